"""Attacks on the tenant lifecycle, one test each, as a tenant (or a leaked key) would try them: two tenants' keys
against a gateway on a real SQLite store (PostgreSQL where it differs), the fine-tuning worker on the same store.
Each test fails on the code before the fix it names (issue 34)."""

from __future__ import annotations

import json
import shutil
import threading

import httpx
import pytest
from sqlalchemy.exc import DataError

from lorafleet.worker import Worker
from serve.gateway.app import ServerThread, create_app
from serve.store import Store
from tests.conftest import MODELS, free_port
from tests.serve.conftest import ADMIN_KEY, KEYS, config, tenant

TINY = str(MODELS / "tiny-random-llama")
ROWS = [{"messages": [{"role": "user", "content": f"ticket {i}"}, {"role": "assistant", "content": "billing"}]}
        for i in range(6)]  # fmt: skip
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
MSG = [{"role": "user", "content": "hi"}]
CAP = 64  # the gateway's max_tokens_cap here


@pytest.fixture
def gw(fake_engine, tiny_adapter_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    root = tmp_path / "adapters"
    for name in ("shared-a", "mine-a", "theirs-a"):
        shutil.copytree(tiny_adapter_root / "tiny-a", root / name)
    (root / "theirs-a" / "marker").write_text("another digest")  # its own version id
    cfg = config(
        [{"name": "fake", "model": TINY, "served_name": "fake-base", "urls": [fake_engine.url]}],
        [
            tenant("acme", ["*"]),
            tenant("globex", ["fake-base", "shared-a"]),
            tenant("tight", ["*"], rpm=3),
            tenant("single", ["*"], fine_tuning_jobs=2, storage_bytes=2 * len(JSONL)),
            tenant("budget", ["*"], usd_per_day=0.001),
        ],  # fmt: skip
        [{"name": "shared-a", "path": "shared-a", "base": "fake-base"}],
        adapters_root=root,
        prices={"fake-base": {"input": 0.1, "output": 0.2, "training": 5.0}},
        store_url=f"sqlite:///{tmp_path / 'store.db'}",
        store_poll_s=0.1,
        max_tokens_cap=CAP,
        max_n=8,
        max_body_bytes=64 * 1024,
        max_file_bytes=512 * 1024,
    )
    server = ServerThread(create_app(cfg), port=free_port()).start()
    server.cfg, server.root = cfg, root
    yield server
    server.stop()


def call(gw, method: str, path: str, who: str | None = "acme", **kw) -> httpx.Response:
    key = ADMIN_KEY if who == "admin" else KEYS.get(who or "", None)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{gw.url}{path}", headers=headers, timeout=30, **kw)


def chat(gw, model: str, who: str = "acme", **body) -> httpx.Response:
    return call(gw, "POST", "/v1/chat/completions", who, json={"model": model, "messages": MSG, **body})


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:400])
    return r.json()["error"]


