"""The fine-tuning round trip a tenant makes with the official `openai` client, on real vLLM (CPU): upload, create a
job, watch its events, and chat with the `ft:` model it made; the other tenant cannot see or use it."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from lorafleet.worker import Worker
from tests.conftest import LIVE_KEYS

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROWS = [{"messages": [{"role": "user", "content": f"Route ticket {i}: my invoice is wrong"},
                      {"role": "assistant", "content": "billing"}]} for i in range(8)]  # fmt: skip
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


def test_fine_tune_then_chat_with_the_openai_client(live_gateway):
    gateway = live_gateway.gateway
    worker = Worker(gateway.store, gateway.cfg, name="live", poll_s=0.2)
    threading.Thread(target=worker.run_forever, daemon=True).start()
    c = openai.OpenAI(base_url=f"{live_gateway.url}/v1", api_key=LIVE_KEYS["acme"], max_retries=0)
    other = openai.OpenAI(base_url=f"{live_gateway.url}/v1", api_key=LIVE_KEYS["globex"], max_retries=0)
    t0 = time.monotonic()
    try:
        train = c.files.create(file=("train.jsonl", JSONL), purpose="fine-tune")
        valid = c.files.create(file=("valid.jsonl", JSONL[: len(JSONL) // 2]), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=train.id,
                                        validation_file=valid.id, suffix="billing",
                                        hyperparameters={"n_epochs": 1, "batch_size": 4})  # fmt: skip
        while (job := c.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() - t0 < 600, f"job still {job.status}"
            time.sleep(1)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model == f"ft:smollm2-135m-instruct:acme:billing:{job.id}" and job.trained_tokens > 0
        events = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=50).data]
        assert events[0] == "The job has successfully completed" and any(m.startswith("Step 2/2") for m in events)
        assert len(c.fine_tuning.jobs.checkpoints.list(job.id).data) == 1

        deadline = time.monotonic() + 30  # the gateway picks the new model up from the store within a poll or two
        while job.fine_tuned_model not in [m.id for m in c.models.list().data]:
            assert time.monotonic() < deadline, "the ft: model never appeared in GET /v1/models"
            time.sleep(0.5)
        reply = c.chat.completions.create(model=job.fine_tuned_model, max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "Route ticket 99: my invoice is wrong"}])  # fmt: skip
        assert reply.usage.completion_tokens > 0 and reply.choices[0].message.content
        print(f"\nfine-tuning round trip: {time.monotonic() - t0:.0f} s to the first chat with {job.fine_tuned_model}")

        assert job.fine_tuned_model not in [m.id for m in other.models.list().data]
        with pytest.raises(openai.NotFoundError):
            other.chat.completions.create(model=job.fine_tuned_model, max_tokens=4,
                                          messages=[{"role": "user", "content": "hi"}])  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            other.fine_tuning.jobs.retrieve(job.id)
    finally:
        worker.stop.set()
