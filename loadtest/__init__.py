"""lorafleet's load, cost and quality harness: `lorafleet bench run|compare|headroom`, and locustfile.py.

It talks to targets over HTTP only (any OpenAI-compatible endpoint); nothing else in lorafleet imports it.
"""
