"""Versioned adapters and aliases through the real gateway over a fake engine, with a real SQLite store: a swap
under load has no errors and never serves the old weights after it, a canary split is sticky, the gateway comes
back from a restart with everything, and bad admin input changes nothing."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from serve.gateway.app import ServerThread, create_app
from serve.store import Store
from tests.conftest import MODELS, free_port
from tests.serve.conftest import ADMIN_KEY, KEYS, config, make_random_adapter, tenant

TINY = MODELS / "tiny-random-llama"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def versions_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    for i in range(5):
        make_random_adapter(TINY, root / f"v{i}", seed=100 + i)
    return root


def gateway_config(fake_engine, root, store_url):
    engine = {"name": "fake", "model": str(TINY), "served_name": "fake-base", "urls": [fake_engine.url]}
    tenants = [tenant("acme", ["fake-base"]), tenant("globex", ["fake-base"]), tenant("meter", ["fake-base"])]
    return config([engine], tenants, adapters_root=root, store_url=store_url, store_poll_s=0.2)


def start(cfg) -> ServerThread:
    return ServerThread(create_app(cfg), port=free_port()).start()


def version(gw, i: int, owner: str | None = None) -> str:
    body = {"adapter": "support", "path": f"v{i}", "base": "fake-base", "owner": owner}
    r = httpx.post(f"{gw.url}/admin/versions", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def point(gw, alias: str, targets: list, tenants: list[str]) -> httpx.Response:
    return httpx.put(f"{gw.url}/admin/aliases/{alias}", json={"targets": targets, "tenants": tenants}, headers=ADMIN)


def chat(gw, who: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": MSG, "max_tokens": 4, **extra}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS[who]}"})


@pytest.fixture
def gw(fake_engine, versions_root, tmp_path):
    server = start(gateway_config(fake_engine, versions_root, f"sqlite:///{tmp_path / 'store.db'}"))
    yield server
    server.stop()


def test_versions_are_named_by_content_and_the_engine_gets_that_name(gw, fake_engine):
    v0 = version(gw, 0)
    assert v0.startswith("support@") and version(gw, 0) == v0  # same files, same version
    assert point(gw, "support", [{"version": v0, "weight": 1}], ["acme"]).status_code == 200
    r = chat(gw, "acme", "support")
    assert r.status_code == 200 and r.json()["model"] == v0  # like OpenAI: the alias resolves to a snapshot name
    assert fake_engine.state.bodies[-1]["model"] == v0
    assert chat(gw, "globex", "support").status_code == 404  # not granted: as if it did not exist
    ids = [m["id"] for m in httpx.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {KEYS['acme']}"})
           .json()["data"]]  # fmt: skip
    assert "support" in ids and v0 not in ids  # tenants see aliases, not version ids


def test_a_swap_under_load_has_no_errors_and_the_old_version_is_retired(gw, fake_engine):
    fake_engine.state.token_delay = 0.01
    v1, v2 = version(gw, 1), version(gw, 2)
    assert point(gw, "support", [{"version": v1, "weight": 1}], ["acme"]).status_code == 200
    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                body = {"model": "support", "messages": MSG, "max_tokens": 8, "stream": True}
                with c.stream("POST", f"{gw.url}/v1/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {KEYS['acme']}"}) as r:  # fmt: skip
                    text = "".join(r.iter_text())
                results.append((time.monotonic(), r.status_code, text))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    t_ask = time.monotonic()
    assert point(gw, "support", [{"version": v2, "weight": 1}], ["acme"]).status_code == 200
    t_moved = time.monotonic()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert len(results) > 50 and all(code == 200 and "[DONE]" in text for _, code, text in results)
    after = [text for t, _, text in results if t > t_moved + 0.5]
    assert after and all(v2 in text for text in after)  # answered by the new version only
    print(f"\nswap under load: {len(results)} streams, 0 errors, alias moved {1000 * (t_moved - t_ask):.0f} ms "
          "after the request")  # fmt: skip
    deadline = time.monotonic() + 5
    while v1 in fake_engine.state.loaded:  # unloaded once its last in-flight request ended
        assert time.monotonic() < deadline, "the old version was never unloaded"
        time.sleep(0.1)
    assert v2 in fake_engine.state.loaded


def test_a_canary_split_is_sticky_per_user_and_near_its_weights(gw, fake_engine):
    v1, v2 = version(gw, 1), version(gw, 2)
    r = point(gw, "support", [{"version": v1, "weight": 0.9}, {"version": v2, "weight": 0.1}], ["acme"])
    assert r.status_code == 200, r.text
    got = Counter(chat(gw, "acme", "support", user=f"user-{i}").json()["model"] for i in range(200))
    assert got[v1] + got[v2] == 200 and 8 <= got[v2] <= 35  # 10 % of 200 = 20, binomial sd 4.2
    assert {chat(gw, "acme", "support", user="user-7").json()["model"] for _ in range(5)} == {
        chat(gw, "acme", "support", user="user-7").json()["model"]}  # fmt: skip


def test_bad_alias_input_is_refused_and_changes_nothing(gw):
    v1, mine = version(gw, 1), version(gw, 3, owner="globex")
    assert point(gw, "support", [{"version": v1, "weight": 1}], ["acme"]).status_code == 200
    cases = [
        ([{"version": v1, "weight": 0.6}], ["acme"], "targets", "must sum to 1"),
        ([{"version": "support@000000000000", "weight": 1}], ["acme"], "targets.0.version", "no version"),
        ([{"version": mine, "weight": 1}], ["acme"], "targets.0.version", "no version"),  # globex's own version
        ([{"version": v1, "weight": 1}], ["nobody"], "tenants", "unknown"),
        ([], ["acme"], "targets", "at least 1"),
    ]
    for targets, tenants, param, message in cases:
        r = point(gw, "support", targets, tenants)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param and message in err["message"], (targets, err)
    alias = httpx.get(f"{gw.url}/admin/aliases/support", headers=ADMIN).json()
    assert alias["targets"] == [{"version": v1, "weight": 1.0}] and len(alias["history"]) == 1
    r = httpx.post(f"{gw.url}/admin/aliases/support/rollback", headers=ADMIN)
    assert r.status_code == 400 and "no earlier target" in r.json()["error"]["message"]
    assert httpx.post(f"{gw.url}/admin/aliases/nope/rollback", headers=ADMIN).status_code == 404


def test_rollback_points_back_at_the_previous_target(gw):
    v1, v2 = version(gw, 1), version(gw, 2)
    point(gw, "support", [{"version": v1, "weight": 1}], ["acme"])
    point(gw, "support", [{"version": v2, "weight": 1}], ["acme"])
    assert chat(gw, "acme", "support").json()["model"] == v2
    r = httpx.post(f"{gw.url}/admin/aliases/support/rollback", headers=ADMIN)
    assert r.status_code == 200 and r.json()["targets"] == [{"version": v1, "weight": 1.0}]
    assert chat(gw, "acme", "support").json()["model"] == v1


def test_a_restarted_gateway_has_every_alias_and_the_same_usage(fake_engine, versions_root, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    gw = start(gateway_config(fake_engine, versions_root, url))
    vs = [version(gw, i) for i in range(5)]
    assert point(gw, "support", [{"version": vs[0], "weight": 0.9}, {"version": vs[1], "weight": 0.1}],
                 ["acme", "meter"]).status_code == 200  # fmt: skip
    assert point(gw, "triage", [{"version": vs[2], "weight": 1}], ["globex"]).status_code == 200
    for who, alias in [("acme", "support"), ("meter", "support"), ("globex", "triage")] * 5:
        assert chat(gw, who, alias).status_code == 200
    before = {t["name"]: t["usage"] for t in httpx.get(f"{gw.url}/admin/tenants", headers=ADMIN).json()["tenants"]}
    gw.stop()

    store = Store(url)
    ledger = store.usage_totals()  # what the stopped gateway left in the store
    assert store.usage_by_model("globex") == {("triage", vs[2]): 5}  # billed by alias and the version that answered
    assert sum(n for (m, v), n in store.usage_by_model("acme").items() if m == "support" and v in vs[:2]) == 5
    for name, u in before.items():
        assert ledger.get(name, {}).get("requests", 0) == u["requests"], name
        assert ledger.get(name, {}).get("completion_tokens", 0) == u["completion_tokens"], name
        assert ledger.get(name, {}).get("cost_nano_usd", 0) == round(u["cost_usd"] * 1e9), name

    t0 = time.monotonic()
    again = start(gateway_config(fake_engine, versions_root, url))
    try:
        after = {
            t["name"]: t["usage"] for t in httpx.get(f"{again.url}/admin/tenants", headers=ADMIN).json()["tenants"]
        }
        for name in before:  # billed before the restart is still billed, exactly
            for key in ("requests", "prompt_tokens", "completion_tokens", "cost_usd"):
                assert after[name][key] == before[name][key], (name, key)
        for who, alias in [("acme", "support"), ("meter", "support"), ("globex", "triage")]:
            assert chat(again, who, alias).status_code == 200
        print(f"\nrestart: every alias answered {time.monotonic() - t0:.2f} s after the new gateway was started")
        assert len(httpx.get(f"{again.url}/admin/versions", headers=ADMIN).json()["versions"]) == 5
    finally:
        again.stop()


def test_two_gateways_on_one_postgresql_follow_each_other(fake_engine, versions_root, postgres):
    url = postgres.fresh_database("two_gateways")
    a, b = (start(gateway_config(fake_engine, versions_root, url)) for _ in range(2))
    try:
        v1, v2 = version(a, 1), version(a, 2)
        assert point(a, "support", [{"version": v1, "weight": 1}], ["acme"]).status_code == 200
        deadline = time.monotonic() + 10  # b reads the store every store_poll_s (0.2 s here)
        while chat(b, "acme", "support").status_code != 200:
            assert time.monotonic() < deadline, "gateway b never served the alias made on gateway a"
            time.sleep(0.1)
        assert chat(b, "acme", "support").json()["model"] == v1
        assert point(b, "support", [{"version": v2, "weight": 1}], ["acme"]).status_code == 200
        while chat(a, "acme", "support").json()["model"] != v2:
            assert time.monotonic() < deadline + 10, "gateway a never followed the move made on gateway b"
            time.sleep(0.1)
    finally:
        a.stop()
        b.stop()


def test_an_adapter_registered_at_run_time_survives_a_restart_and_its_delete_too(fake_engine, versions_root, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    gw = start(gateway_config(fake_engine, versions_root, url))
    body = {"name": "hot", "path": "v4", "base": "fake-base", "tenants": ["globex"]}
    assert httpx.post(f"{gw.url}/admin/adapters", json=body, headers=ADMIN).status_code == 201
    assert chat(gw, "globex", "hot").status_code == 200 and chat(gw, "acme", "hot").status_code == 404
    gw.stop()
    gw = start(gateway_config(fake_engine, versions_root, url))  # before: 404 for everyone after a restart
    try:
        assert chat(gw, "globex", "hot").status_code == 200 and chat(gw, "acme", "hot").status_code == 404
        assert httpx.delete(f"{gw.url}/admin/adapters/hot", headers=ADMIN).status_code == 200
        assert chat(gw, "globex", "hot").status_code == 404
    finally:
        gw.stop()
    gw = start(gateway_config(fake_engine, versions_root, url))
    try:
        assert chat(gw, "globex", "hot").status_code == 404  # deleted stays deleted
    finally:
        gw.stop()
