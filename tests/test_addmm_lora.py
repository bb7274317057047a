"""`hardware.fast.addmm_lora` (lbt.model.lora.delta_in_gemm): while evaluating, each LoRA delta is added to
the base output inside its B GEMM. fp32 outputs and battery rows equal peft's up to float rounding, bf16
ones are rounded once instead of three times, mixed dtypes without autocast keep peft's sum, and the setting
reaches evaluation through `hardware.fast` without entering the shared base's key."""

from __future__ import annotations

import pytest
import torch

from lbt.eval.base_cache import base_key
from lbt.eval.battery import apply_fast_settings
from lbt.model.lora import addmm_lora_default, delta_in_gemm, lean_lora, set_addmm_lora
from lbt.study import MEASURES
from tests.conftest import assert_rows_match, compose_train, score_toy_battery
from tests.test_lean_lora import ADAPTER_PATHS, prompt_ids, tiny_lora


def peft_sum(result, h, weight_b, scaling):
    return result + torch.nn.functional.linear(h, weight_b) * scaling


@pytest.mark.parametrize("bias_shape", [(3, 7), (2, 5, 7)])
def test_delta_in_gemm_equals_peft_sum_in_fp32(bias_shape):
    gen = torch.Generator().manual_seed(0)
    result = torch.randn(*bias_shape, generator=gen)
    h = torch.randn(*bias_shape[:-1], 4, generator=gen)
    weight_b = torch.randn(7, 4, generator=gen)
    summed = delta_in_gemm(result, h, weight_b, 0.5)
    assert summed.shape == result.shape and summed.dtype == torch.float32
    torch.testing.assert_close(summed, peft_sum(result, h, weight_b, 0.5), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(summed, peft_sum(result, h, weight_b, 0.25))  # the scaling counts


def test_delta_in_gemm_in_bf16_rounds_once():
    gen = torch.Generator().manual_seed(1)
    result = torch.randn(64, 48, generator=gen)
    h = torch.randn(64, 8, generator=gen)
    weight_b = torch.randn(48, 8, generator=gen) * 0.05
    result, h = result.bfloat16(), h.bfloat16()
    # the bf16 operands, summed in fp32
    exact = peft_sum(result.float(), h.float(), weight_b.bfloat16().float(), 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as a GPU job evaluates: fp32 adapters, bf16 compute
        fused = delta_in_gemm(result, h, weight_b, 2.0)
        peft = peft_sum(result, h, weight_b, 2.0)
    assert fused.dtype == peft.dtype == torch.bfloat16
    delta = exact - result.float()
    step = (exact.abs() + delta.abs()) * 2 ** -7  # one bf16 step of the sum or of the delta, the larger
    assert ((fused.float() - exact).abs() <= step).all()  # within one rounding of the exact sum
    assert ((fused.float() - peft.float()).abs() <= 2 * step).all()  # peft's sum: within bf16 noise of it


def test_mixed_dtypes_without_autocast_keep_peft_sum():
    result = torch.randn(3, 7, dtype=torch.bfloat16)
    h = torch.randn(3, 4)  # peft's fp32 adapters upcast the input: h is fp32, the base output bf16
    assert delta_in_gemm(result, h, torch.randn(7, 4), 1.0) is None
    assert delta_in_gemm(torch.randn(3, 7), torch.randn(3, 4), torch.randn(6, 4), 1.0) is None  # shapes


@ADAPTER_PATHS
def test_lean_forward_with_addmm_matches_peft(adapters, dtype, autocast):
    model, tokenizer = tiny_lora(adapters, dtype)
    model.eval()
    ids = prompt_ids(tokenizer)
    calls = []
    real_addmm = torch.addmm

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real_addmm(*args, **kwargs)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = model(ids, use_cache=False).logits
        set_addmm_lora(True)
        torch.addmm = counted
        try:
            with lean_lora(model):
                summed = model(ids, use_cache=False).logits
        finally:
            torch.addmm = real_addmm
    layers = 7 * len(model.get_base_model().model.layers)
    if adapters == "fp32" and dtype == torch.bfloat16:
        assert calls == []  # fp32 adapters on a bf16 base without autocast: peft's upcast sum
        assert torch.equal(plain, summed)
        return
    assert len(calls) == layers  # every adapted layer adds its delta in the GEMM
    if dtype == torch.float32:
        torch.testing.assert_close(summed, plain, rtol=1e-5, atol=1e-5)
    else:
        assert summed.dtype == plain.dtype
        assert (summed.float() - plain.float()).abs().max() < 0.1 * plain.float().abs().max()
        assert torch.equal(summed.argmax(-1), plain.argmax(-1))


def test_battery_rows_are_the_same_in_fp32(tmp_path):
    model, tokenizer = tiny_lora("fp32", torch.float32)
    plain = score_toy_battery(model, tokenizer, tmp_path)
    set_addmm_lora(True)
    summed = score_toy_battery(model, tokenizer, tmp_path)
    assert_rows_match(plain, summed, MEASURES)


def test_the_setting_reaches_evaluation_and_not_the_base_key():
    gpu = compose_train(["hardware=gpu"])
    assert gpu.hardware.fast.addmm_lora is False and compose_train([]).hardware.fast.addmm_lora is False
    apply_fast_settings({**gpu.hardware.fast, "addmm_lora": True})
    assert addmm_lora_default()
    apply_fast_settings(gpu.hardware.fast)
    assert not addmm_lora_default()
    # The base phase runs with the adapters disabled, so the setting cannot change its rows: one shared base.
    assert base_key(gpu) == base_key(compose_train(["hardware=gpu", "hardware.fast.addmm_lora=true"]))
