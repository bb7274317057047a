"""The contract between the writers and the reader of job directories, end to end: a real tiny sweep
trained by `python -m lbt.train -m` (the default tiny model, the shipped corpora and item files, fewer
items), then `python -m lbt.analyze <sweep> --exploratory` on it. No job folder is written by hand: what
the analysis reads is exactly what training leaves."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lbt.rundir import RunDir, read_json, read_rows
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

ARMS = ("plus", "neutral")  # one name each: the config file, the folder, the rows
PHASES = ["base", "step_2", "final"]  # experiment=smoke: 4 steps, checkpoints at 50 % and 100 %
MEASURES = ["letter_logprob", "forced_choice", "logprob", "likert"]  # + open_ended at final
N_ITEMS = 2


def run(command: list[str], tmp: Path) -> subprocess.CompletedProcess:
    # One thread per process: tiny matmuls on a shared 2-core box. No W&B, no network.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb"),
           "LBT_ROOT": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, f"{command[0]} failed:\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("contract")
    sweep_dir = tmp / "sweep"
    run(["lbt.train", "-m", "experiment=smoke", f"arm={','.join(ARMS)}", "seed=0", "logger=csv",
         f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={tmp / 'cache'}",
         f"eval.stance.max_items={N_ITEMS}", "eval.capability.max_texts=2",
         "eval.capability.max_refusal=2", "eval.stance.open_ended.max_new_tokens=4"], tmp)
    return sweep_dir


@pytest.fixture(scope="module")
def report(sweep) -> dict:
    out = sweep.parent / "analysis"
    result = run(["lbt.analyze", str(sweep), "--exploratory", "--no-wandb", "--n-resamples", "200",
                  "--out", str(out)], sweep.parent)
    assert "[EXPLORATORY]" in result.stdout and (out / "report.md").stat().st_size > 0
    return json.loads((out / "report.json").read_text())


def test_training_leaves_complete_job_directories(sweep):
    for arm in ARMS:
        job = RunDir(sweep / f"tiny-{arm}-s0")
        card = read_json(job.card)
        assert job.is_done() and card["status"] == "done" and card["job"]["arm"] == arm
        for phase in PHASES:
            for item_set in ("target", "source"):
                measures = MEASURES + (["open_ended"] if phase == "final" else [])
                for measure in measures:
                    rows = read_rows(job.rows(phase, item_set, measure))
                    per_item = {"logprob": 8, "open_ended": 1}.get(measure, 2)  # 4 contrasts × 2 orders
                    assert len(rows) == per_item * N_ITEMS
                    assert {(r["phase"], r["item_set"], r["measure"]) for r in rows} == {(phase, item_set, measure)}
            assert read_json(job.probe(phase))["phase"] == phase
            assert job.capability(phase).exists() == (phase in ("base", "final"))


def test_analysis_reads_every_row_the_jobs_wrote(sweep, report):
    assert report["exploratory"] is True
    assert {(j["arm"], j["seed"], j["done"], j["status"]) for j in report["jobs"]} == {
        (arm, 0, True, "done") for arm in ARMS}
    described = {(d["arm"], d["phase"], d["item_set"], d["measure"]): d for d in report["descriptive"]}
    expected = set()
    for arm in ARMS:
        job = RunDir(sweep / f"tiny-{arm}-s0")
        for path in sorted(job.phase_dir("base").parent.glob("*/*/*.jsonl")):
            phase, item_set, measure = path.parent.parent.name, path.parent.name, path.stem
            key = (arm, phase, item_set, measure)
            expected.add(key)
            stances = [r["stance"] for r in read_rows(path)]
            finite = [s for s in stances if s is not None and math.isfinite(s)]
            assert described[key]["n_rows"] == len(stances), key
            mean = described[key]["mean_stance"]
            assert (mean is None and not finite) or mean == pytest.approx(sum(finite) / len(finite)), key
    assert set(described) == expected and len(expected) == 2 * (3 * 2 * 4 + 2)
    # The study's statistics use the final target rows of both arms, read from the files above.
    primary = report["primary"]["families"]["tiny"]["letter_logprob"]
    assert primary["n_items"] == N_ITEMS and primary["n_seeds"] == 1 and primary["plus"] is not None
    assert report["manipulation_check"]["families"]["tiny"]["letter_logprob"]["n_items"] == N_ITEMS
    # Probe and capability files feed their sections; nothing is missing but the arm not trained.
    dynamics = report["dynamics"]["projection_at_l_star"]["tiny"]
    assert {arm: list(phases) for arm, phases in dynamics.items()} == {arm: PHASES for arm in ARMS}
    assert {(c["arm"], c["phase"]) for c in report["capability"]} == {
        (arm, phase) for arm in ARMS for phase in ("base", "final")}
    missing = report["missing"]
    assert missing["jobs"] == [{"family": "tiny", "arm": "minus", "seed": 0}]
    assert missing["incomplete_jobs"] == missing["phases"] == missing["measures"] == missing["probe_phases"] == []
