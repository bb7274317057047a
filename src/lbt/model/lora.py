"""Wrap a causal LM with peft LoRA from the `train.lora` config."""

from __future__ import annotations

import contextlib

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer


def lora_config(lora_cfg: DictConfig) -> LoraConfig:
    return LoraConfig(
        r=int(lora_cfg.r),
        lora_alpha=int(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules=list(OmegaConf.to_container(lora_cfg.targets, resolve=True)),
        bias="none",
        task_type="CAUSAL_LM",
    )


ADAPTER_MODES = ("fp32", "autocast", "bf16")


def wrap_lora(model: torch.nn.Module, lora_cfg: DictConfig, adapters: str = "fp32") -> torch.nn.Module:
    """peft LoRA on the configured targets.

    adapters:
      fp32     peft's default: fp32 adapter weights, every adapted layer's input upcast to fp32.
      autocast fp32 adapter weights (the optimizer updates full-precision values, as in fp32) but no input
               upcast: run forwards under torch.autocast(bf16), which casts the small adapter weights instead.
      bf16     adapter weights in the model dtype; fastest, but small AdamW updates round away in bf16.
    """
    if adapters not in ADAPTER_MODES:
        raise ValueError(f"adapters={adapters!r}: use one of {ADAPTER_MODES}")
    missing = [t for t in lora_cfg.targets if not any(n.endswith("." + t) for n, _ in model.named_modules())]
    if missing:
        raise ValueError(f"train.lora.targets: {missing} match no module of this model")
    wrapped = get_peft_model(model, lora_config(lora_cfg), autocast_adapter_dtype=adapters != "bf16")
    if adapters == "autocast":
        for module in wrapped.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return wrapped


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list of a (peft-wrapped) HF causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers in {type(inner).__name__}")
    return layers


def compile_decoder_layers(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place (one graph reused by every layer; the loss, masks and
    optimizer stay eager). Evaluation runs the layers eagerly (see `eager_layers`).

    Random ops (LoRA dropout) fall back to eager ATen kernels: with inductor's own RNG the dropout of the
    compiled layers trained measurably differently from eager on an H100 (loss 0.045 apart after one step,
    2026-11-26); with the fallback, compiled and eager training agree exactly on CPU.
    """
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
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
