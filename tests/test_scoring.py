"""Scoring primitives: batched, left-padded scoring equals a plain one-at-a-time reference, and no number
depends on batch composition, order or the tokenizer's padding side."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from lbt.eval.batching import eos_token_ids, left_pad, length_batches
from lbt.eval.scoring import (
    Continuation,
    Engine,
    Greedy,
    NextToken,
    OptionError,
    PaddedBatch,
    encode_option,
    greedy_generate,
    option_text,
)
from lbt.probe import hooks
from tests.eval_reference import greedy, option_logprobs


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(3, 2048) for _ in range(rng.randrange(2, 40))] for _ in range(11)]


def test_left_pad_positions_count_real_tokens():
    batch = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match="empty prompt"):
        left_pad([[1], []], pad_id=0)


def test_length_batches_longest_first_and_complete():
    batches = length_batches([3, 9, 1, 9, 5], batch_size=2)
    assert batches == [[1, 3], [4, 0], [2]]
    with pytest.raises(ValueError):
        length_batches([1], 0)


def test_option_forms():
    assert option_text(" Approve", "bare") == "Approve"
    assert option_text("A", "leading_space") == " A"
    assert option_text(" A", "leading_space") == " A"
    with pytest.raises(OptionError, match="option_form"):
        option_text("A", "with_colon")
    with pytest.raises(OptionError, match="empty"):
        option_text("  ", "bare")


def test_eos_ids_join_tokenizer_and_generation_config(tiny_eval):
    model, tokenizer = tiny_eval
    assert tokenizer.eos_token_id in eos_token_ids(model, tokenizer)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    try:
        assert eos_token_ids(model, tokenizer) == {tokenizer.eos_token_id, 7}
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def _next_token(model, prompts, targets, batch_size):
    return Engine(model, batch_size=batch_size, pad=0).next_token([NextToken(p, t) for p, t in zip(prompts, targets)])


def _continuation(model, prompts, options, batch_size):
    return Engine(model, batch_size=batch_size, pad=0).continuation(
        [Continuation(p, o) for p, o in zip(prompts, options)]
    )


def test_next_token_logprobs_match_full_forward(tiny_eval, prompts):
    model, _ = tiny_eval
    targets = [[3, 100 + k, 2000] for k in range(len(prompts))]
    got = _next_token(model, prompts, targets, batch_size=4)
    for prompt, target, values in zip(prompts, targets, got):
        for token, value in zip(target, values):
            assert value == pytest.approx(option_logprobs(model, prompt, [token])[0], abs=1e-4)


def test_continuation_logprobs_match_full_forward(tiny_eval, prompts):
    model, _ = tiny_eval
    rng = random.Random(1)
    options = [
        [[rng.randrange(3, 2048) for _ in range(rng.randrange(1, 5))] for _ in range(2)] for _ in prompts
    ]
    got = _continuation(model, prompts, options, batch_size=3)
    for prompt, opts, values in zip(prompts, options, got):
        for option, per_token in zip(opts, values):
            assert len(per_token) == len(option)
            assert per_token == pytest.approx(option_logprobs(model, prompt, option), abs=1e-4)


def test_scores_do_not_depend_on_batching_order_or_padding_side(tiny_eval, prompts):
    model, tokenizer = tiny_eval
    options = [[[7], [11, 12, 13]] for _ in prompts]
    reference = _continuation(model, prompts, options, batch_size=len(prompts))
    order = list(range(len(prompts)))
    random.Random(2).shuffle(order)
    for batch_size in (1, 2, 5):
        for side in ("left", "right"):
            tokenizer.padding_side = side
            shuffled = _continuation(
                model, [prompts[i] for i in order], [options[i] for i in order], batch_size=batch_size
            )
            for position, i in enumerate(order):
                for a, b in zip(shuffled[position], reference[i]):
                    assert a == pytest.approx(b, abs=1e-5)
    tokenizer.padding_side = "left"


def test_greedy_generation_matches_hf_generate_one_at_a_time(tiny_eval, prompts):
    model, tokenizer = tiny_eval
    got = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    assert len({g.text for g in got}) > 3  # the wide-init model writes varied text: the test is not vacuous
    for prompt, generation in zip(prompts, got):
        assert generation.text == greedy(model, tokenizer, prompt, 6)
        assert generation.finish in ("eos", "length")


def test_stop_predicate_cuts_each_row_where_it_first_holds(tiny_eval, prompts):
    model, tokenizer = tiny_eval

    def stop(text: str) -> bool:
        return len(text) >= 5

    got = greedy_generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, stop=stop)
    rebatched = greedy_generate(
        model, tokenizer, prompts[::-1], max_new_tokens=8, batch_size=len(prompts), stop=stop
    )
    for prompt, a, b in zip(prompts, got, rebatched[::-1]):
        assert a.text == b.text == greedy(model, tokenizer, prompt, 8, stop=stop)
        if a.finish == "stop":
            assert len(a.text) >= 5 and len(tokenizer.decode(a.token_ids[:-1])) < 5


def test_first_step_logprobs_equal_next_token_logprobs(tiny_eval, prompts):
    model, tokenizer = tiny_eval
    targets = [[35, 36]] * len(prompts)
    generations = greedy_generate(model, tokenizer, prompts, 2, batch_size=4, first_targets=targets)
    direct = _next_token(model, prompts, targets, batch_size=5)
    for generation, values in zip(generations, direct):
        assert generation.first_logprobs == pytest.approx(values, abs=1e-5)


def test_encode_option_has_no_special_tokens(tiny_eval):
    _, tokenizer = tiny_eval
    ids = encode_option(tokenizer, "A")
    assert len(ids) == 1 and ids[0] not in tokenizer.all_special_ids


# -- the engine: requests, order, interventions ---------------------------------------------------------


def test_engine_batches_by_length_and_enters_the_intervention_once_per_batch(tiny_eval, prompts):
    model, tokenizer = tiny_eval
    seen = []

    @contextlib.contextmanager
    def record(batch: PaddedBatch):
        seen.append(batch)
        yield

    engine = Engine(model, tokenizer, batch_size=4)
    targets = [[35, 36]] * len(prompts)
    got = engine.next_token([NextToken(p, t) for p, t in zip(prompts, targets)], intervention=record)
    assert sorted(i for batch in seen for i in batch.indices) == list(range(len(prompts)))
    assert [len(batch.indices) for batch in seen] == [4, 4, 3]
    for batch in seen:
        assert batch.width == max(len(prompts[i]) for i in batch.indices)
    assert seen[0].width == max(len(p) for p in prompts)  # longest first: an out-of-memory shows at once
    unseen = Engine(model, tokenizer, batch_size=4).next_token([NextToken(p, t) for p, t in zip(prompts, targets)])
    assert got == unseen  # the recording intervention changes nothing


def test_intervention_acts_on_the_prompt_and_every_decoding_step(tiny_eval, prompts):
    """Steering through the engine equals steering a plain one-at-a-time run under the same hook."""
    model, tokenizer = tiny_eval
    vector = {0: 4.0 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))}
    engine = Engine(model, tokenizer, batch_size=3)

    def steer(batch: PaddedBatch):
        return hooks.add(model, vector)

    requests = [Greedy(p, 5) for p in prompts[:5]]
    steered = engine.generate(requests, intervention=steer)
    plain = engine.generate(requests)
    assert [g.text for g in steered] != [g.text for g in plain]
    with hooks.add(model, vector):
        for prompt, generation in zip(prompts, steered):
            assert generation.text == greedy(model, tokenizer, prompt, 5)
        alone = [option_logprobs(model, p, [35]) for p in prompts[:5]]
    scored = engine.next_token([NextToken(p, [35]) for p in prompts[:5]], intervention=steer)
    for a, b in zip(scored, alone):
        assert a == pytest.approx(b, abs=1e-4)


def test_requests_with_different_lengths_come_back_in_order(tiny_eval, prompts):
    model, tokenizer = tiny_eval
    engine = Engine(model, tokenizer, batch_size=4)
    lengths = [1 + k % 3 for k in range(len(prompts))]
    seen = []

    @contextlib.contextmanager
    def record(batch: PaddedBatch):
        seen.append(batch.indices)
        yield

    got = engine.generate([Greedy(p, n) for p, n in zip(prompts, lengths)], intervention=record)
    # A batch holds lengths within LENGTH_SPREAD (1 and 2 together, 3 alone), each row ending at its own;
    # the intervention is told the requests' own indices.
    assert sorted(i for indices in seen for i in indices) == list(range(len(prompts)))
    batch_lengths = [{lengths[i] for i in indices} for indices in seen]
    assert all(held <= {1, 2} or held == {3} for held in batch_lengths) and {1, 2} in batch_lengths
    for prompt, n, generation in zip(prompts, lengths, got):
        assert generation.text == greedy(model, tokenizer, prompt, n)
        assert len(generation.token_ids) <= n
