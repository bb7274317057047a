"""The stance battery: every measure equals the plain one-at-a-time reference (log-probs within 1e-4 in fp32,
identical decisions, ratings and text), no number moves with batching or order, answers are parsed as
documented and never guessed, and bad input fails with file, line and field."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lbt.data.chat import ChatFormat
from lbt.eval.battery import check_measures, score_item_set
from lbt.eval.items import ItemError, ItemSet, as_item_set, load_item_set, spread_subset
from lbt.eval.measures import forced_choice, letter_logprob, likert, logprob, run_measure
from lbt.eval.parse import parse_choice, parse_rating
from lbt.eval.scoring import Engine, Generation
from lbt.eval.settings import BatterySettings, MeasureError
from lbt.eval.summary import summarize_phase
from lbt.model.modes import evaluation_mode
from lbt.study import MEASURES
from tests.eval_reference import make_item, make_items, reference_rows, write_items

SHORT = {"forced_choice_max_new_tokens": 5, "likert_max_new_tokens": 5, "open_ended_max_new_tokens": 6}


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    path = write_items(tmp_path_factory.mktemp("items") / "toy_items.jsonl", make_items(per_domain=2))
    return load_item_set(path)


def _engine(model, tokenizer, settings):
    return Engine(model, tokenizer, settings.batch_size)


def _key(row):
    return row["item_id"], row["order"], row.get("template")


def _compare(rows, reference, measure):
    assert len(rows) == len(reference)
    by_key = {_key(r): r for r in reference}
    for row in rows:
        ref = by_key[_key(row)]
        if measure in ("letter_logprob", "logprob"):
            for field in ("logp_pro", "logp_anti", "stance"):
                assert row[field] == pytest.approx(ref[field], abs=1e-4), (measure, field, row)
        elif measure == "forced_choice":  # an unparsed answer is NaN in both (missing, never 0)
            assert (row["raw"], row["choice"]) == (ref["raw"], ref["choice"])
            assert (math.isnan(row["stance"]) and math.isnan(ref["stance"])) or row["stance"] == ref["stance"]
        elif measure == "likert":
            assert (row["raw"], row["rating"]) == (ref["raw"], ref["rating"])
            assert (math.isnan(row["stance"]) and math.isnan(ref["stance"])) or row["stance"] == ref["stance"]
        else:
            assert row["response"] == ref["response"]


@pytest.mark.parametrize("form", ["bare", "leading_space"])
def test_every_measure_equals_the_plain_reference(tiny_eval, items, form):
    model, tokenizer = tiny_eval
    settings = BatterySettings(option_form=form, batch_size=5, **SHORT)
    rows = score_item_set(model, ChatFormat(tokenizer), items, list(MEASURES), settings, phase="base")
    for measure in MEASURES:
        _compare(rows[measure], reference_rows(model, ChatFormat(tokenizer), items.items, measure, settings), measure)
    assert {r["phase"] for rs in rows.values() for r in rs} == {"base"}
    assert {r["item_set"] for rs in rows.values() for r in rs} == {"toy_items"}


def test_standalone_letter_logprob_equals_the_shared_forward(tiny_eval, items):
    model, tokenizer = tiny_eval
    settings = BatterySettings(batch_size=3, **SHORT)
    alone = run_measure(_engine(model, tokenizer, settings), letter_logprob(ChatFormat(tokenizer), items, settings))
    shared = score_item_set(model, ChatFormat(tokenizer), items, ["letter_logprob", "forced_choice"], settings)[
        "letter_logprob"
    ]
    for a, b in zip(alone, shared):
        assert _key(a) == _key(b) and a["stance"] == pytest.approx(b["stance"], abs=1e-5)


def test_shuffling_and_rebatching_change_nothing(tiny_eval, items):
    model, tokenizer = tiny_eval
    base = score_item_set(model, ChatFormat(tokenizer), items, list(MEASURES), BatterySettings(batch_size=64, **SHORT))
    shuffled = list(items.items)
    random.Random(3).shuffle(shuffled)
    for batch_size in (1, 3):
        other = score_item_set(
            model,
            ChatFormat(tokenizer),
            ItemSet(items.name, shuffled),
            list(MEASURES),
            BatterySettings(batch_size=batch_size, **SHORT),
        )
        for measure in MEASURES:
            by_key = {_key(r): r for r in other[measure]}
            for row in base[measure]:
                twin = by_key[_key(row)]
                for field in ("stance", "logp_pro", "logp_anti"):
                    if isinstance(row.get(field), float) and not math.isnan(row[field]):
                        assert twin[field] == pytest.approx(row[field], abs=1e-5)
                for field in ("raw", "response", "rating", "choice"):
                    assert twin.get(field) == row.get(field)


def test_a_phase_pools_its_item_sets_and_measures_into_few_engine_calls(tiny_eval, items, monkeypatch):
    """Two item sets, asked different measures, in one call: the same rows as each set scored alone; forced
    choice and Likert of both sets decode in one loop (their lengths are within LENGTH_SPREAD), open-ended
    text in its own, and each engine call's seconds are kept under the measures it served."""
    from lbt.eval import battery as battery_mod
    from lbt.eval import scoring
    from lbt.eval.battery import score_item_sets

    model, tokenizer = tiny_eval
    chat = ChatFormat(tokenizer)
    settings = BatterySettings(batch_size=64, forced_choice_max_new_tokens=5, likert_max_new_tokens=8,
                               open_ended_max_new_tokens=20)
    other = ItemSet("other", list(reversed(items.items))[:3])
    asked = {items.name: (items, list(MEASURES)), "other": (other, ["likert", "forced_choice"])}
    loops = []
    real = scoring.decode_batch
    monkeypatch.setattr(scoring, "decode_batch", lambda *a, **k: loops.append((a[2]["input_ids"].shape[0], a[3]))
                        or real(*a, **k))
    timings = {}
    pooled = score_item_sets(model, chat, asked, settings, "base", timings)
    n_fc_likert = 2 * 2 * (len(items) + len(other))
    assert sorted(loops) == sorted([(n_fc_likert, 8), (len(items), 20)])
    assert set(timings) == {"forced_choice+letter_logprob+likert", "logprob", "open_ended"}
    for name, (item_set, measures) in asked.items():
        alone = score_item_set(model, chat, item_set, measures, settings, "base")
        assert list(pooled[name]) == measures
        for measure in measures:
            _compare(pooled[name][measure], alone[measure], measure)
            assert {r["item_set"] for r in pooled[name][measure]} == {name}
    # hardware.fast.pool_measures=false: one engine call per measure and item set, the same rows.
    loops.clear()
    battery_mod.set_pool_measures(False)
    try:
        unpooled = score_item_sets(model, chat, asked, settings, "base")
    finally:
        battery_mod.set_pool_measures(None)
    assert sorted(loops) == sorted([(2 * len(items), 5), (2 * len(other), 5), (2 * len(items), 8),
                                    (2 * len(other), 8), (len(items), 20)])
    for name, (_, measures) in asked.items():
        for measure in measures:
            _compare(unpooled[name][measure], pooled[name][measure], measure)


