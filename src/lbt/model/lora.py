"""Wrap a causal LM with peft LoRA from the `train.lora` config."""

from __future__ import annotations

import contextlib

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


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list of a (peft-wrapped) HF causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers in {type(inner).__name__}")
    return layers


def compile_decoder_layers(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place (one graph reused by every layer; the loss, masks and
    optimizer stay eager). Evaluation runs the layers eagerly (see `eager_layers`)."""
    for layer in decoder_layers(model):
        layer.compile()


@contextlib.contextmanager
def eager_layers(model: torch.nn.Module):
    """Run compiled decoder layers eagerly inside the block: evaluation hooks (capture, steering) and
    generation see exactly the plain module, and the training graphs are not recompiled for them."""
    layers = list(decoder_layers(model))
    saved = [getattr(layer, "_compiled_call_impl", None) for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = None
    try:
        yield model
    finally:
        for layer, compiled in zip(layers, saved):
            layer._compiled_call_impl = compiled
