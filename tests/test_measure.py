"""The causal suite's measurements agree with the stance battery and with one-at-a-time computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lbt.data.chat import ChatFormat
from lbt.eval.items import as_item_set, load_items, load_texts
from lbt.eval.measures import forced_choice, letter_logprob, run_measure
from lbt.eval.scoring import Engine, greedy_generate
from lbt.eval.settings import BatterySettings
from lbt.probe import hooks, measure
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model):
    _, tokenizer, model = tiny_model
    items = load_items(ROOT / "data" / "eval" / "target_items.jsonl")[:4]
    return model.eval(), tokenizer, items


def test_letter_logprob_and_forced_choice_match_the_battery(tiny):
    model, tokenizer, items = tiny
    prompts = measure.forced_choice_prompts(items, ChatFormat(tokenizer))
    assert prompts.orders == ["original", "swapped"] * 4
    with torch.no_grad():
        ours = measure.score_forced_choice(model, tokenizer, prompts, batch_size=3, max_new_tokens=8)
        settings = BatterySettings(batch_size=5, forced_choice_max_new_tokens=8)
        engine = Engine(model, tokenizer, settings.batch_size)
        letters = run_measure(engine, letter_logprob(ChatFormat(tokenizer), as_item_set(items), settings))
        choices = run_measure(engine, forced_choice(ChatFormat(tokenizer), as_item_set(items), settings))
    theirs = {(r["item_id"], r["order"]): r["stance"] for r in letters}
    want = np.array([theirs[(i, o)] for i, o in zip(prompts.item_ids, prompts.orders)])
    np.testing.assert_allclose(ours["letter_logprob"], want, atol=1e-4)
    theirs = {(r["item_id"], r["order"]): r["stance"] for r in choices}
    np.testing.assert_array_equal(ours["forced_choice"], [theirs[(i, o)] for i, o in zip(prompts.item_ids,
                                                                                         prompts.orders)])


def test_orientation_swaps_letters(tiny):
    _, tokenizer, items = tiny
    prompts = measure.forced_choice_prompts(items[:1], ChatFormat(tokenizer))
    fc = items[0]["forced_choice"]
    assert (prompts.pro_letter, prompts.anti_letter) == ([fc["pro_label"], fc["anti_label"]],
                                                         [fc["anti_label"], fc["pro_label"]])
    assert prompts.pro_token[0] == prompts.anti_token[1]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": fc["question"]}], tokenize=False,
                                             add_generation_prompt=True)
    assert prompts.ids[0] == tokenizer.encode(rendered, add_special_tokens=False)


def test_answer_activations_are_the_last_prompt_token(tiny):
    model, tokenizer, items = tiny
    prompts = measure.forced_choice_prompts(items, ChatFormat(tokenizer), orders=("original",))
    acts = measure.answer_activations(model, tokenizer, prompts.ids, batch_size=3)
    units = torch.nn.functional.normalize(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    proj = measure.answer_activations(model, tokenizer, prompts.ids, batch_size=2, units=units)
    for i in (0, 3):
        ids = torch.tensor([prompts.ids[i]])
        with torch.no_grad(), hooks.capture(model) as one:
            model(ids, use_cache=False)
        for layer in range(4):
            torch.testing.assert_close(acts["answer"][i, layer], one[layer][0, -1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(acts["prompt_mean"][i, layer], one[layer][0].mean(0), atol=1e-4, rtol=1e-4)
            assert float(proj["answer"][i, layer]) == pytest.approx(float(one[layer][0, -1] @ units[layer]), abs=1e-3)


def test_fluency_perplexity_and_kl(tiny):
    model, tokenizer, _ = tiny
    texts = [row["text"] for row in load_texts(ROOT / "data" / "eval" / "heldout_neutral.jsonl")[:3]]
    neutral = measure.neutral_set(ChatFormat(tokenizer), texts, max_tokens=12)
    ref = measure.fluency(model, tokenizer, neutral, batch_size=2, keep_logprobs=True)
    # One at a time, by hand: mean NLL of the reply tokens.
    nll, count = 0.0, 0
    for row in neutral.ids:
        with torch.no_grad():
            logp = model(torch.tensor([row]), use_cache=False).logits[0].float().log_softmax(-1)
        for t in range(neutral.prompt_len, len(row)):
            nll -= float(logp[t - 1, row[t]])
            count += 1
    assert ref["tokens"] == count == 3 * 12
    assert ref["perplexity"] == pytest.approx(np.exp(nll / count), rel=1e-4)
    same = measure.fluency(model, tokenizer, neutral, batch_size=2, reference=ref["logprobs"])
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    vec = {1: 5.0 * torch.ones(64)}
    steered = measure.fluency(model, tokenizer, neutral, batch_size=2, reference=ref["logprobs"],
                              intervention=lambda b: hooks.add(model, vec, b.response))
    assert steered["kl"] > 1e-3


def test_steering_at_response_positions_leaves_the_prompt_alone(tiny):
    """Steering at the answer position changes the letters; the prompt before it is untouched."""
    model, tokenizer, items = tiny
    prompts = measure.forced_choice_prompts(items[:2], ChatFormat(tokenizer))
    vec = {2: 3.0 * torch.randn(64, generator=torch.Generator().manual_seed(1))}
    base = measure.answer_activations(model, tokenizer, prompts.ids, batch_size=4)
    steered = measure.answer_activations(model, tokenizer, prompts.ids, batch_size=4,
                                         intervention=lambda b: hooks.add(model, vec, b.response))
    torch.testing.assert_close(steered["answer"][:, 2] - base["answer"][:, 2], vec[2].expand(4, 64), atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(steered["answer"][:, :2], base["answer"][:, :2])
    # The prompt mean moves by v / prompt length (only the answer column changed).
    lengths = torch.tensor([len(p) for p in prompts.ids], dtype=torch.float32)
    torch.testing.assert_close(steered["prompt_mean"][:, 2] - base["prompt_mean"][:, 2],
                               vec[2][None, :] / lengths[:, None], atol=1e-4, rtol=0)


def test_forced_choice_ends_at_the_generation_configs_end_tokens_as_the_battery(tiny, monkeypatch):
    """The steered stance (H3) and the battery's (H1) are one measurement: a reply ends at any end-of-turn
    token of the generation config, not only at the tokenizer's (the probe's old decoder missed these)."""
    model, tokenizer, items = tiny
    prompts = measure.forced_choice_prompts(items, ChatFormat(tokenizer))
    first = greedy_generate(model, tokenizer, prompts.ids[:1], 1)[0].token_ids[0]
    assert first != tokenizer.eos_token_id
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, first])
    ours = measure.score_forced_choice(model, tokenizer, prompts, batch_size=3, max_new_tokens=8)
    settings = BatterySettings(batch_size=5, forced_choice_max_new_tokens=8)
    rows = run_measure(Engine(model, tokenizer, settings.batch_size),
                       forced_choice(ChatFormat(tokenizer), as_item_set(items), settings))
    theirs = {(r["item_id"], r["order"]): r for r in rows}
    first_row = theirs[(prompts.item_ids[0], prompts.orders[0])]
    assert (first_row["raw"], first_row["finish"]) == ("", "eos") and np.isnan(ours["forced_choice"][0])
    np.testing.assert_array_equal(ours["forced_choice"],
                                  [theirs[(i, o)]["stance"] for i, o in zip(prompts.item_ids, prompts.orders)])
