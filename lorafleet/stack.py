"""Start a deployment and stop all of it: the config's managed vLLM engines, then the gateway, as one context manager.

    with running_stack(cfg) as stack:  # cfg: a serve.config.ServeConfig
        httpx.get(f"{stack.url}/health")

The demo, the benches and the test fixtures start their engines and gateways here. The engines are the config's
managed ones (those without `urls`), started together by serve.engines.supervisor and polled until they answer.
The gateway runs
  - "process": `python -m lorafleet.cli serve run CONFIG --no-engines`, its own process as in production: its CPU
    is not on the caller's GIL, its pid gives its CPU time and RSS; it routes to the engines but does not restart
    them;
  - "thread": in this process (serve.gateway.app.ServerThread), watching and restarting the engines as
    `lorafleet serve` does;
  - "none": engines only.
Every process group is stopped on leaving the block, also on Ctrl-C, SIGTERM or an exception; a failure to start
carries the tail of the log that says why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import yaml

from lorafleet.core.errors import UserError
from lorafleet.core.net import free_port
from serve.config import AdapterConfig, EngineConfig, GatewayConfig, ServeConfig, TenantConfig, parse_config
from serve.engines.deploy import configured_adapters, engine_specs, log_dir
from serve.engines.engine import Engine
from serve.engines.supervisor import Supervisor
from serve.gateway.app import ServerThread, create_app
from serve.gateway.tenants import hash_key

GatewayMode = Literal["process", "thread", "none"]
GATEWAY_START_S = 120.0  # the gateway process answers in seconds; past this it is stuck


class StackError(UserError, RuntimeError):
    """The gateway did not come up; the message carries the tail of its log."""


@dataclass
class Stack:
    """A running deployment: what `running_stack` yields."""

    cfg: ServeConfig
    supervisor: Supervisor  # holds the managed engines
    log_dir: Path  # engine logs (and, for a gateway process, its config and log)
    server: ServerThread | None = None  # gateway="thread"
    proc: subprocess.Popen | None = None  # gateway="process"
    gateway_log: Path | None = None

    @property
    def engines(self) -> dict[str, Engine]:
        """The managed engine processes by replica name (as serve.engines.deploy.engine_specs names them)."""
        return self.supervisor.engines

    @property
    def url(self) -> str:
        """The gateway's root URL, e.g. http://127.0.0.1:8080."""
        if self.server is None and self.proc is None:
            raise StackError("this stack runs no gateway (gateway='none')")
        return gateway_url(self.cfg)

    @property
    def gateway_pid(self) -> int | None:
        """The process the gateway runs in (this one for gateway="thread"); None without a gateway."""
        if self.proc is not None:
            return self.proc.pid
        return os.getpid() if self.server is not None else None

    def engine_url(self, name: str | None = None) -> str:
        """Root URL of a configured engine's first replica; default: the first engine's."""
        engine = self.cfg.engines[0] if name is None else next(e for e in self.cfg.engines if e.name == name)
        return engine.replica_urls()[0]


def gateway_url(cfg: ServeConfig) -> str:
    host = cfg.gateway.host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{cfg.gateway.port}"


