"""`lorafleet worker`: runs the tenants' fine-tuning jobs (the OpenAI fine-tuning API, serve/gateway/finetune.py).

It claims queued jobs from the store (atomically, so several workers on one PostgreSQL each run a job once), trains
in a child process (so a cancel stops it within a heartbeat, about a second), turns the trainer's steps into job
events and its checkpoints into job checkpoints, scores the result against the base model on the validation
file with the tenant's scorer, and registers it as a new adapter version, granted only to that tenant, under the
job's `ft:` name. A job whose worker died is taken up again once, then failed with a clear error: never left
`running`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from lorafleet.core.paths import data_dir
from serve.config import ServeConfig, load_config
from serve.engines.deploy import adapters_root
from serve.gateway.finetune import alias_refusal, fine_tuned_name
from serve.store.schema import JobRow
from serve.store.store import NANO, Store, StoreError, StoreUnavailable
from train.config import CONFIGS_DIR

HEARTBEAT_S = 1.0
STALE_S = 30.0  # a running job whose heartbeat is older than this lost its worker
MAX_ATTEMPTS = 2
STORE_RETRY_S = 2.0  # between tries while the state store is unreachable
STEP_EVENTS = 20  # about this many step events per job, whatever its length
STORE_ENV = "LORAFLEET_STORE_URL"  # the store a worker process started by `lorafleet serve` uses


class Cancelled(Exception):
    pass


class Stopped(Exception):
    """The worker is shutting down (lorafleet serve stops): the job goes back to the queue, not to `cancelled`."""


class JobFailed(Exception):
    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.error = {"code": code, "message": message, "param": param}


def train_config(job: JobRow, paths: dict[str, str], cfg: ServeConfig, out: Path) -> dict[str, Any]:
    """The default recipe with the job's hyperparameters: a number is used as given; "auto" for n_epochs means
    train.auto's search (epochs and rank/layers, and the learning rate too when it is "auto" as well)."""
    recipe = yaml.safe_load((CONFIGS_DIR / "recipe.yaml").read_text())
    h = job.hyperparameters or {}
    values: dict[str, Any] = {**recipe, "base_model": cfg.engine_for(job.model).model, "seed": job.seed,
                              "data": paths["training_file"], "output_dir": str(out),
                              "name": job.id, "progress": False, "eval_every": 0}  # fmt: skip
    values.pop("n", None)
    values.pop("eval_n", None)
    if job.validation_file:
        values["eval_data"] = paths["validation_file"]
    if h.get("n_epochs", "auto") != "auto":
        values["epochs"] = h["n_epochs"]
    else:  # epochs from the data size and the score on held-out lines, after a budgeted search (train.auto)
        values |= {"auto": True, "scorer": job.extra.get("scorer", "exact")}
    if h.get("batch_size", "auto") != "auto":
        values["batch_size"] = h["batch_size"]
    if h.get("learning_rate_multiplier", "auto") != "auto":
        values["lr"] = recipe["lr"] * h["learning_rate_multiplier"]
        values["auto_search"] = []  # the tenant chose the rate: auto does not vary it
    layers = _layers(values["base_model"])
    if layers and values.get("top_layers", 0) > layers:  # the recipe's "top 15" is half of SmolLM2; keep half of any
        values["top_layers"] = max(1, layers // 2)
    return values


def _layers(model: str) -> int | None:
    from train.models import model_path

    try:
        return json.loads((Path(model_path(model)) / "config.json").read_text()).get("num_hidden_layers")
    except (OSError, ValueError):
        return None


class Worker:
    def __init__(self, store: Store, cfg: ServeConfig, name: str | None = None, poll_s: float = 1.0):
        self.store, self.cfg, self.poll_s = store, cfg, poll_s
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.root = adapters_root(cfg) / "ft"
        self.stop = threading.Event()

    def run_forever(self) -> None:
        """Claim and run jobs until stopped. Nothing one job holds (a deleted file, a crafted scorer) may end the
        loop: that job fails, the next is claimed (tests/serve/test_attacks.py)."""
        while not self.stop.is_set():
            try:
                job = self.next_job()
                if job is not None:
                    self.run(job)
            except StoreUnavailable as e:  # the database restarts: wait for it, as the gateway does
                print(f"lorafleet worker {self.name}: {e}; retrying in {STORE_RETRY_S:g} s", flush=True)
                self.stop.wait(STORE_RETRY_S)
                continue
            except Exception:
                traceback.print_exc()
                self.stop.wait(self.poll_s)
                continue
            if job is None:
                self.stop.wait(self.poll_s)

    def next_job(self) -> JobRow | None:
        self.reap()
        self.validate_waiting()
        return self.store.claim_job(self.name)

    def reap(self) -> None:
        """Jobs left `running` by a worker that died: queue them again once, then fail them."""
        for job in self.store.stale_jobs(STALE_S):
            if job.attempts < MAX_ATTEMPTS and not job.cancel_requested:
                self.store.update_job(job.id, status="queued", worker=None)
                self.store.event(job.id, f"Worker {job.worker} stopped responding; the job was queued again",
                                 level="warn")  # fmt: skip
            else:
                msg = f"the worker running this job stopped responding {job.attempts} time(s); not retried"
                self.store.update_job(job.id, status="failed", error={"code": "worker_lost", "message": msg,
                                                                      "param": None})  # fmt: skip
                self.store.event(job.id, msg, level="error")

    # -- validating_files -> queued | failed

    def validate_waiting(self) -> None:
        for job in self.store.jobs_with_status("validating_files"):
            self.validate(job)

    def validate(self, job: JobRow) -> None:
        """Read the job's files as the trainer and the scorer will, before it waits in the queue: a bad line fails
        it now with every problem listed, not an hour later; the data checks' warnings become events."""
        from lorafleet.core.errors import UserError

        try:
            warnings = self.check_files(job)
        except (UserError, JobFailed) as e:
            message, param = self.in_tenant_terms(job, str(e))
            err = {"code": f"invalid_{param}", "message": message, "param": param}
            self.fail_validation(job, err)
            return
        except Exception:  # our bug, or input crafted to break a reader: this job fails, the worker goes on
            traceback.print_exc()
            err = {"code": "invalid_training_file", "param": "training_file",
                   "message": "the files could not be read; check that they are JSONL of the documented formats"}  # fmt: skip
            self.fail_validation(job, err)
            return
        if self.store.advance_job(job.id, "validating_files", "queued"):
            for w in warnings:
                self.store.event(job.id, f"Data check: {w}", level="warn")
            self.store.event(job.id, "Validated files; the job is queued")

    def fail_validation(self, job: JobRow, err: dict) -> None:
        if self.store.advance_job(job.id, "validating_files", "failed", error=err):
            self.store.event(job.id, f"Fine-tuning job failed: {err['message']}", level="error")

    def in_tenant_terms(self, job: JobRow, message: str) -> tuple[str, str]:
        """A data error as the tenant knows its files: by file id and line, not by paths on this machine; and
        the field (training_file or validation_file) it is about."""
        lines = message.splitlines()
        if lines and lines[0].startswith("task ") and lines[0].endswith("cannot be used:"):
            lines[0] = "the files cannot be used:"
        message, param = "\n".join(lines), "training_file"
        for field in ("validation_file", "training_file"):
            fid = getattr(job, field)
            row = self.store.file(fid, job.tenant) if fid else None
            if row is not None and row.path in message:
                message, param = message.replace(row.path, fid), field
            elif fid and fid in message:
                param = field
        return message.replace(str(data_dir()), "<data>"), param

    def path(self, job: JobRow, field: str) -> str:
        """Where a job's file is on this machine; a file deleted meanwhile fails the job, naming it."""
        fid = getattr(job, field)
        row = self.store.file(fid, job.tenant)
        if row is None or not Path(row.path).is_file():
            raise JobFailed(f"invalid_{field}", f"{field}: file {fid} no longer exists", field)
        return row.path

    def check_files(self, job: JobRow) -> list[str]:
        from train.tasks.files import load_task, read_lines

        if job.validation_file is None:
            read_lines(Path(self.path(job, "training_file")))
            return []
        with tempfile.TemporaryDirectory() as tmp:
            return load_task(self.task_file(job, Path(tmp)), allow_overlap=True).report.warnings

    def task_file(self, job: JobRow, folder: Path, checks: dict | None = None) -> Path:
        """The job's files as a task file: its train split, its validation file as the eval split, its scorer."""
        spec = {"name": job.id, "train": self.path(job, "training_file"),
                "eval": self.path(job, "validation_file"), "scorer": job.extra.get("scorer", "exact"),
                "few_shot_k": 0} | ({"checks": checks} if checks else {})  # fmt: skip
        (folder / "task.yaml").write_text(yaml.safe_dump(spec))
        return folder / "task.yaml"

    # -- queued -> running -> succeeded | failed | cancelled

    def run(self, job: JobRow) -> None:
        out = self.root / job.id
        try:
            report = self.train(job, out)
            self.finish(job, out, report)
        except Cancelled:
            self.store.update_job(job.id, status="cancelled")
            self.store.event(job.id, "Fine-tuning job cancelled")
        except Stopped:  # a restart of the service must not end a tenant's job: it starts over on the next worker
            self.store.update_job(job.id, status="queued", worker=None)
            self.store.event(job.id, f"Worker {self.name} stopped; the job was queued again", level="warn")
        except JobFailed as e:
            self.store.update_job(job.id, status="failed", error=e.error)
            self.store.event(job.id, f"Fine-tuning job failed: {e}", level="error")
        except Exception:  # anything else is our bug, still reported on the job (no traceback), never left running
            traceback.print_exc()
            msg = "an internal error stopped this job; the operator's worker log has the details"
            err = {"code": "internal_error", "message": msg, "param": None}
            self.store.update_job(job.id, status="failed", error=err)
            self.store.event(job.id, f"Fine-tuning job failed: {err['message']}", level="error")

    # -- training, in a child process

    def train(self, job: JobRow, out: Path) -> dict:
        for old in [out, *out.parent.glob(f"{out.name}.ckpt-step-*")]:  # a retried job starts over
            shutil.rmtree(old, ignore_errors=True)
        self.store.clear_checkpoints(job.id)
        out.mkdir(parents=True)
        spec = out.parent / f"{job.id}.train.json"
        paths = {f: self.path(job, f) for f in ("training_file", "validation_file") if getattr(job, f)}
        spec.write_text(json.dumps(train_config(job, paths, self.cfg, out)))
        cmd = [sys.executable, "-m", "lorafleet.worker", "_train", str(spec)]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )  # fmt: skip
        lines: list[str] = []
        reader = threading.Thread(target=self._read, args=(job, proc, lines), daemon=True)
        reader.start()
        while proc.poll() is None:
            cancelled = not self.store.heartbeat(job.id)
            if cancelled or self.stop.is_set():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise Cancelled() if cancelled else Stopped()
            time.sleep(HEARTBEAT_S)
        reader.join(timeout=5)
        if proc.returncode != 0:
            # The tenant is told what it can act on (the trainer's own error), never a traceback or our paths.
            print(f"lorafleet worker {self.name}: job {job.id}: " + "\n".join(lines[-20:]), flush=True)
            said = [line.removeprefix("@error ") for line in lines if line.startswith("@error ")]
            reason = (
                self.in_tenant_terms(job, said[-1])[0]
                if said
                else f"the trainer stopped (exit code {proc.returncode})"
            )
            raise JobFailed("training_failed", f"training failed: {reason}")
        return json.loads((out / "lorafleet_train.json").read_text())

    def _read(self, job: JobRow, proc: subprocess.Popen, lines: list[str]) -> None:
        every = None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith(("auto: ", "WARNING: ")):  # the search's choices and the trainer's advice
                warn = line.startswith("WARNING: ")
                said = self.in_tenant_terms(job, line.strip().removeprefix("WARNING: "))[0]
                self.store.event(job.id, said, level="warn" if warn else "info")
            if not line.startswith("@step "):
                continue
            step = json.loads(line[6:])
            every = every or max(1, step["steps"] // STEP_EVENTS)
            if step["step"] % every == 0 or step["step"] == step["steps"]:
                self.store.event(job.id, f"Step {step['step']}/{step['steps']}: training loss={step['loss']:.4f}",
                                 data=step)  # fmt: skip
            if "checkpoint" in step:
                self.store.add_checkpoint(job.id, step["step"], Path(step["checkpoint"]),
                                          {"step": step["step"], "train_loss": step["loss"]})  # fmt: skip
                self.store.event(job.id, f"Checkpoint created at step {step['step']}")

    # -- evaluation and registration

    def finish(self, job: JobRow, out: Path, report: dict) -> None:
        name = fine_tuned_name(job)
        result: dict[str, Any] = {"trained_tokens": report["metrics"]["tokens"], "steps": report["metrics"]["steps"],
                                  "final_train_loss": report["metrics"]["final_train_loss"]}  # fmt: skip
        if job.validation_file:
            self.store.event(job.id, "Evaluating on the validation file against the base model")
            result |= self.evaluate(job, out)
            self.store.event(job.id, f"Validation accuracy {result['accuracy']:.1%} vs base {result['base_accuracy']:.1%}"
                             f" (n={result['n']})", data={k: result[k] for k in ("accuracy", "base_accuracy", "n")})  # fmt: skip
        self.store.add_checkpoint(job.id, result["steps"], out, {"step": result["steps"],
                                                                 "train_loss": result["final_train_loss"]})  # fmt: skip
        version = self.register(job, name, out, result)
        for c in self.store.checkpoints(job.id):  # each callable as `…:ckpt-step-N`, as on OpenAI
            self.register(job, f"{name}:ckpt-step-{c.step}", Path(c.path), c.metrics)
        data = json.dumps(result, indent=2).encode()
        results = self.store.add_file(job.tenant, "fine-tune-results", f"{job.id}-results.json", data,
                                      data_dir() / "files" / job.tenant, 1)  # fmt: skip
        self.bill(job, result["trained_tokens"])
        self.store.update_job(job.id, status="succeeded", fine_tuned_model=name, trained_tokens=result["trained_tokens"],
                              result_files=[results.id])  # fmt: skip
        self.store.event(job.id, f"New fine-tuned model created: {name}")
        self.promote(job, version.id, result)
        self.store.event(job.id, "The job has successfully completed")

    def bill(self, job: JobRow, tokens: int) -> None:
        """The trained tokens into the ledger at the base model's training price (the tenant's own, if it has one);
        the gateways read them from there into Prometheus and the tenant's $ budgets (Gateway.read_training)."""
        tenant = next((t for t in self.cfg.tenants if t.name == job.tenant), None)
        # the tenant's own training price if it has one, else the list's: an override of only input/output
        # prices must not make training free
        tables = [tenant.prices if tenant else {}, self.cfg.prices]
        price = next((p for t in tables if (p := t.get(job.model)) and p.usd_per_1m_training), None)
        nano = round(price.training_cost(tokens) * NANO) if price else 0
        self.store.record_usage([{"tenant": job.tenant, "model": job.model, "version": job.id, "requests": 0,
                                  "prompt_tokens": 0, "completion_tokens": 0, "trained_tokens": tokens,
                                  "cost_nano_usd": nano}])  # fmt: skip
        self.store.event(job.id, f"Billed {tokens} trained tokens: ${nano / NANO:.6f}")

    def register(self, job: JobRow, name: str, folder: Path, meta: dict):
        """A new version under `name`, granted only to the job's tenant."""
        version = self.store.add_version(name, folder, job.model, owner=job.tenant, source=job.id, meta=meta)
        self.store.set_alias(name, [{"version": version.id, "weight": 1.0}], [job.tenant])
        self.store.grant(name, [job.tenant])
        return version

    def evaluate(self, job: JobRow, out: Path) -> dict:
        """Accuracy of the adapter and of the base on the validation file, scored by the job's scorer."""
        from train.evaluate import evaluate_offline

        task_dir = out.parent / f"{job.id}-task"
        task_dir.mkdir(exist_ok=True)
        task = str(self.task_file(job, task_dir, {"max_overlap": 1.0, "min_train": 1}))  # checked at validation
        base = self.cfg.engine_for(job.model).model
        mine = evaluate_offline(base, out, task, n=200)
        theirs = evaluate_offline(base, None, task, n=200)
        return {"accuracy": mine["accuracy"], "base_accuracy": theirs["accuracy"], "n": mine["n"],
                "gain": mine["accuracy"] - theirs["accuracy"]}  # fmt: skip

    def promote(self, job: JobRow, version: str, result: dict) -> None:
        gate = (job.extra or {}).get("promote_if")
        if not gate:
            return
        gain = result.get("gain")
        if gain is None:
            self.store.event(job.id, f"Not promoted to {gate['alias']!r}: no validation file to judge it on",
                             level="warn")  # fmt: skip
        elif gain >= gate["min_gain"]:
            try:  # checked at creation, and again here: the alias may have been taken since
                refusal = alias_refusal(self.store, self.cfg, gate["alias"], job.tenant)
                if refusal:
                    raise StoreError(refusal)
                target = [{"version": version, "weight": 1.0}]
                self.store.set_alias(gate["alias"], target, [job.tenant], owner=job.tenant)
            except StoreError as e:
                self.store.event(job.id, f"Not promoted to {gate['alias']!r}: {e}", level="warn")
                return
            self.store.grant(gate["alias"], [job.tenant])
            self.store.event(job.id, f"Promoted: alias {gate['alias']!r} now serves this model (gain {gain:+.1%} >= "
                             f"{gate['min_gain']:+.1%})")  # fmt: skip
        else:
            self.store.event(job.id, f"Not promoted to {gate['alias']!r}: gain {gain:+.1%} over the base is below the "
                             f"required {gate['min_gain']:+.1%}", level="warn")  # fmt: skip


def _die_with_parent() -> None:
    """In the trainer, before it runs: die when the worker does. A worker killed outright must not leave a trainer
    running beside the one the next worker starts for the same job; its next line to the dead worker's pipe would
    end it too, but a long stretch without one (scoring, the auto search) would not (tests/lorafleet/test_worker.py)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class WorkerProcess:
    """The worker beside `lorafleet serve`, in a process of its own, started again if it dies: a tenant's files,
    scorer and training never run inside the gateway's process, so nothing in them can stall its requests
    (tests/lorafleet/test_worker.py)."""

    RESTART_S = 2.0

    def __init__(self, config: str | None, store_url: str):
        self.cmd = [sys.executable, "-m", "lorafleet.cli", "worker", *([config] if config else [])]
        self.env = {**os.environ, STORE_ENV: store_url}  # not on the command line: a URL may hold a password
        self.proc: subprocess.Popen | None = None
        self.stop = threading.Event()
        self.restarts = 0

    def start(self) -> WorkerProcess:
        self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True)
        threading.Thread(target=self._watch, daemon=True, name="lorafleet-worker-watch").start()
        return self

    def _watch(self) -> None:
        while not self.stop.wait(0.5):
            if self.proc.poll() is not None:
                print(f"==> fine-tuning worker exited ({self.proc.returncode}); starting it again", flush=True)
                self.stop.wait(self.RESTART_S)
                if not self.stop.is_set():
                    self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True)
                    self.restarts += 1

    def close(self, timeout: float = 15.0) -> None:
        """SIGTERM: the worker stops its training child and ends; SIGKILL if it does not in `timeout`."""
        self.stop.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _train_child(spec: Path) -> int:
    """The child process: one training run, each step reported as an `@step {json}` line."""
    from lorafleet.core.errors import UserError
    from train.auto import run
    from train.config import load_config as load_train_config

    try:
        cfg = load_train_config(None, json.loads(spec.read_text()))
        out = Path(cfg.output_dir)
        run(cfg, log=lambda m: print(m, flush=True), on_step=lambda s: print("@step " + json.dumps(s), flush=True),
            epoch_dir=lambda step: out.with_name(f"{out.name}.ckpt-step-{step}"))  # fmt: skip
    except UserError as e:  # what the tenant can fix: one line for the job's error (worker.train)
        print("@error " + " ".join(str(e).split()), flush=True)
        return 2
    return 0


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="serve YAML (default: the embedded serve/default.yaml)")
    p.add_argument("--store", default=None, help="store URL (default: the config's gateway.store_url)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    store = Store.open(args.store or os.environ.get(STORE_ENV) or cfg.gateway.store_url, data_dir())
    worker = Worker(store, cfg)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())  # ends the loop, and kills a training child
    print(f"lorafleet worker {worker.name}: waiting for fine-tuning jobs in {store.url}", flush=True)
    try:
        worker.run_forever()
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_train":
        sys.exit(_train_child(Path(sys.argv[2])))
    sys.exit("usage: lorafleet worker [CONFIG]")
