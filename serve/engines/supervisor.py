"""Keep the engine processes running: start them all, restart any that dies (with backoff), stop them all.

A restarted vLLM holds none of the adapters loaded at run time, so the supervisor tells the gateway
(`on_restart(name)`), whose registry clears that engine's loaded set and loads them back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serve.engines.engine import Engine, EngineError, EngineSpec

log = logging.getLogger("lorafleet.serve")


class Supervisor:
    def __init__(
        self,
        specs: dict[str, EngineSpec],
        log_dir: Path,
        ready_timeout: float = 900.0,
        poll_s: float = 1.0,
        backoff_s: tuple[float, float] = (1.0, 60.0),
    ):
        self.engines = {name: Engine(spec, Path(log_dir) / f"{name}.log") for name, spec in specs.items()}
        self.ready_timeout, self.poll_s, self.backoff_s = ready_timeout, poll_s, backoff_s
        self.restarts: dict[str, int] = dict.fromkeys(self.engines, 0)
        self.on_restart: Callable[[str], None] | None = None
        self.on_down: Callable[[str], None] | None = None

    def start_all(self) -> dict[str, float]:
        """Start every engine at once and wait until all answer; returns seconds to ready by engine. If one
        fails, all are stopped and EngineError says which and why."""
        for engine in self.engines.values():
            engine.start()
        pool = ThreadPoolExecutor(max(1, len(self.engines)))
        try:
            futures = {n: pool.submit(e.wait_ready, self.ready_timeout) for n, e in self.engines.items()}
            return {n: f.result() for n, f in futures.items()}
        except BaseException:  # Ctrl-C included: stopped engines also end the threads waiting on them
            self.stop_all()
            raise
        finally:
            pool.shutdown(wait=False)

    def stop_all(self) -> None:
        for engine in self.engines.values():
            engine.stop()

    async def run(self) -> None:
        """Watch every engine until cancelled."""
        await asyncio.gather(*(self._watch(name) for name in self.engines))

    async def _watch(self, name: str) -> None:
        engine, delay = self.engines[name], self.backoff_s[0]
        while True:
            await asyncio.sleep(self.poll_s)
            if engine.alive():
                continue
            log.error(
                "engine %s exited (code %s); restarting in %.0f s\n%s",
                name,
                engine.proc.returncode,
                delay,
                engine.log_tail(10),
            )
            if self.on_down:
                self.on_down(name)
            _kill_group(engine)
            await asyncio.sleep(delay)
            try:
                engine.start()
                seconds = await self._wait_ready(engine)
            except EngineError as e:
                log.error("engine %s did not come back: %s", name, e)
                delay = min(delay * 2, self.backoff_s[1])  # a crash loop must not eat the CPU
                continue
            delay = self.backoff_s[0]
            self.restarts[name] += 1
            log.info("engine %s is back after %.0f s", name, seconds)
            if self.on_restart:
                self.on_restart(name)

    async def _wait_ready(self, engine: Engine) -> float:
        # Engine.wait_ready blocks; polling here keeps the gateway's shutdown from waiting on a sleeping thread.
        deadline = engine.started_at + self.ready_timeout
        while time.monotonic() < deadline:
            if not engine.alive():
                raise EngineError(f"engine {engine.spec.name!r} exited with code {engine.proc.returncode}")
            if await asyncio.to_thread(engine.healthy):
                return time.monotonic() - engine.started_at
            await asyncio.sleep(self.poll_s)
        engine.stop()
        raise EngineError(f"engine {engine.spec.name!r} not ready after {self.ready_timeout:.0f} s")


def _kill_group(engine: Engine) -> None:
    """vLLM's worker processes can outlive a crashed API server and hold memory: end its process group."""
    try:
        os.killpg(engine.proc.pid, signal.SIGKILL)  # start_new_session: the group id is the server's pid
    except (ProcessLookupError, PermissionError):
        pass
