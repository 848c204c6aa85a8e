"""The state store against a real SQLite file and a real PostgreSQL server: the same behaviour on both."""

from __future__ import annotations

import threading

import pytest

from serve.store import Store, StoreError
from tests.serve.conftest import make_random_adapter


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()


def test_state_survives_reopening(store_url, tmp_path, smollm2_path):
    s = Store(store_url)
    s.seed_tenants([{"name": "acme", "key_hashes": ["sha256:" + "a" * 64], "models": ["base"]}])
    s.grant("tickets", ["acme"])
    v = s.add_version("tickets", make_random_adapter(smollm2_path, tmp_path / "v1", seed=1), "base", owner="acme")
    s.set_alias("tickets", [{"version": v.id, "weight": 1.0}], ["acme"])
    s.record_usage([{"tenant": "acme", "model": "tickets", "version": v.id, "requests": 3, "prompt_tokens": 30,
                     "completion_tokens": 7, "cost_usd": 0.1 + 0.2}])  # fmt: skip
    s.close()
    again = Store(store_url)  # the migrations run again on a migrated database: nothing changes
    assert again.tenant_models()["acme"] == ["base", "tickets"]
    assert again.alias("tickets").targets == [{"version": v.id, "weight": 1.0}]
    assert again.usage_totals()["acme"] == {"requests": 3, "prompt_tokens": 30, "completion_tokens": 7,
                                            "cost_nano_usd": 300_000_000}  # fmt: skip
    # seeding again replaces the keys but keeps the grants made at run time
    again.seed_tenants([{"name": "acme", "key_hashes": ["sha256:" + "b" * 64], "models": ["base"]}])
    assert again.tenant_models()["acme"] == ["base", "tickets"]
    again.close()


def test_versions_are_named_by_content(store, tmp_path, smollm2_path):
    a = make_random_adapter(smollm2_path, tmp_path / "a", seed=1)
    b = make_random_adapter(smollm2_path, tmp_path / "b", seed=2)
    va, vb = store.add_version("x", a, "base"), store.add_version("x", b, "base")
    assert va.id.startswith("x@") and va.id != vb.id
    assert store.add_version("x", a, "base").id == va.id  # the same files: the same version, not a new one
    assert [v.id for v in store.versions("x")] == [va.id, vb.id]


def test_aliases_split_roll_back_and_refuse_bad_targets(store, tmp_path, smollm2_path):
    v1 = store.add_version("x", make_random_adapter(smollm2_path, tmp_path / "a", seed=1), "base").id
    v2 = store.add_version("x", make_random_adapter(smollm2_path, tmp_path / "b", seed=2), "base").id
    store.set_alias("prod", [{"version": v1, "weight": 1.0}])
    store.set_alias("prod", [{"version": v1, "weight": 0.9}, {"version": v2, "weight": 0.1}])
    assert store.rollback("prod").targets == [{"version": v1, "weight": 1.0}]
    assert len(store.history("prod")) == 3
    for bad, msg in [([], "at least one"), ([{"version": "x@nope", "weight": 1}], "no version 'x@nope'"),
                     ([{"version": v1, "weight": 0.5}], "must sum to 1"),
                     ([{"version": v1, "weight": 0}], "weight: must be in")]:  # fmt: skip
        with pytest.raises(StoreError, match=msg):
            store.set_alias("prod", bad)
    assert store.alias("prod").targets == [{"version": v1, "weight": 1.0}]  # nothing half-written
    with pytest.raises(StoreError, match="no earlier target"):
        store.set_alias("new", [{"version": v2, "weight": 1}]) and store.rollback("new")


def test_files_and_jobs_belong_to_their_tenant(store, tmp_path):
    f = store.add_file("acme", "fine-tune", "train.jsonl", b'{"prompt": "a", "completion": "b"}\n', tmp_path, 1)
    assert store.file(f.id, "acme").bytes == 35 and store.file(f.id, "globex") is None
    assert store.delete_file(f.id, "globex") is False and store.file(f.id, "acme") is not None
    job = store.create_job(tenant="acme", model="base", training_file=f.id, status="queued")
    assert store.job(job.id, "globex") is None and store.job(job.id, "acme").status == "queued"
    page, more = store.jobs("acme")
    assert [j.id for j in page] == [job.id] and not more and store.jobs("globex") == ([], False)
    with pytest.raises(StoreError, match="has not ended"):  # a job that is not over still needs its file
        store.delete_file(f.id, "acme")
    store.update_job(job.id, status="cancelled")
    assert store.delete_file(f.id, "acme") and not (tmp_path / f.id).exists()


def test_each_queued_job_is_claimed_once_by_concurrent_workers(store):
    ids = {store.create_job(tenant="acme", model="base", training_file="file-x", status="queued").id for _ in range(6)}
    claimed: list[str] = []

    def work(name: str) -> None:
        while (job := store.claim_job(name)) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    assert all(store.job(j).status == "running" and store.job(j).attempts == 1 for j in ids)


def test_events_page_newest_first_and_stale_jobs_are_found(store):
    job = store.create_job(tenant="acme", model="base", training_file="file-x", status="queued")
    for i in range(5):
        store.event(job.id, f"step {i}", data={"step": i})
    page, more = store.events(job.id, limit=3)
    assert [e.message for e in page] == ["step 4", "step 3", "step 2"] and more
    rest, more = store.events(job.id, after=page[-1].id, limit=10)
    assert [e.message for e in rest] == ["step 1", "step 0", "Created fine-tuning job"] and not more
    assert store.claim_job("w").id == job.id
    assert store.stale_jobs(older_than_s=3600) == [] and [j.id for j in store.stale_jobs(older_than_s=-1)] == [job.id]
    store.update_job(job.id, cancel_requested=1)
    assert store.heartbeat(job.id) is False  # the worker learns of the cancel on its next beat


def test_the_in_memory_store_takes_one_transaction_at_a_time_from_many_threads():
    """`memory` (the default) is one SQLite connection for every thread: the gateway's and a worker's transactions
    must not interleave on it (they did: "cannot commit - no transaction is active", and the worker thread died)."""
    store = Store("memory")
    jid = store.create_job(tenant="acme", model="base", training_file="file-x", status="queued").id
    errors: list[Exception] = []

    def write(i: int) -> None:
        try:
            for k in range(40):
                store.event(jid, f"thread {i} event {k}")
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(e.message.startswith("thread ") for e in store.events(jid, limit=1000)[0]) == 160
    store.close()


def test_caps_hold_under_concurrent_requests_on_postgresql(postgres, tmp_path):
    """Eight requests of one tenant at once against a cap of 2: the check and the insert are one transaction,
    the tenant's row locked, so exactly two get through (a check before the write let all eight in)."""
    from concurrent.futures import ThreadPoolExecutor

    from serve.store.store import QuotaExceeded

    store = Store(postgres.fresh_database("caps"))
    store.seed_tenants([{"name": "acme", "key_hashes": [], "models": []}])

    def attempt(kind: str) -> bool:
        try:
            if kind == "job":
                store.create_job(max_active=2, tenant="acme", model="base", training_file="f", status="queued")
            else:
                store.add_file("acme", "fine-tune", "t.jsonl", b"x" * 100, tmp_path, 1, quota=250)
            return True
        except QuotaExceeded:
            return False

    for kind in ("job", "file"):
        with ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(attempt, [kind] * 8)) == 2, kind
    assert len(store.files("acme")) == 2 and len(list(tmp_path.iterdir())) == 2  # the refused left no file
    store.close()
