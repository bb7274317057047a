"""Decode modes of `greedy_generate` (`hardware.fast.decode`): the static-cache step, which a GPU records in
a CUDA graph and replays, gives the same rows as the eager reference — tokens, texts, finish reasons and
first-step log-probabilities — for left-padded batches of mixed lengths, per-row end tokens and stop
predicates, with and without LoRA adapters. On a CPU `graph` runs the very step the graph records, without
recording it (the recording itself needs a GPU: benchmarks/decode_graph.py checks it there)."""

from __future__ import annotations

import random

import pytest
import torch

from lbt.config import ConfigError, check_config
from lbt.eval import decode
from lbt.eval.decode import decode_mode, set_decode
from lbt.eval.scoring import greedy_generate
from lbt.model.modes import evaluation_mode
from tests.conftest import compose_train
from tests.eval_reference import greedy, tiny_eval_model


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1)
    return [[rng.randrange(3, 2048) for _ in range(rng.randrange(1, 45))] for _ in range(13)]


@pytest.fixture(autouse=True)
def default_decode():
    set_decode(None)
    yield
    set_decode(None)


def rows(generations):
    return [(g.token_ids, g.text, g.finish, g.first_logprobs) for g in generations]


def generate(model, tokenizer, prompts, decode, **kwargs):
    kwargs.setdefault("max_new_tokens", 10)
    kwargs.setdefault("batch_size", 5)
    return greedy_generate(model, tokenizer, prompts, decode=decode, **kwargs)


@pytest.mark.parametrize("batch_size", [1, 5, 13])
def test_static_rows_equal_eager_rows(tiny_eval, prompts, batch_size):
    model, tokenizer = tiny_eval
    targets = [[35, 36, 900]] * len(prompts)
    eager = generate(model, tokenizer, prompts, "eager", batch_size=batch_size, first_targets=targets)
    assert len({g.text for g in eager}) > 5  # varied text: the comparison is not vacuous
    for mode in ("static", "graph"):
        assert rows(generate(model, tokenizer, prompts, mode, batch_size=batch_size, first_targets=targets)) \
            == rows(eager)


def test_static_rows_equal_one_at_a_time_hf_generate(tiny_eval, prompts):
    model, tokenizer = tiny_eval
    for prompt, generation in zip(prompts, generate(model, tokenizer, prompts, "static", max_new_tokens=7)):
        assert generation.text == greedy(model, tokenizer, prompt, 7)


def test_end_tokens_and_stop_predicates_cut_each_row_as_eager(tiny_eval, prompts):
    model, tokenizer = tiny_eval
    # Make a token that every other row writes (at its step 2..7) an end-of-turn token, so rows end at
    # different steps; the others stop on their text's length or run to the limit.
    written = generate(model, tokenizer, prompts, "eager")
    ends = [g.token_ids[2 + i % 6] for i, g in enumerate(written) if i % 2 == 0]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *ends]

    def stop(text: str) -> bool:
        return len(text) >= 45

    try:
        eager = generate(model, tokenizer, prompts, "eager", stop=stop, max_new_tokens=16)
        static = generate(model, tokenizer, prompts, "static", stop=stop, max_new_tokens=16)
    finally:
        model.generation_config.eos_token_id = saved
    finishes = {g.finish for g in eager}
    assert {"eos", "stop"} <= finishes  # both ways of ending are exercised
    assert rows(static) == rows(eager)


def test_one_new_token_and_batches_that_end_at_once(tiny_eval, prompts):
    model, tokenizer = tiny_eval
    for max_new_tokens in (1, 2, 3):
        assert rows(generate(model, tokenizer, prompts, "static", max_new_tokens=max_new_tokens)) == \
            rows(generate(model, tokenizer, prompts, "eager", max_new_tokens=max_new_tokens))
    always = generate(model, tokenizer, prompts, "static", stop=lambda text: True)
    assert all(g.finish == "stop" and len(g.token_ids) == 1 for g in always)


