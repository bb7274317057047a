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


# A custom op with its own backward, not a torch.autograd.Function: inside a compiled layer, an
# autograd.Function makes AOTAutograd bypass its cache (torch 2.13 logs "Unsupported call_function target
# autograd_function_apply"), so every later job of a sweep traced and partitioned the layer again: most
# likely why, on an H100, a later job's first step took 19.7 s against 9.4 s without folding and the job
# gained nothing (benchmarks/RESULTS.md, 2026-12-07 morning). A custom op keeps the cache
# (tests/test_folded_lora.py).
@torch.library.custom_op("lbt::folded_linear", mutates_args=())
def folded_linear(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  lora_b: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ + h Bᵀ (+ bias) as one GEMM over [x | h]; every input in one dtype (`_folded` casts them)."""
    return F.linear(torch.cat([x, h], dim=-1), torch.cat([weight, lora_b], dim=1), bias)


@folded_linear.register_fake
def _folded_linear_shape(x, h, weight, bias, lora_b):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _folded_linear_save(ctx, inputs, output) -> None:
    _, h, weight, _, lora_b = inputs
    ctx.save_for_backward(h, weight, lora_b)


def _folded_linear_backward(ctx, dy: torch.Tensor):
    """Gradients for x, h and B in one GEMM for both inputs; none for the frozen base weight and bias."""
    h, weight, lora_b = ctx.saved_tensors
    # Joined again rather than saved: holding it from forward to backward would keep a copy of every folded
    # layer's weight for the whole micro-batch.
    grads = dy @ torch.cat([weight, lora_b], dim=1)
    width = weight.shape[1]
    db = dy.reshape(-1, dy.shape[-1]).T @ h.reshape(-1, h.shape[-1])
    return grads[..., :width], grads[..., width:], None, None, db


folded_linear.register_autograd(_folded_linear_backward, setup_context=_folded_linear_save)


def _folded(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            lora_b: torch.Tensor) -> torch.Tensor:
    """`folded_linear` in the dtype the GEMM runs in; each gradient comes back in its input's own dtype."""
    dtype = _compute_dtype(x)
    return folded_linear(x.to(dtype), h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                         lora_b.to(dtype))


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
        return _folded(x, h, base.weight, base.bias, layer.lora_B[adapter].weight)

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