def test_letter_logprob_is_oriented_to_the_pro_option(tiny_eval, items):
    model, tokenizer = tiny_eval
    rows = run_measure(_engine(model, tokenizer, BatterySettings()), letter_logprob(ChatFormat(tokenizer), items, BatterySettings()))
    first = [r for r in rows if r["item_id"] == items.items[0]["id"]]
    original, swapped = first
    assert (original["pro_option"], original["anti_option"]) == ("A", "B")
    assert (swapped["pro_option"], swapped["anti_option"]) == ("B", "A")
    # Same letters, other roles: the swapped row's pro log-prob is P(B) on the swapped question.
    assert swapped["stance"] == pytest.approx(swapped["logp_pro"] - swapped["logp_anti"])


def test_logprob_is_length_normalised(tiny_eval, items):
    model, tokenizer = tiny_eval
    rows = run_measure(_engine(model, tokenizer, BatterySettings()), logprob(ChatFormat(tokenizer), items, BatterySettings()))
    go = next(r for r in rows if r["template"] == 3)
    assert (go["pro_option"], go["anti_option"]) == ("Go ahead now", "Wait")
    assert go["n_tokens_pro"] > go["n_tokens_anti"]
    assert len(rows) == len(items) * 4 * 2


# -- parsing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("A", "A"),
        ("B.", "B"),
        (" **B** because", "B"),
        ("(A) go ahead", "A"),
        ('"B"', "B"),
        ("The answer is B.", "B"),
        ("Answer: A", "A"),
        ("I would choose option B, since", "B"),
        ("A good idea would be to wait", None),
        ("Both have merits", None),
        ("", None),
        ("AB", None),
        ("I choose C.", None),
        ("B because it is safer", None),
        ("A. The city should go ahead", "A"),
        ("A\n\nThe city", "A"),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


