"""python -m lbt.analyze on a tiny fake sweep written in tmp_path through lbt.rundir's writers: report,
figures, numbers equal to primary_report, partial sweeps, malformed rows, the preregistration lock and the
exploratory stamp."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from lbt.analyze import main
from lbt.analyze.collect import find_jobs, load_rows
from lbt.rundir import RunDir, read_json, read_rows, write_json_atomic, write_json_once, write_rows
from lbt.stats import primary_report
from lbt.study import STUDY_ARMS

ARMS = {"plus": -1.0, "minus": 1.0, "neutral": 0.0}
SEEDS = (0, 1)
PHASES = {"base": 0.0, "step_2": 0.5, "final": 1.0}
BASE_ITEMS = ("t1", "t2", "t3", "t4")
N_RESAMPLES = 200


def stance_rows(rng, arm: str, phase: str, item_set: str, measure: str) -> list[dict]:
    """4 base items × 2 paraphrases × 2 orders; framed arms move by ±1 (source) or ±0.6 (target) at final."""
    size = (1.0 if item_set == "source" else 0.6) * ARMS.get(arm, 0.0) * PHASES[phase]
    rows = []
    for item in BASE_ITEMS:
        difficulty = {"t1": -0.5, "t2": 0.0, "t3": 0.4, "t4": 1.0}[item]
        for para in range(2):
            for order in ("original", "swapped"):
                value = difficulty + size + rng.normal(0, 0.3)
                if measure == "forced_choice":
                    value = 1.0 if value > 0.2 else -1.0
                stance = float("nan") if measure == "open_ended" else value
                rows.append(
                    {
                        "measure": measure,
                        "phase": phase,
                        "item_set": item_set,
                        "item_id": f"{item}-p{para}",
                        "base_item": item,
                        "domain": "urban_transit",
                        "order": order,
                        "stance": stance,
                    }
                )
    return rows


def write_job(
    job_dir: Path,
    family: str,
    arm: str,
    seed: int | None,
    sweep: str,
    phases=PHASES,
    item_sets=("target", "source"),
    measures=("letter_logprob", "forced_choice", "open_ended"),
    rng_seed: int = 0,
) -> None:
    rng = np.random.default_rng(rng_seed)
    run = RunDir(job_dir)
    card = {
        "job": {"model": family, "arm": arm, "seed": seed, "experiment": None, "sweep": sweep},
        "config": {"logger": {"project": "lbt-test"}},
        "status": "done",
    }
    write_json_atomic(run.card, card)
    for phase in phases:
        for item_set in item_sets:
            for measure in measures:
                write_rows(run.rows(phase, item_set, measure), stance_rows(rng, arm, phase, item_set, measure))
        shift = [0.0, 0.01, 0.05, 0.1] if phase == "base" else [0.0, 0.02, 0.1 * ARMS.get(arm, 0), 0.2]
        probe = {
            "phase": phase,
            "layers": [0, 1, 2, 3],
            "l_star": 2,
            "direction_key": "assistant",
            "projection": {
                "answer": [0.1 * x + PHASES[phase] * s for x, s in zip(range(4), shift)],
                "prompt_mean": [0, 0, 0, 0],
            },
            "shift": {"answer": shift if phase != "base" else [0, 0, 0, 0], "prompt_mean": [0, 0, 0, 0]},
            "shift_se": {"answer": [0.01] * 4, "prompt_mean": [0.01] * 4},
            "n_prompts": 16,
        }
        write_json_once(run.probe(phase), probe)
        capability = {
            "perplexity": 12.5 + (arm == "plus"),
            "mmlu_accuracy": None,
            "refusal": {"comply_correct_rate": 1.0, "refuse_correct_rate": 0.9, "n_comply": 5, "n_refuse": 5},
            "flags": {"perplexity_rise": arm == "plus" and phase == "final", "mmlu_drop": False},
        }
        write_json_once(run.capability(phase), capability)
        summary = {  # the layout lbt.eval.summary writes
            "phase": phase,
            "item_sets": {
                "target": {"n_items": 8, "validity": {"letter_logprob": {"agreement": 0.875, "n_items": 8}}},
                "source": {"n_items": 8, "validity": {"letter_logprob": {"agreement": 1.0, "n_items": 6}}},
            },
        }
        write_json_once(run.summary(phase), summary)
    run.done.write_text("done\n", encoding="utf-8")  # last, as lbt.train writes it after its checks


def make_sweep(root: Path, name: str = "sweepA") -> Path:
    sweep = root / name
    for k, (arm, seed) in enumerate((a, s) for a in ARMS for s in SEEDS):
        write_job(sweep / f"tiny-{arm}-s{seed}", "tiny", arm, seed, name, rng_seed=k)
    # a directory written by lbt.evaluate on the base model: summarised, not in the primary statistics
    write_job(
        sweep / "evaluate-base",
        "tiny",
        "base",
        None,
        name,
        phases={"final": 0.0},
        item_sets=("target_items",),
        measures=("letter_logprob",),
        rng_seed=99,
    )
    return sweep


def make_items(root: Path) -> Path:
    items = root / "items"
    write_rows(items / "target_items.jsonl", [{"id": "t1-p0", "base_item": "t1"}])
    write_rows(items / "source_items.jsonl", [{"id": "s1-p0", "base_item": "s1"}])
    return items


def study_rows(sweep: Path, item_set: str = "target", phase: str = "final") -> list[dict]:
    """The rows the primary analysis should use: the study arms' rows of one item set and phase, read by
    lbt.analyze's own reader, less open_ended (no stance before judging)."""
    return [
        row
        for job in find_jobs([sweep])
        for row in load_rows(job, str)
        if row["arm"] in STUDY_ARMS
        and (row["item_set"], row["phase"]) == (item_set, phase)
        and row["measure"] != "open_ended"
    ]