def upload(gw, who: str = "acme", data: bytes = JSONL) -> str:
    r = call(gw, "POST", "/v1/files", who, files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def create_job(gw, who: str = "acme", **body) -> httpx.Response:
    if "training_file" not in body:
        body["training_file"] = upload(gw, who)
    return call(gw, "POST", "/v1/fine_tuning/jobs", who, json={"model": "fake-base", **body})


def store_of(gw) -> Store:
    return gw.gateway.store


def owned_version(gw, folder: str, owner: str, name: str) -> str:
    """A fine-tuned version as the worker registers one: owned by `owner`, granted to it under its `ft:` name."""
    store = store_of(gw)
    v = store.add_version(name, gw.root / folder, "fake-base", owner=owner, source="ftjob-x")
    store.set_alias(name, [{"version": v.id, "weight": 1.0}], [owner])
    store.grant(name, [owner])
    return v.id


def wait_until(predicate, timeout: float = 10.0) -> bool:
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return True
        done.wait(0.05)
    return False


# -- 1. alias takeover


def test_1_a_job_cannot_name_an_alias_it_does_not_own(gw):
    owned_version(gw, "theirs-a", "globex", "ft:fake-base:globex::ftjob-1")
    theirs = store_of(gw).versions("ft:fake-base:globex::ftjob-1")[0].id
    assert call(gw, "PUT", "/admin/aliases/support", "admin",
                json={"targets": [{"version": theirs}], "tenants": ["globex"]}).status_code == 200  # fmt: skip
    for alias in ("support", "shared-a", "fake-base"):  # another tenant's alias, a configured adapter, a base
        err = error(create_job(gw, promote_if={"alias": alias}), 400)
        assert err["param"] == "promote_if.alias" and err["code"] == "alias_taken", err
        assert "globex" not in err["message"]
    err = error(create_job(gw, promote_if={"alias": "ft:fake-base:globex::ftjob-1"}), 400)  # names as other names
    assert err["param"] == "promote_if.alias"
    assert create_job(gw, promote_if={"alias": "mine"}).status_code == 200


def test_1_promotion_checks_the_alias_again(gw):
    """The alias was free when the job was created; another tenant took it before the job ended."""
    r = create_job(gw, promote_if={"alias": "later", "min_gain": 0.0})
    job = store_of(gw).job(r.json()["id"])
    theirs = owned_version(gw, "theirs-a", "globex", "ft:fake-base:globex::ftjob-2")
    store_of(gw).set_alias("later", [{"version": theirs, "weight": 1.0}], ["globex"])
    mine = owned_version(gw, "mine-a", "acme", f"ft:fake-base:acme::{job.id}")
    Worker(store_of(gw), gw.cfg, name="w").promote(job, mine, {"gain": 0.5})
    assert store_of(gw).alias("later").targets == [{"version": theirs, "weight": 1.0}]
    assert store_of(gw).alias("later").tenants == ["globex"]
    assert any("Not promoted" in e.message for e in store_of(gw).events(job.id, limit=50)[0])


def test_1_an_alias_pointed_back_by_the_operator_revokes_who_was_left_out(gw):
    mine = owned_version(gw, "mine-a", "acme", "ft:fake-base:acme::ftjob-3")
    r = call(gw, "POST", "/admin/versions", "admin", json={"adapter": "prod", "path": "shared-a", "base": "fake-base"})
    shared = r.json()["id"]
    body = {"targets": [{"version": shared}], "tenants": ["acme", "globex"]}
    assert call(gw, "PUT", "/admin/aliases/prod", "admin", json=body).status_code == 200
    assert chat(gw, "prod", "globex").status_code == 200
    assert call(gw, "PUT", "/admin/aliases/prod", "admin", json={**body, "tenants": ["acme"]}).status_code == 200
    assert error(chat(gw, "prod", "globex"), 404)["code"] == "model_not_found"
    assert error(chat(gw, "prod", "tight"), 404)["code"] == "model_not_found"  # '*' is not a way around the list
    assert "prod" not in store_of(gw).tenant_models()["globex"]  # gone from the store too: a restart keeps it gone
    assert chat(gw, "prod", "acme").status_code == 200
    assert mine  # acme's own version stays acme's


# -- 2. unbilled streams


@pytest.mark.parametrize("options,param", [
    ({"include_usage": "false", "continuous_usage_stats": True}, "stream_options.include_usage"),
    ({"include_usage": True, "continuous_usage_stats": "no"}, "stream_options.continuous_usage_stats"),
    ({"include_usage": 0}, "stream_options.include_usage"),
])  # fmt: skip
def test_2_stream_options_of_the_wrong_type_are_refused(gw, options, param):
    r = chat(gw, "fake-base", stream=True, stream_options=options)
    assert error(r, 400)["param"] == param


def test_2_a_stream_always_asks_the_engine_for_usage_and_is_billed(gw, fake_engine):
    before = gw.gateway.tenants.tenants["acme"].usage.completion_tokens
    r = chat(gw, "fake-base", stream=True, max_tokens=7, stream_options={"include_usage": False})
    assert r.status_code == 200 and '"usage"' not in r.text  # stripped: the client did not ask for it
    sent = fake_engine.state.bodies[-1]["stream_options"]
    assert sent["include_usage"] is True and sent["continuous_usage_stats"] is True
    assert gw.gateway.tenants.tenants["acme"].usage.completion_tokens == before + 7


# -- 3. '*' means the shared models


def test_3_star_never_reaches_another_tenants_fine_tuned_models(gw):
    name = "ft:fake-base:globex:x:ftjob-4"
    version = owned_version(gw, "theirs-a", "globex", name)
    assert wait_until(lambda: chat(gw, name, "globex").status_code == 200)  # the gateway has read the store
    for model in (name, version):
        assert error(chat(gw, model, "acme"), 404)["code"] == "model_not_found"
    listed = [m["id"] for m in call(gw, "GET", "/v1/models").json()["data"]]
    assert name not in listed and version not in listed and {"fake-base", "shared-a"} <= set(listed)
    assert chat(gw, "shared-a", "acme").status_code == 200  # shared models stay in '*'


# -- 11. what /metrics tells


def test_11_metrics_labels_name_no_job(gw):
    name = "ft:fake-base:globex:x:ftjob-0123456789abcdef01234567"
    owned_version(gw, "theirs-a", "globex", name)
    assert wait_until(lambda: chat(gw, name, "globex").status_code == 200)
    text = httpx.get(f"{gw.url}/metrics").text
    assert "ftjob-" not in text and 'model="ft:fake-base:globex:x"' in text


# -- 4. one poison job


def test_4_a_file_a_job_needs_cannot_be_deleted(gw):
    fid = upload(gw)
    job = create_job(gw, training_file=fid).json()["id"]
    assert error(call(gw, "DELETE", f"/v1/files/{fid}"), 409)["code"] == "file_in_use"
    call(gw, "POST", f"/v1/fine_tuning/jobs/{job}/cancel")
    assert call(gw, "DELETE", f"/v1/files/{fid}").json()["deleted"]


def test_4_a_job_whose_file_is_gone_fails_alone_and_the_worker_goes_on(gw):
    store = store_of(gw)
    poison = create_job(gw).json()["id"]
    good = create_job(gw, "globex").json()["id"]
    with store.tx() as s:  # its file went missing behind the API's back (a restore, an older lorafleet)
        from serve.store.schema import FileRow

        s.delete(s.get(FileRow, store.job(poison).training_file))
    worker = Worker(store, gw.cfg, name="w")
    claimed = worker.next_job()  # validates both, fails the poison one, claims the other
    assert claimed is not None and claimed.id == good
    failed = store.job(poison)
    assert failed.status == "failed" and failed.error["code"] == "invalid_training_file"
    assert failed.error["param"] == "training_file" and "no longer exists" in failed.error["message"]
    assert str(gw.root.parent) not in json.dumps(failed.error)  # no path of this machine


def test_4_a_file_gone_at_training_time_fails_the_job_cleanly(gw):
    store = store_of(gw)
    jid = create_job(gw).json()["id"]
    worker = Worker(store, gw.cfg, name="w")
    worker.validate_waiting()
    job = store.claim_job("w")
    with store.tx() as s:
        from serve.store.schema import FileRow

        s.delete(s.get(FileRow, job.training_file))
    worker.run(job)
    row = store.job(jid)
    assert row.status == "failed" and row.error["code"] == "invalid_training_file", row.error
    assert "Traceback" not in row.error["message"] and str(gw.root.parent) not in row.error["message"]


# -- 5. a tenant's regex


def test_5_a_catastrophic_scorer_pattern_fails_its_job_naming_the_pattern(gw):
    rows = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a" * 40 + "!"}]}
            for i in range(6)]  # fmt: skip
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    pattern = "(a|aa)+$"  # backtracks through every split of the run of a's: ~1.6x longer per character
    r = create_job(gw, training_file=upload(gw, data=data), validation_file=upload(gw, data=data),
                   scorer={"name": "regex", "pattern": pattern, "group": 1})  # fmt: skip
    jid = r.json()["id"]
    worker = Worker(store_of(gw), gw.cfg, name="w")
    done = threading.Thread(target=worker.validate_waiting, daemon=True)
    done.start()
    done.join(timeout=120)
    assert not done.is_alive(), "the scorer is still matching"
    row = store_of(gw).job(jid)
    assert row.status == "failed" and pattern in row.error["message"], row.error
    assert httpx.get(f"{gw.url}/health").json()["status"] == "ok"


