"""`lorafleet serve`: run the engines and the gateway, check a config, hash a key, benchmark the gateway.

lorafleet serve [CONFIG] [--host H] [--port P] [--no-engines] [--engines smollm2,gemma] [--no-worker]
lorafleet serve check [CONFIG]
lorafleet serve hash-key KEY
lorafleet serve bench [--help]
lorafleet serve soak [--seconds 600] [--help]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from lorafleet.benches import gateway as bench
from lorafleet.benches import soak
from lorafleet.core.errors import UserError
from lorafleet.worker import Worker, WorkerProcess
from serve.config import load_config
from serve.engines.deploy import configured_adapters, engine_specs, log_dir
from serve.engines.supervisor import Supervisor
from serve.gateway.app import create_app, uvicorn_config
from serve.gateway.tenants import hash_key


def _run_parser(prog: str = "lorafleet serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="start the vLLM engines, then the gateway")
    p.add_argument("config", nargs="?", help="deployment YAML (default: the embedded serve/default.yaml)")
    _run_options(p)
    return p


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="gateway address (default: the config's gateway.host)")
    p.add_argument("--port", type=int, help="gateway port (default: the config's gateway.port)")
    p.add_argument("--no-engines", action="store_true", help="start no engine: they already run on their ports")
    p.add_argument("--engines", help="comma-separated engine names to start (default: all); others get 503")
    p.add_argument(
        "--no-worker", action="store_true", help="run no fine-tuning worker here (lorafleet worker elsewhere)"
    )


def register(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    _run_options(p)
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="[CONFIG | check | hash-key | bench | soak] ...")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    action = rest[0] if rest else None
    if action == "hash-key":
        return _hash_key(rest[1:])
    if action == "check":
        return _check(rest[1:])
    if action == "bench":
        return bench.main(rest[1:])
    if action == "soak":
        return soak.main(rest[1:])
    if action == "run":
        rest = rest[1:]
    more = _run_parser().parse_args(rest)
    for key in ("host", "port", "engines"):
        if getattr(more, key) is not None:
            setattr(args, key, getattr(more, key))
    args.no_engines = args.no_engines or more.no_engines
    args.no_worker = args.no_worker or more.no_worker
    return _serve(more.config, args)


def _hash_key(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lorafleet serve hash-key", description="print the hash to put in a config")
    p.add_argument("key")

    print(hash_key(p.parse_args(argv).key))
    return 0


def _check(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lorafleet serve check", description="validate a config (default: embedded)")
    p.add_argument("config", nargs="?")
    cfg = load_config(p.parse_args(argv).config)

    adapters = configured_adapters(cfg)
    for e in cfg.engines:
        where = ", ".join(e.replica_urls()) or f"the addresses of {e.dns} (dns)"
        print(f"engine {e.name}: model {e.public_name} at {where}{'' if e.managed else ' (external)'}")
    for a in cfg.adapters:
        state = "ok" if a.name in adapters or a.mode == "merged" else "missing (skipped)"
        print(f"adapter {a.name}: {a.mode} on {a.base}, {state}")
    for t in cfg.tenants:
        print(f"tenant {t.name}: models {t.models}, limits {t.limits.model_dump(exclude_none=True)}")
    print("config ok")
    return 0


def start_worker(store, cfg, config: str | None) -> WorkerProcess | Worker:
    """The fine-tuning worker beside the gateway: a process of its own on the gateway's store. A `memory` store
    lives in this process only, so there the worker is a thread (tests and trials; a tenant's scorer then runs
    here, bounded by its time limit per match)."""
    if store.url == "memory":
        worker = Worker(store, cfg)
        threading.Thread(target=worker.run_forever, daemon=True, name="lorafleet-worker").start()
        print(f"==> fine-tuning worker {worker.name} in this process (store: memory; a shared store runs it in a "
              "process of its own)", flush=True)  # fmt: skip
        return worker
    print(f"==> fine-tuning worker process on {store.url}", flush=True)
    return WorkerProcess(config, store.url).start()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _serve(config: str | None, args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per engine call costs CPU and says little
    cfg = load_config(config)
    host, port = args.host or cfg.gateway.host, args.port or cfg.gateway.port
    adapters = configured_adapters(cfg)
    specs = {} if args.no_engines else engine_specs(cfg)
    if args.engines:
        wanted = set(args.engines.split(","))
        unknown = wanted - set(specs)
        if unknown:
            raise UserError(f"--engines: unknown {sorted(unknown)}; this config runs {sorted(specs)}")
        specs = {n: s for n, s in specs.items() if n in wanted}
    supervisor, worker = Supervisor(specs, log_dir(cfg)), None
    # Engines run in their own process groups: a SIGTERM during start-up must still reach `finally` below.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for name, spec in specs.items():
            print(f"==> starting engine {name}: {spec.served_name} on {spec.url} (log: {log_dir(cfg)}/{name}.log)")
        for name, seconds in supervisor.start_all().items():
            print(f"==> engine {name} ready in {seconds:.0f} s; its vLLM metrics: {specs[name].url}/metrics")
        app = create_app(cfg, adapters, supervisor)
        worker = None if args.no_worker else start_worker(app.state.gateway.store, cfg, config)
        print(f"==> gateway on http://{host}:{port}/v1 (metrics: /metrics); Ctrl-C stops everything", flush=True)
        uvicorn.Server(uvicorn_config(app, host, port)).run()
    finally:
        if isinstance(worker, WorkerProcess):
            worker.close()
        elif worker is not None:
            worker.stop.set()
        supervisor.stop_all()
    return 0


if __name__ == "__main__":
    from lorafleet.cli import main as lorafleet_main

    sys.exit(lorafleet_main(["serve", *sys.argv[1:]]))
