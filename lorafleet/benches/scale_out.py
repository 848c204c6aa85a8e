"""Scale-out on real parts: `python -m lorafleet.benches.scale_out`.

Starts a real PostgreSQL and Redis, two SmolLM2 vLLM engine replicas, and three gateway processes over them that
share the store and the limits: two with bounded-load placement, one pinned (each adapter always on its own
replica). Then, in one run:
  1. shared limits: a tenant with rpm=60 hammered through both bounded gateways at once for --rpm-seconds;
     accepted requests (60, not 120, is the goal);
  2. spill vs pinned: a skewed mix (one adapter --hot share of the traffic) at a load that saturates one replica,
     alternating rounds through the pinned and a bounded gateway; output throughput and TTFT p90 of each;
  3. a replica killed mid-run under load through a bounded gateway: failed requests, seconds until every
     request succeeds again, and where the adapters are afterwards.
Prints the figures and writes them as JSON under runs/scale-out/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx

from loadtest.client import ClientPool, RequestRecord, auth_headers, build_body, endpoint, stream_request
from loadtest.config import Target
from lorafleet.benches.gateway import KEY, PROMPTS, make_adapters, run_load
from lorafleet.benches.lora_cost import p90
from lorafleet.core import paths
from lorafleet.core.net import free_port
from lorafleet.services import PostgresServer, RedisServer
from lorafleet.stack import one_engine_config, running_stack
from serve.config import AdapterConfig, EngineConfig, GatewayConfig, Limits, ServeConfig, TenantConfig
from serve.gateway.tenants import hash_key
from train.models import model_path

HAMMER_KEY = "sk-hammer"
ADMIN_KEY = "sk-admin-bench"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lorafleet.benches.scale_out", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="smollm2-135m-instruct", help="model id or HF folder")
    p.add_argument("--rpm-seconds", type=float, default=60.0, help="how long the rpm=60 tenant is hammered")
    p.add_argument("--rounds", type=int, default=2, help="spill-vs-pinned rounds per gateway")
    p.add_argument("--requests", type=int, default=48, help="requests per round")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--hot", type=float, default=0.8, help="share of the traffic on the hot adapter")
    p.add_argument("--kill-seconds", type=float, default=30.0, help="length of the replica-kill run")
    p.add_argument(
        "--no-bind",
        dest="bind",
        action="store_false",
        help="let both engines use every core (default: one core each, like two machines)",
    )
    p.add_argument("--out", default=None, help="JSON results folder (default runs/scale-out)")
    return p.parse_args(argv)


def gateway_config(args, root: Path, urls: list[str], adapters: list[str], store: str, redis: str,
                   placement: str) -> ServeConfig:  # fmt: skip
    engine = EngineConfig(name="smollm2", model=args.model, urls=urls, max_loras=4)
    base = engine.public_name
    return ServeConfig(
        gateway=GatewayConfig(port=free_port(), log_dir=str(root / f"gateway-{placement}-{free_port()}"), store_url=store, redis_url=redis,
                              placement=placement, admin_key_hash=hash_key(ADMIN_KEY),
                              health_interval_s=1.0),  # fmt: skip
        adapters_root=str(root),
        engines=[engine],
        adapters=[AdapterConfig(name=a, path=a, base=base) for a in adapters],
        tenants=[TenantConfig(name="load", api_key_hashes=[hash_key(KEY)]),
                 TenantConfig(name="hammer", api_key_hashes=[hash_key(HAMMER_KEY)], limits=Limits(rpm=60))],
    )  # fmt: skip


# -- 1. one rpm limit across two gateways


def hammer(gateways: list[str], model: str, seconds: float, threads: int = 8) -> dict:
    deadline = time.monotonic() + seconds
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

    def worker(i: int) -> list[int]:
        codes = []
        with httpx.Client(timeout=60, trust_env=False) as c:
            while time.monotonic() < deadline:
                url = gateways[i % len(gateways)]
                codes.append(c.post(f"{url}/v1/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {HAMMER_KEY}"}).status_code)  # fmt: skip
        return codes

    with ThreadPoolExecutor(threads) as pool:
        codes = [c for cs in pool.map(worker, range(threads)) for c in cs]
    return {"accepted": codes.count(200), "refused_429": codes.count(429), "other": len(codes) - codes.count(200)
            - codes.count(429), "seconds": seconds, "gateways": len(gateways), "rpm": 60}  # fmt: skip


# -- 2. spill vs pinned


def skewed(hot: str, cold: list[str], share: float) -> list[str]:
    """A cycle of model names with `share` of them the hot adapter, the rest spread over the cold ones."""
    n = 20
    k = round(share * n)
    return [hot] * k + [cold[i % len(cold)] for i in range(n - k)]


def spill_vs_pinned(args, pinned: str, spill: str, models: list[str]) -> dict:
    results = {"pinned": [], "bounded": []}
    for i in range(args.rounds):
        order = (("pinned", pinned), ("bounded", spill)) if i % 2 == 0 else (("bounded", spill), ("pinned", pinned))
        for name, url in order:
            r = run_load(url, models, args.requests, args.concurrency, args.max_tokens)
            results[name].append({"tok_s": r["tok_s"], "ttft_p90_s": p90(r["ttfts"])})
            print(f"    round {i + 1} {name:8s} {r['tok_s']:7.1f} tok/s  TTFT p90 {p90(r['ttfts']) * 1e3:7.0f} ms",
                  flush=True)  # fmt: skip
    return results


# -- 3. a replica killed under load


async def kill_run(url: str, models: list[str], seconds: float, concurrency: int, max_tokens: int, kill) -> dict:
    target = Target(name="kill", base_url=f"{url}/v1", model=models[0], api_key=KEY, price={"usd_per_hour": 1})
    headers, records, t0 = auth_headers(KEY), [], time.perf_counter()
    killed_at: list[float] = []

    async def loop(pool: ClientPool, w: int) -> None:
        i = w
        while time.perf_counter() - t0 < seconds:
            body = build_body(target, models[i % len(models)], [{"role": "user", "content": PROMPTS[i % 64]}],
                              max_tokens, force_output_len=True)  # fmt: skip
            start = time.perf_counter() - t0
            async with pool.lease() as client:
                rec = await stream_request(client, endpoint(target), headers, body, RequestRecord("m", start), t0)
            records.append((start, time.perf_counter() - t0, rec.ok, rec.error))
            i += concurrency

    async def killer() -> None:
        await asyncio.sleep(seconds / 3)
        killed_at.append(time.perf_counter() - t0)
        kill()

    async with ClientPool(timeout_s=120) as pool:
        await asyncio.gather(killer(), *(loop(pool, w) for w in range(concurrency)))
    k = killed_at[0]
    failed = [r for r in records if not r[2]]
    after = [r for r in records if r[0] >= k]
    return {"requests": len(records), "failed": len(failed), "killed_at_s": round(k, 2),
            "failed_in_flight_at_kill": sum(1 for r in failed if r[0] < k),
            "failed_sent_after_kill": sum(1 for r in failed if r[0] >= k),
            "last_failure_ended_s_after_kill": round(max((r[1] for r in failed), default=k) - k, 2),
            "first_success_sent_after_kill_s": round(min((r[1] for r in after if r[2]), default=float("nan")) - k, 2),
            "ok_after_kill": sum(1 for r in after if r[2]),
            "first_errors": sorted({(r[3] or "")[:120] for r in failed})[:3]}  # fmt: skip


def placements(url: str) -> dict[str, dict]:
    """Each replica: up, and the adapters the gateway has loaded there."""
    r = httpx.get(f"{url}/admin/engines", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    return {x["name"]: {"up": x["up"], "adapters": sorted(a.split("@")[0] for a in x["adapters"])}
            for x in r.json()["engines"][0]["replicas"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-scale-out-"))
    work.chmod(0o711)  # the `postgres` user must pass through to its folder
    adapters = ["hot", "cold-1", "cold-2", "cold-3"]
    make_adapters(model_path(args.model), work, adapters)
    # One core each, as two machines would have their own: two engines sharing both cores would measure contention.
    cores = [str(i % (os.cpu_count() or 1)) for i in range(2)] if args.bind else []
    engines_cfg = one_engine_config(args.model, work, name="smollm2", replicas=2, max_loras=4, cpu_bind=cores)
    results: dict = {"model": args.model, "hot_share": args.hot, "cpu_bind": cores}
    with ExitStack() as stack:
        print("==> starting PostgreSQL, Redis and two vLLM engine replicas", flush=True)
        pg = PostgresServer(work / "pg").start()
        stack.callback(pg.stop)
        redis = RedisServer(work / "redis").start()
        stack.callback(redis.stop)
        engines = stack.enter_context(running_stack(engines_cfg, "none", ready_timeout=900))
        urls = engines_cfg.engines[0].replica_urls()
        store = pg.fresh_database("scale_out")
        print("==> starting three gateway processes (2 bounded, 1 pinned) on one store and one Redis", flush=True)
        gws = {}
        for name, placement in (("a", "bounded"), ("b", "bounded"), ("pinned", "pinned")):
            cfg = gateway_config(args, work, urls, adapters, store, redis.url, placement)
            gws[name] = stack.enter_context(
                running_stack(cfg, "process", gateway_log=work / f"gateway-{name}.log")
            ).url
        model = engines_cfg.engines[0].public_name
        for url in gws.values():  # warm-up: every adapter loaded where it lives, both engines compiled
            run_load(url, adapters, 8, 4, 4)

        print(f"==> 1/3 rpm=60 through 2 gateways for {args.rpm_seconds:.0f} s", flush=True)
        results["rpm"] = hammer([gws["a"], gws["b"]], model, args.rpm_seconds)
        print(f"    accepted {results['rpm']['accepted']} (goal 60; per-process limits: 120), "
              f"429: {results['rpm']['refused_429']}, other: {results['rpm']['other']}", flush=True)  # fmt: skip

        mix = skewed("hot", adapters[1:], args.hot)
        print(
            f"==> 2/3 skewed mix ({args.hot:.0%} on one adapter), c={args.concurrency}: pinned vs bounded", flush=True
        )
        results["spill"] = spill_vs_pinned(args, gws["pinned"], gws["a"], mix)
        results["placement_after_spill"] = placements(gws["a"])

        print(f"==> 3/3 killing replica smollm2-1 {args.kill_seconds / 3:.0f} s into a {args.kill_seconds:.0f} s run",
              flush=True)  # fmt: skip
        victim = engines.engines["smollm2-1"]
        results["before_kill"] = placements(gws["a"])
        kill = lambda: os.killpg(victim.proc.pid, signal.SIGKILL)  # noqa: E731
        results["kill"] = asyncio.run(kill_run(gws["a"], mix, args.kill_seconds, 8, args.max_tokens // 2, kill))
        results["after_kill"] = placements(gws["a"])
    report(results)
    out = Path(args.out) if args.out else paths.runs_dir() / "scale-out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {out / 'results.json'}")
    return 0


def report(r: dict) -> None:
    print("\n== scale-out")
    rpm = r["rpm"]
    print(f"  rpm=60 across {rpm['gateways']} gateways, {rpm['seconds']:.0f} s: {rpm['accepted']} accepted (goal 60)")
    for name in ("pinned", "bounded"):
        rounds = r["spill"][name]
        print(f"  {name:8s} {statistics.median(x['tok_s'] for x in rounds):7.1f} tok/s  TTFT p90 "
              f"{statistics.median(x['ttft_p90_s'] for x in rounds) * 1e3:6.0f} ms  (median of {len(rounds)} rounds)")  # fmt: skip
    tp = [b["tok_s"] / p["tok_s"] for b, p in zip(r["spill"]["bounded"], r["spill"]["pinned"], strict=True)]
    tt = [b["ttft_p90_s"] / p["ttft_p90_s"] for b, p in zip(r["spill"]["bounded"], r["spill"]["pinned"], strict=True)]
    print(f"  bounded / pinned: throughput {statistics.median(tp):.2f}x [{min(tp):.2f}-{max(tp):.2f}], "
          f"TTFT p90 {statistics.median(tt):.2f}x [{min(tt):.2f}-{max(tt):.2f}]")  # fmt: skip
    print(f"  adapters after the skewed rounds: {r['placement_after_spill']}")
    k = r["kill"]
    print(f"  replica killed: {k['failed']} of {k['requests']} requests failed ({k['failed_in_flight_at_kill']} in "
          f"flight at the kill, {k['failed_sent_after_kill']} sent after); the first request sent after the kill "
          f"completed {k['first_success_sent_after_kill_s']} s after it, the last failure ended "
          f"{k['last_failure_ended_s_after_kill']} s after it")  # fmt: skip
    print(f"  adapters before: {r['before_kill']}; after: {r['after_kill']}")


if __name__ == "__main__":
    sys.exit(main())
