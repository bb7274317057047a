"""Wrap a causal LM with peft LoRA from the `train.lora` config."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, get_peft_model


def lora_config(lora_cfg: DictConfig) -> LoraConfig:
    return LoraConfig(
        r=int(lora_cfg.r),
        lora_alpha=int(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules=list(OmegaConf.to_container(lora_cfg.targets, resolve=True)),
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap_lora(model: torch.nn.Module, lora_cfg: DictConfig, keep_adapter_dtype: bool = False) -> torch.nn.Module:
    """peft LoRA on the configured targets.

    keep_adapter_dtype: leave the adapters in the base model's dtype (bf16 on GPU) instead of peft's
    default fp32 adapters, which upcast every input of every adapted layer.
    """
    missing = [t for t in lora_cfg.targets if not any(n.endswith("." + t) for n, _ in model.named_modules())]
    if missing:
        raise ValueError(f"train.lora.targets: {missing} match no module of this model")
    return get_peft_model(model, lora_config(lora_cfg), autocast_adapter_dtype=not keep_adapter_dtype)
