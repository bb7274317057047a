"""StanceEvaluator: rows and summary per phase, append-only (a finished phase is skipped, a half-written
one completes only what is missing), logger scalars and W&B Tables, model mode restored; the real config
tree builds the evaluators from the eval group's own keys and a tiny training job writes every phase."""

from __future__ import annotations

import json
import math

import pytest

from lbt import train as train_mod
from lbt import wandb_keys
from lbt.data.chat import ChatFormat
from lbt.eval import evaluators as evaluators_mod
from lbt.eval.evaluators import CapabilityEvaluator, StanceEvaluator
from lbt.eval.rows import expected_rows, read_rows
from lbt.eval.session import Session
from lbt.eval.settings import MeasureError
from lbt.rundir import RunDir, file_problem, incomplete_phases
from lbt.study import MEASURES
from tests.conftest import compose_train
from tests.eval_reference import make_items, write_items

pytestmark = pytest.mark.usefixtures("one_thread")
BATTERY = {
    "forced_choice": {"max_new_tokens": 3},
    "likert": {"max_new_tokens": 3},
    "open_ended": {"max_new_tokens": 4},
    "batch_size": 8,
}


class RecordingLogger:
    def __init__(self):
        self.metrics: list[tuple[dict, int]] = []
        self.tables: list[tuple[str, list, list, int]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((metrics, step))

    def log_table(self, key, columns, data, step=None):
        self.tables.append((key, columns, data, step))

    def save(self):
        pass


def session(tmp_path, loggers=(), step=7):
    return Session(RunDir(tmp_path / "job"), step=step, loggers=list(loggers))


def make_evaluator(tmp_path, tokenizer, measures=MEASURES, **kwargs):
    source = write_items(tmp_path / "source_items.jsonl", make_items(per_domain=1))
    target = write_items(tmp_path / "target_items.jsonl", make_items(per_domain=2))
    return StanceEvaluator(ChatFormat(tokenizer), {"source": str(source), "target": str(target)}, list(measures),
                           **BATTERY, **kwargs)


def test_phase_writes_rows_summary_and_logs(tiny_eval, tmp_path, monkeypatch):
    model, tokenizer = tiny_eval
    monkeypatch.setattr("lightning.pytorch.loggers.WandbLogger", RecordingLogger)  # tables go to W&B loggers
    logger = RecordingLogger()
    evaluator = make_evaluator(tmp_path, tokenizer)
    model.train()
    evaluator.evaluate(model, "step_3", session(tmp_path, [logger]))
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    phase = tmp_path / "job/eval/step_3"
    for item_set, n_items in (("source", 2), ("target", 4)):
        for measure in MEASURES:
            rows = read_rows(phase / item_set / f"{measure}.jsonl")
            n_rows = {"logprob": 8, "open_ended": 1}.get(measure, 2) * n_items
            assert len(rows) == n_rows
            assert {r["phase"] for r in rows} == {"step_3"} and {r["item_set"] for r in rows} == {item_set}
    summary = json.loads((phase / "summary.json").read_text())
    stats = summary["item_sets"]["target"]["measures"]["letter_logprob"]
    stances = [r["stance"] for r in read_rows(phase / "target/letter_logprob.jsonl")]
    assert stats["mean_stance"] == pytest.approx(sum(stances) / len(stances))
    assert summary["settings"]["option_form"] == "bare"
    ((metrics, step),) = logger.metrics
    assert step == 7 and metrics["eval/target/letter_logprob/stance"] == pytest.approx(stats["mean_stance"])
    assert "eval/source/logprob/domain/park_rules" in metrics
    assert not any(k.startswith(wandb_keys.SHIFT_PREFIX) for k in metrics)   # no base phase to subtract
    # One table per measure (not per phase and item set), at the phase's step, phase and item set first.
    assert sorted(key for key, *_ in logger.tables) == sorted(wandb_keys.rows_table(m) for m in MEASURES)
    assert {step for *_, step in logger.tables} == {7}
    _, columns, data, _ = next(t for t in logger.tables if t[0] == "eval_rows/letter_logprob")
    assert columns[:8] == ["phase", "item_set", "measure", "item_id", "base_item", "domain", "order", "stance"]
    assert len(data) == 2 * (2 + 4)


def test_shift_from_base_and_row_tables_across_phases_and_a_resume(tiny_eval, tmp_path, monkeypatch):
    """Base logs shift 0; a later phase, scored by a new evaluator as a resumed job would, logs its stance
    minus base's (read from base's summary) and tables holding the rows of both phases."""
    model, tokenizer = tiny_eval
    monkeypatch.setattr("lightning.pytorch.loggers.WandbLogger", RecordingLogger)
    measures = ["letter_logprob", "logprob"]  # scored by the untrained model (its generations do not parse)
    first = RecordingLogger()
    make_evaluator(tmp_path, tokenizer, measures).evaluate(model, "base", session(tmp_path, [first], step=0))
    ((base_metrics, base_step),) = first.metrics
    shifts = {wandb_keys.shift_vs_base(s, m) for s in ("source", "target") for m in measures}
    assert base_step == 0 and {k: v for k, v in base_metrics.items() if k in shifts} == dict.fromkeys(shifts, 0.0)
    # Move base's recorded mean stance, so the shift is not 0 by construction (same model at both phases).
    summary_path = tmp_path / "job/eval/base/summary.json"
    base = json.loads(summary_path.read_text())
    base["item_sets"]["target"]["measures"]["letter_logprob"]["mean_stance"] -= 0.25
    summary_path.write_text(json.dumps(base))

    resumed = RecordingLogger()
    make_evaluator(tmp_path, tokenizer, measures).evaluate(model, "step_2", session(tmp_path, [resumed], step=2))
    ((metrics, step),) = resumed.metrics
    stance = metrics[wandb_keys.stance("target", "letter_logprob")]
    assert step == 2 and metrics[wandb_keys.shift_vs_base("target", "letter_logprob")] == pytest.approx(
        stance - base["item_sets"]["target"]["measures"]["letter_logprob"]["mean_stance"])
    assert metrics[wandb_keys.shift_vs_base("source", "logprob")] == pytest.approx(0.0)
    assert sorted(key for key, *_ in resumed.tables) == sorted(wandb_keys.rows_table(m) for m in measures)
    for key, columns, data, step in resumed.tables:
        per_phase = {"eval_rows/letter_logprob": 2, "eval_rows/logprob": 8}[key] * (2 + 4)  # rows per item × items
        assert step == 2 and columns[:2] == list(wandb_keys.ROWS_TABLE_COLUMNS)
        assert [row[0] for row in data] == ["base"] * per_phase + ["step_2"] * per_phase  # base's rows first
        assert [row[1] for row in data[:per_phase]] == sorted(row[1] for row in data[:per_phase])  # source, target


def test_finished_phase_is_skipped_and_half_written_phase_completes(tiny_eval, tmp_path, monkeypatch):
    model, tokenizer = tiny_eval
    evaluator = make_evaluator(tmp_path, tokenizer, ["letter_logprob", "likert"])
    where = session(tmp_path)
    evaluator.evaluate(model, "base", where)
    phase = tmp_path / "job/eval/base"
    before = {p: p.read_bytes() for p in phase.rglob("*.json*")}
    asked: list[list[str]] = []
    real = evaluators_mod.score_item_sets

    def spy(model, chat, sets, *args, **kwargs):
        asked.extend(list(measures) for _, measures in sets.values())
        return real(model, chat, sets, *args, **kwargs)

    monkeypatch.setattr(evaluators_mod, "score_item_sets", spy)
    evaluator.evaluate(model, "base", where)
    assert asked == [] and {p: p.read_bytes() for p in phase.rglob("*.json*")} == before
    # A crash after some measure files: summary and one measure missing.
    (phase / "summary.json").unlink()
    (phase / "target/likert.jsonl").unlink()
    evaluator.evaluate(model, "base", where)
    assert asked == [["likert"]]
    assert (phase / "target/letter_logprob.jsonl").read_bytes() == before[
        phase / "target/letter_logprob.jsonl"
    ]
    summary = json.loads((phase / "summary.json").read_text())
    assert summary["item_sets"]["target"]["measures"]["letter_logprob"]["n_rows"] == 8


def files_state(folder):
    """Bytes and mtime of every file but the set-aside ones (<name>.corrupt-<time>)."""
    return {
        p: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".corrupt-" not in p.name
    }


def test_planned_files_are_what_the_phase_leaves_and_a_bad_one_is_made_again(tiny_eval, tmp_path, monkeypatch):
    model, tokenizer = tiny_eval
    evaluator = make_evaluator(tmp_path, tokenizer, measure_phases={"open_ended": ["final"]})
    where = session(tmp_path)
    planned = evaluator.planned_files(where.run, "step_3")
    phase = tmp_path / "job/eval/step_3"
    # 2 source and 4 target items; open_ended is restricted to the final phase.
    per_item = {"letter_logprob": 2, "forced_choice": 2, "logprob": 8, "likert": 2}  # logprob: 4 contrasts
    assert {(e.path, e.rows) for e in planned} == {
        (phase / item_set / f"{m}.jsonl", per_item[m] * n) for item_set, n in (("source", 2), ("target", 4))
        for m in per_item
    } | {(phase / "summary.json", None)}
    assert [e.rows for e in evaluator.planned_files(where.run, "final") if e.path.stem == "open_ended"] == [2, 4]
    evaluator.evaluate(model, "step_3", where)
    assert all(file_problem(e) is None for e in planned)
    assert {e.path for e in planned} == {p for p in phase.rglob("*") if p.is_file()}  # nothing unplanned

    likert, summary = phase / "target/likert.jsonl", phase / "summary.json"
    intact = likert.read_bytes()
    likert.write_bytes(b"".join(intact.splitlines(keepends=True)[:-1]))  # a truncated rows file
    assert "7 rows, 8 expected" in file_problem(next(e for e in planned if e.path == likert))
    before = files_state(phase)
    asked: list[list[str]] = []
    real = evaluators_mod.score_item_sets
    monkeypatch.setattr(
        evaluators_mod, "score_item_sets", lambda m, t, sets, *a, **k: asked.extend(
            list(measures) for _, measures in sets.values()) or real(m, t, sets, *a, **k)
    )
    assert incomplete_phases({"step_3": planned}) == ["step_3"]
    assert not likert.exists() and not summary.exists()  # set aside: the rows and the summary built from them
    assert len(list(phase.glob("target/likert.jsonl.corrupt-*"))) == 1
    evaluator.evaluate(model, "step_3", where)
    assert asked == [["likert"]] and likert.read_bytes() == intact
    after = files_state(phase)
    for path in before.keys() - {likert, summary}:
        assert after[path] == before[path], path  # same bytes, same mtime
    assert all(file_problem(e) is None for e in planned)

    summary.write_text('{"phase": "step_3", "item_sets": {')  # a corrupt JSON file
    assert "corrupt" in file_problem(next(e for e in planned if e.path == summary))
    before = files_state(phase)
    assert incomplete_phases({"step_3": planned}) == ["step_3"]
    evaluator.evaluate(model, "step_3", where)
    assert asked == [["likert"]]  # nothing scored again: every rows file is read back
    after = files_state(phase)
    assert after.keys() == before.keys() and [p for p in before if after[p] != before[p]] == [summary]
    assert json.loads(summary.read_text())["item_sets"]["target"]["measures"]["likert"]["n_rows"] == 8
    # Without the check first, the hook itself finds a short file, sets it aside and scores it again.
    likert.write_bytes(intact[: intact.index(b"\n") + 1])
    evaluator.evaluate(model, "step_3", where)
    assert asked[-1] == ["likert"] and likert.read_bytes() == intact


@pytest.mark.parametrize("measure", MEASURES)
def test_expected_rows_is_what_the_battery_writes(tiny_eval, tmp_path, measure):
    from lbt.eval.battery import score_item_set
    from lbt.eval.items import load_item_set
    from lbt.eval.settings import BatterySettings

    model, tokenizer = tiny_eval
    items_list = make_items(per_domain=1)
    items_list[0]["contrasts"] = items_list[0]["contrasts"][:1]  # items need not share a contrast count
    items = load_item_set(write_items(tmp_path / "t.jsonl", items_list))
    rows = score_item_set(model, ChatFormat(tokenizer), items, [measure], BatterySettings.from_config(BATTERY))[measure]
    assert len(rows) == expected_rows(items, measure)


def test_unknown_measure_and_missing_items_fail_at_construction(tiny_eval, tmp_path):
    chat = ChatFormat(tiny_eval[1])
    target = write_items(tmp_path / "t.jsonl", make_items(1))
    with pytest.raises(MeasureError, match="stance_vibes"):
        StanceEvaluator(chat, {"target": str(target)}, ["likert", "stance_vibes"])
    with pytest.raises(Exception, match="not found"):
        StanceEvaluator(chat, {"target": str(tmp_path / "nope.jsonl")}, ["likert"])
    with pytest.raises(ValueError, match="phase kinds must be among"):
        StanceEvaluator(chat, {"target": str(target)}, ["likert"], measure_phases={"likert": ["last"]})


def test_default_config_builds_the_evaluators_from_the_groups_own_keys(tiny_model):
    _, tokenizer, _ = tiny_model
    cfg = compose_train(["eval.stance.max_items=2"])
    evaluators = train_mod.job_evaluators(cfg, ChatFormat.of(tokenizer, cfg.model))
    stance = next(e for e in evaluators if isinstance(e, StanceEvaluator))
    capability = next(e for e in evaluators if isinstance(e, CapabilityEvaluator))
    assert stance.measures == list(MEASURES) and stance.settings.forced_choice_max_new_tokens == 4
    assert set(stance.item_sets) == {"source", "target"} and all(len(s) == 2 for s in stance.item_sets.values())
    assert len(capability.texts) == 8 and capability.phases == ["base", "final"]
    # eval=default is the full battery; eval=quick (the default job's) only cuts items and lengths.
    full, quick = compose_train(["eval=default"]).eval, compose_train([]).eval
    assert full.stance.max_items is None and full.stance.open_ended.max_new_tokens == 256
    assert full.capability.max_texts is None
    assert quick.stance.max_items == 4 and quick.stance.measures == full.stance.measures
    switched_off = train_mod.job_evaluators(compose_train(["eval.capability=null", "probe=none"]), ChatFormat(tokenizer))
    assert [type(e) for e in switched_off] == [StanceEvaluator]


def test_training_job_evaluates_every_phase(toy_corpus, tmp_path):
    cfg = compose_train(
        [
            f"arm.corpus={toy_corpus}",
            "data.require_validation=false",
            "logger=none",
            "probe=none",
            "train.effective_batch=8",
            "train.micro_batch=4",
            "train.epochs=1",
            "train.max_length=128", "data.drop_long_prompts=true",
            "train.checkpoint_fractions=[0.5,1.0]",
            f"+job_dir={tmp_path / 'job'}",
            "sweep_name=test",
            "eval.stance.forced_choice.max_new_tokens=2",
            "eval.stance.likert.max_new_tokens=2",
            "eval.stance.open_ended.max_new_tokens=2",
            "eval.stance.max_items=1",
            "eval.capability.max_texts=2",
            "eval.capability.max_refusal=2",
            "eval.capability.refusal_max_new_tokens=2",
        ]
    )
    train_mod.train(cfg)
    job = tmp_path / "job"
    phases = sorted(p.name for p in (job / "eval").iterdir())
    assert phases[0] == "base" and "final" in phases and any(p.startswith("step_") for p in phases)
    for phase in phases:
        assert (job / "eval" / phase / "summary.json").exists()
        # Defaults: capability at base and final (the guardrails), open_ended only for the final model.
        assert (job / "eval" / phase / "capability.json").exists() == (phase in ("base", "final"))
        assert (job / "eval" / phase / "target" / "open_ended.jsonl").exists() == (phase == "final")
        rows = read_rows(job / "eval" / phase / "target" / "letter_logprob.jsonl")
        assert len(rows) == 2 and all(math.isfinite(r["stance"]) for r in rows)


@pytest.mark.parametrize("hardware,expected", [("cpu", 128), ("gpu", 512), ("multi_gpu", 512)])
def test_eval_batch_follows_hardware_and_capability_generation_uses_it(hardware, expected):
    cfg = compose_train([f"hardware={hardware}"])
    assert cfg.eval.stance.batch_size == expected
    capability = cfg.eval.capability
    assert capability.generation_batch_size == expected
    assert capability.batch_size == 8  # perplexity: full-vocabulary logits, small batches
    overridden = compose_train([f"hardware={hardware}", "hardware.eval_batch_size=16"])
    assert overridden.eval.stance.batch_size == overridden.eval.capability.generation_batch_size == 16