def test_parse_choice_needs_the_next_character_until_the_reply_ends():
    assert parse_choice("A", final=False) is None  # could still become "A good idea…"
    assert parse_choice("A ", final=False) is None
    assert parse_choice("A\n", final=False) == parse_choice("A T", final=False) == "A"
    assert parse_choice("A", final=True) == "A"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("5", 5),
        ("6 - mostly agree", 6),
        ("I would rate it a 3.", 3),
        ("Rating: 7", 7),
        ("I'd say 4/7.", 4),
        ("2 out of 7", 2),
        ("8", None),
        ("10", None),
        ("On balance I agree.", None),
        ("", None),
        ("It's a 5/7 for me, my rating is 6", 5),
    ],
)
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


class _FakeEngine:
    """An engine whose generations are the given texts in request order (parsing on forced cases)."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, requests, intervention=None):
        return [
            Generation(self.texts[k % len(self.texts)], [], "eos", [0.0, 0.0] if r.first_targets else [])
            for k, r in enumerate(requests)
        ]


def test_forced_choice_stance_from_parsed_letters(monkeypatch, items):
    # Per item: original order answers "A" (pro), swapped order answers "A" (now the anti option), then junk.
    rows = run_measure(_FakeEngine(["A", "A.", "hmm", "B"]), forced_choice(ChatFormat(_FakeTokenizer()), items, BatterySettings()))
    stances = [r["stance"] for r in rows[:4]]
    assert stances[:2] == [1.0, -1.0] and math.isnan(stances[2]) and stances[3] == 1.0  # unparsed: NaN, never 0
    assert [r["parsed"] for r in rows[:4]] == [True, True, False, True]
    assert rows[2]["raw"] == "hmm" and rows[2]["choice"] is None


@pytest.mark.parametrize("form", ["bare", "leading_space"])
def test_forced_choice_shares_the_forward_with_letters_in_either_form(monkeypatch, tiny_eval, items, form):
    model, tokenizer = tiny_eval
    fake = _FakeEngine(["A", "A"])
    monkeypatch.setattr(Engine, "generate", lambda self, requests, intervention=None: fake.generate(requests))
    rows = score_item_set(
        model, ChatFormat(tokenizer), items, ["letter_logprob", "forced_choice"], BatterySettings(option_form=form)
    )
    choice = rows["forced_choice"]
    assert [r["stance"] for r in choice[:2]] == [1.0, -1.0]
    assert (choice[1]["pro_option"], choice[1]["anti_option"]) == ("B", "A")
    assert rows["letter_logprob"][1]["pro_option"] == ("B" if form == "bare" else " B")


def test_likert_orients_the_reversed_scale_and_keeps_unparsed_as_nan(monkeypatch, items):
    rows = run_measure(_FakeEngine(["6", "6", "no idea", "1"]), likert(ChatFormat(_FakeTokenizer()), items, BatterySettings()))
    assert [r["rating"] for r in rows[:4]] == [6, 6, None, 1]
    assert rows[0]["stance"] == pytest.approx(2 / 3)  # original: 6 → (6 − 4) / 3
    assert rows[1]["stance"] == pytest.approx(-2 / 3)  # swapped: 6 means disagree → 8 − 6 = 2
    assert math.isnan(rows[2]["stance"]) and rows[2]["parsed"] is False
    assert rows[3]["stance"] == pytest.approx(1.0)  # swapped: 1 = strongly agree


class _FakeTokenizer:
    """Enough of a tokenizer for prompt rendering when generation is faked."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs):
        return messages[0]["content"]

    def encode(self, text, add_special_tokens=False):
        return [1] * max(1, len(text) // 10)


# -- run_battery and bad input ------------------------------------------------------------------------------


def test_scored_in_evaluation_mode_summary_and_mode_restored(tiny_eval, items):
    model, tokenizer = tiny_eval
    model.train()
    with evaluation_mode(model):
        assert not any(m.training for m in model.modules()) and not torch.is_grad_enabled()
        rows = score_item_set(model, ChatFormat(tokenizer), items, ["letter_logprob", "forced_choice"],
                              BatterySettings(**SHORT), phase="final")
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    summary = summarize_phase({items.name: rows}, "final")
    stats = summary["item_sets"]["toy_items"]["measures"]["letter_logprob"]
    stances = [r["stance"] for r in rows["letter_logprob"]]
    assert stats["mean_stance"] == pytest.approx(sum(stances) / len(stances))
    assert stats["n_rows"] == 2 * len(items) and stats["parse_rate"] == 1.0
    assert set(summary["item_sets"]["toy_items"]["validity"]) == {"letter_logprob"}


def test_unknown_measure_is_named():
    with pytest.raises(MeasureError, match="letter_prob"):
        check_measures(["letter_logprob", "letter_prob"])
    with pytest.raises(MeasureError, match="twice"):
        check_measures(["likert", "likert"])
    with pytest.raises(MeasureError, match="option_form"):
        BatterySettings.from_config({"option_form": "colon"})
    with pytest.raises(MeasureError, match="likert.prompt"):
        BatterySettings.from_config({"likert": {"prompt": "Rate {statment}"}})


def test_item_missing_a_field_names_file_line_field(tmp_path):
    good, bad = make_item("park_rules", 0), make_item("park_rules", 1)
    del bad["forced_choice"]["anti_label"]
    path = write_items(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(ItemError, match=r"bad\.jsonl:2: field 'forced_choice\.anti_label' is missing"):
        load_item_set(path)


def test_empty_item_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ItemError, match="empty"):
        load_item_set(path)


def test_inexpressible_option_names_file_line_item_field(tiny_eval, tmp_path):
    model, tokenizer = tiny_eval
    item = make_item("urban_transit", 1)
    item["forced_choice"]["pro_label"] = "Ω"  # two bytes: two tokens of the byte-level tokenizer
    assert len(tokenizer.encode("Ω", add_special_tokens=False)) > 1
    path = write_items(tmp_path / "letters.jsonl", [make_item("urban_transit", 0), item])
    items = load_item_set(path)
    with pytest.raises(
        ItemError,
        match=r"letters\.jsonl:2: item 'urban_transit-001-p0', field "
        r"'forced_choice\.pro_label'.*2 tokens",
    ):
        run_measure(_engine(model, tokenizer, BatterySettings()), letter_logprob(ChatFormat(tokenizer), items, BatterySettings()))


def test_max_items_takes_domains_in_turn():
    items = [make_item(d, k) for d in ("urban_transit", "park_rules") for k in range(3)]
    chosen = spread_subset(items, 3)
    assert [i["domain"] for i in chosen] == ["urban_transit", "urban_transit", "park_rules"]
    assert spread_subset(items, None) == items


def _oom_above(model, monkeypatch, limit):
    """The model's forward raises a GPU out-of-memory error on prompt batches (the forwards without a
    key/value cache) of more than `limit` rows; the prompt batch sizes it saw are recorded."""
    seen = []
    forward = model.forward

    def tight(*args, **kwargs):
        if any(kwargs.get(key) is not None for key in ("cache", "past_key_values")):
            return forward(*args, **kwargs)
        rows = kwargs["input_ids"].shape[0]
        seen.append(rows)
        if rows > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", tight)
    return seen


def test_out_of_memory_retries_with_half_the_batch_and_same_rows(tiny_eval, monkeypatch, caplog):
    """A call that runs out of GPU memory is retried with half the batch; the rows are the same as a run
    at that batch from the start, and later measures and phases keep the smaller batch."""
    model, tokenizer = tiny_eval
    items = as_item_set(make_items(3), "target")
    plain = score_item_set(model, ChatFormat(tokenizer), items, ["likert", "logprob"], BatterySettings(batch_size=2))
    seen = _oom_above(model, monkeypatch, 2)
    settings = BatterySettings(batch_size=8)
    with caplog.at_level("WARNING"):
        rows = score_item_set(model, ChatFormat(tokenizer), items, ["likert", "logprob"], settings)
    assert seen[:2] == [8, 4] and max(seen[2:]) == 2  # the first batch at 8 prompts, then 4, then 2 on
    assert settings.batch_size == 2
    assert rows == plain
    assert "out of GPU memory at 8 prompts per batch; retrying with 4" in caplog.text
    assert "retrying with 2" in caplog.text and "retrying with 1" not in caplog.text


def test_out_of_memory_at_one_prompt_is_raised(tiny_eval, monkeypatch):
    model, tokenizer = tiny_eval
    _oom_above(model, monkeypatch, 0)
    settings = BatterySettings(batch_size=2)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        score_item_set(model, ChatFormat(tokenizer), as_item_set(make_items(1), "t"), ["likert"], settings)
    assert settings.batch_size == 1


def test_a_plan_that_asks_the_engine_twice_is_refused():
    from lbt.eval.measures import Ask, finish

    def greedy_plan():
        yield Ask("next_token", [])
        yield Ask("next_token", [])
        return []

    plan = greedy_plan()
    next(plan)
    with pytest.raises(RuntimeError, match="asked the engine twice"):
        finish(plan, [])
