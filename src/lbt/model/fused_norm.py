"""RMSNorm in one kernel while the model is read (`hardware.fast.fused_norm`, on in hardware=gpu).

Qwen2's and Llama's RMSNorm (transformers) run about seven eager kernels per call: a cast to fp32, the square,
the mean, the epsilon and the reciprocal square root, two products and the cast back, each reading or writing
a tensor as large as the hidden states. An evaluation forward runs 2 of them per layer, plus the final one;
they are among the eager elementwise kernels that took 0.070 s of the battery's logprob measure on an H100
(benchmarks/RESULTS.md, issue 15). `torch.nn.functional.rms_norm` computes the same normalisation in one
kernel on a GPU (in fp32 inside, as transformers does).

Inside `fused_rms_norms` (which `lbt.model.modes.evaluation_mode` enters when the setting is on) every
norm of a known class (`FUSED_CLASSES`) calls `rms_norm` instead of its own forward; on exit the modules are
as before. Training is untouched: its compiled layers fuse the norm already, and an eager training step keeps
transformers' autograd graph.

Numbers: in fp32 the output equals transformers' up to float rounding (tests/test_fused_norm.py). In bf16
transformers rounds twice (the normalised value to bf16, then its product with the weight) where the fused
kernel rounds once, so outputs differ by at most about one bf16 step: rows within bf16 noise, as any kernel
change gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from lbt.fast_settings import FastSetting

# Norm classes whose forward is weight * (x / rms(x)) with the weight itself (not 1 + weight, as Gemma's):
# the study's two model families, which the tiny model's architecture shares.
FUSED_CLASSES = frozenset({"Qwen2RMSNorm", "LlamaRMSNorm"})

# Whether `evaluation_mode` fuses the model's RMSNorms (`hardware.fast.fused_norm`; None: off).
FUSED_NORM = FastSetting("fused_norm", False)
set_fused_norm = FUSED_NORM.set
fused_norm_default = FUSED_NORM.get


def fusable(module: torch.nn.Module) -> bool:
    """A norm of a known class with the attributes its forward reads (a 1-D weight, variance_epsilon)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ in FUSED_CLASSES and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _fused_forward(norm: torch.nn.Module, own_forward):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = norm.weight
        if weight.dtype != hidden_states.dtype:
            # transformers' product promotes (an fp32 weight on bf16 states gives fp32): keep its forward
            return own_forward(hidden_states)
        shape = (hidden_states.shape[-1],)
        kind = hidden_states.device.type
        if torch.is_autocast_enabled(kind):
            # Autocast may run rms_norm in fp32 and return fp32; transformers' norm keeps the states' dtype.
            with torch.autocast(kind, enabled=False):
                return F.rms_norm(hidden_states, shape, weight, norm.variance_epsilon)
        return F.rms_norm(hidden_states, shape, weight, norm.variance_epsilon)

    return forward


@contextlib.contextmanager
def fused_rms_norms(model: torch.nn.Module, on: bool | None = None) -> Iterator[int]:
    """Inside the block every fusable norm of `model` runs `torch.nn.functional.rms_norm`; yields how many.
    on: None takes the process default (`set_fused_norm`); False changes nothing."""
    if not (fused_norm_default() if on is None else on):
        yield 0
        return
    swapped: list[tuple[torch.nn.Module, object]] = []
    try:
        for module in model.modules():
            if fusable(module):
                swapped.append((module, module.__dict__.get("forward")))
                module.forward = _fused_forward(module, module.forward)
        yield len(swapped)
    finally:
        for module, own in reversed(swapped):
            if own is None:
                del module.forward
            else:
                module.forward = own
