"""The vLLM contract: what vLLM accepts from a LoRA adapter and its engine flags. One copy, for train and serve."""

from __future__ import annotations

# vLLM only serves ranks up to --max-lora-rank, which must itself be one of these (vllm/config/lora.py).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# vLLM packs q/k/v into qkv_proj and gate/up into gate_up_proj (packed_modules_mapping in
# vllm/model_executor/models/{llama,gemma3}.py) and adapts every linear layer; an adapter names the HF modules.
LLAMA_STYLE = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
SUPPORTED_MODULES = {
    "LlamaForCausalLM": LLAMA_STYLE,
    "Gemma3ForCausalLM": LLAMA_STYLE,
    "MistralForCausalLM": LLAMA_STYLE,
    "Qwen2ForCausalLM": LLAMA_STYLE,
    "Qwen3ForCausalLM": LLAMA_STYLE,
}

# PEFT initialisations that rewrite the base weights; vLLM refuses them (peft_helper._init_is_supported).
BASE_CHANGING_INITS = frozenset({"pissa", "olora", "corda", "loftq"})


def supported_modules(architecture: str) -> frozenset[str]:
    return SUPPORTED_MODULES.get(architecture, LLAMA_STYLE)
