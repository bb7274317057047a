"""report.md on a small written sweep: a measure below the parse rate is not interpretable (no d), every
blank has its reason, the calibrated line and the design check are there (fast; the real tiny sweep is
tests/test_report_parse.py)."""

from __future__ import annotations

import json
import math

from lbt.analyze import main
from lbt.rundir import RunDir, read_rows, write_rows
from tests.test_analyze import make_sweep


def test_low_parse_rate_is_not_interpretable_and_blanks_carry_reasons(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = make_sweep(tmp_path)
    for job in sweep.glob("tiny-plus-s*"):
        path = RunDir(job).rows("final", "target", "forced_choice")
        rows = read_rows(path)
        for k, row in enumerate(rows):
            if k % 4:  # 25 % parsed
                row.update(stance=math.nan, parsed=False)
        path.unlink()  # rows are written once: the rewritten file replaces the job's
        write_rows(path, rows)
    out = tmp_path / "analysis"
    args = [
        str(sweep),
        "--out",
        str(out),
        "--no-wandb",
        "--exploratory",
        "--n-resamples",
        "200",
        "--design-studies",
        "40",
        "--design-resamples",
        "100",
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    entry = report["primary"]["families"]["tiny"]["forced_choice"]
    assert "plus parsed 8 of 32 rows (25 %)" in entry["not_interpretable"]
    assert "**tiny, forced_choice**: not interpretable" in md and "## Parse rates" in md
    rate = [
        r
        for r in report["parse_rates"]
        if (r["arm"], r["phase"], r["item_set"], r["measure"])
        == ("plus", "final", "target", "forced_choice")
    ]
    assert [(r["n_parsed"], r["n_rows"]) for r in rate] == [(8, 32)]
    assert "calibrated CI combined" in md and "## Design check" in md
    assert report["design_check"][0]["measure"] == "letter_logprob" and "null" in report["design_check"][0]
    assert report["design_check"][1]["skipped"].startswith("not interpretable")
    assert "(not scored until judged)" in md  # open_ended's mean stance
    for bad in ("| — |", "| nan", "d = nan", "NaN 0"):
        assert bad not in md, bad
    assert not any(
        g["passes"]
        for g in report["manipulation_gate"]
        if g["measure"] == "forced_choice"
        and report["manipulation_check"]["families"]["tiny"]["forced_choice"].get("not_interpretable")
    )
