"""Shared prompt prefixes (`lbt.eval.prefix`, `hardware.fast.share_prefix`): the grouping runs the fewest
tokens, and the engine's rows with sharing equal its rows without, for every request kind and decode mode,
on the project's own battery items (fp32, tiny model); sharing stays off where a caller could see it."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from lbt.data.chat import ChatFormat
from lbt.eval import prefix
from lbt.eval.battery import score_item_set
from lbt.eval.decode import set_decode
from lbt.eval.items import load_item_set
from lbt.eval.prefix import PrefixPlan, plan_prefixes, set_share_prefix
from lbt.eval.scoring import Continuation, Engine, Greedy, NextToken
from lbt.eval.settings import BatterySettings
from lbt.model.modes import evaluation_mode
from tests.conftest import ROOT, compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

MEASURES = ["letter_logprob", "forced_choice", "logprob", "likert", "open_ended"]


@pytest.fixture(autouse=True)
def defaults():
    set_decode(None)
    set_share_prefix(None)
    yield
    set_decode(None)
    set_share_prefix(None)


@pytest.fixture
def shared_batches(monkeypatch):
    """Counts the batches that ran with shared prefixes."""
    calls = []
    real = prefix.shared_inputs

    def counting(*args, **kwargs):
        calls.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(prefix, "shared_inputs", counting)
    return calls


# -- the plan -----------------------------------------------------------------------------------------------


def tokens_run(prompts, plan: PrefixPlan) -> int:
    return sum(plan.prefix) + sum(len(plan.own(prompts, i)) for i in range(len(prompts)))


def check_plan(prompts, plan: PrefixPlan) -> None:
    for i, p in enumerate(prompts):
        shared = plan.prefix[plan.group[i]]
        assert 0 <= shared < len(p)  # every prompt keeps a token of its own
        for j, q in enumerate(prompts):
            if plan.group[j] == plan.group[i]:
                assert list(p[:shared]) == list(q[:shared])


def partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in partitions(rest):
        for k in range(len(smaller)):
            yield smaller[:k] + [[first] + smaller[k]] + smaller[k + 1:]
        yield [[first]] + smaller


def group_cost(prompts) -> float:
    if len(prompts) == 1:
        return len(prompts[0])
    shared = min(min(prefix._common(prompts[0], q) for q in prompts[1:]), min(len(q) for q in prompts) - 1)
    return shared + sum(len(q) - shared for q in prompts) if shared >= 1 else math.inf


def test_the_plan_runs_the_fewest_tokens_of_every_grouping():
    """Against every partition of small sets of prompts that end alike (as chat prompts end in the generation
    prompt), over a two-token alphabet so that prefixes nest deeply."""
    rng = random.Random(0)
    for _ in range(400):
        prompts = [[rng.choice([1, 2]) for _ in range(rng.randrange(0, 6))] + [9] for _ in range(rng.randint(1, 7))]
        plan = plan_prefixes(prompts)
        check_plan(prompts, plan)
        fewest = min(sum(group_cost([prompts[i] for i in g]) for g in p) for p in partitions(list(range(len(prompts)))))
        assert tokens_run(prompts, plan) == fewest, prompts


def test_any_prompts_get_a_valid_plan_no_dearer_than_running_them_whole():
    rng = random.Random(1)
    for _ in range(300):
        prompts = [[rng.choice([1, 2, 3]) for _ in range(rng.randint(1, 9))] for _ in range(rng.randint(1, 12))]
        prompts += [list(p) for p in rng.sample(prompts, k=min(2, len(prompts)))]  # duplicates
        plan = plan_prefixes(prompts)
        check_plan(prompts, plan)
        assert tokens_run(prompts, plan) <= sum(len(p) for p in prompts)


def test_items_are_grouped_at_their_scenario():
    """Three items, eight prompts each behind a common chat opening: one group per item, at the item's whole
    common prefix (the chat opening alone is not worth a group: it would be run again in every item's)."""
    opening = [50, 51, 52]
    prompts, owner = [], []
    for item in range(3):
        scenario = [100 + item] * 20
        for k in range(8):
            prompts.append(opening + scenario + [200 + k] * (3 + k) + [9])
            owner.append(item)
    plan = plan_prefixes(prompts)
    assert len(set(plan.group)) == 3
    assert all((plan.group[i] == plan.group[j]) == (owner[i] == owner[j]) for i, j in itertools.combinations(range(24), 2))
    assert plan.prefix == [23, 23, 23]


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="empty prompt"):
        plan_prefixes([[1, 2], []])


def test_a_deep_chain_of_nested_prefixes_needs_no_recursion():
    prompts = [[1] * k + [9] for k in range(1, 1500)]
    check_plan(prompts, plan_prefixes(prompts))


# -- the engine's rows ----------------------------------------------------------------------------------------


