"""`hardware.fast.fused_norm` (lbt.model.fused_norm): inside evaluation_mode each Qwen2/Llama RMSNorm runs
torch's rms_norm. fp32 outputs and battery rows equal transformers' norm's up to float rounding, bf16 ones
are rounded once instead of twice, other norms and mixed dtypes keep their own forward, and every module is
as before afterwards."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from lbt.eval.battery import apply_fast_settings
from lbt.model.fused_norm import fused_norm_default, fused_rms_norms, set_fused_norm
from lbt.model.modes import evaluation_mode
from lbt.study import MEASURES
from tests.conftest import assert_rows_match, compose_train, directions_key_now, score_toy_battery


@pytest.fixture
def varied_eval(tiny_eval):
    """The tiny eval model with norm weights that are not all 1 (the weight's product is part of the norm)."""
    model, tokenizer = tiny_eval
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Qwen2RMSNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
    return model, tokenizer


def _norms(model):
    return [m for m in model.modules() if isinstance(m, Qwen2RMSNorm)]


def test_each_norm_gives_transformers_output_and_is_restored(varied_eval):
    model, _ = varied_eval
    norms = _norms(model)
    x = torch.randn(3, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 4
    own = [norm(x) for norm in norms]
    with fused_rms_norms(model, on=True) as fused:
        assert fused == len(norms) == 2 * model.config.num_hidden_layers + 1
        for norm, want in zip(norms, own):
            assert "forward" in norm.__dict__
            torch.testing.assert_close(norm(x), want, rtol=2e-6, atol=2e-6)
    assert not any("forward" in norm.__dict__ for norm in norms)
    with fused_rms_norms(model, on=False) as fused:  # off: nothing changes
        assert fused == 0 and not any("forward" in norm.__dict__ for norm in norms)


@pytest.mark.parametrize("norm_class", [Qwen2RMSNorm, LlamaRMSNorm])
def test_bf16_is_rounded_once_and_keeps_its_dtype(norm_class):
    gen = torch.Generator().manual_seed(2)
    norm = norm_class(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(64, generator=gen))
    x = (torch.randn(32, 64, generator=gen) * 3).bfloat16()
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    own = norm(x)
    holder = torch.nn.Sequential(norm)
    with fused_rms_norms(holder, on=True) as fused:
        assert fused == 1
        out = norm(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a job's evaluation under bf16-mixed autocast
            assert norm(x).dtype == torch.bfloat16
    assert out.dtype == own.dtype == torch.bfloat16
    error = ((out.double() - exact).abs() / exact.abs().clamp_min(1e-3)).max()
    assert error <= 2 ** -8  # one rounding: half a bf16 step
    # within a bf16 step of transformers' own
    assert (out.double() - own.double()).abs().max() <= 2 ** -6 * exact.abs().max()


def test_other_norms_and_mixed_dtypes_keep_their_own_forward():
    class GemmaRMSNorm(torch.nn.Module):  # weight applied as (1 + weight): not the fused formula
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * (1 + self.weight)

    gemma = GemmaRMSNorm()
    mixed = Qwen2RMSNorm(8)  # fp32 weight on bf16 states: transformers' product promotes to fp32
    holder = torch.nn.Sequential(gemma, mixed)
    x = torch.randn(2, 8).bfloat16()
    with fused_rms_norms(holder, on=True) as fused:
        assert fused == 1 and "forward" not in gemma.__dict__
        out = mixed(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, mixed(x))


def test_battery_rows_are_the_same_in_fp32(varied_eval, tmp_path):
    model, tokenizer = varied_eval
    plain = score_toy_battery(model, tokenizer, tmp_path)
    set_fused_norm(True)
    with evaluation_mode(model):
        assert all("forward" in norm.__dict__ for norm in _norms(model))
    fused = score_toy_battery(model, tokenizer, tmp_path)
    assert_rows_match(plain, fused, MEASURES)


def test_the_setting_reaches_evaluation_mode(varied_eval):
    model, _ = varied_eval
    gpu = compose_train(["hardware=gpu"]).hardware.fast
    # on for GPU; a CPU keeps the golden rows
    assert gpu.fused_norm is True and compose_train([]).hardware.fast.fused_norm is False
    apply_fast_settings({**gpu, "fused_norm": True})
    assert fused_norm_default()
    with evaluation_mode(model):
        assert all("forward" in norm.__dict__ for norm in _norms(model))
    assert not any("forward" in norm.__dict__ for norm in _norms(model))
    apply_fast_settings({**gpu, "fused_norm": False})
    with evaluation_mode(model):
        assert not any("forward" in norm.__dict__ for norm in _norms(model))


def test_the_directions_key_names_the_setting():
    off = directions_key_now()
    set_fused_norm(True)
    assert directions_key_now() != off
