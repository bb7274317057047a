"""`hardware.fast.sdpa_gqa` (lbt.model.gqa): inside evaluation_mode, masked prompt forwards let torch's
attention read grouped key/value heads in place instead of transformers copying them to every query head.
Here the GPU-only rule is widened to the CPU's fp32, where torch's kernels take grouped heads with a mask too:
the outputs and battery rows equal the copying path's up to float rounding, and decoding steps keep
transformers' own path."""

from __future__ import annotations

import importlib

import pytest
import torch

from lbt.eval.base_cache import base_key
from lbt.eval.battery import apply_fast_settings
from lbt.model import gqa
from lbt.model.gqa import grouped_query_attention, grouped_with_mask, sdpa_gqa_default, set_sdpa_gqa
from lbt.model.modes import evaluation_mode
from lbt.study import MEASURES
from tests.conftest import assert_rows_match, compose_train, directions_key_now, score_toy_battery

SDPA = importlib.import_module(gqa.SDPA_MODULE)


@pytest.fixture
def on_cpu(monkeypatch):
    """The rule as it acts on a GPU, for the CPU's fp32 tensors."""
    monkeypatch.setattr(gqa, "GQA_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(gqa, "GQA_DTYPES", frozenset({torch.float32}))


@pytest.fixture
def copies(monkeypatch):
    """How many times transformers copied keys or values out to every query head (repeat_kv)."""
    calls = []
    real = SDPA.repeat_kv

    def counted(hidden, n_rep):
        calls.append(n_rep)
        return real(hidden, n_rep)

    monkeypatch.setattr(SDPA, "repeat_kv", counted)
    return calls


def mask(q: int, kv: int) -> torch.Tensor:
    return torch.ones(2, 1, q, kv, dtype=torch.bool)


def test_the_rule_takes_masked_prompts_in_half_precision_on_a_gpu_only(monkeypatch):
    key = torch.zeros(2, 2, 7, 8)
    assert not grouped_with_mask(mask(5, 7), key)  # fp32 on a CPU: transformers' choice stands
    monkeypatch.setattr(gqa, "GQA_DEVICES", frozenset({"cpu"}))  # as if this were the GPU
    assert not grouped_with_mask(mask(5, 7), key)  # fp32: torch may take its unfused kernel
    half = key.bfloat16()
    assert grouped_with_mask(mask(5, 7), half)
    assert not grouped_with_mask(None, half)  # no mask: transformers groups the heads itself
    assert not grouped_with_mask(mask(1, 7), half)  # a decoding step: transformers' own path
    assert not grouped_with_mask(mask(5, 7), torch.zeros(2, 2, 7, 512, dtype=torch.bfloat16))  # head dim
    assert not grouped_with_mask(mask(5, 7), half, torch.zeros(2, 2, 7, 4, dtype=torch.bfloat16))


def test_prompt_forwards_read_grouped_heads_and_match_in_fp32(tiny_eval, on_cpu, copies):
    model, tokenizer = tiny_eval
    texts = ["Should I try a cold proof tonight?", "Is rye flour worth it?"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all()  # padded: the forward has a mask
    with torch.no_grad():
        plain = model(**batch, use_cache=False).logits
        copied = len(copies)
        assert copied == 2 * len(model.model.layers)  # keys and values, every layer
        with grouped_query_attention(on=True) as on:
            assert on
            grouped = model(**batch, use_cache=False).logits
        assert len(copies) == copied  # no copy inside
        again = model(**batch, use_cache=False).logits
    assert len(copies) == 2 * copied  # transformers' choice is back after the block
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(grouped[real], plain[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(again, plain)


def test_off_nested_and_restored(on_cpu):
    own = SDPA.use_gqa_in_sdpa
    with grouped_query_attention(on=False) as on:
        assert not on and SDPA.use_gqa_in_sdpa is own
    with grouped_query_attention() as on:  # the process default: off
        assert not on and SDPA.use_gqa_in_sdpa is own
    with grouped_query_attention(on=True):
        inner_fn = SDPA.use_gqa_in_sdpa
        assert inner_fn is not own
        with grouped_query_attention(on=True) as inner:  # entered twice: one patch, undone once
            assert inner and SDPA.use_gqa_in_sdpa is inner_fn
        assert SDPA.use_gqa_in_sdpa is inner_fn
    assert SDPA.use_gqa_in_sdpa is own


def test_battery_rows_are_the_same_in_fp32(tiny_eval, on_cpu, copies, tmp_path):
    model, tokenizer = tiny_eval
    plain = score_toy_battery(model, tokenizer, tmp_path)
    copied = len(copies)
    set_sdpa_gqa(True)
    grouped = score_toy_battery(model, tokenizer, tmp_path)
    assert copied > 0 and len(copies) - copied < copied  # prompts read the grouped heads in place
    assert_rows_match(plain, grouped, MEASURES)


def test_the_setting_reaches_evaluation_and_the_keys():
    gpu = compose_train(["hardware=gpu"])
    assert gpu.hardware.fast.sdpa_gqa is True and compose_train([]).hardware.fast.sdpa_gqa is False
    own = SDPA.use_gqa_in_sdpa
    apply_fast_settings(gpu.hardware.fast)
    assert sdpa_gqa_default()
    with evaluation_mode(torch.nn.Linear(2, 2)):
        assert SDPA.use_gqa_in_sdpa is not own
    assert SDPA.use_gqa_in_sdpa is own
    on = directions_key_now()
    set_sdpa_gqa(False)
    assert directions_key_now() != on
    # Base rows are read through it (rounding may differ in bf16): the shared base is keyed by it.
    assert base_key(gpu) != base_key(compose_train(["hardware=gpu", "hardware.fast.sdpa_gqa=false"]))
