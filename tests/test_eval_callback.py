"""StanceEvalCallback: rows and summary per phase, append-only (a finished phase is skipped, a half-written
one completes only what is missing), logger scalars and W&B Tables, model mode restored; the real config
tree instantiates the callbacks and a tiny training job writes every phase."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from lbt import train as train_mod
from lbt.eval import callback as callback_mod
from lbt.eval.battery import MEASURES, MeasureError
from lbt.eval.callback import CapabilityCallback, StanceEvalCallback
from lbt.eval.rows import expected_rows, read_rows
from lbt.phases import PhaseContext
from lbt.rundir import file_problem, incomplete_phases
from tests.conftest import compose_train
from tests.eval_reference import make_items, tiny_eval_model, write_items

BATTERY = {
    "forced_choice": {"max_new_tokens": 3},
    "likert": {"max_new_tokens": 3},
    "open_ended": {"max_new_tokens": 4},
    "batch_size": 8,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and the test box is shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return tiny_eval_model()


class RecordingLogger:
    def __init__(self):
        self.metrics: list[tuple[dict, int]] = []
        self.tables: list[tuple[str, list, list]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((metrics, step))

    def log_table(self, key, columns, data):
        self.tables.append((key, columns, data))


def fake_trainer(loggers=()):
    strategy = SimpleNamespace(broadcast=lambda value, src=0: value, barrier=lambda: None)
    return SimpleNamespace(
        global_rank=0,
        world_size=1,
        is_global_zero=True,
        strategy=strategy,
        loggers=list(loggers),
        global_step=7,
    )


def make_callback(tmp_path, tokenizer, measures=MEASURES, **kwargs):
    source = write_items(tmp_path / "source_items.jsonl", make_items(per_domain=1))
    target = write_items(tmp_path / "target_items.jsonl", make_items(per_domain=2))
    callback = StanceEvalCallback(
        {"source": str(source), "target": str(target)}, list(measures), BATTERY, **kwargs
    )
    cfg = OmegaConf.create({"model": {"chat_template_kwargs": {}}})
    callback.setup_context(PhaseContext(job_dir=tmp_path / "job", tokenizer=tokenizer, cfg=cfg))
    return callback


def test_phase_writes_rows_summary_and_logs(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr("lightning.pytorch.loggers.WandbLogger", RecordingLogger)  # tables go to W&B loggers
    logger = RecordingLogger()
    callback = make_callback(tmp_path, tokenizer)
    model.train()
    callback.run_phase(fake_trainer([logger]), SimpleNamespace(model=model), "step_3")
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
    keys = {key for key, _, _ in logger.tables}
    assert "eval_rows/step_3/target/likert" in keys and len(keys) == 2 * len(MEASURES)
    _, columns, data = next(t for t in logger.tables if t[0] == "eval_rows/step_3/source/letter_logprob")
    assert columns[:8] == [
        "measure",
        "phase",
        "item_set",
        "item_id",
        "base_item",
        "domain",
        "order",
        "stance",
    ]
    assert len(data) == 4


def test_finished_phase_is_skipped_and_half_written_phase_completes(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    callback = make_callback(tmp_path, tokenizer, ["letter_logprob", "likert"])
    trainer, module = fake_trainer(), SimpleNamespace(model=model)
    callback.run_phase(trainer, module, "base")
    phase = tmp_path / "job/eval/base"
    before = {p: p.read_bytes() for p in phase.rglob("*.json*")}
    asked: list[list[str]] = []
    real = callback_mod.score_item_set

    def spy(model, tokenizer, items, measures, *args, **kwargs):
        asked.append(list(measures))
        return real(model, tokenizer, items, measures, *args, **kwargs)

    monkeypatch.setattr(callback_mod, "score_item_set", spy)
    callback.run_phase(trainer, module, "base")
    assert asked == [] and {p: p.read_bytes() for p in phase.rglob("*.json*")} == before
    # A crash after some measure files: summary and one measure missing.
    (phase / "summary.json").unlink()
    (phase / "target/likert.jsonl").unlink()
    callback.run_phase(trainer, module, "base")
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


def test_planned_files_are_what_the_phase_leaves_and_a_bad_one_is_made_again(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    callback = make_callback(tmp_path, tokenizer, measure_phases={"open_ended": ["final"]})
    trainer, module = fake_trainer(), SimpleNamespace(model=model)
    planned = callback.planned_files("step_3")
    phase = tmp_path / "job/eval/step_3"
    # 2 source and 4 target items; open_ended is restricted to the final phase.
    per_item = {"letter_logprob": 2, "forced_choice": 2, "logprob": 8, "likert": 2}  # logprob: 4 contrasts
    assert {(e.path, e.rows) for e in planned} == {
        (phase / item_set / f"{m}.jsonl", per_item[m] * n) for item_set, n in (("source", 2), ("target", 4))
        for m in per_item
    } | {(phase / "summary.json", None)}
    assert [e.rows for e in callback.planned_files("final") if e.path.stem == "open_ended"] == [2, 4]
    callback.run_phase(trainer, module, "step_3")
    assert all(file_problem(e) is None for e in planned)
    assert {e.path for e in planned} == {p for p in phase.rglob("*") if p.is_file()}  # nothing unplanned

    likert, summary = phase / "target/likert.jsonl", phase / "summary.json"
    intact = likert.read_bytes()
    likert.write_bytes(b"".join(intact.splitlines(keepends=True)[:-1]))  # a truncated rows file
    assert "7 rows, 8 expected" in file_problem(next(e for e in planned if e.path == likert))
    before = files_state(phase)
    asked: list[list[str]] = []
    real = callback_mod.score_item_set
    monkeypatch.setattr(
        callback_mod, "score_item_set", lambda m, t, items, measures, *a, **k: asked.append(list(measures))
        or real(m, t, items, measures, *a, **k)
    )
    assert incomplete_phases({"step_3": planned}) == ["step_3"]
    assert not likert.exists() and not summary.exists()  # set aside: the rows and the summary built from them
    assert len(list(phase.glob("target/likert.jsonl.corrupt-*"))) == 1
    callback.run_phase(trainer, module, "step_3")
    assert asked == [["likert"]] and likert.read_bytes() == intact
    after = files_state(phase)
    for path in before.keys() - {likert, summary}:
        assert after[path] == before[path], path  # same bytes, same mtime
    assert all(file_problem(e) is None for e in planned)

    summary.write_text('{"phase": "step_3", "item_sets": {')  # a corrupt JSON file
    assert "corrupt" in file_problem(next(e for e in planned if e.path == summary))
    before = files_state(phase)
    assert incomplete_phases({"step_3": planned}) == ["step_3"]
    callback.run_phase(trainer, module, "step_3")
    assert asked == [["likert"]]  # nothing scored again: every rows file is read back
    after = files_state(phase)
    assert after.keys() == before.keys() and [p for p in before if after[p] != before[p]] == [summary]
    assert json.loads(summary.read_text())["item_sets"]["target"]["measures"]["likert"]["n_rows"] == 8
    # Without the check first, the hook itself finds a short file, sets it aside and scores it again.
    likert.write_bytes(intact[: intact.index(b"\n") + 1])
    callback.run_phase(trainer, module, "step_3")
    assert asked[-1] == ["likert"] and likert.read_bytes() == intact


@pytest.mark.parametrize("measure", MEASURES)
def test_expected_rows_is_what_the_battery_writes(tiny, tmp_path, measure):
    from lbt.eval.battery import BatterySettings, load_item_set, score_item_set

    model, tokenizer = tiny
    items_list = make_items(per_domain=1)
    items_list[0]["contrasts"] = items_list[0]["contrasts"][:1]  # items need not share a contrast count
    items = load_item_set(write_items(tmp_path / "t.jsonl", items_list))
    rows = score_item_set(model, tokenizer, items, [measure], BatterySettings.from_config(BATTERY))[measure]
    assert len(rows) == expected_rows(items, measure)


def test_unknown_measure_and_missing_items_fail_at_instantiation(tmp_path):
    target = write_items(tmp_path / "t.jsonl", make_items(1))
    with pytest.raises(MeasureError, match="stance_vibes"):
        StanceEvalCallback({"target": str(target)}, ["likert", "stance_vibes"])
    with pytest.raises(Exception, match="not found"):
        StanceEvalCallback({"target": str(tmp_path / "nope.jsonl")}, ["likert"])


def test_default_config_instantiates_both_callbacks():
    cfg = compose_train(["++model.eval_limits.max_items=2"])
    callbacks = train_mod.instantiate_callbacks(cfg)
    stance = next(c for c in callbacks if isinstance(c, StanceEvalCallback))
    assert any(isinstance(c, CapabilityCallback) for c in callbacks)
    assert stance.measures == list(MEASURES)
    assert set(stance.item_sets) == {"source", "target"} and all(
        len(s) == 2 for s in stance.item_sets.values()
    )
    full = compose_train(["model=qwen"])
    assert full.eval.max_items is None and full.eval.open_ended.max_new_tokens == 256


def test_training_job_evaluates_every_phase(toy_corpus, tmp_path):
    limits = {
        "max_items": 1,
        "max_texts": 2,
        "max_refusal": 2,
        "refusal_max_new_tokens": 2,
        "open_ended_max_new_tokens": 2,
    }
    cfg = compose_train(
        [
            f"arm.corpus={toy_corpus}",
            "data.require_validation=false",
            "logger=none",
            "probe=none",
            "train.effective_batch=8",
            "train.micro_batch=4",
            "train.epochs=1",
            "train.max_length=128",
            "train.checkpoint_fractions=[0.5,1.0]",
            f"+job_dir={tmp_path / 'job'}",
            "sweep_name=test",
            "eval.forced_choice.max_new_tokens=2",
            "eval.likert.max_new_tokens=2",
            *(f"++model.eval_limits.{k}={v}" for k, v in limits.items()),
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
    assert cfg.eval.batch_size == expected
    assert cfg.eval.callbacks.stance.battery.batch_size == expected
    capability = cfg.eval.callbacks.capability
    assert capability.generation_batch_size == expected
    assert capability.batch_size == 8  # perplexity: full-vocabulary logits, small batches
    overridden = compose_train([f"hardware={hardware}", "eval.batch_size=16"])
    assert overridden.eval.callbacks.capability.generation_batch_size == 16