# -- 6. memory and disk


def test_6_every_body_is_capped(gw):
    big = b"{" + b" " * (2 << 20) + b"}"
    for method, path, who in [("POST", "/v1/fine_tuning/jobs", "acme"), ("PUT", "/admin/aliases/x", "admin"),
                              ("POST", "/admin/versions", "admin"), ("POST", "/admin/adapters", "admin"),
                              ("PUT", "/admin/engines/fake/replicas", "admin")]:  # fmt: skip
        assert error(call(gw, method, path, who, content=big), 413)["code"] == "request_too_large", path


def test_6_an_upload_is_cut_at_the_cap_while_it_streams(gw):
    """Chunked, so no Content-Length to refuse up front: the 413 must come while the client is still sending."""
    import socket

    head = (f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['acme']}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n").encode()  # fmt: skip
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'
    with socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(head)
        for data in [part] + [b"x" * (64 * 1024)] * 12:  # 768 KiB, over the 512 KiB cap; never the end
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
        answer = sock.recv(4096)  # times out (fails) if the gateway waits for the rest
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer, answer[:300]
    assert call(gw, "GET", "/v1/files").json()["data"] == []


def test_6_a_long_text_field_and_many_bad_lines_are_cheap_refusals(gw):
    r = call(gw, "POST", "/v1/files", files={"file": ("t.jsonl", JSONL)}, data={"purpose": "p" * 20_000})
    assert error(r, 400)["param"] == "file"
    r = call(gw, "POST", "/v1/files", files={"file": ("t.jsonl", b"{bad\n" * 3000)}, data={"purpose": "fine-tune"})
    err = error(r, 400)
    assert "3000 bad line(s)" in err["message"] and "(and 2990 more)" in err["message"]
    assert len(err["message"]) < 4000


