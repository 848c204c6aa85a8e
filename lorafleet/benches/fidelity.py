"""`python -m lorafleet.benches.fidelity`: does `lorafleet bench` agree with vLLM's own `vllm bench serve`?

Same engine, same load (completions endpoint, ~64 tokens in, 64 forced out, closed loop), alternating rounds of
the two tools; prints output throughput and median TTFT of each and their ratios (goal: within 5 %).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def vllm_bench(url: str, model: str, tokenizer: Path, n: int, concurrency: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai",
           "--base-url", url, "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "random",
           "--random-input-len", "64", "--random-output-len", "64", "--num-prompts", str(n),
           "--max-concurrency", str(concurrency), "--ignore-eos", "--save-result", "--result-dir", str(out),
           "--result-filename", "vllm.json"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    r = json.loads((out / "vllm.json").read_text())
    return {"output_tok_per_s": r["output_throughput"], "ttft_p50_s": r["median_ttft_ms"] / 1000}


def lorafleet_bench(url: str, model: str, n: int, concurrency: int, out: Path) -> dict:
    cfg = {
        "targets": [
            {
                "name": "engine",
                "base_url": f"{url}/v1",
                "model": model,
                "api": "completions",
                "price": {"usd_per_hour": 1.0},
            }
        ],  # fmt: skip
        "load": {
            "mode": "closed",
            "concurrency": concurrency,
            "num_requests": n,
            "warmup_requests": 0,
            "max_tokens": 64,
            "force_output_len": True,
        },  # fmt: skip
        "prompts": {"source": "synthetic", "input_tokens": 64},
        "output_dir": str(out / "lf"),
    }
    (out / "lf.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "lorafleet.cli", "bench", "run", str(out / "lf.yaml"), "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    step = json.loads((out / "lf" / "results.json").read_text())["targets"]["engine"]["steps"][0]
    return {"output_tok_per_s": step["output_tok_per_s"], "ttft_p50_s": step["ttft"]["p50"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", help="a running vLLM engine; default: start SmolLM2 on a free port")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    from train.models import model_path

    tokenizer = model_path(args.model)
    engine = None
    if not args.url:
        import socket

        from serve.engines.engine import Engine, EngineSpec

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        engine = Engine(EngineSpec("fidelity", tokenizer, port, served_name=args.model), Path("runs/fidelity.log"))
        engine.start().wait_ready()
        args.url = engine.spec.url
    rows: dict[str, list[dict]] = {"vllm bench serve": [], "lorafleet bench": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            lorafleet_bench(args.url, args.model, 8, 4, Path(tmp))  # warm-up, not counted
            for r in range(args.rounds):
                out = Path(tmp) / f"r{r}"
                out.mkdir()
                rows["lorafleet bench"].append(
                    lorafleet_bench(args.url, args.model, args.requests, args.concurrency, out)
                )
                rows["vllm bench serve"].append(vllm_bench(args.url, args.model, tokenizer, args.requests,
                                                           args.concurrency, out))  # fmt: skip
                print(f"round {r + 1}: " + "; ".join(f"{k} {v[-1]}" for k, v in rows.items()), flush=True)
    finally:
        if engine:
            engine.stop()
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
    ours, ref = med["lorafleet bench"], med["vllm bench serve"]
    for m in ("output_tok_per_s", "ttft_p50_s"):
        print(f"{m:18} lorafleet {ours[m]:8.3f}  vllm {ref[m]:8.3f}  ratio {ours[m] / ref[m]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