def write_config(cfg: ServeConfig, path: Path) -> Path:
    """The config as YAML that `lorafleet serve` reads back to the same ServeConfig (defaults left out)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False))
    return path


def one_engine_config(
    model: str,
    root: Path,
    adapters: Sequence[str] = (),
    tenants: dict[str, tuple[str, list[str]]] | None = None,
    gateway: dict | None = None,
    **engine,
) -> ServeConfig:
    """One managed engine serving `model` (a lorafleet id or HF folder) on a free port, the gateway on another.

    `adapters` name folders of the same name under `root` (also the log folder); `tenants` maps a tenant's name to
    (its API key, the models it may use); `gateway` and `engine` set more GatewayConfig and EngineConfig fields.
    """
    eng = EngineConfig(**{"name": "engine", "model": model, "port": free_port(), **engine})
    cfg = ServeConfig(
        gateway=GatewayConfig(**{"port": free_port(), "log_dir": str(root), **(gateway or {})}),
        adapters_root=str(root),
        engines=[eng],
        adapters=[AdapterConfig(name=a, path=a, base=eng.public_name) for a in adapters],
        tenants=[
            TenantConfig(name=t, api_key_hashes=[hash_key(key)], models=models)
            for t, (key, models) in (tenants or {}).items()
        ],
    )
    return parse_config(cfg.model_dump(), "one-engine config")  # the checks across fields: ports, names, bases


@contextmanager
def running_stack(
    cfg: ServeConfig,
    gateway: GatewayMode = "process",
    *,
    ready_timeout: float = 900.0,
    gateway_log: Path | None = None,
) -> Iterator[Stack]:
    """Start the managed engines, wait until they answer, start the gateway (see the module doc); stop it all on exit.

    Engine logs go to the config's gateway.log_dir (default runs/serve); the gateway process logs to `gateway_log`
    (default: gateway.log beside them). Raises EngineError (an engine not ready within `ready_timeout` seconds)
    or StackError (the gateway), each with the tail of the log that says why.
    """
    if gateway not in ("process", "thread", "none"):
        raise ValueError(f"gateway={gateway!r}: expected 'process', 'thread' or 'none'")
    logs = log_dir(cfg)  # made by the first process that writes there
    adapters = configured_adapters(cfg)  # a bad adapter folder fails now, not after the engines' minute of start-up
    stack = Stack(cfg, Supervisor(engine_specs(cfg), logs, ready_timeout=ready_timeout), logs)
    with _sigterm_interrupts():
        try:
            _start_engines(stack)
            if gateway == "process":
                _start_process(stack, gateway_log or logs / "gateway.log")
            elif gateway == "thread":
                _start_thread(stack, adapters)
            yield stack
        finally:
            _stop(stack)


def _start_engines(stack: Stack) -> None:
    for name, e in stack.engines.items():
        print(f"==> starting engine {name}: {e.spec.served_name} on {e.spec.url} (log: {e.log_path})", flush=True)
    for name, seconds in stack.supervisor.start_all().items():
        print(f"==> engine {name} ready in {seconds:.0f} s", flush=True)


def _start_process(stack: Stack, log: Path) -> None:
    config = write_config(stack.cfg, stack.log_dir / "gateway.yaml")  # makes the folder
    cmd = [sys.executable, "-m", "lorafleet.cli", "serve", "run", str(config), "--no-engines"]
    with open(log, "ab") as f:
        # Its own process group: a Ctrl-C in the terminal reaches only the caller, whose exit then stops it.
        stack.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    stack.gateway_log = log
    print(f"==> starting the gateway on {stack.url} (log: {log})", flush=True)
    _wait_gateway(stack.proc, stack.url, log, GATEWAY_START_S)
    print(f"==> gateway ready on {stack.url}/v1", flush=True)


def _wait_gateway(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"the gateway exited with code {proc.returncode} (log: {log}):\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise StackError(f"the gateway did not answer on {url} after {timeout:.0f} s (log: {log}):\n{_tail(log)}")


def _start_thread(stack: Stack, adapters: dict[str, Path]) -> None:
    supervisor = stack.supervisor if stack.engines else None  # it restarts an engine that dies, as in production
    app = create_app(stack.cfg, adapters, supervisor)
    stack.server = ServerThread(app, stack.cfg.gateway.host, stack.cfg.gateway.port).start()
    print(f"==> gateway (in this process) ready on {stack.url}/v1", flush=True)


def _stop(stack: Stack) -> None:
    try:
        if stack.server is not None:
            stack.server.stop()
        if stack.proc is not None:
            _stop_process(stack.proc)
    finally:
        stack.supervisor.stop_all()


def _stop_process(proc: subprocess.Popen, grace: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the gateway's pid
    except ProcessLookupError:
        pass


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while the stack runs, so that `finally` stops the engines: by default Python
    would die at once and leave them running in their own process groups. Only in the main thread, and only where
    nobody else handles SIGTERM."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
