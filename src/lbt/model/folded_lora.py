"""A LoRA layer's B product folded into its base GEMM (`hardware.fast.fold_lora`, off by default).

peft computes a LoRA Linear in training as base(x) + B(A(drop(x))) · s: the delta B(…) is a tensor as wide as
the layer's output, written, read back and added to the base output, and in backward the output's gradient is
read once more for the delta's input gradient. For the MLP's gate and up projections (2,048 → 11,008 in
Qwen2.5-3B) the delta is 5.4 times as wide as the input, and the step's fused SiLU × up kernels, which read
it, took 0.12 s of a 1.04 s step on an H100 (benchmarks/RESULTS.md, issue 15). With h = A(drop(x)) · s
(rank r), the same output is one GEMM over the concatenated inner dimension:

    y = [x | h] · [W | B]ᵀ (+ bias)        backward:  [dx | dh] = dy · [W | B],   dB = dyᵀ · h

so the delta is never materialised and the output's gradient is read by one GEMM for both input gradients.
Dropout, A and the scaling run as in peft (the same random draws in the same order). In fp32 the output and
every gradient equal peft's up to summation order; in bf16 the sum is rounded once instead of twice.

Only layers whose output is wider than their input are folded (the concatenation copies the input and the
weight, which costs more than it saves for a square or narrowing layer), with an unquantized base and one
plain adapter (no DoRA or other variant), in training mode; every other call runs peft's forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lbt.model.lora import plain_adapter


class _FoldedLinear(torch.autograd.Function):
    """y = x Wᵀ + h Bᵀ (+ bias) as one GEMM; gradients for x, h and B (the base weight and bias are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_b: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        ctx.save_for_backward(h, weight, lora_b)
        ctx.dtypes = (x.dtype, h.dtype, lora_b.dtype, dtype)
        joined = torch.cat([weight.to(dtype), lora_b.to(dtype)], dim=1)
        return F.linear(torch.cat([x.to(dtype), h.to(dtype)], dim=-1), joined,
                        None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        h, weight, lora_b = ctx.saved_tensors
        x_dtype, h_dtype, b_dtype, dtype = ctx.dtypes
        dy = dy.to(dtype)
        # Joined again rather than saved: holding it from forward to backward would keep a copy of every
        # folded layer's weight for the whole micro-batch.
        joined = torch.cat([weight.to(dtype), lora_b.to(dtype)], dim=1)
        grads = dy @ joined
        width = weight.shape[1]
        dx, dh = grads[..., :width], grads[..., width:]
        db = dy.reshape(-1, dy.shape[-1]).T @ h.reshape(-1, h.shape[-1]).to(dtype)
        return dx.to(x_dtype), dh.to(h_dtype), None, None, db.to(b_dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the GEMM runs in: autocast's where it is on (a bf16-mixed job), else the input's."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _widening(base: torch.nn.Module) -> bool:
    """An unquantized nn.Linear whose output is wider than its input: the layers that fold."""
    return type(base) is torch.nn.Linear and base.out_features > base.in_features


def folded_candidate(module: torch.nn.Module) -> str | None:
    """The adapter name when `module` is a peft LoRA Linear that folds: one plain adapter (`plain_adapter`)
    in training mode, a widening base (`_widening`) with a frozen weight and bias, and no input upcast
    (adapters=autocast or bf16; or everything in one dtype, as on a CPU); None otherwise."""
    adapter = plain_adapter(module)
    if adapter is None or not module.training or not _widening(module.base_layer):
        return None
    base = module.base_layer
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if getattr(module, "cast_input_dtype_enabled", True) and module.lora_A[adapter].weight.dtype != base.weight.dtype:
        return None
    return adapter


def _folded_forward(layer: torch.nn.Module):
    peft_forward = type(layer).forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = folded_candidate(layer)
        if adapter is None or args or kwargs:
            return peft_forward(layer, x, *args, **kwargs)
        base = layer.base_layer
        h = layer.lora_A[adapter](layer.lora_dropout[adapter](x)) * layer.scaling[adapter]
        return _FoldedLinear.apply(x, h, base.weight, base.bias, layer.lora_B[adapter].weight)

    return forward


def fold_lora(model: torch.nn.Module) -> int:
    """Give every LoRA Linear whose output is wider than its input the folded forward (it checks the layer's
    state on each call and otherwise runs peft's); returns how many layers got it."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    folded = 0
    for module in model.modules():
        if type(module) is LoraLinear and _widening(module.base_layer):
            module.forward = _folded_forward(module)
            folded += 1
    return folded
