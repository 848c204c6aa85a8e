"""The base layer: what every stage shares and that imports nothing else of lorafleet.

paths (where run-time artefacts live), errors (one hierarchy), blocks (report rendering), tasks (the task and
scorer interface), vllm (what vLLM accepts: LoRA ranks, target modules), net (local ports).
"""
