"""The default tiny job's outputs, recorded before the architecture refactor (issue 14), must not change.

A refactor that moves code between files must leave every row, summary, probe file, the adapter and the
loss history as they were, timings aside. The golden files in `tests/golden/tiny_job/` were written by
`python -m tests.test_golden record` at commit 582c41a; re-record only for a change that is meant to
change results, and say so in the commit.

Text, choices, ratings, counts and keys must be identical. Numbers must agree to 1e-3 relative or 1e-6
absolute (`FLOAT_TOL`), which is float rounding and nothing more: the job's log-probabilities are fp32 values
of magnitude ~10, so one rounding step is ~1e-6, and a stance is the difference of two of them. On the
machine of 2026-12-07 (an AMD EPYC with AVX-512; the same torch 2.13.0) the job moved 289 of the recorded
numbers, by at most 6.4e-7 absolute, and the adapter by at most 4.2e-7 (Adam's steps amplify near-zero
gradients' rounding), with every text, choice, rating and loss unchanged; transformers 5.23 to 5.25 and
peft 0.21.0 and 0.21.2 all gave that, so neither package caused it (most likely the CPU). Any change of
behaviour moves the numbers by far more.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny_job"
# Keys whose values are timings or dates: they differ on every run and are left out of the comparison.
VOLATILE = {"wall_s", "wall_time_s", "seconds", "started", "finished", "time", "tokens_per_s"}
FLOAT_TOL = {"rel_tol": 1e-3, "abs_tol": 1e-6}  # float rounding across machines (see the module's docstring)
RUN_CARD_KEYS = ("trained_steps", "final_loss", "loss_history", "val_loss", "data")


def run_tiny_job(job_dir: Path, cache_dir: Path) -> None:
    """The default job (`python -m lbt.train`, tiny model, CPU), with CSV logging instead of W&B."""
    env = dict(os.environ, LBT_ROOT=".", WANDB_MODE="offline", PYTHONHASHSEED="0")
    command = [sys.executable, "-m", "lbt.train", "logger=csv", f"hydra.run.dir={job_dir}",
               f"paths.cache_dir={cache_dir}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def golden_files(job_dir: Path) -> list[Path]:
    """The files of a job directory that the golden test compares, relative to the job directory."""
    names = [p.relative_to(job_dir) for p in sorted((job_dir / "eval").rglob("*")) if p.is_file()]
    names += [p.relative_to(job_dir) for p in sorted((job_dir / "probe").glob("*")) if p.is_file()]
    return names + [Path("adapter/adapter_model.safetensors")]


def run_card_subset(job_dir: Path) -> dict:
    card = json.loads((job_dir / "run.json").read_text())
    return {key: card[key] for key in RUN_CARD_KEYS}


def record(job_dir: Path) -> None:
    shutil.rmtree(GOLDEN, ignore_errors=True)
    for name in golden_files(job_dir):
        (GOLDEN / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(job_dir / name, GOLDEN / name)
    (GOLDEN / "run_card.json").write_text(json.dumps(run_card_subset(job_dir), indent=1, sort_keys=True))


def same(expected, actual, where: str) -> list[str]:
    """The differences between two JSON values, floats within FLOAT_TOL, volatile keys skipped."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(expected) - VOLATILE != set(actual) - VOLATILE:
            return [f"{where}: keys {sorted(set(expected) ^ set(actual))} differ"]
        problems = []
        for key in sorted(set(expected) - VOLATILE):
            problems += same(expected[key], actual[key], f"{where}/{key}")
        return problems
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{where}: {len(expected)} items, now {len(actual)}"]
        return [p for i, (e, a) in enumerate(zip(expected, actual)) for p in same(e, a, f"{where}[{i}]")]
    if isinstance(expected, float) and isinstance(actual, (float, int)) and not isinstance(actual, bool):
        if math.isnan(expected) and math.isnan(actual):
            return []
        if math.isclose(expected, actual, **FLOAT_TOL):
            return []
    elif expected == actual and type(expected) is type(actual):
        return []
    return [f"{where}: {expected!r} became {actual!r}"]


def json_lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare_file(name: Path, job_dir: Path) -> list[str]:
    expected, actual = GOLDEN / name, job_dir / name
    if not actual.exists():
        return [f"{name}: missing"]
    if name.suffix == ".jsonl":
        return same(json_lines(expected), json_lines(actual), str(name))
    if name.suffix == ".json":
        return same(json.loads(expected.read_text()), json.loads(actual.read_text()), str(name))
    if name.suffix == ".safetensors":
        want, got = load_file(str(expected)), load_file(str(actual))
        if set(want) != set(got):
            return [f"{name}: tensors {sorted(set(want) ^ set(got))} differ"]
        return [f"{name}:{key} differs" for key in sorted(want)
                if not torch.allclose(want[key], got[key], FLOAT_TOL["rel_tol"], FLOAT_TOL["abs_tol"])]
    if name.suffix == ".pt":
        want, got = torch.load(expected, weights_only=True), torch.load(actual, weights_only=True)
        return same(_tensors_to_lists(want), _tensors_to_lists(got), str(name))
    raise AssertionError(f"no comparison for {name}")


def _tensors_to_lists(value):
    if isinstance(value, torch.Tensor):
        return value.double().tolist()
    if isinstance(value, dict):
        return {key: _tensors_to_lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tensors_to_lists(item) for item in value]
    return value


@pytest.mark.slow
def test_default_tiny_job_is_unchanged(tmp_path: Path) -> None:
    assert GOLDEN.is_dir(), "golden files missing: python -m tests.test_golden record"
    job_dir = tmp_path / "job"
    run_tiny_job(job_dir, tmp_path / "cache")
    expected_names = sorted(p.relative_to(GOLDEN) for p in GOLDEN.rglob("*")
                            if p.is_file() and p.name != "run_card.json")
    assert sorted(golden_files(job_dir)) == expected_names
    problems = [p for name in expected_names for p in compare_file(name, job_dir)]
    expected_card = json.loads((GOLDEN / "run_card.json").read_text())
    problems += same(expected_card, json.loads(json.dumps(run_card_subset(job_dir))), "run.json")
    assert not problems, "\n".join(problems[:40])


def test_comparison_catches_a_changed_value() -> None:
    """The comparison itself can fail: a changed float, a changed string, a lost key."""
    row = {"stance": 0.25, "raw": "A", "parsed": True, "wall_s": 1.0}
    assert same(row, dict(row, wall_s=9.0), "r") == []
    assert same(row, dict(row, stance=0.25 + 6.4e-7), "r") == []  # another CPU's rounding
    assert same(row, dict(row, stance=0.251), "r")
    assert same({"s": 0.0004}, {"s": 0.0004 + 5e-7}, "r") == []
    assert same({"s": 0.0004}, {"s": 0.0004 + 3e-6}, "r")
    assert same(row, dict(row, raw="B"), "r")
    assert same(row, {k: v for k, v in row.items() if k != "parsed"}, "r")
    assert same({"s": float("nan")}, {"s": float("nan")}, "r") == []
    assert same({"s": float("nan")}, {"s": 0.0}, "r")
    assert same({"n": 1}, {"n": True}, "r")


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        run_tiny_job(Path(scratch) / "job", Path(scratch) / "cache")
        record(Path(scratch) / "job")
    print(f"recorded {sum(1 for p in GOLDEN.rglob('*') if p.is_file())} files in {GOLDEN}")
