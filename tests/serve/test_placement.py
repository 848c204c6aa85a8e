"""Adapter placement over engine replicas: bounded-load consistent hashing (unit tables), the engines' own load
from /metrics, LRU eviction within max_cpu_loras, replicas added and removed at run time (admin API, DNS)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from lorafleet.core.net import free_port
from serve.config import parse_config
from serve.gateway.app import ServerThread, create_app
from serve.gateway.metrics import Metrics
from serve.gateway.registry import Registry, Replica, bounded, engine_load, rendezvous
from tests.conftest import MODELS
from tests.serve.conftest import ADMIN_KEY, KEYS, config, tenant
from tests.serve.fake_engine import FakeEngine, wait_for

TINY = str(MODELS / "tiny-random-llama")
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "hello there"}]


def replicas(*loads, down=()):
    out = [Replica(f"e-{i}", f"http://e{i}", "g", False, up=i not in down) for i in range(len(loads))]
    for r, load in zip(out, loads, strict=True):
        r.inflight = load
    return out


@pytest.mark.parametrize(
    ("loads", "down", "first", "why"),
    [
        ((0, 0), (), "e-0", "idle: the adapter's own replica"),
        ((1, 0), (), "e-0", "1+1 <= ceil(1.25 * 2 / 2) = 2: stays home"),
        ((2, 0), (), "e-1", "2+1 > ceil(1.25 * 3 / 2) = 2: spills"),
        ((5, 4), (), "e-0", "5+1 <= ceil(1.25 * 10 / 2) = 7: both busy, stays home"),
        ((8, 0, 0), (), "e-1", "spills to the next in its own ranking, not any idle replica (locality)"),
        ((8, 8, 0), (), "e-2", "both ranked first are over the bound: the third"),
        ((0, 0), (0,), "e-1", "its replica is down"),
    ],
)
def test_bounded_load_table(loads, down, first, why):
    ranked = replicas(*loads, down=down)
    order = bounded(ranked, 1.25)
    assert order[0].name == first, why
    assert sorted(r.name for r in order) == sorted(r.name for r in ranked)  # every replica is still a fallback


def test_other_gateways_load_counts_through_the_engines_own_metrics():
    home, other = replicas(0, 0)
    home.engine_load, home.inflight_at_scrape = 6, 0  # six requests from other gateways at the last scrape
    assert bounded([home, other], 1.25)[0] is other
    home.inflight_at_scrape = 6  # ...or were they ours, already counted in inflight
    home.inflight = 6
    assert home.load == 6


def test_engine_load_reads_running_and_waiting_from_vllm_metrics():
    text = """# HELP vllm:num_requests_running Number of requests in model execution batches.
