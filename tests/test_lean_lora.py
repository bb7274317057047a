"""`lean_lora`: peft's eval forward without its bookkeeping must give the very same numbers."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lbt.eval.scoring import greedy_generate
from lbt.model.load import load_model, load_tokenizer
from lbt.model.lora import lean_lora, wrap_lora
from lbt.model.modes import evaluation_mode
from tests.conftest import CONF


def tiny_lora(adapters: str, dtype: torch.dtype):
    cfg = OmegaConf.load(CONF / "model" / "tiny.yaml")
    tokenizer = load_tokenizer(cfg)
    model = wrap_lora(load_model(cfg, tokenizer, dtype), OmegaConf.load(CONF / "train.yaml").train.lora,
                      adapters=adapters)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # trained-looking adapters: B is zero at init
                p.normal_(std=0.05)
    return model, tokenizer


def swapped(model) -> int:
    return sum("forward" in vars(m) for m in model.modules())


def prompt_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("Should I repot the basil before summer?")["input_ids"]])


# The adapter paths a job runs: fp32 adapters on an fp32 or a bf16 base, and under bf16 autocast.
ADAPTER_PATHS = pytest.mark.parametrize("adapters,dtype,autocast", [("fp32", torch.float32, False),
                                                                     ("fp32", torch.bfloat16, False),
                                                                     ("autocast", torch.bfloat16, True)])


@ADAPTER_PATHS
def test_lean_forward_equals_peft_bit_for_bit(adapters, dtype, autocast):
    model, tokenizer = tiny_lora(adapters, dtype)
    model.eval()
    ids = prompt_ids(tokenizer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = model(ids, use_cache=False).logits
        with lean_lora(model):
            assert swapped(model) == 7 * len(model.get_base_model().model.layers)
            lean = model(ids, use_cache=False).logits
    assert torch.equal(plain, lean)
    assert swapped(model) == 0  # peft's forward is back


def test_lean_generation_equals_peft_and_training_mode_is_untouched():
    model, tokenizer = tiny_lora("fp32", torch.float32)
    prompts = [tokenizer(t)["input_ids"] for t in ("Is a new oven worth it?", "Should I try rye flour?")]
    model.eval()
    plain = greedy_generate(model, tokenizer, prompts, 6)
    with evaluation_mode(model):
        assert swapped(model) > 0
        lean = greedy_generate(model, tokenizer, prompts, 6)
    assert [g.token_ids for g in lean] == [g.token_ids for g in plain]
    model.train()
    with lean_lora(model):
        assert swapped(model) == 0  # dropout must run in training: peft's forward stays


def test_disabled_adapters_keep_peft_forward():
    model, tokenizer = tiny_lora("fp32", torch.float32)
    model.eval()
    ids = torch.tensor([tokenizer("Should I bake at dawn?")["input_ids"]])
    with torch.no_grad(), model.disable_adapter(), lean_lora(model):
        assert swapped(model) == 0
        off = model(ids, use_cache=False).logits
    with torch.no_grad(), lean_lora(model):
        on = model(ids, use_cache=False).logits
    assert not torch.equal(off, on)


def test_state_changed_inside_the_block_falls_back_to_peft():
    model, tokenizer = tiny_lora("fp32", torch.float32)
    model.eval()
    ids = torch.tensor([tokenizer("Should I try a cold proof?")["input_ids"]])
    with torch.no_grad():
        with model.disable_adapter():
            off = model(ids, use_cache=False).logits
        with lean_lora(model):
            assert swapped(model) > 0
            with model.disable_adapter():
                assert torch.equal(model(ids, use_cache=False).logits, off)
