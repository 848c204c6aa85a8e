"""What the gateway costs: `python -m lorafleet.benches.gateway` (or `lorafleet serve bench`).

Starts one vLLM engine and the gateway (its own process, as in production) in front of it, then measures, in
the same run on the same engine:
  1. overhead: the same streaming load against the engine directly and through the gateway, in alternating
     rounds (ABBA), giving the output-throughput ratio and the added median TTFT (under load, and one request
     at a time, where queueing does not hide it); with --litellm, LiteLLM's proxy in the same rounds;
  2. cold adapter: first-token latency of an adapter's first request (hot-load included) minus a warm one;
  3. adapters: output throughput with requests spread over N distinct adapters vs all on one.
Prints ratios and writes them as JSON under runs/serve-bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loadtest.client import ClientPool, RequestRecord, auth_headers, build_body, endpoint, stream_request
from loadtest.config import Target
from lorafleet.benches import litellm
from lorafleet.core import paths
from lorafleet.core.net import free_port
from lorafleet.stack import Stack, one_engine_config, running_stack
from train.export import random_adapter
from train.models import model_path

KEY = "sk-bench"
PROMPTS = [f"Write a short story about a lighthouse keeper and the number {i}." for i in range(64)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lorafleet.benches.gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="model id or HF folder")
    p.add_argument("--rounds", type=int, default=4, help="overhead rounds per target")
    p.add_argument("--requests", type=int, default=32, help="requests per round")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    p.add_argument("--probes", type=int, default=40, help="one-at-a-time TTFT probes per target")
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters in the multi-adapter round")
    p.add_argument("--cold", type=int, default=3, help="adapters whose first request is timed")
    p.add_argument(
        "--litellm",
        nargs="?",
        const="install",
        default=None,
        metavar="PATH",
        help="also measure LiteLLM's proxy in front of the same engine: its `litellm` executable, or none to "
        f"install litellm[proxy]=={litellm.VERSION} on first use into <home>/tools/litellm",
    )
    p.add_argument("--out", default=None, help="JSON results folder (default runs/serve-bench)")
    return p.parse_args(argv)


# -- load generation: the harness's client (loadtest/client.py), so TTFT and tokens mean what they mean there


async def load(
    url: str, models: list[str], n: int, concurrency: int, max_tokens: int, key: str = KEY, chats: list | None = None
) -> dict:
    """n streaming chat requests, `concurrency` at a time, forced to max_tokens; any failure raises. `chats`: the
    prompts' messages, in turn (default: a one-line user message from PROMPTS)."""
    chats = chats or [[{"role": "user", "content": p}] for p in PROMPTS]
    target = Target(name="bench", base_url=f"{url}/v1", model=models[0], api_key=key, price={"usd_per_hour": 1})
    sem, headers = asyncio.Semaphore(concurrency), auth_headers(key)

    async def one(pool: ClientPool, i: int, t0: float) -> RequestRecord:
        model, prompt = models[i % len(models)], chats[i % len(chats)]
        body = build_body(target, model, prompt, max_tokens, force_output_len=True)
        async with sem, pool.lease() as client:
            return await stream_request(client, endpoint(target), headers, body, RequestRecord(model, 0.0), t0)

    async with ClientPool(timeout_s=600) as pool:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(one(pool, i, t0) for i in range(n)))
        wall = time.perf_counter() - t0
    failed = [r for r in records if not r.ok]
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {n} requests to {url} failed; first: {failed[0].status} {failed[0].error}"
        )
    tokens = sum(r.output_tokens for r in records)
    ttfts = [r.ttft if r.ttft is not None else float("nan") for r in records]
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "ttfts": ttfts}


def run_load(*args, **kw) -> dict:
    return asyncio.run(load(*args, **kw))


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


