"""ProbeEvaluator in a real (tiny) training job: files per phase in the contract format, shift at base = 0,
phases are not redone, scalars reach the logger; the training-time intervention (its own callback and
config group) is active only in training, with the probe on or off."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from lbt import train as train_mod
from lbt import wandb_keys
from lbt.config.entries import build
from lbt.data.chat import ChatFormat
from lbt.eval.session import Evaluator, Session
from lbt.probe import callback as intervention_mod
from lbt.probe import evaluator as probe_mod
from lbt.probe import hooks
from lbt.rundir import RunDir
from tests.conftest import ROOT, compose_train
from tests.test_directions import write_paired_corpora

pytestmark = pytest.mark.usefixtures("one_thread")
ITEMS = ROOT / "data" / "eval" / "target_items.jsonl"
CONTRACT_KEYS = {"phase", "layers", "l_star", "direction_key", "projection", "shift", "shift_se", "n_prompts"}


class Spy(Evaluator):
    """Runs after the probe in every phase: records whether the training ablation was switched on."""

    seen: ClassVar[list[tuple[str, bool]]] = []
    intervention: ClassVar[intervention_mod.TrainIntervention | None] = None

    def evaluate(self, model, phase, session):
        Spy.seen.append((phase, Spy.intervention.active()))


class SpiedIntervention(intervention_mod.TrainIntervention):
    """The intervention callback, made known to Spy."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        Spy.intervention = self


def job_cfg(tmp: Path, name: str, *extra: str, probe: bool = True):
    corpora = write_paired_corpora(tmp, n=16)
    probing = ["probe=default", f"probe.items={ITEMS}", "probe.max_items=6", "probe.batch_size=4"]
    return compose_train([
        f"arm.corpus={corpora['plus']}", "data.require_validation=false", "logger=csv", "eval=none",
        *(probing if probe else ["probe=none"]), f"directions.arms.plus.corpus={corpora['plus']}",
        f"directions.arms.minus.corpus={corpora['minus']}",
        f"paths.cache_dir={tmp / 'cache'}", "train.effective_batch=8", "train.micro_batch=8", "train.epochs=1",
        "train.max_steps=2", "train.checkpoint_fractions=[0.5,1.0]", "train.max_length=96",
        "data.drop_long_prompts=true",
        f"+job_dir={tmp / name}", "sweep_name=test", *extra])


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    cfg = job_cfg(tmp, "job")
    train_mod.train(cfg)
    return tmp, tmp / "job", cfg


def test_phase_files_follow_the_contract(job):
    _, job_dir, cfg = job
    n_layers = cfg.model.arch.num_hidden_layers
    phases = {p.stem for p in (job_dir / "probe").glob("*.json")}
    assert phases == {"base", "step_1", "final"}
    for phase in phases:
        record = json.loads((job_dir / "probe" / f"{phase}.json").read_text())
        assert CONTRACT_KEYS <= set(record) and record["phase"] == phase
        assert record["layers"] == list(range(n_layers)) and 0 <= record["l_star"] < n_layers
        assert record["n_prompts"] == 6
        for key in ("projection", "shift", "shift_se"):
            assert set(record[key]) == {"answer", "prompt_mean"}
            assert all(len(v) == n_layers and all(np.isfinite(v)) for v in record[key].values())
    base = json.loads((job_dir / "probe" / "base.json").read_text())
    assert base["shift"]["answer"] == [0.0] * n_layers and base["shift_se"]["prompt_mean"] == [0.0] * n_layers
    final = json.loads((job_dir / "probe" / "final.json").read_text())
    # Paired shift = difference of mean projections (same prompts at both phases).
    np.testing.assert_allclose(final["shift"]["answer"],
                               np.subtract(final["projection"]["answer"], base["projection"]["answer"]), atol=1e-9)
    assert final["direction_key"] == base["direction_key"]
    assert (job_dir / "probe" / "base_values.pt").exists()
    assert (job[0] / "cache" / "directions" / f"{base['direction_key']}.json").exists()