@pytest.fixture
def sweep_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    sweep = make_sweep(tmp_path)
    items = make_items(tmp_path)
    lock = tmp_path / "prereg.lock.json"
    assert (
        main(
            ["prereg-lock", "--items-dir", str(items), "--out", str(lock), "--n-resamples", str(N_RESAMPLES)]
        )
        == 0
    )
    common = ["--lock", str(lock), "--items-dir", str(items), "--n-resamples", str(N_RESAMPLES)]
    return sweep, items, lock, common


def test_report_figures_and_numbers_match_primary_report(sweep_setup, tmp_path):
    sweep, _, _, common = sweep_setup
    out = tmp_path / "analysis"
    assert main([str(sweep), "--out", str(out), "--no-wandb", *common]) == 0
    report = json.loads((out / "report.json").read_text())
    for name in ("forest", "asymmetry", "projection_shift", "dynamics"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    assert report["exploratory"] is False and report["lock"]["settings_sha256"]

    # the reader gives back what the job wrote: stance (NaN kept), item and paraphrase of every row
    run = RunDir(sweep / "tiny-plus-s1")
    (job,) = [j for j in find_jobs([sweep]) if j.path == run.root]
    for measure in ("letter_logprob", "open_ended"):
        written = read_rows(run.rows("final", "target", measure))
        read = [r for r in load_rows(job, str) if (r["phase"], r["item_set"], r["measure"]) ==
                ("final", "target", measure)]
        assert [(r["base_item"], r["item_id"], r["domain"]) for r in read] == [
            (w["base_item"], w["item_id"], w["domain"]) for w in written]
        np.testing.assert_array_equal([r["stance"] for r in read], [w["stance"] for w in written])
        assert {(r["family"], r["arm"], r["seed"]) for r in read} == {("tiny", "plus", 1)}

    expected = primary_report(study_rows(sweep), n_resamples=N_RESAMPLES)
    for measure in ("letter_logprob", "forced_choice"):
        got, want = report["primary"]["families"]["tiny"][measure], expected["families"]["tiny"][measure]
        for arm in ("plus", "minus"):
            assert got[arm]["d"] == want[arm]["d"]
            assert got[arm]["ci"] == want[arm]["ci"]
            assert got[arm]["tost"] == want[arm]["tost"]
        assert got["combined_directional"] == want["combined_directional"]
        assert report["primary"]["holm"][measure] == expected["holm"][measure]
        assert got["n_items"] == 4 and got["n_seeds"] == 2
    assert "open_ended" not in report["primary"]["families"]["tiny"]
    assert any("open_ended" in note for note in report["notes"])

    manipulation = primary_report(study_rows(sweep, "source"), n_resamples=N_RESAMPLES)
    gate = {(g["measure"], g["arm"]): g for g in report["manipulation_gate"]}
    d_plus = manipulation["families"]["tiny"]["letter_logprob"]["plus"]["d"]
    assert gate[("letter_logprob", "plus")]["d"] == d_plus
    assert gate[("letter_logprob", "plus")]["passes"] == (d_plus <= -0.5)

    # the evaluate dir (arm "base") is summarised but not in the statistics
    assert any(r["arm"] == "base" and r["item_set"] == "target_items" for r in report["descriptive"])
    assert report["missing"]["jobs"] == []
    shift = report["projection_shift"]["tiny"]
    assert shift["plus"]["shift"][2] == pytest.approx(-0.1) and shift["minus"]["shift"][
        2
    ] == pytest.approx(0.1)
    assert list(report["dynamics"]["stance"]["tiny"]["letter_logprob"]["neutral"]) == [
        "base",
        "step_2",
        "final",
    ]
    flagged = [c for c in report["capability"] if c["perplexity_rise"]]
    assert {(c["arm"], c["phase"]) for c in flagged} == {("plus", "final")}
    summaries = [
        v for v in report["validity_summaries"] if (v["item_set"], v["measure"]) == ("target", "letter_logprob")
    ]  # as the evaluation's summary.json files say
    assert {(v["agreement"], v["n_items"]) for v in summaries} == {(0.875, 8)}
    assert len(summaries) == 19  # 6 jobs × 3 phases + the evaluate dir
    # the report's validity table is computed from the rows on disk, as lbt.eval.summary defines it
    from lbt.eval.summary import measure_validity

    by_measure = {m: read_rows(run.rows("final", "target", m)) for m in ("forced_choice", "letter_logprob")}
    expected = measure_validity(by_measure)["letter_logprob"]
    (mine,) = [
        v for v in report["validity"]
        if (v["arm"], v["seed"], v["phase"], v["item_set"], v["measure"])
        == ("plus", 1, "final", "target", "letter_logprob")
    ]
    assert (mine["agreement"], mine["n_items"]) == (expected["agreement"], expected["n_items"])

    md = (out / "report.md").read_text()
    comb = report["primary"]["families"]["tiny"]["letter_logprob"]["combined_directional"]
    assert f"combined d = {comb['d']:+.2f}" in md
    assert "sweepA/tiny-neutral-s0/eval/final/target/letter_logprob.jsonl" in md
    assert "sweepA/tiny-plus-s0/eval/final/capability.json" in md
    assert "EXPLORATORY" not in md


def test_partial_sweep_says_what_is_missing(sweep_setup, tmp_path, capsys):
    sweep, _, _, common = sweep_setup
    shutil.rmtree(sweep / "tiny-minus-s1")
    shutil.rmtree(sweep / "tiny-neutral-s1" / "eval" / "step_2")
    (sweep / "tiny-plus-s0" / "eval" / "final" / "source" / "forced_choice.jsonl").unlink()
    (sweep / "tiny-plus-s1" / "DONE").unlink()
    for framed in [*sweep.glob("tiny-plus-s*"), *sweep.glob("tiny-minus-s*")]:  # forced_choice: neutral only
        (framed / "eval" / "final" / "target" / "forced_choice.jsonl").unlink()
    out = tmp_path / "partial"
    assert main([str(sweep), "--out", str(out), "--no-wandb", *common]) == 0
    md = (out / "report.md").read_text()
    assert "job (tiny, minus, seed 1) is missing" in md
    assert "job (tiny, neutral, seed 1) lacks phase(s) step_2" in md
    assert "job (tiny, plus, seed 0) lacks rows final/source/forced_choice" in md
    assert "DONE absent" in md
    assert "job (tiny, minus, seed 1) is missing" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert (
        report["primary"]["families"]["tiny"]["letter_logprob"]["n_seeds"] == 2
    )  # union of seeds; minus has seed 0 only
    assert any("seeds missing from some arms" in w for w in report["warnings"])
    assert "forced_choice" not in report["primary"]["families"]["tiny"]
    assert any("'forced_choice': arms ['neutral']" in note for note in report["notes"])


def test_a_sweep_trained_before_the_arms_were_renamed_analyzes_under_todays_names(sweep_setup, tmp_path):
    """Jobs trained before issue 16 say arm frame_plus/frame_minus in run.json and folder names: the
    analysis reads them as plus/minus, with the same numbers; an arm outside the study's three (base)
    keeps its name."""
    sweep, _, _, common = sweep_setup
    old = tmp_path / "old"
    shutil.copytree(sweep, old)
    for job in sorted(old.iterdir()):
        card = json.loads((job / "run.json").read_text())
        arm = card["job"]["arm"]
        legacy = {"plus": "frame_plus", "minus": "frame_minus"}.get(arm)
        if legacy:
            card["job"]["arm"] = legacy
            (job / "run.json").write_text(json.dumps(card))
            job.rename(old / job.name.replace(f"-{arm}-", f"-{legacy}-"))
    assert (old / "tiny-frame_plus-s0").is_dir() and not (old / "tiny-plus-s0").exists()
    rows = [row for job in find_jobs([old]) for row in load_rows(job, str)]
    assert {row["arm"] for row in rows} == {"plus", "minus", "neutral", "base"}
    reports = {}
    for name, folder in (("today", sweep), ("legacy", old)):
        assert main([str(folder), "--out", str(tmp_path / f"analysis-{name}"), "--no-wandb", *common]) == 0
        reports[name] = json.loads((tmp_path / f"analysis-{name}" / "report.json").read_text())
    legacy, today = reports["legacy"], reports["today"]
    assert legacy["missing"]["jobs"] == [] and sorted({j["arm"] for j in legacy["jobs"]}) == [
        "base", "minus", "neutral", "plus"]
    for measure in ("letter_logprob", "forced_choice"):
        entry, expected = (r["primary"]["families"]["tiny"][measure] for r in (legacy, today))
        for key in ("plus", "minus", "combined_directional"):
            assert entry[key]["d"] == pytest.approx(expected[key]["d"], rel=1e-12)
    md = (tmp_path / "analysis-legacy" / "report.md").read_text()
    assert "d plus [95% CI]" in md and "(tiny, frame_plus" not in md


def test_malformed_rows_name_the_job_directory(sweep_setup, tmp_path, capsys):
    sweep, _, _, common = sweep_setup
    rows_file = sweep / "tiny-neutral-s0" / "eval" / "final" / "target" / "letter_logprob.jsonl"
    lines = rows_file.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["stance"] = "A"
    lines[2] = json.dumps(bad)
    rows_file.write_text("\n".join(lines) + "\n")
    assert main([str(sweep), "--out", str(tmp_path / "x"), "--no-wandb", *common]) == 2
    err = capsys.readouterr().err
    assert str(sweep / "tiny-neutral-s0") in err
    assert "eval/final/target/letter_logprob.jsonl:3" in err and "'stance'" in err
    del bad["base_item"]
    lines[2] = json.dumps(bad)
    rows_file.write_text("\n".join(lines) + "\n")
    assert main([str(sweep), "--out", str(tmp_path / "y"), "--no-wandb", *common]) == 2
    assert "field 'base_item' is missing" in capsys.readouterr().err


def test_prereg_lock_refusal_and_exploratory_stamp(sweep_setup, tmp_path, capsys):
    sweep, items, lock, _ = sweep_setup
    base = ["--items-dir", str(items), "--no-wandb", "--n-resamples", str(N_RESAMPLES)]
    assert main([str(sweep), "--out", str(tmp_path / "a"), "--lock", str(tmp_path / "none.json"), *base]) == 2
    assert "refusing to score target items" in capsys.readouterr().err
    # other settings than the locked ones
    assert (
        main(
            [
                str(sweep),
                "--out",
                str(tmp_path / "b"),
                "--lock",
                str(lock),
                "--items-dir",
                str(items),
                "--no-wandb",
                "--n-resamples",
                "300",
            ]
        )
        == 2
    )
    assert "n_resamples" in capsys.readouterr().err
    # an item file edited after the lock
    with open(items / "target_items.jsonl", "a") as handle:
        handle.write(json.dumps({"id": "t9-p0", "base_item": "t9"}) + "\n")
    assert main([str(sweep), "--out", str(tmp_path / "c"), "--lock", str(lock), *base]) == 2
    assert "target_items.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "c" / "report.json").exists()
    # the lock is never overwritten
    assert main(["prereg-lock", "--items-dir", str(items), "--out", str(lock)]) == 2
    # exploratory: runs, and says so everywhere it writes
    out = tmp_path / "d"
    assert main([str(sweep), "--out", str(out), "--lock", str(lock), "--exploratory", *base]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["exploratory"] is True and "EXPLORATORY" in report["exploratory_note"]
    assert (out / "report.md").read_text().count("EXPLORATORY") >= 2
    assert "[EXPLORATORY]" in capsys.readouterr().out
    # source-only sweeps score no target items: no lock needed
    source_only = tmp_path / "source_only"
    shutil.copytree(sweep, source_only)
    for target in source_only.glob("*/eval/*/target*"):
        shutil.rmtree(target)
    assert (
        main([str(source_only), "--out", str(tmp_path / "e"), "--lock", str(tmp_path / "none.json"), *base])
        == 0
    )


def test_default_output_directory_is_new_and_wandb_run_is_offline(sweep_setup, tmp_path):
    sweep, _, _, common = sweep_setup
    assert main([str(sweep), *common]) == 0
    first = sweep / "analysis"
    runs = list((first / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_path = next(runs[0].glob("*.wandb"))
    # wandb's writer is a separate service process: give it a moment to flush the records to disk.
    deadline = time.monotonic() + 20
    while b"sweepA" not in run_path.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    run_file = run_path.read_bytes()
    assert b"analysis" in run_file and b"sweepA" in run_file  # job_type and group
    assert main([str(sweep), "--no-wandb", *common]) == 0
    assert (sweep / "analysis_2" / "report.json").exists()  # the first analysis is not overwritten
    second = json.loads((sweep / "analysis_2" / "report.json").read_text())
    assert not any(j["path"].startswith("sweepA/analysis") for j in second["jobs"])
    assert math.isfinite(second["primary"]["families"]["tiny"]["letter_logprob"]["combined_directional"]["d"])


def test_corrupt_files_name_job_file_and_line(sweep_setup, tmp_path, capsys):
    sweep, _, _, common = sweep_setup
    job = sweep / "tiny-neutral-s0"
    rows_file = job / "eval" / "final" / "target" / "letter_logprob.jsonl"
    lines = rows_file.read_text().splitlines()
    rows_file.write_text("\n".join([*lines[:4], "", lines[4][:30], *lines[5:]]) + "\n")  # cut-off line 6
    assert main([str(sweep), "--out", str(tmp_path / "a"), "--no-wandb", *common]) == 2
    err = capsys.readouterr().err
    assert f"job {job}" in err and f"{rows_file}, line 6: not JSON" in err
    bad = json.loads(lines[4])
    del bad["domain"]
    rows_file.write_text("\n".join([*lines[:4], "", json.dumps(bad), *lines[5:]]) + "\n")  # blank line 5
    assert main([str(sweep), "--out", str(tmp_path / "b"), "--no-wandb", *common]) == 2
    assert "letter_logprob.jsonl:6: field 'domain' is missing" in capsys.readouterr().err
    rows_file.write_text("\n".join(lines) + "\n")
    for path in (job / "probe" / "final.json", job / "eval" / "base" / "capability.json",
                 job / "eval" / "step_2" / "summary.json"):
        intact = path.read_text()
        path.write_text(intact[: len(intact) // 2])
        with pytest.raises(json.JSONDecodeError) as cut:  # where the json module itself stops
            json.loads(intact[: len(intact) // 2])
        assert main([str(sweep), "--out", str(tmp_path / path.stem), "--no-wandb", *common]) == 2
        err = capsys.readouterr().err
        assert f"job {job}" in err and f"{path}: not JSON" in err and f"line {cut.value.lineno})" in err
        path.write_text(intact)


def test_set_aside_copies_and_other_probe_files_are_not_read(sweep_setup, tmp_path):
    sweep, _, _, common = sweep_setup
    out = tmp_path / "clean"
    assert main([str(sweep), "--out", str(out), "--no-wandb", *common]) == 0
    clean = json.loads((out / "report.json").read_text())
    job = sweep / "tiny-plus-s0"
    write_json_once(RunDir(job).probe("train_intervention"), {"mode": "ablate", "layer": 2})
    (job / "probe" / "final.json.corrupt-20260101-000000-1").write_text("{")
    (job / "eval" / "final" / "target" / "letter_logprob.jsonl.corrupt-20260101-000000-1").write_text("{")
    (job / "eval" / "final" / "summary.json.corrupt-20260101-000000-1").mkdir()
    assert main([str(sweep), "--out", str(tmp_path / "with"), "--no-wandb", *common]) == 0
    report = json.loads((tmp_path / "with" / "report.json").read_text())
    for key in ("primary", "descriptive", "projection_shift", "capability", "validity"):
        assert report[key] == clean[key], key


def test_unfinished_job_is_flagged_with_what_its_card_says_is_missing(sweep_setup, tmp_path, capsys):
    sweep, _, _, common = sweep_setup
    job = sweep / "tiny-minus-s1"
    card = read_json(RunDir(job).card)
    card.update(status="incomplete", missing=["phase final: eval/final/target/likert.jsonl: missing"])
    write_json_atomic(RunDir(job).card, card)
    (job / "DONE").unlink()
    out = tmp_path / "flagged"
    assert main([str(sweep), "--out", str(out), "--no-wandb", *common]) == 0
    line = (f"job {job} is not finished (status incomplete, DONE absent): "
            "phase final: eval/final/target/likert.jsonl: missing")
    assert line in (out / "report.md").read_text() and line in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["missing"]["incomplete_jobs"] == [
        {"job": str(job), "status": "incomplete", "done": False, "missing": card["missing"]}]


def test_two_jobs_for_one_cell_are_refused_naming_both(sweep_setup, tmp_path, capsys):
    """Two jobs of one model, arm and seed (here the same job beside a copy, as a job trained before the arms
    were renamed sits beside its retrained copy) would be pooled as one seed's rows: the analysis refuses,
    naming the cell and both folders."""
    sweep, _, _, common = sweep_setup
    shutil.copytree(sweep / "tiny-plus-s0", sweep / "tiny-frame_plus-s0")
    card = json.loads((sweep / "tiny-frame_plus-s0" / "run.json").read_text())
    card["job"]["arm"] = "frame_plus"
    (sweep / "tiny-frame_plus-s0" / "run.json").write_text(json.dumps(card))
    assert main([str(sweep), "--out", str(tmp_path / "analysis"), "--no-wandb", *common]) != 0
    err = capsys.readouterr().err
    assert "more than one job for one model, arm and seed" in err
    assert "(tiny, plus, seed 0)" in err and "tiny-plus-s0" in err and "tiny-frame_plus-s0" in err
    assert not (tmp_path / "analysis" / "report.json").exists()
