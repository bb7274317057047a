"""Residual-stream hooks on small random Qwen2 and Llama models (fp32), plain and peft-wrapped."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lbt.model.tiny import TOKENIZER_DIR
from lbt.probe import hooks
from lbt.probe.hooks import Positions

LAYERS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(kind: str, peft: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen2" if kind == "qwen2" else "llama", vocab_size=256, hidden_size=32, intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    if peft:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"],
                                                 init_lora_weights=False)).eval()
    return model


def batch(padding: str) -> dict[str, torch.Tensor]:
    """Two rows of lengths 7 and 4, padded left or right, with position ids counting real tokens."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(2, 256, (7,), generator=g), torch.randint(2, 256, (4,), generator=g)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(7 - len(row), 7) if padding == "left" else slice(0, len(row))
        ids[i, cols], mask[i, cols] = row, 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}


MODELS = [("qwen2", False), ("llama", False), ("qwen2", True), ("llama", True)]


@pytest.fixture(scope="module", params=MODELS, ids=lambda p: f"{p[0]}{'-peft' if p[1] else ''}")
def model(request):
    return tiny_model(*request.param)


def test_finds_layers_through_peft_and_lightning_wrappers():
    plain = tiny_model("qwen2")
    wrapped = tiny_model("qwen2", peft=True)
    assert len(hooks.decoder_layers(plain)) == LAYERS
    assert hooks.decoder_layers(wrapped) is wrapped.get_base_model().model.layers

    class Holder(nn.Module):  # as the LightningModule holds the peft model
        def __init__(self, inner):
            super().__init__()
            self.model = inner
    assert hooks.decoder_layers(Holder(wrapped)) is wrapped.get_base_model().model.layers


@torch.no_grad()
def test_capture_equals_output_hidden_states(model):
    inputs = batch("left")
    out = model(**inputs, output_hidden_states=True, use_cache=False)
    with hooks.capture(model) as acts:
        model(**inputs, use_cache=False)
    assert acts.layers() == list(range(LAYERS))
    for layer in range(LAYERS - 1):
        torch.testing.assert_close(acts[layer], out.hidden_states[layer + 1], rtol=0, atol=0)
    # HF applies the final norm before returning the last hidden state.
    normed = hooks.final_norm(model)(acts[LAYERS - 1])
    torch.testing.assert_close(normed, out.hidden_states[LAYERS], rtol=0, atol=0)


@pytest.mark.parametrize("padding", ["left", "right"])
@torch.no_grad()
def test_add_shows_exactly_v_at_chosen_positions(model, padding):
    inputs = batch(padding)
    last = hooks.last_positions(inputs["attention_mask"])
    assert inputs["attention_mask"][torch.arange(2), last].tolist() == [1, 1]
    expected_last = [6, 6] if padding == "left" else [6, 3]
    assert last.tolist() == expected_last
    chosen = Positions.at_index(last, 7)
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    with hooks.capture(model, [1]) as clean:
        model(**inputs, use_cache=False)
    with hooks.add(model, {1: v}, chosen), hooks.capture(model, [1]) as steered:
        model(**inputs, use_cache=False)
    diff = steered[1] - clean[1]
    for row in range(2):
        for col in range(7):
            want = v if col == last[row] else torch.zeros(32)
            torch.testing.assert_close(diff[row, col], want, rtol=0, atol=1e-6)


@torch.no_grad()
def test_add_per_row_vectors_and_start_columns(model):
    inputs = batch("right")
    v = torch.randn(2, 32, generator=torch.Generator().manual_seed(4))
    with hooks.capture(model, [0]) as clean:
        model(**inputs, use_cache=False)
    with hooks.add(model, {0: v}, Positions.starting_at([5, 2])), hooks.capture(model, [0]) as steered:
        model(**inputs, use_cache=False)
    diff = steered[0] - clean[0]
    assert torch.allclose(diff[0, 5:], v[0].expand(2, 32), atol=1e-6) and diff[0, :5].abs().max() < 1e-6
    assert torch.allclose(diff[1, 2:], v[1].expand(5, 32), atol=1e-6) and diff[1, :2].abs().max() < 1e-6


@torch.no_grad()
def test_project_out_leaves_zero_component(model):
    inputs = batch("left")
    u = torch.randn(32, generator=torch.Generator().manual_seed(5))
    unit = u / u.norm()
    with hooks.capture(model, [2]) as clean:
        model(**inputs, use_cache=False)
    assert (clean[2] @ unit).abs().max() > 1e-2  # the component exists before
    with hooks.project_out(model, {2: 3.0 * u}), hooks.capture(model, [2]) as ablated:
        model(**inputs, use_cache=False)
    assert (ablated[2] @ unit).abs().max() < 1e-5
    # Only the component along u changed.
    rest = clean[2] - (clean[2] @ unit)[..., None] * unit
    torch.testing.assert_close(ablated[2], rest, rtol=0, atol=1e-5)


