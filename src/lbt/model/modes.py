"""The one mode every measurement runs the model in: `evaluation_mode`.

Scoring, probing and the causal suite all read the model the same way: evaluation mode (dropout off), no
gradients, compiled decoder layers run eagerly, and LoRA layers on peft's lean eval forward; optionally
with the adapters switched off, which is the base model. Writing this once keeps the H1 stance (the
battery) and the steered H3 stance (the causal suite) on the same model state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lbt.model.fused_norm import fused_rms_norms
from lbt.model.gqa import grouped_query_attention
from lbt.model.layers import decoder_layers
from lbt.model.lora import eager_layers, lean_lora


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, adapters: bool = True) -> Iterator[nn.Module]:
    """Inside the block: eval mode, no gradients, eager decoder layers (`eager_layers`: hooks and generation
    see the plain modules, training graphs are not recompiled), lean LoRA forwards (`lean_lora`: the same
    numbers as peft's with less Python per decoding step), RMSNorms in one kernel where
    `hardware.fast.fused_norm` is on (`lbt.model.fused_norm`), masked prompt forwards reading grouped
    key/value heads in place where `hardware.fast.sdpa_gqa` is on (`lbt.model.gqa`) and, with
    adapters=False, peft's adapters disabled. Every submodule's train/eval flag is restored on exit, one by
    one: Lightning trains with the whole module in train mode, and a frozen part may differ."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if not adapters and hasattr(model, "disable_adapter"):
                stack.enter_context(model.disable_adapter())
            if _has_decoder_layers(model):
                stack.enter_context(eager_layers(model))
            stack.enter_context(lean_lora(model))
            stack.enter_context(fused_rms_norms(model))  # hardware.fast.fused_norm (off: nothing changes)
            stack.enter_context(grouped_query_attention())  # hardware.fast.sdpa_gqa (off: nothing changes)
            yield model
    finally:
        for module, training in modes:
            module.training = training


def _has_decoder_layers(model: nn.Module) -> bool:
    """Whether `eager_layers` applies: a toy module without a decoder stack has nothing compiled to undo."""
    try:
        decoder_layers(model)
    except ValueError:
        return False
    return True
