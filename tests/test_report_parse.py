"""Parse rates and "not interpretable" on a real tiny sweep (slow): the default tiny model is trained by
`python -m lbt.train -m` (the contract test's sweep) and analysed; its random weights rarely produce a
parsable forced-choice answer, so the report must say so instead of printing a d."""

from __future__ import annotations

import json
import math

import pytest

from lbt.rundir import RunDir, read_rows
from tests.test_contract import ARMS, run, sweep  # noqa: F401  (the module fixture trains the sweep)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def analysed(sweep):  # noqa: F811
    out = sweep.parent / "analysis_parse"
    run(
        [
            "lbt.analyze",
            str(sweep),
            "--exploratory",
            "--no-wandb",
            "--n-resamples",
            "200",
            "--out",
            str(out),
            "--design-studies",
            "50",
        ],
        sweep.parent,
    )
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_parse_rates_match_the_rows_and_reach_the_report(sweep, analysed):  # noqa: F811
    report, md = analysed
    assert "## Parse rates" in md
    rates = {(r["arm"], r["phase"], r["item_set"], r["measure"]): r for r in report["parse_rates"]}
    for arm in ARMS:
        rows = read_rows(RunDir(sweep / f"tiny-{arm}-s0").rows("final", "target", "forced_choice"))
        parsed = sum(1 for r in rows if r.get("parsed") and math.isfinite(r["stance"]))
        assert all(
            not math.isfinite(r["stance"]) for r in rows if not r.get("parsed")
        )  # unparsed: NaN, never 0
        rate = rates[(arm, "final", "target", "forced_choice")]
        assert (rate["n_parsed"], rate["n_rows"]) == (parsed, len(rows))
        assert rates[(arm, "final", "target", "letter_logprob")]["parse_rate"] == 1.0
        assert rates[(arm, "final", "target", "open_ended")]["parse_rate"] is None


def test_a_measure_below_the_parse_rate_is_not_interpretable_and_no_number_hides_its_reason(analysed):
    report, md = analysed
    entry = report["primary"]["families"]["tiny"].get("forced_choice")
    low = [
        r
        for r in report["parse_rates"]
        if r["measure"] == "forced_choice"
        and r["phase"] == "final"
        and r["item_set"] == "target"
        and r["parse_rate"] < 0.8
    ]
    if entry is not None and low:
        assert entry["not_interpretable"].startswith("not interpretable")
        assert "tiny, forced_choice**: not interpretable" in md
    for bad in ("| nan", "NaN 0", "| — |", "mean 0.0000", "d = nan"):
        assert bad not in md, bad