# -- 7. training limits


def test_7_a_tenant_has_a_cap_on_jobs_not_ended(gw):
    fid = upload(gw, "single")
    jobs = [create_job(gw, "single", training_file=fid).json()["id"] for _ in range(2)]
    assert error(create_job(gw, "single", training_file=fid), 429)["code"] == "quota_exceeded"
    call(gw, "POST", f"/v1/fine_tuning/jobs/{jobs[0]}/cancel", "single")  # one ends: room for one more
    assert create_job(gw, "single", training_file=fid).status_code == 200


def test_7_a_tenant_has_a_cap_on_stored_bytes(gw):
    upload(gw, "single")
    upload(gw, "single")
    r = call(gw, "POST", "/v1/files", "single", files={"file": ("t.jsonl", JSONL)}, data={"purpose": "fine-tune"})
    assert error(r, 429)["code"] == "quota_exceeded"
    assert len(store_of(gw).files("single")) == 2


def test_7_training_is_billed_into_the_ledger_metrics_and_budgets(gw):
    from tests.serve.conftest import scrape

    job = store_of(gw).job(create_job(gw, "budget").json()["id"])
    Worker(store_of(gw), gw.cfg, name="w").bill(job, 1000)  # 1,000 trained tokens at $5 per 1M
    assert store_of(gw).usage_totals()["budget"]["cost_nano_usd"] == 5_000_000
    assert wait_until(lambda: gw.gateway.tenants.tenants["budget"].usage.cost_nano_usd == 5_000_000)
    assert scrape(gw.url, "lorafleet_tokens_total", tenant="budget", kind="trained") == 1000
    assert scrape(gw.url, "lorafleet_cost_usd_total", tenant="budget") == pytest.approx(0.005)
    err = error(create_job(gw, "budget", training_file=job.training_file), 429)  # $0.005 of a $0.001 day
    assert err["code"] == "insufficient_quota"


def test_7_files_and_jobs_routes_count_against_rpm(gw):
    codes = [call(gw, "GET", "/v1/fine_tuning/jobs", "tight").status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]


def test_7_the_worker_claims_round_robin_across_tenants(gw):
    store = store_of(gw)
    fid = upload(gw)
    flood = [create_job(gw, training_file=fid).json()["id"] for _ in range(3)]
    other = create_job(gw, "globex").json()["id"]
    for jid in [*flood, other]:
        store.update_job(jid, status="queued")
    first = store.claim_job("w1")
    second = store.claim_job("w2")
    assert first.id == flood[0] and second.id == other  # globex does not wait behind acme's three


# -- 8. a prompt list multiplies n