# -- the three measurements


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def overhead(args, urls: dict[str, tuple[str, str]], model: str, pids: dict[str, int]) -> dict:
    """The same load on every path in turn, the order reversed every other round (ABBA, ABCCBA) so drift hits all
    alike. urls: "direct" (the engine) first, then the proxies in front of it, each (url, key); pids: the proxies'
    processes."""
    names, expected = list(urls), args.requests * args.max_tokens
    runs: dict[str, list[dict]] = {k: [] for k in names}
    cpu = dict.fromkeys(pids, 0.0)
    for i in range(args.rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            cpu0 = cpu_seconds(pids[name]) if name in pids else 0.0
            r = run_load(urls[name][0], [model], args.requests, args.concurrency, args.max_tokens, urls[name][1])
            if name in pids:
                cpu[name] += cpu_seconds(pids[name]) - cpu0
            if r["tokens"] != expected:  # a path that drops ignore_eos answers shorter: its tok/s would not compare
                raise RuntimeError(f"{name} returned {r['tokens']} output tokens, {expected} asked for (ignore_eos)")
            runs[name].append(r)
            print(
                f"    round {i + 1} {name:8s} {r['tok_s']:7.1f} tok/s  median TTFT {median_ms(r['ttfts']):7.1f} ms",
                flush=True,
            )
    tput = {k: sum(r["tokens"] for r in v) / sum(r["wall_s"] for r in v) for k, v in runs.items()}
    ttft = {k: median_ms([t for r in v for t in r["ttfts"]]) for k, v in runs.items()}
    probes: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(args.probes):
        for name in names:
            probes[name] += run_load(urls[name][0], [model], 1, 1, 4, urls[name][1])["ttfts"]
    probe = {k: median_ms(v) for k, v in probes.items()}
    # Each probe beside the direct one just before it: the median of these differences is the added latency with
    # the engine's drift cancelled (a difference of two medians of ~300 ms TTFTs moved by +-3 ms between runs).
    added = {k: median_ms([t - d for t, d in zip(probes[k], probes["direct"], strict=True)]) for k in names[1:]}
    vs_direct = {}
    for k in names[1:]:
        wall, tokens = sum(r["wall_s"] for r in runs[k]), sum(r["tokens"] for r in runs[k])
        vs_direct[k] = {
            "throughput_ratio": tput[k] / tput["direct"],
            # each round against the direct run next to it: the spread says how much of the ratio is noise
            "round_ratios": [r["tok_s"] / d["tok_s"] for r, d in zip(runs[k], runs["direct"], strict=True)],
            # a noise-free view of the same cost: the proxy's own CPU, which on a CPU host the engine loses
            "cpu_cores": cpu.get(k, 0.0) / wall,
            "cpu_ms_per_1k_tokens": cpu.get(k, 0.0) / tokens * 1e6,
            "added_median_ttft_ms_under_load": ttft[k] - ttft["direct"],
            "added_median_ttft_ms_one_at_a_time": added[k],
        }
    return {
        "throughput_tok_s": tput,
        "median_ttft_ms_under_load": ttft,
        "median_ttft_ms_one_at_a_time": probe,
        "cpu_count": os.cpu_count(),
        "vs_direct": vs_direct,
    }


def cold_adapter(args, gateway: str, cold: list[str]) -> dict:
    cold_ttft, warm_ttft = [], []
    for name in cold:
        cold_ttft += run_load(gateway, [name], 1, 1, 4)["ttfts"]
        warm_ttft += run_load(gateway, [name], 1, 1, 4)["ttfts"]
    c, w = median_ms(cold_ttft), median_ms(warm_ttft)
    return {"cold_ttft_ms": c, "warm_ttft_ms": w, "cold_minus_warm_ms": c - w}


def many_adapters(args, gateway: str, adapters: list[str]) -> dict:
    for name in adapters:  # loaded before timing: this measures serving, not loading
        run_load(gateway, [name], 1, 1, 2)
    one_ = run_load(gateway, adapters[:1], args.requests, args.concurrency, args.max_tokens)
    many = run_load(gateway, adapters, args.requests, args.concurrency, args.max_tokens)
    return {
        "one_adapter_tok_s": one_["tok_s"],
        f"{len(adapters)}_adapters_tok_s": many["tok_s"],
        "ratio": many["tok_s"] / one_["tok_s"],
    }


def make_adapters(base: Path, root: Path, names: list[str]) -> None:
    """A random r=8 LoRA on every linear layer under each name: the cost of serving one does not depend on what it
    learned; the same weights under another name are another adapter to vLLM."""
    print(f"==> making {len(names)} random r=8 adapters", flush=True)
    random_adapter(base, root / names[0])
    for name in names[1:]:
        shutil.copytree(root / names[0], root / name)


def measure(args: argparse.Namespace, stack: Stack, adapters: list[str], cold: list[str], litellm=None) -> dict:
    """litellm: (url, key, pid) of a LiteLLM proxy in front of the same engine, measured beside the gateway."""
    model = stack.cfg.engines[0].public_name
    urls = {"direct": (stack.engine_url(), KEY), "gateway": (stack.url, KEY)}
    pids = {"gateway": stack.gateway_pid}
    if litellm is not None:
        url, key, pids["litellm"] = litellm
        urls["litellm"] = (url, key)
    for url, key in urls.values():  # warm-up every path
        run_load(url, [model], 2, 2, 4, key)
    print(
        f"==> 1/3 overhead of {', '.join(list(urls)[1:])}: {args.rounds} rounds x {args.requests} requests, "
        f"c={args.concurrency}, {args.max_tokens} output tokens, base model",
        flush=True,
    )
    results = {"overhead": overhead(args, urls, model, pids)}
    print(f"==> 2/3 cold adapter first token ({len(cold)} adapters)", flush=True)
    results["cold_adapter"] = cold_adapter(args, stack.url, cold)
    print(f"==> 3/3 {len(adapters)} distinct adapters vs 1", flush=True)
    results["adapters"] = many_adapters(args, stack.url, adapters)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))  # kept when the run fails: the logs are in it
    adapters = [f"a{i}" for i in range(args.adapters)]
    cold = [f"cold-{i}" for i in range(args.cold)]
    make_adapters(model_path(args.model), work, adapters + cold)
    cfg = one_engine_config(
        args.model,
        work,
        adapters + cold,
        tenants={"bench": (KEY, ["*"])},
        gateway={"max_tokens_cap": 4096},
        name="bench",
        max_loras=args.adapters,
        max_cpu_loras=args.adapters + 8,
    )
    exe = None
    if args.litellm is not None:
        exe = litellm.ensure_installed() if args.litellm == "install" else Path(args.litellm)
    with running_stack(cfg, "process") as stack, contextlib.ExitStack() as proxies:  # the gateway in its own process
        other = None
        if exe is not None:
            name = stack.cfg.engines[0].public_name
            other = proxies.enter_context(litellm.running_litellm(exe, name, stack.engine_url(), free_port(), work))
        results = measure(args, stack, adapters, cold, other)
    results["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    report(results)
    out = Path(args.out) if args.out else paths.runs_dir() / "serve-bench"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def report(r: dict) -> None:
    o, c, a = r["overhead"], r["cold_adapter"], r["adapters"]
    t, u, p = o["throughput_tok_s"], o["median_ttft_ms_under_load"], o["median_ttft_ms_one_at_a_time"]
    print("\n== overhead against the engine called directly (same engine, alternating rounds)")
    print(
        f"  direct: {t['direct']:.1f} tok/s, median TTFT {u['direct']:.1f} ms under load, {p['direct']:.1f} ms alone"
    )
    for name, v in o["vs_direct"].items():
        goal = " (goal >= 0.98)" if name == "gateway" else ""
        spread = f"rounds {min(v['round_ratios']):.3f}-{max(v['round_ratios']):.3f}"
        print(f"  {name}: {t[name]:.1f} tok/s, ratio {v['throughput_ratio']:.3f}{goal}, {spread}")
        cores, n = v["cpu_cores"], o["cpu_count"]
        print(
            f"    CPU {cores:.3f} cores while serving, {v['cpu_ms_per_1k_tokens']:.0f} ms per 1k output tokens"
            f" (= {cores / n:.1%} of this machine's {n} cores)"
        )
        goal = " (goal <= 2)" if name == "gateway" else ""
        print(
            f"    added median TTFT: {v['added_median_ttft_ms_under_load']:+.1f} ms under load, "
            f"{v['added_median_ttft_ms_one_at_a_time']:+.1f} ms one at a time (median of paired probes){goal}"
        )
    print("== cold adapter (hot-load on first use)")
    print(
        f"  first token cold {c['cold_ttft_ms']:.0f} ms, warm {c['warm_ttft_ms']:.0f} ms, "
        f"cold - warm {c['cold_minus_warm_ms']:+.0f} ms"
    )
    n = next(k for k in a if k.endswith("_adapters_tok_s"))
    print("== distinct adapters")
    print(
        f"  1 adapter {a['one_adapter_tok_s']:.1f} tok/s, {n.split('_')[0]} adapters {a[n]:.1f} tok/s, "
        f"ratio {a['ratio']:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
