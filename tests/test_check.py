"""`python -m lbt.check`: the completeness check behind DONE, run again from outside on a finished job.

One default tiny job (the golden test's command) is trained once; each test works on copies of its folder,
changed the way a copy, a sync or a pruning script could change it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lbt import check
from tests.test_golden import ROOT, run_tiny_job


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    job = tmp_path_factory.mktemp("check") / "job"
    run_tiny_job(job, job.parent / "cache")
    assert (job / "DONE").exists()
    # The job's process started it: the card says how long Python, the imports and the compose took first.
    card = json.loads((job / "run.json").read_text())
    assert 0.5 < card["startup_s"] < 120
    return job


@pytest.fixture(autouse=True)
def from_root(monkeypatch):
    """The job's item paths are relative to the folder it was started in (the repository root)."""
    monkeypatch.chdir(ROOT)


def copy(job: Path, to: Path) -> Path:
    shutil.copytree(job, to)
    return to


def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_card(job: Path, **changes) -> None:
    card = json.loads((job / "run.json").read_text())
    card.update(changes)
    (job / "run.json").write_text(json.dumps(card))


def test_a_finished_job_and_a_sweep_of_it_are_complete(finished, tmp_path, capsys):
    assert check.main([str(finished)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"complete: {finished}", "1 job(s): 1 complete"]
    sweep = tmp_path / "sweep"
    for name in ("tiny-plus-s0", "tiny-minus-s0"):
        copy(finished, sweep / name)
    (sweep / ".submitit").mkdir()  # a sweep's other folders hold no run.json: not jobs
    assert check.main([str(sweep), "--json", str(tmp_path / "out.json")]) == 0
    outcomes = json.loads((tmp_path / "out.json").read_text())
    assert [(Path(o["job"]).name, o["outcome"]) for o in outcomes] == [("tiny-minus-s0", "complete"),
                                                                       ("tiny-plus-s0", "complete")]


def test_a_folder_of_sweeps_is_checked_as_lbt_analyze_finds_it(finished, tmp_path, capsys):
    """multirun/<date>/<time>/<job>: the jobs two levels down are found, as lbt.analyze finds them."""
    from lbt.analyze.collect import find_jobs

    multirun = tmp_path / "multirun"
    jobs = [copy(finished, multirun / "2026-12-07" / day / "tiny-plus-s0") for day in ("10-00-00", "11-00-00")]
    assert check.main([str(multirun)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"complete: {job}" for job in jobs] + [
        "2 job(s): 2 complete"]
    assert [job.path for job in find_jobs([multirun / "2026-12-07" / "10-00-00"])] == jobs[:1]


def truncate_rows(job: Path) -> str:
    rows = job / "eval" / "final" / "target" / "logprob.jsonl"
    lines = rows.read_text().splitlines(keepends=True)
    rows.write_text("".join(lines[:-1]))
    return f"{rows}: {len(lines) - 1} rows, {len(lines)} expected"


def drop_step_adapter(job: Path) -> str:
    shutil.rmtree(job / "checkpoints" / "adapter_step_2")
    return "checkpoint of step_2"


def drop_probe(job: Path) -> str:
    (job / "probe" / "step_3.json").unlink()
    return f"phase step_3: {job / 'probe' / 'step_3.json'}: missing"


def fewer_steps(job: Path) -> str:
    total = json.loads((job / "run.json").read_text())["data"]["total_steps"]
    edit_card(job, trained_steps=total - 1)
    return f"training: {total - 1} of {total} optimizer steps ran"


def break_adapter(job: Path) -> str:
    (job / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return "adapter: "


def failed_status(job: Path) -> str:
    edit_card(job, status="failed")
    return "run.json says status 'failed', not 'done'"


@pytest.mark.parametrize("damage", [truncate_rows, drop_step_adapter, drop_probe, fewer_steps, break_adapter,
                                    failed_status])
def test_a_done_folder_that_lacks_something_is_named_and_left_as_it_is(finished, tmp_path, capsys, damage):
    job = copy(finished, tmp_path / "job")
    expected = damage(job)
    before = files(job)
    assert check.main([str(job)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"DONE BUT INCOMPLETE: {job}\n") and expected in out, out
    assert "1 job(s): 1 incomplete" in out
    assert files(job) == before  # nothing written, moved or set aside


def test_unfinished_and_uncheckable_jobs_are_not_complete(finished, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    running = copy(finished, sweep / "a-running")
    (running / "DONE").unlink()
    edit_card(running, status="interrupted", missing=["training: 3 of 4 optimizer steps ran"])
    moved = copy(finished, sweep / "b-moved")
    card = json.loads((moved / "run.json").read_text())
    card["config"]["eval"]["stance"]["item_sets"]["target"] = "./data/eval/gone.jsonl"
    (moved / "run.json").write_text(json.dumps(card))
    copy(finished, sweep / "c-complete")
    assert check.main([str(sweep)]) == 1
    out = capsys.readouterr().out
    assert f"unfinished: no DONE (run.json status 'interrupted'): {running}\n" \
           "    - training: 3 of 4 optimizer steps ran" in out
    assert f"cannot check: {moved}\n    - cannot rebuild the job's plan: " in out and "gone.jsonl" in out
    assert f"complete: {sweep / 'c-complete'}" in out
    assert out.rstrip().endswith("3 job(s): 1 complete, 1 unchecked, 1 unfinished")


def test_a_folder_without_jobs_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    for folder in (tmp_path / "empty", tmp_path / "nowhere"):
        done = subprocess.run([sys.executable, "-m", "lbt.check", str(folder)], capture_output=True, text=True,
                              env=env, timeout=120, check=False)
        assert done.returncode == 2, done.stderr
        assert str(folder) in done.stderr and "Traceback" not in done.stderr