def test_static_rows_equal_eager_rows_with_lora_adapters(prompts):
    from omegaconf import OmegaConf

    from lbt.model.lora import wrap_lora
    from tests.conftest import CONF

    model, tokenizer = tiny_eval_model()
    model = wrap_lora(model, OmegaConf.load(CONF / "train.yaml").train.lora, adapters="fp32")
    gen = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters an effect
            param.data = torch.randn(param.shape, generator=gen) * 0.2
    with evaluation_mode(model):  # what evaluation runs: lean LoRA forwards, eval mode, no gradients
        eager = generate(model, tokenizer, prompts, "eager")
        static = generate(model, tokenizer, prompts, "graph")
        with model.disable_adapter():
            base = generate(model, tokenizer, prompts, "eager")
    assert rows(static) == rows(eager)
    assert rows(base) != rows(eager)  # the adapters change the text: the comparison sees them


def test_mode_resolution(tiny_eval, monkeypatch):
    model, _ = tiny_eval
    assert decode_mode(model) == "eager"                # CPU default
    assert decode_mode(model, "graph") == "static"      # no CUDA graphs on a CPU: the same step, unrecorded
    set_decode("static")
    assert decode_mode(model) == "static"
    assert decode_mode(model, "eager") == "eager"       # a call's own mode wins
    with pytest.raises(ValueError, match="decode='fast'"):
        set_decode("fast")
    with pytest.raises(ValueError, match="decode='fast'"):
        decode_mode(model, "fast")
    model.train()
    try:
        assert decode_mode(model) == "eager"            # dropout: the reference path
    finally:
        model.eval()
    with monkeypatch.context() as on_cuda:  # what a CUDA device would get (nothing runs here)
        on_cuda.setattr(decode, "model_device", lambda m: torch.device("cuda"))
        set_decode(None)
        assert decode_mode(model) == "eager"       # graph is opt-in until a whole GPU job has run with it
        set_decode("graph")
        assert decode_mode(model) == "graph"
        handle = model.model.layers[0].register_forward_hook(lambda module, args, output: None)
        try:
            assert decode_mode(model) == "static"  # a hook's Python must run at every step, not once
        finally:
            handle.remove()
    monkeypatch.setattr(model.config, "_attn_implementation", "eager")
    assert decode_mode(model, "static") == "eager"      # static decoding passes sdpa's boolean masks


def test_hardware_fast_decode_is_checked():
    check_config(compose_train(["+hardware.fast.decode=static"]))
    with pytest.raises(ConfigError, match="hardware.fast.decode=graphs: must be null or one of eager, static, graph"):
        check_config(compose_train(["+hardware.fast.decode=graphs"]))


def test_queued_eager_path_unchanged(tiny_eval, prompts, monkeypatch):
    model, tokenizer = tiny_eval
    plain = generate(model, tokenizer, prompts, "eager")
    monkeypatch.setattr(decode, "_QUEUE_AHEAD", True)
    assert rows(generate(model, tokenizer, prompts, "eager")) == rows(plain)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_requests_of_different_lengths_share_a_loop_and_end_at_their_own(tiny_eval, prompts, mode, monkeypatch):
    """Forced choice's 8 tokens and Likert's 12 decode in one loop (lengths within LENGTH_SPREAD), each row
    ending where a loop of its own length would end it; 30 tokens run in another loop."""
    from lbt.eval import scoring
    from lbt.eval.scoring import Engine, Greedy

    model, tokenizer = tiny_eval
    lengths = [(8, 12, 30)[k % 3] for k in range(len(prompts))]
    stops = [None if k % 2 else (lambda text: "e" in text) for k in range(len(prompts))]
    loops = []
    real = scoring.decode_batch
    monkeypatch.setattr(scoring, "decode_batch", lambda *a, **k: loops.append(a[3]) or real(*a, **k))
    with evaluation_mode(model):
        engine = Engine(model, tokenizer, batch_size=len(prompts), decode=mode)
        pooled = engine.generate([Greedy(p, n, s) for p, n, s in zip(prompts, lengths, stops)])
        assert sorted(loops) == [12, 30]
        alone = {n: engine.generate([Greedy(p, n, s) for p, m, s in zip(prompts, lengths, stops) if m == n])
                 for n in (8, 12, 30)}
    expected = [alone[n].pop(0) for n in lengths]
    assert rows(pooled) == rows(expected)
    assert {g.finish for g in pooled} >= {"length", "stop"}
    assert all(len(g.token_ids) <= n for g, n in zip(pooled, lengths))
    assert any(len(g.token_ids) == 8 and g.finish == "length" for g, n in zip(pooled, lengths) if n == 8)
