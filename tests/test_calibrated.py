"""lbt.stats.calibrated and lbt.stats.variance: numbers by hand and by scipy, and small seeded simulations
(the calibrated test keeps its level at the study's 3 seeds × 48 items; the pre-registered bootstrap does not)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from lbt.stats import primary_report
from lbt.stats.calibrated import anova_mean_squares, batch_intervals, calibrated_interval, mean_variance
from lbt.stats.simulate import ARMS, Design, run, simulate_cells
from lbt.stats.variance import estimate_components
from tests.test_simulate import cell_rows


def test_anova_mean_squares_by_hand():
    # D = [[1, 2, 6], [3, 4, 8]]: grand 4; seed means 3, 5; item means 2, 3, 7
    d = np.array([[1.0, 2.0, 6.0], [3.0, 4.0, 8.0]])
    ms = anova_mean_squares(d)
    assert ms["mean"] == 4.0
    assert ms["ms_seed"] == pytest.approx(3 * ((3 - 4) ** 2 + (5 - 4) ** 2) / 1)  # N · Σ dev² / (S − 1) = 6
    assert ms["ms_item"] == pytest.approx(2 * (4 + 1 + 9) / 2)  # S · Σ dev² / (N − 1) = 14
    assert ms["ms_res"] == pytest.approx(0.0)  # additive: no interaction
    assert (ms["df_seed"], ms["df_item"], ms["df_res"]) == (1, 2, 2)


def test_without_item_term_the_test_is_the_seed_level_t():
    # item means all equal (MS_item = 0): V = var(seed means) / S on S − 1 df, i.e. scipy's one-sample t
    seed_effect = np.array([0.3, -0.1, 0.5, 0.2])
    pattern = np.array([[1.0, -1.0], [-1.0, 1.0], [0.5, -0.5], [-0.5, 0.5]])  # zero item means
    d = seed_effect[:, None] + 0.1 * pattern
    result = calibrated_interval(d, np.random.default_rng(0).normal(size=(4, 2)))
    reference = sps.ttest_1samp(d.mean(axis=1), 0.0, alternative="greater")
    assert result["df"] == 3
    assert result["t"] == pytest.approx(reference.statistic, rel=1e-12)
    assert result["p_one_sided"] == pytest.approx(reference.pvalue, rel=1e-10)


def test_one_seed_is_the_paired_t_on_items():
    rng = np.random.default_rng(1)
    d = rng.normal(0.2, 1.0, (1, 30))
    result = calibrated_interval(d, rng.normal(size=(1, 30)))
    reference = sps.ttest_1samp(d[0], 0.0)
    assert result["df"] == 29
    assert result["p_two_sided"] == pytest.approx(reference.pvalue, rel=1e-10)


def test_item_term_enters_with_satterthwaite_df_by_hand():
    rng = np.random.default_rng(2)
    d = rng.normal(size=(3, 10)) + 3 * rng.normal(size=(1, 10))  # strong item × arm effect
    ms = anova_mean_squares(d)
    variance, df = mean_variance(ms)
    cells = 30
    seed, item, res = ms["ms_seed"] / cells, ms["ms_item"] / cells, ms["ms_res"] / cells
    assert ms["ms_item"] / ms["ms_res"] > sps.f.ppf(0.90, 9, 18)  # the F test rejects at 10 %
    assert variance == pytest.approx(seed + item - res)
    bound = seed * 2 / sps.chi2.ppf(0.3, 2)
    expected = (bound + item - res) ** 2 / (bound**2 / 2 + item**2 / 9 + res**2 / 18)
    assert df == pytest.approx(min(expected, 2 + 9))


def test_interval_excludes_zero_when_the_two_sided_test_rejects():
    design = Design(n_seeds=3, n_items=20, sigma_seed=0.3)
    cells = simulate_cells(design, -0.3, 0.3, 500, np.random.default_rng(3))
    out = batch_intervals(cells, ARMS, rng=np.random.default_rng(4), draws=4000)["combined"]
    excludes = (out["ci"][:, 0] > 0) | (out["ci"][:, 1] < 0)
    agree = excludes == (out["p_two_sided"] <= 0.05)
    assert np.all(agree | (np.abs(out["p_two_sided"] - 0.05) < 0.02))
    assert agree.mean() >= 0.95  # disagreements only where p is within Monte-Carlo error of 0.05


def test_primary_report_carries_the_calibrated_line_with_the_same_point_estimates():
    design = Design(n_seeds=3, n_items=12)
    cells = simulate_cells(design, -0.5, 0.5, 1, np.random.default_rng(5))[0]
    rows = cell_rows(cells)
    report = primary_report(rows, n_resamples=200)
    entry = report["families"]["f"]["m"]
    cal = entry["calibrated"]
    for key in ("plus", "minus", "combined_directional"):
        assert cal[key]["d"] == pytest.approx(entry[key]["d"], rel=1e-12)
        assert cal[key]["ci"][0] < cal[key]["d"] < cal[key]["ci"][1]
        assert (cal[key]["n_seeds"], cal[key]["n_items"]) == (3, 12)
    d = (cells[1] - cells[0]) / 2
    expected = calibrated_interval(d, cells[2])
    assert cal["combined_directional"]["p_one_sided"] == pytest.approx(
        float(expected["p_one_sided"]), rel=1e-12
    )
    assert report["calibrated_holm"]["m"]["f"]["p"] == cal["combined_directional"]["p_one_sided"]
    assert set(entry["variance_components"]["components"]) == {
        "sigma_item",
        "sigma_item_arm",
        "sigma_seed",
        "sigma_noise",
    }


def test_an_empty_cell_drops_its_item_from_the_calibrated_block():
    design = Design(n_seeds=3, n_items=6)
    cells = simulate_cells(design, 0, 0, 1, np.random.default_rng(6))[0]
    rows = cell_rows(cells, missing=(("plus", 1, 4),))
    with pytest.warns(Warning):
        cal = primary_report(rows, n_resamples=50)["families"]["f"]["m"]["calibrated"]
    assert cal["plus"]["n_items"] == 5 and "1 base item" in cal["plus"]["left_out"]
    assert cal["minus"]["n_items"] == 6 and "left_out" not in cal["minus"]


def test_variance_components_are_unbiased_on_average():
    design = Design(
        n_seeds=4, n_items=30, sigma_item=0.8, sigma_item_arm=0.4, sigma_seed=0.5, sigma_noise=0.6
    )
    cells = simulate_cells(design, 0, 0, 300, np.random.default_rng(7))
    estimates = np.array(
        [
            [getattr(c, k) ** 2 for k in ("sigma_item", "sigma_item_arm", "sigma_seed", "sigma_noise")]
            for c in (estimate_components(x)[0] for x in cells)
        ]
    )
    truth = np.array([0.64, 0.16, 0.25, 0.36])
    # truncation at 0 biases small components up a little; 300 studies give ~3 % SE on the big ones
    assert estimates.mean(axis=0) == pytest.approx(truth, rel=0.15, abs=0.03)
    assert estimate_components(cells[0, :, :1])[0] is None  # one seed: not estimable


def test_calibrated_keeps_its_level_at_three_seeds_and_48_items_where_the_bootstrap_does_not():
    """The issue's acceptance check (seeded). Calibrated: 4,000 null studies (closed form, fast); the
    pre-registered bootstrap: 300 studies × 2 families at 300 resamples, reported beside it."""
    design = Design(n_seeds=3, n_items=48, sigma_seed=0.5)
    cells = simulate_cells(design, 0.0, 0.0, 4000, np.random.default_rng(8))
    out = batch_intervals(cells, ARMS, rng=np.random.default_rng(9), draws=1000)
    coverage = np.mean([np.mean((o["ci"][:, 0] <= 0) & (0 <= o["ci"][:, 1])) for o in out.values()])
    fpr = np.mean([np.mean(o["p_one_sided"] <= 0.05) for o in out.values()])  # 12,000 one-sided tests
    pre = run(
        Design(n_studies=300, n_seeds=3, n_items=48, sigma_seed=0.5, n_resamples=300, seed=10), ("null",)
    )["scenarios"]["null"]
    print(
        f"3 × 48, null: calibrated coverage {coverage:.3f}, FPR {fpr:.3f}; pre-registered coverage "
        f"{pre['coverage_combined']:.3f}, FPR {pre['directional_rejection_rate']:.3f}"
    )
    assert 0.93 <= coverage <= 0.97
    assert fpr <= 0.06
    assert (
        pre["coverage_combined"] < 0.90 and pre["directional_rejection_rate"] > 0.08
    )  # the documented failure
    assert 0.93 <= pre["calibrated"]["coverage_combined"] <= 0.97  # the same check inside simulate's run


def test_two_seeds_take_the_seed_term_at_its_upper_78_percent_bound_in_the_df():
    rng = np.random.default_rng(3)
    d = rng.normal(size=(2, 12)) + 3 * rng.normal(size=(1, 12))
    ms = anova_mean_squares(d)
    variance, df = mean_variance(ms)
    seed, item, res = ms["ms_seed"] / 24, ms["ms_item"] / 24, ms["ms_res"] / 24
    bound = seed / sps.chi2.ppf(0.22, 1)
    expected = (bound + item - res) ** 2 / (bound**2 + item**2 / 11 + res**2 / 11)
    assert variance == pytest.approx(seed + item - res)
    assert df == pytest.approx(min(expected, 1 + 11))


def test_the_item_term_is_left_out_when_its_f_test_does_not_reject_at_10_percent():
    rng = np.random.default_rng(4)
    for _ in range(50):
        ms = anova_mean_squares(rng.normal(size=(3, 20)))
        variance, df = mean_variance(ms)
        rejects = ms["ms_item"] / ms["ms_res"] > sps.f.ppf(0.90, 19, 38)
        assert df == pytest.approx(2.0) or rejects
        assert variance == pytest.approx(ms["ms_seed"] / 60) or rejects


def test_the_design_once_out_of_band_is_in_band():
    """10 seeds × 18 items, item × arm variance and no seed variance: with the 5 % pre-test the seed-level
    t alone under-covered (0.924, false-positive rate 0.066); the 10 % pre-test brings the item term in."""
    from lbt.stats.compare import in_band, null_rates

    rates = null_rates("item×arm, no seed", 10, 18, 4000, ["calibrated"], seed=11)["calibrated"]
    assert in_band(rates), rates


def test_band_summary_counts_and_names_the_designs_out_of_band():
    from lbt.stats.compare import band_summary, in_band, validation_mixtures

    rows = [{"mixture": "m", "n_seeds": 2, "n_items": 18, "null": {"x": {"coverage": 0.95, "fpr": 0.05}}},
            {"mixture": "m", "n_seeds": 3, "n_items": 18, "null": {"x": {"coverage": 0.975, "fpr": 0.02}}},
            {"mixture": "n", "n_seeds": 5, "n_items": 48, "null": {"x": {"coverage": 0.94, "fpr": 0.061}}}]
    summary = band_summary(rows)["x"]
    assert (summary["in_band"], summary["designs"]) == (1, 3)
    assert summary["out_of_band"] == ["m 3×18", "n 5×48"]
    assert summary["coverage_min"] == 0.94 and summary["fpr_max"] == 0.061
    assert in_band({"coverage": 0.93, "fpr": 0.06}) and not in_band({"coverage": 0.929, "fpr": 0.0})
    held_out = validation_mixtures()
    assert len(held_out) == 6 and held_out == validation_mixtures()
