"""`lorafleet prove TENANT.yaml`: does a fine-tuned small model beat the big generalist on *my* task, and at what
cost? The demo's path (lorafleet.demo.run) for one tenant's own task file:

    # tenant.yaml (paths relative to this file)
    tenant: acme-support
    task: tickets/task.yaml        # a task file (train.tasks.files) or a built-in task name
    # n_train: 600                 # default: the whole train split
    # n_eval: 200                  # default: up to 200 eval items
    # recipe: {epochs: 3}          # overrides on train/configs/recipe.yaml
    # curve_sizes: [50, 100, 250]  # default: 50, 100, 250, 500, ... up to half the train split
    # load_sweep: [4, 16]          # closed-loop concurrencies each target is priced at
    # small: smollm2-135m-instruct
    # generalist: gemma-3-270m
    # usd_per_hour: 0.10

It checks the data, trains (or reuses) the adapter and the learning-curve adapters, serves them beside the
generalist, scores specialist / base zero-shot / base k-shot / generalist k-shot through the gateway, load-tests
and prices each target at the SLO, and writes runs/prove-<tenant>-<time>/report.md with the article's four claims
answered for this tenant.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from pydantic import Field

from lorafleet.core.config import Strict, load_yaml
from lorafleet.core.errors import UserError
from lorafleet.core.paths import home
from lorafleet.demo.run import GENERALIST, SMALL, DemoPlan, Tenant, demo
from train.data import DataError
from train.tasks import get_task, is_task_file

CURVE_STEPS = (50, 100, 250, 500, 1000, 2500, 5000, 10000)


class ProveFile(Strict):
    tenant: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the tenant's name (letters, digits, _ . -)")
    task: str = Field(description="a task file (task.yaml or its folder), relative to this file, or a built-in task")
    api_key: str = Field("", description="the key the harness sends for this tenant; default sk-<tenant>-prove")
    n_train: int = Field(0, ge=0, description="train examples; 0 = the whole train split")
    n_eval: int = Field(200, ge=1, description="eval items per model (at most the eval split)")
    recipe: dict = Field(default_factory=dict, description="overrides on train/configs/recipe.yaml")
    curve_sizes: list[int] | None = Field(None, description="smaller training sets; default 50, 100, ... <= half")
    load_sweep: list[int] = Field(default_factory=lambda: [4, 16], min_length=1)
    load_seconds: float = Field(30.0, gt=0, description="each load step, measured after the ramp-up")
    load_ramp_s: float = Field(15.0, ge=0, description="workers start one by one over this many seconds (unmeasured)")
    small: str = SMALL
    generalist: str = GENERALIST
    usd_per_hour: float = Field(0.10, gt=0)


def curve_sizes(n_train: int) -> list[int]:
    """Sizes up to what the data allows: each at most half the full set, which is the curve's last point."""
    return [s for s in CURVE_STEPS if s <= n_train // 2]


def make_plan(path: Path) -> DemoPlan:
    spec = ProveFile.parse(load_yaml(path, "tenant file"), f"tenant file {path}")
    task_ref = spec.task
    if is_task_file(task_ref) and not Path(task_ref).is_absolute():
        task_ref = str((path.parent / task_ref).resolve())
    try:
        task = get_task(task_ref)
    except (DataError, ValueError) as e:
        raise UserError(f"{path}: task: {e}") from e
    n_train = spec.n_train or task.size("train") or 500  # default: the whole train split (500 for a generator)
    if spec.curve_sizes and max(spec.curve_sizes) >= n_train:
        raise UserError(f"{path}: curve_sizes must be below n_train ({n_train}), got {spec.curve_sizes}")
    return DemoPlan(
        tenants=[Tenant(spec.tenant, task_ref, spec.api_key or f"sk-{spec.tenant}-prove")],
        title=f"lorafleet prove {spec.tenant}",
        n_train=n_train,
        n_eval=spec.n_eval,
        recipe=spec.recipe,
        usd_per_hour=spec.usd_per_hour,
        load_sweep=spec.load_sweep,
        load_seconds=spec.load_seconds,
        load_ramp_s=spec.load_ramp_s,
        curve_task=task_ref,
        curve_sizes=spec.curve_sizes if spec.curve_sizes is not None else curve_sizes(n_train),
        merged=False,
        small=spec.small,
        generalist=spec.generalist,
        runs_name=f"prove-{spec.tenant}-",
    )


def register(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("tenant_file", type=Path, metavar="TENANT.yaml", help="the tenant and its task file")
    p.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    plan = make_plan(args.tenant_file)
    plan.gateway_port = args.port
    os.environ.setdefault("LORAFLEET_HOME", str(home()))
    t0 = time.time()
    run_dir = demo(plan)
    print(f"\n{plan.title} finished in {(time.time() - t0) / 60:.1f} min: {run_dir}/report.md")
    return 0