vllm:num_requests_running{engine="0",model_name="smollm2"} 3.0
vllm:num_requests_waiting{engine="0",model_name="smollm2"} 2.0
vllm:num_requests_waiting_by_reason{reason="capacity"} 9.0
vllm:num_preemptions_total{engine="0"} 7.0
"""
    assert engine_load(text) == 5


def _registry(placement: str) -> Registry:
    urls = [f"http://127.0.0.1:{9000 + i}" for i in range(3)]
    cfg = parse_config({"gateway": {"placement": placement}, "engines": [
        {"name": "e", "model": "m", "served_name": "base", "urls": urls}]})  # fmt: skip
    reg = Registry(cfg, Metrics(), {})
    for r in reg.groups["e"]:
        r.up = True
    reg.add_adapter("a1@abc", None, "base")
    return reg


def test_pinned_placement_never_spills_and_bounded_does():
    for placement, spills in (("pinned", False), ("bounded", True)):
        reg = _registry(placement)
        model = reg.models["a1@abc"]
        home = rendezvous("a1", [r.name for r in reg.groups["e"]])[0]
        reg.replica(home).inflight = 10
        assert (reg.route(model)[0].name != home) is spills, placement


def _adapter_root(tmp_path, names):
    from tests.serve.conftest import make_random_adapter

    for i, n in enumerate(names):
        make_random_adapter(MODELS / "tiny-random-llama", tmp_path / n, seed=i)
    return tmp_path


def _chat(gw, model, **extra):
    body = {"model": model, "messages": MSG, "max_tokens": 2, **extra}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS['acme']}"},
                      timeout=30)  # fmt: skip


def test_least_recently_used_idle_adapter_is_unloaded_at_max_cpu_loras(tmp_path, fake_engine):
    root = _adapter_root(tmp_path, ["a", "b", "c"])
    engine = {"name": "fake", "model": TINY, "served_name": "fake-base", "urls": [fake_engine.url],
              "max_loras": 1, "max_cpu_loras": 2}  # fmt: skip
    adapters = [{"name": n, "path": n, "base": "fake-base"} for n in "abc"]
    gw = ServerThread(create_app(config([engine], [tenant("acme", ["*"])], adapters, adapters_root=root)),
                      port=free_port()).start()  # fmt: skip
    try:
        for n in ("a", "b", "a"):  # b is now the least recently used
            assert _chat(gw, n).status_code == 200
        assert _chat(gw, "c").status_code == 200
        held = {v.split("@")[0] for v in fake_engine.state.loaded}
        assert held == {"a", "c"}, held
        assert len(fake_engine.state.loaded) == 2
        assert (
            httpx.get(f"{gw.url}/metrics").text.count(
                'lorafleet_adapter_loads_total{adapter="b",result="evicted"} 1.0'
            )
            == 1
        )
        # an adapter with a request in flight is never the one unloaded
        fake_engine.state.token_delay = 0.3
        slow = threading.Thread(target=lambda: _chat(gw, "a", stream=True, max_tokens=8))
        slow.start()
        assert wait_for(lambda: fake_engine.state.running == 1)
        time.sleep(0.1)
        fake_engine.state.token_delay = 0.0
        assert _chat(gw, "b").status_code == 200  # a is older than c but busy: c goes
        slow.join()
        assert {v.split("@")[0] for v in fake_engine.state.loaded} == {"a", "b"}
    finally:
        gw.stop()


def test_replicas_join_and_leave_through_the_admin_api_without_a_restart(tmp_path):
    root = _adapter_root(tmp_path, ["hot"])
    e1, e2 = FakeEngine(free_port()).start(), FakeEngine(free_port()).start()
    engine = {"name": "fake", "model": TINY, "served_name": "fake-base", "urls": [e1.url]}
    cfg = config([engine], [tenant("acme", ["*"])], [{"name": "hot", "path": "hot", "base": "fake-base"}],
                 adapters_root=root, placement="bounded")  # fmt: skip
    gw = ServerThread(create_app(cfg), port=free_port()).start()
    try:
        assert _chat(gw, "hot").status_code == 200 and e1.state.requests == 1
        r = httpx.put(f"{gw.url}/admin/engines/fake/replicas", json={"urls": [e1.url, e2.url]}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert [x["up"] for x in r.json()["replicas"]] == [True, True]
        # a hot adapter with requests held open spills onto the new replica
        for e in (e1, e2):
            e.state.token_delay = 0.2
        threads = [threading.Thread(target=_chat, args=(gw, "hot"), kwargs={"stream": True, "max_tokens": 10})
                   for _ in range(6)]  # fmt: skip
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert e1.state.requests > 1 and e2.state.requests > 0, (e1.state.requests, e2.state.requests)
        # the first replica leaves: everything goes to the second, still no restart
        r = httpx.put(f"{gw.url}/admin/engines/fake/replicas", json={"urls": [e2.url]}, headers=ADMIN)
        assert [x["url"] for x in r.json()["replicas"]] == [e2.url]
        before = e1.state.requests
        for e in (e1, e2):
            e.state.token_delay = 0.0
        assert all(_chat(gw, "hot").status_code == 200 for _ in range(3)) and e1.state.requests == before
        listed = httpx.get(f"{gw.url}/admin/engines", headers=ADMIN).json()["engines"]
        assert listed[0]["replicas"][0]["adapters"] and listed[0]["replicas"][0]["url"] == e2.url
        # bad input: a clear 4xx naming the field, nothing changed
        bad = httpx.put(f"{gw.url}/admin/engines/fake/replicas", json={"urls": ["not a url"]}, headers=ADMIN)
        assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("urls")
        assert httpx.put(f"{gw.url}/admin/engines/nope/replicas", json={"urls": [e2.url]},
                         headers=ADMIN).status_code == 404  # fmt: skip
        assert httpx.get(f"{gw.url}/admin/engines", headers=ADMIN).json()["engines"][0]["replicas"][0]["url"] == e2.url
    finally:
        gw.stop()
        e1.stop()
        e2.stop()


def test_an_engine_found_by_dns_is_served(fake_engine):
    engine = {"name": "fake", "model": TINY, "served_name": "fake-base", "dns": f"localhost:{fake_engine.port}"}
    gw = ServerThread(create_app(config([engine], [tenant("acme", ["*"])])), port=free_port()).start()
    try:
        assert _chat(gw, "fake-base").status_code == 200
        urls = [r["url"] for r in httpx.get(f"{gw.url}/admin/engines", headers=ADMIN).json()["engines"][0]["replicas"]]
        assert f"http://127.0.0.1:{fake_engine.port}" in urls
    finally:
        gw.stop()


def test_merged_adapters_get_replicas_like_base_models():
    cfg = parse_config({"engines": [{"name": "e", "model": "m", "served_name": "base", "urls": ["http://127.0.0.1:1"]}],
                        "adapters": [{"name": "hot", "path": "hot", "base": "base", "mode": "merged", "port": 9100,
                                      "replicas": 2}]})  # fmt: skip
    reg = Registry(cfg, Metrics(), {})
    assert [(r.name, r.url) for r in reg.groups["merged-hot"]] == [
        ("merged-hot-0", "http://127.0.0.1:9100"), ("merged-hot-1", "http://127.0.0.1:9101")]  # fmt: skip
    with pytest.raises(Exception, match="port/url/replicas only apply to mode: merged"):
        parse_config({"engines": [{"name": "e", "model": "m", "served_name": "base", "urls": ["http://127.0.0.1:1"]}],
                      "adapters": [{"name": "x", "path": "x", "base": "base", "replicas": 2}]})  # fmt: skip


class Dropper:
    """An engine that dies under every request: /health answers, a POST gets its connection closed unanswered
    (what a replica killed mid-request, or a dropped kept-alive connection, looks like to the gateway)."""

    def __init__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.dropped = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = conn.recv(65536)
                if head.startswith(b"GET"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                else:
                    self.dropped += 1  # closed without a byte of answer

    def stop(self) -> None:
        self.sock.close()


def test_a_replica_that_closes_the_connection_unanswered_fails_over(fake_engine):
    dropper = Dropper()
    engine = {"name": "fake", "model": TINY, "served_name": "fake-base", "urls": [dropper.url, fake_engine.url]}
    gw = ServerThread(create_app(config([engine], [tenant("acme", ["*"])])), port=free_port()).start()
    try:
        r = _chat(gw, "fake-base")
        assert r.status_code == 200 and fake_engine.state.requests == 1
        assert dropper.dropped == 2  # tried first (twice: once more on a fresh connection); the client never knew
    finally:
        gw.stop()
        dropper.stop()
