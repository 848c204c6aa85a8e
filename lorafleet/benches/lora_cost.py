"""What unmerged LoRA costs on one engine: `python -m lorafleet.benches.lora_cost`.

Starts two vLLM engines of the same model, one with LoRA on (the CPU LoRA plugin loaded, adapters loaded at
run time) and one with LoRA off, and in alternating rounds sends each arm the same streaming load (c=16, forced
output length) straight to the engine:
  base-on-lora-engine   base-model requests on the LoRA engine
  mix-K                 requests spread over K adapters on the LoRA engine (K = 3 and --max-loras)
  base-no-lora          base-model requests on the LoRA-off engine
  base-no-lora-eager    the same on a LoRA-off engine in eager mode: vLLM runs every LoRA engine on CPU eagerly
                        (no torch.compile), so this arm tells the LoRA work from the compiler's gain
It prints output throughput and TTFT p90 of each arm as ratios to the base model on the LoRA engine (and the
LoRA engine's base to the LoRA-off engine's), with the spread over rounds, and which LoRA kernel path ran.
`--adapters DIR...` serves trained adapters (cycled over the slots) instead of random ones on every layer, and
`--eager` runs the engines as `make demo` does on CPU: with both, it measures what the demo's unmerged tenants cost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import httpx

from lorafleet.benches.gateway import make_adapters, run_load
from lorafleet.stack import one_engine_config, running_stack
from serve.engines import cpu_lora
from train.models import model_path

GOALS = {"mix-3": 0.85, "mix-max": 0.80}  # throughput vs base on the same engine (issue: CPU LoRA performance)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lorafleet.benches.lora_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="model id or HF folder")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every arm once, in rotating order")
    p.add_argument("--requests", type=int, default=32, help="requests per arm and round")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64, help="forced output tokens per request")
    p.add_argument("--max-loras", type=int, default=8, help="adapter slots of the LoRA engine (the mix-max arm)")
    p.add_argument("--adapters", nargs="+", type=Path, default=None, metavar="DIR",
                   help="serve these trained adapters (cycled over the slots) instead of random ones on every layer, "
                   "e.g. adapters/manifest adapters/contract adapters/drugs after `make demo`")  # fmt: skip
    p.add_argument("--eager", action="store_true", help="run the LoRA engine and the first LoRA-off one eagerly "
                   "(`--optimization-level 0`), as `make demo` runs its engines on CPU")  # fmt: skip
    p.add_argument("--task", default="", help="send this task's held-out prompts (system prompt and input; "
                   "prefill-heavy, as in `make demo`) instead of one-line ones")  # fmt: skip
    return p.parse_args(argv)


def p90(values: list[float]) -> float:
    v = sorted(x for x in values if x == x)  # NaN: a request without a first token
    return v[min(len(v) - 1, int(0.9 * len(v)))] if v else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [str(d) for d in args.adapters or [] if not (d / "adapter_config.json").is_file()]
    if missing:
        raise SystemExit(f"not PEFT adapter folders (no adapter_config.json): {', '.join(missing)}")
    work = Path(tempfile.mkdtemp(prefix="lorafleet-lora-cost-"))
    adapters = [f"a{i}" for i in range(args.max_loras)]
    if args.adapters:
        for i, name in enumerate(adapters):  # the same weights under another name are another adapter to vLLM
            shutil.copytree(args.adapters[i % len(args.adapters)], work / name)
    else:
        make_adapters(model_path(args.model), work, adapters)
    mode = {"extra_args": ["--optimization-level", "0"]} if args.eager else {}
    lora_cfg = one_engine_config(args.model, work, name="lora", max_loras=args.max_loras, **mode)
    plain_cfg = one_engine_config(args.model, work, name="plain", enable_lora=False, **mode)
    eager_cfg = one_engine_config(
        args.model, work, name="plain-eager", enable_lora=False, extra_args=["--compilation-config", '{"mode": 0}']
    )
    with ExitStack() as stack:
        how = "an eager LoRA engine and two eager" if args.eager else "a compiled LoRA engine, a compiled and an eager"
        print(f"==> starting {how} LoRA-off engines", flush=True)
        lora = stack.enter_context(running_stack(lora_cfg, "none", ready_timeout=600)).engine_url()
        plain = stack.enter_context(running_stack(plain_cfg, "none", ready_timeout=600)).engine_url()
        eager = stack.enter_context(running_stack(eager_cfg, "none", ready_timeout=600)).engine_url()
        model = lora_cfg.engines[0].public_name
        for name in adapters:
            body = {"lora_name": name, "lora_path": str(work / name)}
            r = httpx.post(f"{lora}/v1/load_lora_adapter", json=body, timeout=120, trust_env=False)
            if r.status_code != 200:
                raise SystemExit(f"the engine refused adapter {name}: HTTP {r.status_code} {r.text[:300]}")
        arms = {
            "base-on-lora-engine": (lora, [model]),
            "mix-3": (lora, adapters[:3]),
            "mix-max": (lora, adapters),
            "base-no-lora": (plain, [model]),
            "base-no-lora-eager": (eager, [model]),
        }
        chats = task_chats(args.task) if args.task else None
        for url, models in arms.values():  # warm-up: every adapter in a slot, both engines compiled
            run_load(url, models, len(models) * 2, len(models) * 2, 4, chats=chats)
        results = {name: [] for name in arms}
        kernels = cpu_lora.path(compiled=False if args.eager else None)  # --eager overrides the compiled default
        print(
            f"==> {args.rounds} rounds x {len(arms)} arms x {args.requests} requests, c={args.concurrency}, "
            f"{args.max_tokens} forced output tokens, {args.task or 'one-line'} prompts, "
            f"{'adapters ' + ', '.join(map(str, args.adapters)) if args.adapters else 'random adapters'}; "
            f"LoRA kernels: {kernels} ({cpu_lora.ENV}={os.environ.get(cpu_lora.ENV, '1')})",
            flush=True,
        )
        names = list(arms)
        for i in range(args.rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate: drift hits every arm alike
                url, models = arms[name]
                r = run_load(url, models, args.requests, args.concurrency, args.max_tokens, chats=chats)
                results[name].append((r["tok_s"], p90(r["ttfts"])))
                print(
                    f"    round {i + 1} {name:20s} {r['tok_s']:7.1f} tok/s  TTFT p90 {p90(r['ttfts']) * 1e3:7.0f} ms"
                )
    report(results, args.max_loras)
    return 0


def task_chats(task: str, n: int = 64) -> list[list[dict]]:
    """A task's held-out prompts as chat messages (its system prompt, then the input), without the answers."""
    from train.data import split_prompt, to_conversation
    from train.tasks import get_task

    return [split_prompt(to_conversation(r))[0] for r in get_task(task).generate(n, split="eval", seed=0)]


