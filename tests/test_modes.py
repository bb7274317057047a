"""`evaluation_mode`, the one model mode of every measurement, and the one decoder-layer finder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lbt.model.layers import decoder_layers
from lbt.model.modes import evaluation_mode
from tests.test_lean_lora import prompt_ids, swapped, tiny_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora():
    return tiny_lora("fp32", torch.float32)


def test_eval_no_grad_lean_and_every_flag_restored(lora):
    model, _ = lora
    model.train()
    frozen = decoder_layers(model)[0].mlp
    frozen.eval()  # a part in another mode than the whole: restored as it was, not to the model's mode
    with evaluation_mode(model) as inside:
        assert inside is model
        assert not any(m.training for m in model.modules())
        assert not torch.is_grad_enabled()
        assert swapped(model) > 0  # lean LoRA forwards
    assert torch.is_grad_enabled() and swapped(model) == 0
    assert model.training and not frozen.training
    assert all(m.training for name, m in model.named_modules() if ".mlp" not in name)
    model.eval()


def test_adapters_off_is_the_base_model(lora):
    model, tokenizer = lora
    ids = prompt_ids(tokenizer)
    with evaluation_mode(model) as tuned:
        adapted = tuned(ids, use_cache=False).logits
    with evaluation_mode(model, adapters=False) as base:
        off = base(ids, use_cache=False).logits
    with torch.no_grad(), model.disable_adapter():
        reference = model(ids, use_cache=False).logits
    assert torch.equal(off, reference)
    assert not torch.allclose(adapted, off)  # the adapters are back on after the block
    with evaluation_mode(model):
        assert torch.equal(model(ids, use_cache=False).logits, adapted)


def test_compiled_layers_run_eagerly_inside_and_compiled_after(lora):
    model, _ = lora
    layers = decoder_layers(model)
    marker = object()
    layers[0]._compiled_call_impl = marker  # what nn.Module.compile() leaves on a layer
    try:
        with evaluation_mode(model):
            assert all(layer._compiled_call_impl is None for layer in layers)
        assert layers[0]._compiled_call_impl is marker
    finally:
        layers[0]._compiled_call_impl = None


def test_a_module_without_decoder_layers_still_gets_the_mode():
    toy = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    with pytest.raises(ValueError, match="no decoder layers"):
        decoder_layers(toy)
    with evaluation_mode(toy):
        assert not toy.training and not torch.is_grad_enabled()
    assert toy.training
