"""The fine-tuning worker on a real store and the real trainer (the tiny random model: seconds, not minutes):
a job runs to a registered, servable version; the gate; cancel; a crashed worker's job is retried, then failed."""

from __future__ import annotations

import json
import threading
import time

import pytest

from lorafleet.worker import MAX_ATTEMPTS, Worker
from serve.config import parse_config
from serve.gateway.finetune import CreateJob, create_job
from serve.gateway.tenants import TenantStore
from serve.store import Store
from tests.conftest import MODELS
from train.export import validate_adapter

pytestmark = pytest.mark.slow

TINY = str(MODELS / "tiny-random-llama")
ROWS = [{"messages": [{"role": "user", "content": f"ticket {i}"}, {"role": "assistant", "content": "billing"}]}
        for i in range(8)]  # fmt: skip


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    cfg = parse_config({"adapters_root": str(tmp_path / "adapters"), "engines": [
        {"name": "tiny", "model": TINY, "served_name": "tiny-base", "urls": ["http://127.0.0.1:9"]}],
        "tenants": [{"name": "acme", "api_key_hashes": ["sha256:" + "a" * 64], "models": ["tiny-base"]}]})  # fmt: skip
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.seed_tenants([{"name": "acme", "key_hashes": [], "models": ["tiny-base"]}])
    data = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    train = store.add_file("acme", "fine-tune", "t.jsonl", data, tmp_path / "files", 8).id
    valid = store.add_file("acme", "fine-tune", "v.jsonl", data[: len(data) // 2], tmp_path / "files", 4).id
    yield cfg, store, train, valid
    store.close()


def job(cfg, store, train, valid=None, validate=True, **extra):
    body = {"model": "tiny-base", "training_file": train, "validation_file": valid, "suffix": "t",
            "hyperparameters": {"n_epochs": 1, "batch_size": 4}, **extra}  # fmt: skip
    jid = create_job(
        CreateJob.model_validate(body), store=store, cfg=cfg, tenant=TenantStore(cfg.tenants).tenants["acme"]
    )["id"]
    assert store.job(jid).status == "validating_files"
    if validate:
        Worker(store, cfg, name="validator").validate_waiting()
    return jid


def test_files_are_validated_before_the_job_is_queued(setup, tmp_path):
    cfg, store, train, valid = setup
    good = job(cfg, store, train, valid)
    assert store.job(good).status == "queued"
    warnings = [e.message for e in store.events(good, limit=50)[0] if e.level == "warn"]
    # the data checks' advice reaches the tenant: 8 examples are far below the ~500 the article asks for
    assert any("8 train examples" in m for m in warnings)
    # a validation file the scorer cannot read fails the job now, naming the line, not after training
    bad = store.add_file("acme", "fine-tune", "v.jsonl", (json.dumps({"messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "not json"}]}) + "\n").encode(),
        tmp_path / "files", 1).id  # fmt: skip
    failed = job(cfg, store, train, bad, scorer="json")
    row = store.job(failed)
    assert row.status == "failed" and row.error["code"] == "invalid_validation_file"
    assert row.error["param"] == "validation_file" and row.finished_at is not None
    assert f"{bad}:1" in row.error["message"] and str(tmp_path) not in row.error["message"]  # its id, not our paths
    assert store.claim_job("w").id == good  # only the valid job was queued


def test_a_job_runs_to_a_registered_version_granted_to_its_tenant(setup):
    cfg, store, train, valid = setup
    jid = job(cfg, store, train, valid, promote_if={"alias": "support", "min_gain": 1.0})
    worker = Worker(store, cfg, name="w1")
    worker.run(store.claim_job("w1"))
    done = store.job(jid)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny-base:acme:t:{jid}" and done.trained_tokens > 0
    (billed,) = store.training_usage()  # the ledger holds what it trained (free here: no training price)
    assert billed.tenant == "acme" and billed.version == jid and billed.trained_tokens == done.trained_tokens
    (version,) = store.versions(done.fine_tuned_model)
    assert version.owner == "acme" and version.source == jid and validate_adapter(version.path) == []
    assert store.alias(done.fine_tuned_model).targets == [{"version": version.id, "weight": 1.0}]
    assert done.fine_tuned_model in store.tenant_models()["acme"]
    messages = [e.message for e in reversed(store.events(jid, limit=100)[0])]
    assert any(m.startswith("Step 2/2: training loss=") for m in messages)
    assert any(m.startswith("Validation accuracy") for m in messages)
    # the gate: a random tiny model cannot beat its base by 100 points, so the alias is not moved, and it says why
    assert any("Not promoted to 'support'" in m for m in messages) and store.alias("support") is None
    (results,) = done.result_files
    assert json.loads(open(store.file(results, "acme").path).read())["n"] == 4
    assert [c.step for c in store.checkpoints(jid)] == [2]
    assert store.alias(f"{done.fine_tuned_model}:ckpt-step-2") is not None  # the final checkpoint is callable too


def test_auto_hyperparameters_run_the_search_judged_by_the_score(setup):
    cfg, store, train, valid = setup
    jid = job(cfg, store, train, valid, hyperparameters={})  # every hyperparameter "auto", as OpenAI's default
    Worker(store, cfg, name="w1").run(store.claim_job("w1"))
    done = store.job(jid)
    assert done.status == "succeeded", done.error
    (version,) = store.versions(done.fine_tuned_model)
    report = json.loads(open(f"{version.path}/lorafleet_train.json").read())
    assert report["auto"]["candidates"][0]["name"] == "recipe" and report["score"]["n"] == 1  # 8 lines: 1 held out
    messages = [e.message for e in store.events(jid, limit=200)[0]]
    assert any(m.startswith("auto: chose ") for m in messages)


def test_each_epoch_but_the_last_leaves_a_servable_checkpoint(setup):
    cfg, store, train, _ = setup
    jid = job(cfg, store, train, hyperparameters={"n_epochs": 3, "batch_size": 4})  # 2 steps per epoch
    Worker(store, cfg, name="w1").run(store.claim_job("w1"))
    done = store.job(jid)
    assert done.status == "succeeded", done.error
    ckpts = store.checkpoints(jid)
    assert [c.step for c in ckpts] == [6, 4, 2]
    for c in ckpts:
        assert validate_adapter(c.path) == []
        (v,) = store.versions(f"{done.fine_tuned_model}:ckpt-step-{c.step}")
        assert v.owner == "acme" and f"{done.fine_tuned_model}:ckpt-step-{c.step}" in store.tenant_models()["acme"]
    # different weights at each epoch: three different versions
    assert len({store.versions(f"{done.fine_tuned_model}:ckpt-step-{c.step}")[0].digest for c in ckpts}) == 3
    assert any(e.message == "Checkpoint created at step 4" for e in store.events(jid, limit=100)[0])


def test_cancel_stops_a_running_job_within_seconds(setup):
    cfg, store, train, _ = setup
    jid = job(cfg, store, train, hyperparameters={"n_epochs": 50, "batch_size": 1})  # 400 steps: minutes
    worker = Worker(store, cfg, name="w1", poll_s=0.1)
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while store.job(jid).status != "running" or not store.events(jid, limit=1)[0][0].message.startswith("Step"):
        assert time.monotonic() < deadline, "the job never started stepping"
        time.sleep(0.2)
    store.update_job(jid, cancel_requested=1)
    t0 = time.monotonic()
    while store.job(jid).status == "running":
        assert time.monotonic() - t0 < 10, "cancel did not stop the job in 10 s"
        time.sleep(0.1)
    worker.stop.set()
    thread.join(timeout=10)
    assert store.job(jid).status == "cancelled" and store.versions(f"ft:tiny-base:acme:t:{jid}") == []


def test_a_crashed_workers_job_is_retried_once_then_failed(setup):
    cfg, store, train, _ = setup
    jid = job(cfg, store, train)
    worker = Worker(store, cfg, name="w2")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        assert store.claim_job(f"dead-{attempt}").id == jid  # a worker claims it, then dies without a beat
        store.update_job(jid, heartbeat_at=None)
        worker.reap()
    failed = store.job(jid)
    assert failed.status == "failed" and failed.error["code"] == "worker_lost"
    messages = [e.message for e in store.events(jid, limit=50)[0]]
    assert any("queued again" in m for m in messages) and any("not retried" in m for m in messages)


def test_the_serve_worker_is_a_process_started_again_if_it_dies(setup, tmp_path):
    """`lorafleet serve` runs the worker in a process of its own (WorkerProcess): it comes back when killed,
    claims jobs from the shared store, and when the service stops, a running job goes back to the queue (a restart
    must not end a tenant's job)."""
    import os
    import signal

    import yaml

    from lorafleet.worker import WorkerProcess

    cfg, store, train, _ = setup
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    worker = WorkerProcess(str(path), store.url).start()
    try:
        first = worker.proc.pid
        os.killpg(first, signal.SIGKILL)
        assert wait(lambda: worker.proc.pid != first and worker.proc.poll() is None, 30)
        assert worker.restarts == 1
        body = {"model": "tiny-base", "training_file": train, "hyperparameters": {"n_epochs": 50, "batch_size": 1}}
        acme = TenantStore(cfg.tenants).tenants["acme"]  # created beside the running worker: no status to assert
        jid = create_job(CreateJob.model_validate(body), store=store, cfg=cfg, tenant=acme)["id"]
        stepping = lambda: any(e.message.startswith("Step") for e in store.events(jid, limit=5)[0])  # noqa: E731
        assert wait(stepping, 120), "the worker process never ran the job"
    finally:
        worker.close()
    assert worker.proc.poll() is not None
    assert store.job(jid).status == "queued" and store.job(jid).worker is None
    assert any("queued again" in e.message for e in store.events(jid, limit=5)[0])

    # a worker killed outright takes its trainer with it
    worker = WorkerProcess(str(path), store.url).start()
    try:
        assert wait(lambda: trainers(jid) and store.job(jid).status == "running", 120)
        (trainer,) = trainers(jid)
        os.killpg(worker.proc.pid, signal.SIGKILL)  # the trainer has a session of its own: not in this group
        assert wait(lambda: gone(trainer), 15)
    finally:
        worker.close()


def wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def trainers(jid: str) -> list[int]:
    """Pids of the trainer processes of a job (their command line names its spec file)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any("_train" in part for part in proc.info["cmdline"] or []) and jid in " ".join(proc.info["cmdline"]):
            found.append(proc.pid)
    return found


def gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