def report(results: dict[str, list[tuple[float, float]]], max_loras: int) -> None:
    base = results["base-on-lora-engine"]
    print("\n== per round, ratio to the base model on the same LoRA engine (throughput; TTFT p90)")
    for name, rounds in results.items():
        tput = [r[0] / b[0] for r, b in zip(rounds, base, strict=True)]
        ttft = [r[1] / b[1] for r, b in zip(rounds, base, strict=True)]
        label = f"mix-{max_loras}" if name == "mix-max" else name
        goal = f"  (goal >= {GOALS[name]})" if name in GOALS else ""
        print(
            f"  {label:20s} throughput {statistics.median(tput):.3f}x [{min(tput):.3f}-{max(tput):.3f}]{goal}; "
            f"TTFT p90 {statistics.median(ttft):.2f}x [{min(ttft):.2f}-{max(ttft):.2f}]"
        )
    for name, what in (
        ("base-no-lora", "the LoRA-off engine (goal >= 0.97)"),
        ("base-no-lora-eager", "the LoRA-off engine, both eager (the LoRA work alone)"),
    ):
        ratio = [b[0] / p[0] for b, p in zip(base, results[name], strict=True)]
        print(
            f"  base on the LoRA engine vs {what}: {statistics.median(ratio):.3f}x [{min(ratio):.3f}-{max(ratio):.3f}]"
        )


if __name__ == "__main__":
    sys.exit(main())