def test_shift_by_hand_and_standard_error():
    """phase_record on numbers worked out by hand: diffs (1, 3) → mean 2, SD √2, SE 1."""
    class FakeDirections:
        key, variant = "k", "assistant_mean"
        n_layers = 1

        def l_star(self):
            return 0

        def norm(self):
            return torch.tensor([2.0])

        def accuracy(self):
            return [0.75]
    now = {"answer": torch.tensor([[2.0], [5.0]]), "prompt_mean": torch.tensor([[1.0], [1.0]])}
    base = {"answer": torch.tensor([[1.0], [2.0]]), "prompt_mean": torch.tensor([[1.0], [1.0]])}
    record = probe_mod.phase_record("final", now, base, FakeDirections())
    assert record["projection"]["answer"] == [3.5] and record["shift"]["answer"] == [2.0]
    assert record["shift_se"]["answer"] == [pytest.approx(1.0)] and record["shift_se"]["prompt_mean"] == [0.0]


def test_scalars_reach_the_logger_on_the_training_step_axis(job):
    """csv/metrics.csv: the probe at base, step_1 and final sits at steps 0, 1, 2; the loss of the n-th
    optimizer step at n, beside the probe of the model it made."""
    _, job_dir, _ = job
    with open(job_dir / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))

    def at(key: str) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]

    shift = at(wandb_keys.probe_shift_at_l_star())
    assert [step for step, _ in shift] == [0, 1, 2] and shift[0][1] == 0.0
    assert [step for step, _ in at(wandb_keys.TRAIN_LOSS)] == [1, 2]


def probe_of(cfg, tokenizer) -> probe_mod.ProbeEvaluator:
    """The job's probe evaluator, built as lbt.train builds it."""
    return build(cfg.probe, chat=ChatFormat.of(tokenizer, cfg.model), base_model=cfg.model)


def test_existing_phase_is_skipped_and_missing_base_values_are_recomputed(job, tmp_path):
    _, job_dir, cfg = job
    from lbt.model.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer, torch.float32)
    probe = probe_of(cfg, tokenizer)
    before = (job_dir / "probe" / "final.json").stat().st_mtime_ns
    probe.evaluate(model, "final", Session(RunDir(job_dir)))
    assert (job_dir / "probe" / "final.json").stat().st_mtime_ns == before
    # The plain base model as a later phase, with base_values.pt gone: recomputed, and the shift is 0.
    copy = tmp_path / "job"
    (copy / "probe").mkdir(parents=True)
    (copy / "probe" / "base.json").write_bytes((job_dir / "probe" / "base.json").read_bytes())
    probe.evaluate(model, "step_9", Session(RunDir(copy)))
    record = json.loads((copy / "probe" / "step_9.json").read_text())
    base = json.loads((job_dir / "probe" / "base.json").read_text())
    np.testing.assert_allclose(record["projection"]["answer"], base["projection"]["answer"], atol=1e-5)
    np.testing.assert_allclose(record["shift"]["answer"], 0.0, atol=1e-5)
    assert (copy / "probe" / "base_values.pt").exists()


def test_wandb_line_plots_per_phase():
    logged = []

    class Experiment:
        def log(self, data):
            logged.append(data)

    class WandbLogger:
        experiment = Experiment()
    record = {"layers": [0, 1], "projection": {"answer": [0.1, 0.2], "prompt_mean": [0.0, 0.1]},
              "shift": {"answer": [0.0, 0.05], "prompt_mean": [0.0, 0.0]}}
    probe_mod.log_wandb_lines(WandbLogger(), "final", record, step=12)
    assert set(logged[0]) == {"probe/final/answer_projection", "probe/final/prompt_mean_projection",
                              "probe/final/answer_shift", "probe/final/prompt_mean_shift", wandb_keys.STEP}
    assert logged[0][wandb_keys.STEP] == 12                              # on the run's one step axis


