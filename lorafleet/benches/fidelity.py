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

from lorafleet.core import paths
from lorafleet.stack import one_engine_config, running_stack
from train.models import model_path


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", help="a running vLLM engine; default: start SmolLM2 on a free port")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    return ap.parse_args(argv)


def compare(args: argparse.Namespace, url: str, model: str) -> dict[str, list[dict]]:
    """Alternating rounds of the two tools on the engine at `url`, after one uncounted warm-up."""
    rows: dict[str, list[dict]] = {"vllm bench serve": [], "lorafleet bench": []}
    with tempfile.TemporaryDirectory() as tmp:
        lorafleet_bench(url, model, 8, 4, Path(tmp))
        for r in range(args.rounds):
            out = Path(tmp) / f"r{r}"
            out.mkdir()
            rows["lorafleet bench"].append(lorafleet_bench(url, model, args.requests, args.concurrency, out))
            rows["vllm bench serve"].append(vllm_bench(url, model, model_path(args.model), args.requests,
                                                       args.concurrency, out))  # fmt: skip
            print(f"round {r + 1}: " + "; ".join(f"{k} {v[-1]}" for k, v in rows.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        rows = compare(args, args.url, args.model)
    else:
        cfg = one_engine_config(args.model, paths.runs_dir() / "fidelity", name="fidelity")
        with running_stack(cfg, "none") as stack:
            rows = compare(args, stack.engine_url(), cfg.engines[0].public_name)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
    ours, ref = med["lorafleet bench"], med["vllm bench serve"]
    for m in ("output_tok_per_s", "ttft_p50_s"):
        print(f"{m:18} lorafleet {ours[m]:8.3f}  vllm {ref[m]:8.3f}  ratio {ours[m] / ref[m]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