def test_8_prompts_times_n_is_capped_like_n(gw):
    body = {"model": "fake-base", "prompt": ["x"] * 5, "n": 2, "max_tokens": 1}
    err = error(call(gw, "POST", "/v1/completions", json=body), 400)
    assert err["param"] == "prompt" and "10 generations" in err["message"]
    assert call(gw, "POST", "/v1/completions", json={**body, "n": 1}).status_code == 200
    assert call(gw, "POST", "/v1/completions", json={**body, "prompt": [1, 2, 3] * 50, "n": 8}).status_code == 200


# -- 9. inputs that gave a 500


def test_9_crafted_inputs_get_4xx(gw):
    deep = b"[" * 100_000 + b"]" * 100_000 + b"\n"
    digits = b'{"prompt": "a", "completion": "' + b"b" + b'", "x": ' + b"9" * 5000 + b"}\n"
    for data in (deep, digits):
        r = call(gw, "POST", "/v1/files", files={"file": ("t.jsonl", JSONL + data)}, data={"purpose": "fine-tune"})
        assert error(r, 400)["param"] == "file"
    fid = upload(gw)
    for extra, param in [({"method": {"supervised": "x"}}, "method.supervised"),
                         ({"method": {"supervised": [1]}}, "method.supervised"),
                         ({"method": "supervised"}, "method"),
                         ({"scorer": {"name": ["exact"]}}, "scorer"),
                         ({"scorer": {"name": "regex", "pattern": "(" * 5000 + "a" + ")" * 5000}}, "scorer")]:  # fmt: skip
        err = error(create_job(gw, training_file=fid, **extra), 400)
        assert err["param"] is not None and err["param"].startswith(param), (extra, err)
    job = create_job(gw, training_file=fid).json()["id"]
    for after in ("ftevent-" + "9" * 20, "ftevent-" + "9" * 5000):
        assert error(call(gw, "GET", f"/v1/fine_tuning/jobs/{job}/events", params={"after": after}), 400)


# -- 10. max_tokens


def test_10_a_request_without_max_tokens_gets_the_cap(gw, fake_engine):
    assert chat(gw, "fake-base").status_code == 200
    assert fake_engine.state.bodies[-1]["max_tokens"] == CAP


# -- 12. errors in the caller's terms


def test_12_an_engine_error_names_the_alias_not_the_version_behind_it(gw, fake_engine):
    version = owned_version(gw, "theirs-a", "globex", "ft:fake-base:globex::ftjob-5")
    body = {"targets": [{"version": version}], "tenants": ["globex"]}
    assert call(gw, "PUT", "/admin/aliases/support", "admin", json=body).status_code == 200
    fake_engine.stop()
    err = error(chat(gw, "support", "globex"), 503)
    assert "'support'" in err["message"] and "ftjob" not in err["message"] and "@" not in err["message"], err


# -- 13. PostgreSQL's column widths


def test_13_long_names_on_postgresql_are_400_and_leave_nothing(fake_engine, tiny_adapter_root, postgres, tmp_path,
                                                               monkeypatch):  # fmt: skip
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    url = postgres.fresh_database("attacks13")
    cfg = config([{"name": "fake", "model": TINY, "served_name": "fake-base", "urls": [fake_engine.url]}],
                 [tenant("acme", ["*"])], adapters_root=tiny_adapter_root, store_url=url)  # fmt: skip
    server = ServerThread(create_app(cfg), port=free_port()).start()
    try:
        r = call(server, "POST", "/v1/files", files={"file": ("n" * 600, JSONL)}, data={"purpose": "fine-tune"})
        assert error(r, 400)["param"] == "file"
        assert error(call(server, "PUT", "/admin/aliases/" + "a" * 300, "admin",
                          json={"targets": [{"version": "x"}]}), 400)["param"] == "name"  # fmt: skip
        body = {"adapter": "v" * 64, "path": "tiny-a", "base": "fake-base"}  # id: 64 characters + @ + digest
        assert call(server, "POST", "/admin/versions", "admin", json=body).status_code == 201
        store = server.gateway.store
        with pytest.raises(DataError):  # past the API's check, the database refuses: no file is left behind
            store.add_file("acme", "fine-tune", "n" * 600, JSONL, tmp_path / "orphans", 6)
        assert list((tmp_path / "orphans").iterdir()) == []
    finally:
        server.stop()
