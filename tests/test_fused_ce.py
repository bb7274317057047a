"""`hardware.fast.fused_ce` (lbt.model.fused_ce): the loss of a frozen output projection and its gradient in
one pass give the plain cross-entropy's value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from lbt.model.fused_ce import fused_linear_ce
from lbt.model.module import chunked_lm_loss
from tests.conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")


def case(dtype=torch.float32, rows=13, hidden=16, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).to(dtype).requires_grad_(True)
    w = torch.randn(vocab, hidden, generator=gen).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    return h, w, targets


def close_in_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 rounding moves single elements that nearly cancel by much of their size, so gradients are compared as
    a whole: the difference's norm against the reference's."""
    got, want = got.float(), want.float()
    assert float((got - want).norm() / want.norm()) < 1e-2


def plain(h, w, targets, scale):
    h = h.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(F.linear(h, w).float(), targets, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("chunk", [1, 4, 13, 64])
def test_fp32_value_and_gradient_equal_the_plain_loss(chunk):
    h, w, targets = case()
    want_loss, want_grad = plain(h, w, targets, 0.37)
    loss = fused_linear_ce(h, w, targets, chunk)
    (loss * 0.37).backward()  # a scaled loss, as a step divides by its supervised-token count
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, want_grad, rtol=1e-5, atol=1e-6)


def test_bf16_stays_within_bf16_rounding_of_the_plain_loss():
    h, w, targets = case(torch.bfloat16, rows=40, hidden=32, vocab=300)
    want_loss, want_grad = plain(h, w, targets, 1 / 40)
    loss = fused_linear_ce(h, w, targets, 16)
    (loss / 40).backward()
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-3, atol=1e-2)
    close_in_bf16(h.grad, want_grad)


def test_compiled_kernel_equals_the_eager_one():
    """The GPU runs the softmax work compiled: the same numbers (checked here on the CPU's compiler)."""
    torch._dynamo.reset()
    h, w, targets = case(rows=9)
    eager = fused_linear_ce(h, w, targets, 4, compiled=False)
    eager.backward()
    eager_grad = h.grad.clone()
    h.grad = None
    compiled = fused_linear_ce(h, w, targets, 4, compiled=True)
    compiled.backward()
    torch.testing.assert_close(compiled.detach(), eager.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, eager_grad, rtol=1e-5, atol=1e-6)


def test_without_grad_it_returns_the_loss_only():
    h, w, targets = case()
    want, _ = plain(h, w, targets, 1.0)
    with torch.no_grad():
        loss = fused_linear_ce(h, w, targets, 5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-5)


def test_a_trainable_projection_is_refused_and_the_chunked_loss_keeps_the_plain_path():
    h, w, targets = case()
    with pytest.raises(ValueError, match="frozen projection"):
        fused_linear_ce(h, w.requires_grad_(True), targets, 4)
    with pytest.raises(ValueError, match="chunk"):
        fused_linear_ce(h, w.detach(), targets, 0)
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    head.weight.data.copy_(w.detach())
    loss = chunked_lm_loss(h, head, targets, 4, fused=True)
    loss.backward()
    assert head.weight.grad is not None  # the plain path gave the trainable weight its gradient
    want = F.cross_entropy(F.linear(h.detach(), w.detach()), targets, reduction="sum")
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-5)


def test_gpu_hardware_fuses_and_cpu_does_not():
    assert compose_train(["hardware=gpu"]).hardware.fast.fused_ce is True
    assert compose_train(["hardware=multi_gpu"]).hardware.fast.fused_ce is True
    assert compose_train([]).hardware.fast.fused_ce is False


def test_under_bf16_autocast_as_a_gpu_job_trains():
    """Lightning's bf16-mixed runs the loss under autocast: both paths then project in bf16."""
    h, w, targets = case(rows=24, hidden=32, vocab=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want_grad = plain(h, w, targets, 1 / 24)
        loss = fused_linear_ce(h, w, targets, 10)
        (loss / 24).backward()
    assert h.grad.dtype == h.dtype
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-3, atol=1e-2)
    close_in_bf16(h.grad, want_grad)
