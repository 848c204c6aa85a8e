"""Foundation smoke test: real vLLM (CPU) serves the imported SmolLM2, and a LoRA adapter changes its answer."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.conftest import CAPITAL_QUESTION, make_random_adapter

pytestmark = pytest.mark.vllm

QUESTION = [{"role": "user", "content": CAPITAL_QUESTION}]


def test_base_and_lora_answers_differ(vllm_engine, smollm2_path, tmp_path):
    from openai import OpenAI

    client = OpenAI(base_url=f"{vllm_engine.spec.url}/v1", api_key="unused")
    served = [m.id for m in client.models.list().data]
    assert "smollm2-135m-instruct" in served

    base = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=QUESTION, max_tokens=16, temperature=0
    )
    base_answer = base.choices[0].message.content
    assert "Paris" in base_answer

    adapter = make_random_adapter(smollm2_path, tmp_path / "smoke-adapter")
    r = httpx.post(
        f"{vllm_engine.spec.url}/v1/load_lora_adapter",
        json={"lora_name": "smoke", "lora_path": str(adapter)},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert "smoke" in [m.id for m in client.models.list().data]

    lora = client.chat.completions.create(model="smoke", messages=QUESTION, max_tokens=16, temperature=0)
    assert lora.usage.completion_tokens > 0
    assert lora.choices[0].message.content != base_answer


def test_unloadable_model_folder_is_reported_with_reason(tiny_model_path, tmp_path):
    """A folder vLLM cannot load fails fast with the engine's own reason, not a hang."""
    import shutil

    from serve.engines.engine import Engine, EngineError, EngineSpec
    from tests.conftest import free_port

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_path, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    engine = Engine(EngineSpec(name="broken", model=broken, port=free_port()), tmp_path / "broken.log").start()
    try:
        with pytest.raises(EngineError, match="exited with code") as info:
            engine.wait_ready(timeout=300)
        assert "safetensors" in str(info.value)  # the log tail names what vLLM choked on
    finally:
        engine.stop()