@torch.no_grad()
def test_patching_own_activations_changes_no_logit(model):
    inputs = batch("right")
    with hooks.capture(model) as acts:
        clean = model(**inputs, use_cache=False).logits
    for layer in range(LAYERS):
        with hooks.replace(model, {layer: acts[layer]}):
            patched = model(**inputs, use_cache=False).logits
        torch.testing.assert_close(patched, clean, rtol=0, atol=0)
    # And a different activation does change them (the patch is really applied).
    with hooks.replace(model, {1: acts[1] + 1.0}):
        assert not torch.allclose(model(**inputs, use_cache=False).logits, clean)


@torch.no_grad()
def test_replace_row_vector_at_answer_position_only(model):
    inputs = batch("left")
    new = torch.randn(2, 32, generator=torch.Generator().manual_seed(6))
    with hooks.replace(model, {1: new}, Positions.response()), hooks.capture(model, [1]) as acts:
        model(**inputs, use_cache=False)
    torch.testing.assert_close(acts[1][:, -1], new, rtol=0, atol=0)
    with hooks.capture(model, [1]) as clean:
        model(**inputs, use_cache=False)
    torch.testing.assert_close(acts[1][:, :-1], clean[1][:, :-1], rtol=0, atol=0)


@pytest.mark.parametrize("include_answer", [False, True])
@torch.no_grad()
def test_response_steering_during_cached_generate(model, include_answer):
    """Steering at response positions during KV-cached generate touches exactly the generated columns
    (and the answer column if asked): replaying the generated sequence without steering shows +v there
    and nothing elsewhere."""
    inputs = batch("left")
    v = 2.0 * torch.randn(32, generator=torch.Generator().manual_seed(7))
    with hooks.add(model, {1: v}, Positions.response(include_answer)), hooks.capture(model, [1]) as steered:
        out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=True)
    assert out.shape[1] == 11
    assert len(steered.calls[1]) == 4  # prefill + 3 cached decode steps
    fed = out[:, :-1]  # the last generated token is never fed back
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)
    with hooks.capture(model, [1]) as replay:
        model(input_ids=fed, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
    diff = (steered[1] - replay[1]) * mask[..., None]  # pad columns: generate gives them other position ids
    first = 6 if include_answer else 7
    assert diff[:, :first].abs().max() < 1e-5
    torch.testing.assert_close(diff[:, first:], v.expand(2, 10 - first, 32), rtol=0, atol=1e-4)


def test_tuple_returning_layers_are_handled():
    """Older transformers return (hidden, ...) from a decoder layer: read and replace the first element."""
    class TupleLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, hidden):
            return (torch.tanh(self.linear(hidden)), "attn-weights")

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([TupleLayer() for _ in range(3)])

        def forward(self, hidden):
            seen = []
            for layer in self.layers:
                out = layer(hidden)
                assert isinstance(out, tuple) and out[1] == "attn-weights"
                hidden = out[0]
                seen.append(hidden)
            return hidden, seen

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

        def forward(self, hidden):
            return self.model(hidden)

    torch.manual_seed(0)
    toy = Toy()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        _, clean = toy(x)
        with hooks.capture(toy) as acts:
            toy(x)
        for layer in range(3):
            torch.testing.assert_close(acts[layer], clean[layer])
        v = torch.ones(8)
        with hooks.add(toy, {1: v}), hooks.capture(toy, [1]) as steered:
            toy(x)
        torch.testing.assert_close(steered[1] - clean[1], v.expand(2, 5, 8), rtol=0, atol=1e-6)
        with hooks.project_out(toy, {0: v}), hooks.capture(toy, [0]) as ablated:
            toy(x)
        assert (ablated[0] @ (v / v.norm())).abs().max() < 1e-6
    assert hooks.hidden_of((x, None)) is x and hooks.with_hidden((x, "w"), x + 1)[1] == "w"
    assert isinstance(hooks.with_hidden(x, x + 1), torch.Tensor)


@torch.no_grad()
def test_hooks_are_removed_on_exit_and_on_error(model):
    inputs = batch("left")
    clean = model(**inputs, use_cache=False).logits
    layer = hooks.decoder_layers(model)[0]
    before = (len(layer._forward_hooks), len(layer._forward_pre_hooks))  # transformers keeps its own hooks
    with pytest.raises(RuntimeError), hooks.add(model, {0: torch.ones(32)}):
        raise RuntimeError("boom")
    torch.testing.assert_close(model(**inputs, use_cache=False).logits, clean, rtol=0, atol=0)
    assert (len(layer._forward_hooks), len(layer._forward_pre_hooks)) == before


def test_real_tokenizer_chat_prompt_answer_position():
    """The answer position of a left-padded chat prompt batch is the last prompt token of every row."""
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True) for t in ("Hi there, how are you?", "Go")]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    last = hooks.last_positions(enc["attention_mask"])
    assert last.tolist() == [enc["input_ids"].shape[1] - 1] * 2
