"""lbt.stats: effect sizes, aggregation, bootstrap, TOST and Holm against numbers worked out by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from lbt.stats import StatsInputError, StatsWarning, aggregate_cells, holm, primary_report, tost
from lbt.stats.bootstrap import bootstrap_effects, draw_indices
from lbt.stats.effect_size import combined_directional, effect_size, sample_sd

# Hand example: 1 family, 2 seeds × 2 base items. Cell values (seed, item):
#   neutral    s0: a=0, b=2   s1: a=1, b=3   mean 1.5, SD² = (2.25+.25+.25+2.25)/3 = 5/3
#   plus s0: a=-1, b=1  s1: a=0, b=2   mean 0.5  → d = -1 / sqrt(5/3)
#   minus s0: a=2, b=4  s1: a=3, b=5   mean 3.5  → d = +2 / sqrt(5/3)
#   combined = (2 + 1) / 2 / sqrt(5/3) = 1.5 / sqrt(5/3)
CELLS = {
    "neutral": {(0, "a"): 0.0, (0, "b"): 2.0, (1, "a"): 1.0, (1, "b"): 3.0},
    "plus": {(0, "a"): -1.0, (0, "b"): 1.0, (1, "a"): 0.0, (1, "b"): 2.0},
    "minus": {(0, "a"): 2.0, (0, "b"): 4.0, (1, "a"): 3.0, (1, "b"): 5.0},
}
SD = math.sqrt(5 / 3)


def rows_from_cells(cells=CELLS, family="fam", measure="letter_logprob", nan_in=None):
    """Each cell value v becomes rows v−0.5 and v+0.5 (two option orders) → the cell mean is v again."""
    rows = []
    for arm, values in cells.items():
        for (seed, item), v in values.items():
            for order, delta in (("original", -0.5), ("swapped", 0.5)):
                rows.append(
                    {
                        "family": family,
                        "arm": arm,
                        "seed": seed,
                        "base_item": item,
                        "domain": "dom",
                        "measure": measure,
                        "order": order,
                        "stance": v + delta,
                        "source": f"sweep/{family}-{arm}-s{seed}/eval/final/target/{measure}.jsonl",
                    }
                )
            if nan_in == (arm, seed, item):
                rows.append({**rows[-1], "stance": float("nan")})
    return rows


def test_effect_size_and_combined_by_hand():
    neutral = list(CELLS["neutral"].values())
    assert sample_sd(neutral) == pytest.approx(SD, rel=1e-15)
    d_plus = effect_size(list(CELLS["plus"].values()), neutral)
    d_minus = effect_size(list(CELLS["minus"].values()), neutral)
    assert d_plus == pytest.approx(-1 / SD, rel=1e-14)
    assert d_minus == pytest.approx(2 / SD, rel=1e-14)
    assert combined_directional(d_plus, d_minus) == pytest.approx(1.5 / SD, rel=1e-14)


def test_aggregation_averages_rows_and_counts_nan():
    rows = rows_from_cells(nan_in=("plus", 1, "b"))
    rows.append({**rows[0], "template": 3, "stance": None})  # None is unparsed too
    ((key, table),) = aggregate_cells(rows).items()
    assert key == ("fam", "letter_logprob")
    assert table.arms == ("plus", "minus", "neutral")
    assert table.seeds == (0, 1) and table.items == ("a", "b")
    assert table.values[0].tolist() == [[-1.0, 1.0], [0.0, 2.0]]
    assert table.values[2].tolist() == [[0.0, 2.0], [1.0, 3.0]]
    # one NaN row in plus (seed 1, b) and one None row in neutral (rows[0] is neutral s0 a)
    assert table.n_nan_rows == {"plus": 1, "minus": 0, "neutral": 1}
    assert table.n_rows == {"plus": 9, "minus": 8, "neutral": 9}
    assert table.n_empty_cells == {"plus": 0, "minus": 0, "neutral": 0}


def test_primary_report_point_estimates_and_tost_by_hand():
    rows = rows_from_cells(nan_in=("neutral", 0, "a"))
    report = primary_report(rows, n_resamples=500, sesoi_d=0.5, alpha=0.05, seed=0)
    entry = report["families"]["fam"]["letter_logprob"]
    assert entry["plus"]["d"] == pytest.approx(-1 / SD, rel=1e-14)
    assert entry["minus"]["d"] == pytest.approx(2 / SD, rel=1e-14)
    assert entry["combined_directional"]["d"] == pytest.approx(1.5 / SD, rel=1e-14)
    assert entry["n_items"] == 2 and entry["n_seeds"] == 2
    assert report["nan_counts"]["fam"]["letter_logprob"] == {"plus": 0, "minus": 0, "neutral": 1}
    # TOST plus vs neutral on the 4 + 4 cells: diff −1, both SD² 5/3, SE = sqrt(2·(5/3)/4), df 6
    bound = 0.5 * SD
    se = math.sqrt(5 / 3 / 4 + 5 / 3 / 4)
    p_lower = sps.t.sf((-1 + bound) / se, 6)
    p_upper = sps.t.cdf((-1 - bound) / se, 6)
    assert entry["plus"]["tost"]["p_lower"] == pytest.approx(p_lower, rel=1e-10)
    assert entry["plus"]["tost"]["p_upper"] == pytest.approx(p_upper, rel=1e-10)
    assert entry["plus"]["tost"]["equivalent"] is False
    assert set(entry["plus"]) == {"d", "ci", "tost"}
    assert set(entry["combined_directional"]) == {"d", "ci", "p_one_sided"}
    assert set(report["holm"]["letter_logprob"]["fam"]) == {"p", "threshold", "reject"}
    assert entry["sources"]["neutral"] == [
        "sweep/fam-neutral-s0/eval/final/target/letter_logprob.jsonl",
        "sweep/fam-neutral-s1/eval/final/target/letter_logprob.jsonl",
    ]


def test_tost_pooled_and_welch_df_by_hand():
    x = [1.0, 2.0, 3.0, 4.0]  # mean 2.5, s² = 5/3
    y = [0.0, 1.0, 2.0, 3.0, 4.0]  # mean 2.0, s² = 10/4 = 2.5
    bound = 0.5 * math.sqrt(2.5)
    a, b = (5 / 3) / 4, 2.5 / 5
    se = math.sqrt(a + b)
    pooled = tost(x, y, sesoi_d=0.5, alpha=0.05)
    assert pooled.df == 7
    assert pooled.bound == pytest.approx(bound, rel=1e-14)
    assert pooled.se == pytest.approx(se, rel=1e-14)
    assert pooled.p_lower == pytest.approx(sps.t.sf((0.5 + bound) / se, 7), rel=1e-12)
    assert pooled.p_upper == pytest.approx(sps.t.cdf((0.5 - bound) / se, 7), rel=1e-12)
    assert not pooled.equivalent  # p_upper ≈ 0.38
    welch_df = (a + b) ** 2 / (a**2 / 3 + b**2 / 4)
    welch = tost(x, y, sesoi_d=0.5, welch=True)
    assert welch.df == pytest.approx(welch_df, rel=1e-14) and welch.df == pytest.approx(6.9808, abs=1e-4)
    assert welch.p_lower == pytest.approx(sps.t.sf((0.5 + bound) / se, welch_df), rel=1e-12)


def test_tost_declares_equivalence_for_a_tiny_difference():
    rng = np.random.default_rng(3)
    y = rng.normal(0, 1, 400)
    x = y[::-1] + 0.01  # same spread, difference far inside ±0.2 SD
    assert tost(x, y, sesoi_d=0.2).equivalent


def test_holm_two_p_values_by_hand():
    # sorted: 0.02 vs 0.05/2 = 0.025 → reject; 0.03 vs 0.05/1 → reject
    both = holm({"qwen": 0.03, "llama": 0.02}, alpha=0.05)
    assert both["llama"] == {"p": 0.02, "threshold": 0.025, "reject": True}
    assert both["qwen"] == {"p": 0.03, "threshold": 0.05, "reject": True}
    # sorted: 0.03 > 0.025 → keep; step-down stops, so 0.04 ≤ 0.05 is kept too
    none = holm({"qwen": 0.04, "llama": 0.03}, alpha=0.05)
    assert none["llama"]["reject"] is False and none["qwen"]["reject"] is False
    assert none["qwen"]["threshold"] == 0.05
    assert holm({"a": None, "b": 0.01})["a"]["reject"] is False
    assert holm({"a": None, "b": 0.04})["b"]["threshold"] == 0.05  # m counts usable p-values only


def test_holm_in_primary_report_across_families():
    rows = rows_from_cells(family="qwen") + rows_from_cells(family="llama")
    report = primary_report(rows, n_resamples=300)
    h = report["holm"]["letter_logprob"]
    assert sorted(x["threshold"] for x in h.values()) == [0.025, 0.05]
    for family in ("qwen", "llama"):
        assert (
            h[family]["p"]
            == report["families"][family]["letter_logprob"]["combined_directional"]["p_one_sided"]
        )


def random_cells(seed: int, n_seeds: int = 3, n_items: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    return {
        arm: {(s, f"i{i}"): float(rng.normal(shift, 1)) for s in range(n_seeds) for i in range(n_items)}
        for arm, shift in (("neutral", 0.0), ("plus", -0.3), ("minus", 0.4))
    }


def test_bootstrap_is_deterministic_given_seed_and_independent_of_other_groups():
    rows = rows_from_cells(random_cells(0))
    a = primary_report(rows, n_resamples=400, seed=7)
    b = primary_report(rows, n_resamples=400, seed=7)
    c = primary_report(rows, n_resamples=400, seed=8)
    ea, eb, ec = (r["families"]["fam"]["letter_logprob"] for r in (a, b, c))
    assert ea["combined_directional"]["ci"] == eb["combined_directional"]["ci"]
    assert ea["plus"]["ci"] != ec["plus"]["ci"]
    with_other = primary_report(
        rows + rows_from_cells(random_cells(1), family="other"), n_resamples=400, seed=7
    )
    assert with_other["families"]["fam"]["letter_logprob"]["plus"]["ci"] == ea["plus"]["ci"]


def test_the_same_item_draw_is_applied_to_every_arm():
    rng = np.random.default_rng(0)
    neutral = rng.normal(0, 5, (4, 10))  # large item-to-item spread
    values = np.stack([neutral.copy(), neutral + rng.normal(1, 1, (4, 10)), neutral])
    draws = bootstrap_effects(values, ("plus", "minus", "neutral"), 2000, rng)
    # plus equals neutral cell by cell: only a shared draw gives exactly 0 in every resample
    assert np.all(draws["plus"] == 0.0)
    assert np.std(draws["minus"]) > 0


def test_draw_indices_resample_seeds_then_items_within_each_seed():
    rng = np.random.default_rng(1)
    flat = draw_indices(rng, 1, 5000, 3, 4)[0].reshape(5000, 3, 4)
    seed_of_cell = flat // 4
    assert np.all(seed_of_cell == seed_of_cell[..., :1])  # every item of a slot comes from one drawn seed
    # some resamples repeat a seed (seed level is resampled), items vary within a slot
    assert np.any(seed_of_cell[:, 0, 0] == seed_of_cell[:, 1, 0])
    assert np.mean([len(set(row)) for row in (flat[:, 0] % 4).tolist()]) < 4
    no_seed_level = draw_indices(rng, 1, 10, 3, 4, seed_level=False)[0].reshape(10, 3, 4) // 4
    assert np.all(no_seed_level == np.arange(3)[None, :, None])


def plain_loop_ci(values, n_resamples, rng):
    """An independent, one-resample-at-a-time version of the same bootstrap (combined estimate)."""
    n_seeds, n_items = values.shape[1:]
    out = []
    for _ in range(n_resamples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        items = rng.integers(0, n_items, (n_seeds, n_items))
        cells = values[:, seeds[:, None], items]
        sd = cells[2].std(ddof=1)
        out.append(((cells[1].mean() - cells[2].mean()) - (cells[0].mean() - cells[2].mean())) / 2 / sd)
    return np.percentile(out, [2.5, 97.5])


def test_vectorised_bootstrap_matches_a_plain_loop_within_monte_carlo_error():
    rng = np.random.default_rng(5)
    values = (
        rng.normal(0, 1, (3, 4, 12)) + rng.normal(0, 0.5, (3, 4, 1)) + np.array([-0.5, 0.5, 0])[:, None, None]
    )
    draws = bootstrap_effects(
        values, ("plus", "minus", "neutral"), 20000, np.random.default_rng(0)
    )
    vec = np.percentile(draws["combined"], [2.5, 97.5])
    loop = plain_loop_ci(values, 4000, np.random.default_rng(1))
    width = vec[1] - vec[0]
    assert np.all(np.abs(vec - loop) < 0.06 * width)


def test_combined_p_is_share_of_draws_at_or_below_zero():
    rows = rows_from_cells()
    entry = primary_report(rows, n_resamples=1000)["families"]["fam"]["letter_logprob"]
    # minus − plus is +3 in every cell pair of a seed/item; any resample keeps it positive
    assert entry["combined_directional"]["p_one_sided"] == 0.0
    flipped = {
        "neutral": CELLS["neutral"],
        "plus": CELLS["minus"],
        "minus": CELLS["plus"],
    }
    entry = primary_report(rows_from_cells(flipped), n_resamples=1000)["families"]["fam"]["letter_logprob"]
    assert entry["combined_directional"]["p_one_sided"] == 1.0


def test_single_seed_falls_back_to_item_level_resampling_with_a_warning():
    cells = {arm: {k: v for k, v in values.items() if k[0] == 0} for arm, values in CELLS.items()}
    with pytest.warns(StatsWarning, match="single seed"):
        report = primary_report(rows_from_cells(cells), n_resamples=200)
    entry = report["families"]["fam"]["letter_logprob"]
    assert entry["resampling"] == "item_only" and entry["n_seeds"] == 1
    assert any("single seed" in w for w in report["warnings"])


def test_seed_missing_from_some_arms_keeps_every_cell_with_a_warning():
    cells = {arm: dict(values) for arm, values in CELLS.items()}
    cells["plus"][(2, "a")] = 9.0
    cells["plus"][(2, "b")] = 9.0
    with pytest.warns(StatsWarning, match="seeds missing from some arms"):
        report = primary_report(rows_from_cells(cells), n_resamples=300)
    entry = report["families"]["fam"]["letter_logprob"]
    assert entry["seeds"] == [0, 1, 2] and entry["n_seeds"] == 3
    # plus mean over its 6 cells (−1, 1, 0, 2, 9, 9) = 20/6; neutral mean 1.5 over its 4 cells
    assert entry["plus"]["d"] == pytest.approx((20 / 6 - 1.5) / SD, rel=1e-14)
    assert entry["empty_cells"] == {"plus": 0, "minus": 0, "neutral": 0}
    assert all(math.isfinite(x) for x in entry["plus"]["ci"] + entry["combined_directional"]["ci"])


def test_bad_input_errors_name_the_problem_and_the_job():
    rows = rows_from_cells()
    with pytest.raises(StatsInputError, match="no neutral arm"):
        primary_report([r for r in rows if r["arm"] != "neutral"], n_resamples=10)
    with pytest.raises(StatsInputError, match="only one arm"):
        primary_report([r for r in rows if r["arm"] == "neutral"], n_resamples=10)
    broken = [r for r in rows if not (r["arm"] == "minus" and r["seed"] == 1 and r["base_item"] == "b")]
    with pytest.raises(
        StatsInputError, match=r"mismatched item sets.*minus.*seed 1.*\['b'\].*fam-minus"
    ):
        primary_report(broken, n_resamples=10)
    missing = [dict(r) for r in rows]
    del missing[5]["base_item"]
    with pytest.raises(
        StatsInputError, match=r"row 5 from sweep/fam-neutral-s1/eval/final/target.*base_item"
    ):
        primary_report(missing, n_resamples=10)
    with pytest.raises(StatsInputError, match="'base' is not a study arm"):
        primary_report(rows + [{**rows[0], "arm": "base"}], n_resamples=10)
    with pytest.raises(StatsInputError, match="stance must be a number"):
        primary_report(rows + [{**rows[0], "stance": "A"}], n_resamples=10)
    with pytest.raises(StatsInputError, match="several item_sets"):
        primary_report([{**r, "item_set": "target"} for r in rows] + [{**rows[0], "item_set": "source"}])
    all_nan = [{**r, "stance": math.nan} if r["arm"] == "plus" else r for r in rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StatsWarning)
        with pytest.raises(StatsInputError, match="no parsed stance at all"):
            primary_report(all_nan, n_resamples=10)