@pytest.mark.parametrize("probe", [True, False])
def test_train_intervention_is_active_only_in_training_with_or_without_the_probe(tmp_path, monkeypatch, probe):
    Spy.seen = []
    cfg = job_cfg(tmp_path, "ablate", "intervention=ablate", "+eval.spy._target_=tests.test_probe_callback.Spy",
                  "intervention._target_=tests.test_probe_callback.SpiedIntervention", probe=probe)
    calls = {"n": 0}
    original = hooks.ablate_writes

    def counting(model, direction, enabled=None):
        def wrapped():
            on = enabled()
            calls["n"] += int(on)
            return on
        return original(model, direction, wrapped)
    monkeypatch.setattr(intervention_mod.hooks, "ablate_writes", counting)
    train_mod.train(cfg)
    record = json.loads((tmp_path / "ablate" / "probe" / "train_intervention.json").read_text())
    assert record["mode"] == "ablate" and record["cosine_with_direction"] == pytest.approx(1.0)
    n_layers = cfg.model.arch.num_hidden_layers
    # 2 steps × 1 micro-batch × (embeddings + attention and MLP of every layer), forward only.
    assert calls["n"] == 2 * (1 + 2 * n_layers)
    assert [phase for phase, _ in Spy.seen] == ["base", "step_1", "final"]
    assert not any(active for _, active in Spy.seen)
    probed = sorted(p.name for p in (tmp_path / "ablate" / "probe").glob("*.json"))
    assert probed == (["base.json", "final.json", "step_1.json"] if probe else []) + [
        "train_intervention.json"]


def test_random_control_ablates_a_seeded_direction_of_the_same_layer(tmp_path):
    cfg = job_cfg(tmp_path, "random", "intervention=ablate_random", "intervention.seed=5", "train.max_steps=1",
                  "train.checkpoint_fractions=[1.0]", probe=False)
    train_mod.train(cfg)
    record = json.loads((tmp_path / "random" / "probe" / "train_intervention.json").read_text())
    assert record["mode"] == "ablate_random" and record["seed"] == 5
    assert abs(record["cosine_with_direction"]) < 0.99   # not the real direction


def test_planned_file_per_phase_and_a_corrupt_one_is_measured_again(job, tmp_path):
    """probe/<phase>.json is planned for every phase; corrupt, it is reported, set aside by the check and
    written again by the phase (here `base`, with the base model), every other file untouched."""
    from lbt.model.load import load_model, load_tokenizer
    from lbt.rundir import file_problem, incomplete_phases

    _, job_dir, cfg = job
    copy = tmp_path / "job"
    (copy / "probe").mkdir(parents=True)
    for path in (job_dir / "probe").iterdir():
        (copy / "probe" / path.name).write_bytes(path.read_bytes())
    tokenizer = load_tokenizer(cfg.model)
    probe, where = probe_of(cfg, tokenizer), Session(RunDir(copy))
    planned = {phase: probe.planned_files(where.run, phase) for phase in ("base", "step_1", "final")}
    assert {phase: [(e.path, e.rows) for e in files] for phase, files in planned.items()} == {
        phase: [(copy / "probe" / f"{phase}.json", None)] for phase in planned}
    assert all(file_problem(e) is None for files in planned.values() for e in files)
    base = copy / "probe" / "base.json"
    intact = json.loads(base.read_text())
    base.write_text(base.read_text().replace("{", "[", 1))
    assert "corrupt" in file_problem(planned["base"][0])
    others = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (copy / "probe").iterdir() if p != base}
    assert incomplete_phases(planned) == ["base"] and not base.exists()
    model = load_model(cfg.model, tokenizer, torch.float32)
    probe.evaluate(model, "base", where)
    assert file_problem(planned["base"][0]) is None
    again = json.loads(base.read_text())
    np.testing.assert_allclose(again["projection"]["answer"], intact["projection"]["answer"], atol=1e-5)
    assert again["direction_key"] == intact["direction_key"]
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (copy / "probe").iterdir() if p != base}
    assert {p: v for p, v in after.items() if ".corrupt-" not in p.name} == others  # base_values.pt too
    # An unreadable base_values.pt (the pairing cache) is set aside and recomputed with the adapters off.
    (copy / "probe" / "base_values.pt").write_bytes(b"not a torch file")
    probe.evaluate(model, "step_2", where)
    shift = json.loads((copy / "probe" / "step_2.json").read_text())["shift"]["answer"]
    np.testing.assert_allclose(shift, 0.0, atol=1e-5)  # the base model against its own base values
    assert len(list((copy / "probe").glob("base_values.pt.corrupt-*"))) == 1
