"""The loss of a frozen output projection and its gradient in one pass (`hardware.fast.fused_ce`).

The plain chunked loss (`lbt.model.module.chunked_lm_loss`) computes each chunk's logits twice (forward, and
again in backward under activation checkpointing), and each time copies them to fp32 and runs log_softmax
over the copy; backward adds log_softmax's own backward and a copy back to the compute dtype. A step of
the study's recipe spent about a tenth of its GPU time there (benchmarks/RESULTS.md, train_throughput).

The gradient of a chunk's summed cross-entropy with respect to its logits is softmax minus one-hot, known as
soon as the loss is. So forward computes both, multiplies that gradient by the projection's weight at once,
and keeps only d loss / d hidden (tokens x hidden size, small); backward scales it by the incoming gradient.
On a GPU the per-chunk softmax work is compiled, so it reads the logits in their own dtype, without an fp32
copy. The weight gets no gradient: LoRA never adapts the output projection, and a trainable one keeps the
plain path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _loss_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy in fp32, its gradient with respect to `logits` in their dtype)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, targets[:, None]).squeeze(1)).sum()
    grad = torch.exp(x - lse[:, None])
    grad = grad.scatter_add(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
    return loss, grad.to(logits.dtype)


_COMPILED: dict[str, Callable] = {}


def loss_and_grad_kernel(device: torch.device, compiled: bool | None = None) -> Callable:
    """`_loss_and_grad`, compiled (one dynamic-shape graph per process) where `compiled` says so; None:
    compiled on a GPU, where it saves the fp32 copies, eager on a CPU, where it would only add a compile."""
    if not (device.type == "cuda" if compiled is None else compiled):
        return _loss_and_grad
    if "kernel" not in _COMPILED:
        _COMPILED["kernel"] = torch.compile(_loss_and_grad, dynamic=True)
    return _COMPILED["kernel"]


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compiled: bool | None) -> torch.Tensor:
        kernel = loss_and_grad_kernel(hidden.device, compiled)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            loss, grad_logits = kernel(hidden[rows] @ weight.t(), targets[rows])
            total += loss
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden.float() * grad_total).to(grad_hidden.dtype), None, None, None, None


def fused_linear_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                    compiled: bool | None = None) -> torch.Tensor:
    """Sum over rows of cross-entropy(hidden @ weight.T, targets), `chunk` rows at a time: the same value and
    gradient with respect to `hidden` as `F.cross_entropy(F.linear(hidden, weight).float(), targets,
    reduction="sum")`, without the full logits or their fp32 copy. `weight` must not require a gradient."""
    if weight.requires_grad:
        raise ValueError("fused_linear_ce gives the weight no gradient: use it for a frozen projection only")
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    return _FusedLinearCE.apply(hidden, weight, targets, chunk, compiled)
