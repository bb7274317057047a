"""`hardware.fast.fold_lora` (lbt.model.folded_lora): a wide LoRA layer's B product inside its base GEMM trains
like peft's forward (fp32, dropout on: the same draws), compiled too, and evaluation leaves it in place."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lbt.model.folded_lora import fold_lora, folded_candidate
from lbt.model.load import load_model
from lbt.model.lora import compile_decoder_layers, wrap_lora
from lbt.model.modes import evaluation_mode
from lbt.model.module import supervised_token_loss

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}


def _model(tiny_model, fold: bool):
    cfg, tok, _ = tiny_model
    torch.manual_seed(0)
    model = wrap_lora(load_model(cfg.model, tok, torch.float32), OmegaConf.create(LORA))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the folded product something to carry
            torch.nn.init.normal_(param, std=0.05)
    return model, (fold_lora(model) if fold else 0)


def _train(model, steps: int = 3) -> tuple[list[float], torch.Tensor]:
    """Losses of a few AdamW steps on one batch, and the trainable gradients of the last step."""
    ids = torch.randint(3, 2000, (3, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, 30:] = 0
    batch = {"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    torch.manual_seed(1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss, n = supervised_token_loss(model, batch)
        (loss / n).backward()
        grads = torch.cat([p.grad.flatten() for p in params])
        opt.step()
        losses.append(float(loss.detach()) / n)
    return losses, grads


def test_only_widening_layers_fold(tiny_model):
    model, folded = _model(tiny_model, True)
    names = [name.split(".")[-1] for name, module in model.named_modules() if "forward" in module.__dict__]
    n_layers = len(model.base_model.model.model.layers)
    assert folded == 2 * n_layers and sorted(set(names)) == ["gate_proj", "up_proj"]
    model.eval()
    assert not any(folded_candidate(m) for m in model.modules())  # evaluation runs peft's forward


def test_folded_layers_train_like_peft_with_dropout(tiny_model):
    plain_losses, plain_grads = _train(_model(tiny_model, False)[0])
    model, folded = _model(tiny_model, True)
    model.train()
    assert sum(folded_candidate(m) is not None for m in model.modules()) == folded > 0  # the folded path runs
    folded_losses, folded_grads = _train(model)
    assert folded_losses == pytest.approx(plain_losses, rel=1e-6)
    torch.testing.assert_close(folded_grads, plain_grads, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fold", [True, False])
def test_compiled_layers_train_like_peft_and_their_graphs_are_cached(tiny_model, tmp_path, monkeypatch, fold):
    """Compiled, the layers (folded or not) learn as peft's eager ones do, and AOTAutograd keeps their graphs
    in its cache: a later job of a sweep loads them instead of tracing the layer again (the folded GEMM as a
    torch.autograd.Function made it bypass the cache, and a later job's first step took 10 s longer on an
    H100)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    plain_losses, plain_grads = _train(_model(tiny_model, False)[0])
    model, _ = _model(tiny_model, fold)
    torch._dynamo.reset()
    # Empty reads as unset, so the layers compile into this test's folder; the variable is restored after it.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")
    compile_decoder_layers(model, cache_dir=tmp_path / "inductor")
    counters.clear()
    losses, grads = _train(model)
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    torch.testing.assert_close(grads, plain_grads, rtol=1e-3, atol=1e-6)
    aot = dict(counters["aot_autograd"])
    assert aot.get("autograd_cache_bypass", 0) == 0, aot
    assert aot.get("autograd_cache_saved", 0) + aot.get("autograd_cache_hit", 0) > 0, aot


@pytest.mark.parametrize("bias", [False, True])
def test_the_folded_gemm_gives_the_unfolded_output_and_gradients(bias):
    """x Wᵀ + h Bᵀ (+ b) and its gradients for x, h and B, as the two GEMMs give them (fp32); the frozen
    weight and bias get none."""
    from lbt.model.folded_lora import _folded

    gen = torch.Generator().manual_seed(3)
    x, h = torch.randn(2, 5, 6, generator=gen), torch.randn(2, 5, 3, generator=gen)
    weight, b = torch.randn(10, 6, generator=gen), torch.randn(10, generator=gen) if bias else None
    lora_b = torch.randn(10, 3, generator=gen)
    outs = []
    for fn in (lambda *a: _folded(*a),
               lambda x, h, w, b_, lb: torch.nn.functional.linear(x, w, b_) + torch.nn.functional.linear(h, lb)):
        leaves = [t.clone().requires_grad_() for t in (x, h, lora_b)]
        y = fn(leaves[0], leaves[1], weight, b, leaves[2])
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append([y.detach(), *(t.grad for t in leaves)])
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_folded_gemm_runs_in_autocasts_dtype_and_returns_each_gradient_in_its_own():
    from lbt.model.folded_lora import _folded

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, generator=gen, requires_grad=True)
    h = torch.randn(4, 3, generator=gen, requires_grad=True)
    lora_b = torch.randn(10, 3, generator=gen, requires_grad=True)  # fp32 adapter weights, as hardware=gpu
    weight = torch.randn(10, 6, generator=gen).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _folded(x, h, weight, None, lora_b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert (x.grad.dtype, h.grad.dtype, lora_b.grad.dtype) == (torch.float32,) * 3
    want = x.detach() @ weight.float().T + h.detach() @ lora_b.detach().T
    torch.testing.assert_close(y.float(), want, rtol=3e-2, atol=3e-2)


def test_evaluation_leaves_the_folded_forward_in_place(tiny_model):
    model, _ = _model(tiny_model, True)
    own = {name: module.__dict__["forward"] for name, module in model.named_modules() if "forward" in module.__dict__}
    with evaluation_mode(model):
        assert all(module.__dict__["forward"] is not own[name] for name, module in model.named_modules()
                   if name in own)  # the lean eval forward inside
    assert {name: module.__dict__.get("forward") for name, module in model.named_modules() if name in own} == own
