"""Locust users for the lorafleet gateway or any OpenAI-compatible server: streamed chat completions.

    locust -f loadtest/locustfile.py --headless -u 4 -r 2 -t 20s --host http://127.0.0.1:8080
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080      # web UI on :8089

Environment:
    LORAFLEET_LOCUST_MIX      tenants as key:model[:weight], comma separated, e.g.
                              "acme-key:manifest:0.7,globex-key:contract:0.3" (each request picks one by weight)
    LORAFLEET_API_KEY         key when no mix is given (default: none)
    LORAFLEET_MODEL           model when no mix is given (default smollm2-135m-instruct)
    LORAFLEET_MAX_TOKENS      max_tokens per request (default 64)
    LORAFLEET_INPUT_WORDS     words in each synthetic prompt (default 128)
    LORAFLEET_FORCE_OUTPUT_LEN  1 = send ignore_eos + min_tokens=max_tokens (vLLM) so every answer has max_tokens
    LORAFLEET_WAIT_S          pause between a user's requests (default 0: a closed loop)

Besides one row per model for the POST itself (time to response headers), each request reports its own
rows: time_to_first_token, inter_token_latency (mean gap between chunks), time_per_output_token and
total_latency, all in ms with the output token count (from the server's usage) as their "size".
Caveat: Locust rounds response times (to 10 ms above 100 ms), and its users form a closed loop; use
`lorafleet bench run` for open-loop arrivals and exact percentiles.

This file uses plain `requests` through Locust's HttpUser (gevent-friendly); it must not use asyncio.
"""

from __future__ import annotations

import json
import random
import time

from locust import HttpUser, constant, events, task

try:
    from loadtest.locust_env import WORDS, settings_from_env
except ImportError:  # run from a checkout that is not installed: locust puts this folder on sys.path
    from locust_env import WORDS, settings_from_env

SETTINGS = settings_from_env()


def _metric(name: str, ms: float, tokens: int) -> None:
    events.request.fire(
        request_type="METRIC", name=name, response_time=ms, response_length=tokens, exception=None, context={}
    )


class OpenAIStreamUser(HttpUser):
    wait_time = constant(SETTINGS.wait_s)

    def on_start(self) -> None:
        self.rng = random.Random()
        base = (self.host or "").rstrip("/")
        self.path = "/chat/completions" if base.endswith("/v1") else "/v1/chat/completions"
        self.weights = [w for _, _, w in SETTINGS.mix]

    def _body(self, model: str) -> dict:
        prompt = " ".join(self.rng.choice(WORDS) for _ in range(SETTINGS.input_words))
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": SETTINGS.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if SETTINGS.force_output_len:
            body.update(ignore_eos=True, min_tokens=SETTINGS.max_tokens)
        return body

    @task
    def chat(self) -> None:
        key, model, _ = self.rng.choices(SETTINGS.mix, weights=self.weights)[0]
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        start = time.perf_counter()
        with self.client.post(
            self.path, json=self._body(model), headers=headers, stream=True, catch_response=True, name=f"chat {model}"
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                ttft, gaps, tokens = self._read_stream(resp, start)
            except Exception as e:  # a broken stream is a failed request, not a crashed user
                resp.failure(f"{type(e).__name__}: {e}")
                return
            if ttft is None:
                resp.failure("the stream carried no content")
                return
            e2e = time.perf_counter() - start
            # Locust's "size" column of this row: output tokens (from usage) instead of bytes.
            resp.request_meta["response_length"] = tokens
            resp.success()
        _metric("time_to_first_token", ttft * 1000, tokens)
        if gaps:
            _metric("inter_token_latency", sum(gaps) / len(gaps) * 1000, tokens)
        if tokens > 1:
            _metric("time_per_output_token", (e2e - ttft) / (tokens - 1) * 1000, tokens)
        _metric("total_latency", e2e * 1000, tokens)

    @staticmethod
    def _read_stream(resp, start: float) -> tuple[float | None, list[float], int]:
        """(TTFT s, gaps between content chunks, output tokens from usage or else chunks)."""
        ttft, last, gaps, chunks, tokens = None, start, [], 0, None
        for line in resp.iter_lines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            obj = json.loads(payload)
            if "error" in obj and "choices" not in obj:
                raise RuntimeError(str(obj["error"])[:200])
            if obj.get("usage"):
                tokens = int(obj["usage"].get("completion_tokens") or 0)
            text = "".join((c.get("delta") or {}).get("content") or "" for c in obj.get("choices") or ())
            if text:
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - start
                else:
                    gaps.append(now - last)
                last = now
                chunks += 1
        return ttft, gaps, tokens if tokens is not None else chunks
