"""Find the decoder layers of a Hugging Face causal LM through the wrappers lbt puts around it (peft,
DDP/FSDP, a LightningModule). One finder serves LoRA compilation, the evaluation modes and the probe hooks."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model inside peft, DDP and Lightning wrappers."""
    for _ in range(8):
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft
            model = model.get_base_model()
        elif isinstance(model, PreTrainedModel):
            return model
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, FSDP
            model = model.module
        elif isinstance(getattr(model, "model", None), nn.Module):  # a LightningModule holding the model
            model = model.model
        else:
            return model
    return model


def _layer_list(model: nn.Module) -> nn.ModuleList | None:
    for path in ("model.layers", "layers", "model.decoder.layers", "transformer.h"):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, found through peft/DDP/Lightning wrappers."""
    base = unwrap(model)
    layers = _layer_list(base)
    if layers is not None:
        return layers
    # Unknown layout: the longest ModuleList named "...layers".
    candidates = [m for n, m in base.named_modules() if isinstance(m, nn.ModuleList) and n.endswith("layers")]
    if not candidates:
        raise ValueError(f"no decoder layers found in {type(base).__name__}")
    return max(candidates, key=len)