def worst_difference(plain: dict, shared: dict) -> tuple[float, int]:
    worst, texts = 0.0, 0
    for measure, rows in plain.items():
        assert len(rows) == len(shared[measure])
        for a, b in zip(rows, shared[measure]):
            assert (a["item_id"], a["order"], a.get("template")) == (b["item_id"], b["order"], b.get("template"))
            for field in ("stance", "logp_pro", "logp_anti"):
                if field in a and not (math.isnan(a[field]) and math.isnan(b[field])):
                    worst = max(worst, abs(a[field] - b[field]) / max(1.0, abs(a[field])))
            texts += sum(a[f] != b[f] for f in ("raw", "response", "rating", "choice") if f in a)
    return worst, texts


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_battery_rows_with_shared_prefixes_equal_whole_prompts(tiny_eval, shared_batches, decode):
    """Every measure on the project's source items (all five request paths: next-token letters off the first
    decoding step, continuations, greedy text with stop predicates, long open-ended text), in batches that
    split groups: the same texts and log-probabilities within fp32 rounding."""
    model, tokenizer = tiny_eval
    chat = ChatFormat.of(tokenizer, compose_train([]).model)
    items = load_item_set(ROOT / "data" / "eval" / "source_items.jsonl")
    set_decode(decode)
    rows = {}
    for share in (False, True):
        set_share_prefix(share)
        settings = BatterySettings(batch_size=28, open_ended_max_new_tokens=12)
        with evaluation_mode(model):
            rows[share] = score_item_set(model, chat, items, MEASURES, settings)
    worst, texts = worst_difference(rows[False], rows[True])
    assert texts == 0 and worst < 1e-5
    assert len({r["raw"] for r in rows[False]["likert"]}) > 3  # varied text: the comparison is not vacuous
    assert len(shared_batches) >= 5 and max(shared_batches) == 28


def test_next_token_and_continuation_share_and_agree(tiny_eval, shared_batches):
    model, tokenizer = tiny_eval
    rng = random.Random(2)
    heads = [[rng.randrange(3, 2000) for _ in range(30)] for _ in range(4)]
    prompts = [h + [rng.randrange(3, 2000) for _ in range(rng.randint(1, 6))] for h in heads for _ in range(5)]
    options = [[[5], [6, 7, 8]], [[9, 10], [11]]]
    with evaluation_mode(model):
        results = {}
        for share in (False, True):
            engine = Engine(model, tokenizer, batch_size=7, share_prefix=share)
            results[share] = (engine.next_token([NextToken(p, [5, 6]) for p in prompts]),
                              engine.continuation([Continuation(p, options[i % 2]) for i, p in enumerate(prompts)]))
    assert shared_batches
    plain, shared = results[False], results[True]
    for a, b in zip(plain[0], shared[0]):
        assert a == pytest.approx(b, abs=1e-5)
    for a, b in zip(plain[1], shared[1]):
        for x, y in zip(a, b):
            assert x == pytest.approx(y, abs=1e-5)


def test_unrelated_prompts_run_whole(tiny_eval, shared_batches):
    model, tokenizer = tiny_eval
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randint(5, 20))] for _ in range(12)]
    with evaluation_mode(model):
        Engine(model, tokenizer, batch_size=6, share_prefix=True).next_token([NextToken(p, [5]) for p in prompts])
    assert shared_batches == []


def test_a_one_token_prompt_runs_whole_beside_shared_ones(tiny_eval, shared_batches):
    model, tokenizer = tiny_eval
    prompts = [[7]] + [[40] * 30 + [50 + k] for k in range(6)]
    with evaluation_mode(model):
        plain = Engine(model, tokenizer, batch_size=8, share_prefix=False).next_token([NextToken(p, [5]) for p in prompts])
        shared = Engine(model, tokenizer, batch_size=8, share_prefix=True).next_token([NextToken(p, [5]) for p in prompts])
        assert shared_batches == []  # one batch, holding the one-token prompt
        Engine(model, tokenizer, batch_size=6, share_prefix=True).next_token([NextToken(p, [5]) for p in prompts])
        assert shared_batches == [6]  # the six that share, in a batch of their own
    assert [v for row in shared for v in row] == pytest.approx([v for row in plain for v in row], abs=1e-5)


def test_no_sharing_under_an_intervention_or_a_hook(tiny_eval, shared_batches):
    """Steering, patching and capture see a prompt's positions: with an intervention, or any forward hook on
    the model, every prompt runs whole (and the process default alone switches nothing on)."""
    model, tokenizer = tiny_eval
    prompts = [[40] * 30 + [50 + k] for k in range(6)]
    requests = [Greedy(p, 3) for p in prompts]
    seen = []

    def intervention(batch):
        seen.append(batch.width)
        return torch.no_grad()

    with evaluation_mode(model):
        set_share_prefix(True)
        Engine(model, tokenizer, batch_size=6).generate(requests, intervention)
        assert shared_batches == [] and seen == [31]
        handle = model.model.layers[0].register_forward_hook(lambda *a: None)
        try:
            Engine(model, tokenizer, batch_size=6).generate(requests)
        finally:
            handle.remove()
        assert shared_batches == []
        Engine(model, tokenizer, batch_size=6).generate(requests)
        assert shared_batches == [6]
        set_share_prefix(None)
        Engine(model, tokenizer, batch_size=6).generate(requests)
        assert shared_batches == [6]


def test_right_padded_batches_refuse_sharing(tiny_eval):
    model, tokenizer = tiny_eval
    with pytest.raises(ValueError, match="left-padded"):
        Engine(model, tokenizer).map_batches([[1, 2]], lambda b, i: [0], padding="right", share=True)


def test_the_gpu_hardware_shares_and_the_cpu_hardware_does_not():
    assert compose_train(["hardware=gpu"]).hardware.fast.share_prefix is True
    assert compose_train(["hardware=multi_gpu"]).hardware.fast.share_prefix is True
    assert compose_train([]).hardware.fast.share_prefix is False
