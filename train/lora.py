"""The model side of training: the base in bf16 wrapped with PEFT LoRA, the optimizer, and the loss taken only
where labels are (sharing the prefix every example of a batch has)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lorafleet.core.cpu import fast_bf16
from train.config import TrainConfig, TrainError
from train.dataset import IGNORE, Example, collate
from train.export import supported_modules


def use_bf16(setting: str) -> bool:
    if setting != "auto":
        return setting == "true"
    return fast_bf16()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of every nn.Linear except the LM head: q/k/v/o/gate/up/down_proj for Llama."""
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    return sorted(names - {"lm_head"})


def top_layers(model: torch.nn.Module, n: int) -> list[int] | None:
    """PEFT's layers_to_transform for the top n decoder layers (None: all). Nothing below them has trainable
    weights, so autograd stops there: the backward pass, twice the forward's cost, shrinks to those layers."""
    total = model.config.num_hidden_layers
    if n == 0 or n == total:
        return None
    if n > total:
        raise TrainError(f"top_layers={n} but {model.config.model_type} has {total} layers: use 1..{total} or 0 (all)")
    return list(range(total - n, total))


def build_model(cfg: TrainConfig, base_path: Path, bf16: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    targets = cfg.target_modules or linear_module_names(base)
    arch = (base.config.architectures or [type(base).__name__])[0]
    bad = sorted(set(targets) - supported_modules(arch))
    if bad:
        raise TrainError(
            f"target_modules {bad} cannot be served by vLLM for {arch}: use {sorted(supported_modules(arch))}"
        )
    # Seed right before the adapter exists: LoRA A is drawn at creation (unsloth#617).
    seed_everything(cfg.seed)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        layers_to_transform=top_layers(base, cfg.top_layers),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master weights for the adapter; autocast runs the matmuls in bf16
    return model


def param_counts(model) -> dict[str, Any]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "share": round(trainable / total, 5)}


def build_optimizer(model, cfg: TrainConfig, steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    warm = int(cfg.warmup) if cfg.warmup >= 1 else int(cfg.warmup * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, steps - warm)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0 - min(1.0, progress) if cfg.schedule == "linear" else 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------- loss


# Architectures whose decoder is checked to give the same loss with a shared-prefix KV cache (tests/train).
PREFIX_SHARING_MODELS = {"llama", "mistral", "qwen2", "qwen3"}
MIN_SHARED_PREFIX = 16  # below this the extra decoder call costs more than it saves


def shared_prefix_len(batch: dict[str, torch.Tensor]) -> int:
    """How many leading tokens every row shares and none of them is scored on (the system prompt, usually).

    Tasks repeat one instruction in every example (35-50 % of the tokens of the built-in tasks). Position p's
    hidden state predicts token p+1, so the prefix stops one token before the first labelled token of any row.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.shape[0] < 2:
        return 0
    common = int((ids == ids[:1]).all(dim=0).int().cumprod(0).sum())
    labelled = (labels != IGNORE).any(dim=0).nonzero()
    first_label = int(labelled[0]) if len(labelled) else ids.shape[1]
    n = min(common, first_label - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


def _decoder_hidden(lm, input_ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """The decoder's last hidden states for positions prefix.. of each row.

    With a shared prefix, it runs once (batch of 1) into a KV cache that is repeated across the batch; the rows
    then attend to it exactly as to their own copy. Gradients flow back through the repeated cache, so the
    prefix's LoRA weights get the sum of every row's gradient, as without sharing.
    """
    decoder = lm.get_decoder()
    if not prefix:
        return decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    cache = decoder(input_ids=input_ids[:1, :prefix], use_cache=True).past_key_values
    cache.batch_repeat_interleave(input_ids.shape[0])
    return decoder(input_ids=input_ids[:, prefix:], past_key_values=cache, use_cache=True).last_hidden_state


def loss_sum(
    model, batch: dict[str, torch.Tensor], logits_at_labels: bool = True, share_prefix: bool = True
) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions.

    With `logits_at_labels` the decoder runs alone and the LM head is applied only to the hidden states whose
    next token is labelled: the answer is a few dozen tokens of a several-hundred-token example, and the head
    (49k x 576 for SmolLM2) is about a fifth of the forward FLOPs plus a large fp32 softmax. With `share_prefix`
    (on architectures in PREFIX_SHARING_MODELS) the prefix all rows share is computed once per batch.

    No attention mask is passed: padding is on the right and attention is causal, so no real token can see a
    pad, and pad positions are never labelled. Without a mask SDPA takes its faster causal kernel.
    """
    lm = model.get_base_model()
    targets = batch["labels"][:, 1:]
    if logits_at_labels:
        shareable = share_prefix and getattr(lm.config, "model_type", None) in PREFIX_SHARING_MODELS
        prefix = shared_prefix_len(batch) if shareable else 0
        hidden = _decoder_hidden(lm, batch["input_ids"], prefix)
        targets = targets[:, prefix:]
        keep = targets != IGNORE
        logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
        cap = getattr(lm.config, "final_logit_softcapping", None)
        if cap:  # Gemma-2 style models squash logits; keep the loss identical to the full forward
            logits = torch.tanh(logits / cap) * cap
    else:
        keep = targets != IGNORE
        logits = lm(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1][keep]
    if "weights" not in batch:
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    weights = batch["weights"][:, 1:][:, -targets.shape[1] :][keep]  # aligned with targets, past any shared prefix
    return (F.cross_entropy(logits.float(), targets[keep], reduction="none") * weights).sum()


def n_labels(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def label_weight(batch: dict[str, torch.Tensor]) -> float:
    """What loss_sum's sum is divided by for a mean: the label count, or the labels' summed weights."""
    if "weights" not in batch:
        return n_labels(batch)
    return float(batch["weights"][:, 1:][batch["labels"][:, 1:] != IGNORE].sum())


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], cfg: TrainConfig, pad_id: int, amp) -> float:
    """Mean per-token loss on the eval set (answer tokens only, as in training)."""
    if not examples:
        return float("nan")
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count, size = 0.0, 0, cfg.batch_size * 2
    for start in range(0, len(order), size):
        batch = collate([examples[i] for i in order[start : start + size]], pad_id)
        with amp():
            total += float(loss_sum(model, batch, cfg.logits_at_labels, cfg.share_prefix))
        count += n_labels(batch)
    model.train()
    return total / max(1, count)
