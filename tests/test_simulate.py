"""lbt.stats.simulate: the bootstrap keeps its coverage where it is valid, and the documented failure at
3 seeds shows up (small simulations; the full ≥ 1,000-study run is `python -m lbt.stats.simulate`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lbt.stats import primary_report
from lbt.stats.simulate import ARMS, Design, analyse_batch, main, run, simulate_cells


def binomial_band(p: float, n: int, z: float = 3.0) -> tuple[float, float]:
    half = z * math.sqrt(p * (1 - p) / n)
    return p - half, p + half


def test_combined_coverage_is_nominal_with_many_seeds_and_items():
    # valid regime: 12 seeds × 20 items, cell noise dominating the neutral SD (see docs/statistics.md)
    design = Design(
        n_studies=150,
        n_seeds=12,
        n_items=20,
        sigma_item=0.3,
        sigma_seed=0.3,
        sigma_noise=1.0,
        n_resamples=300,
        seed=11,
    )
    result = run(design, ("effect",))["scenarios"]["effect"]
    n = result["n_family_studies"]
    lo, hi = binomial_band(0.95, n)
    assert n == 300
    assert lo <= result["coverage_combined"] <= hi
    assert result["directional_rejection_rate"] > 0.9  # d = ∓0.5 is found


def test_three_seeds_under_cover_and_inflate_false_positives_as_documented():
    design = Design(n_studies=150, n_seeds=3, n_items=18, sigma_seed=0.5, n_resamples=300, seed=12)
    result = run(design, ("null",))["scenarios"]["null"]
    lo, _ = binomial_band(0.95, result["n_family_studies"])
    assert result["coverage_combined"] < lo
    assert result["directional_rejection_rate"] > 0.05 + 3 * math.sqrt(0.05 * 0.95 / 300)


def cell_rows(cells: np.ndarray, missing: tuple = ()) -> list[dict]:
    """Rows of one family and measure from simulated (arm, seed, item) cells; the cells named in
    `missing` as (arm, seed, item) hold NaN."""
    n_arms, n_seeds, n_items = cells.shape
    return [
        {"family": "f", "arm": arm, "seed": s, "base_item": i, "domain": "d", "measure": "m",
         "stance": math.nan if (arm, s, i) in missing else float(cells[a, s, i])}
        for a, arm in enumerate(ARMS[:n_arms])
        for s in range(n_seeds)
        for i in range(n_items)
    ]


def test_simulated_point_estimates_equal_primary_report():
    design = Design(n_seeds=3, n_items=5, n_resamples=50)
    rng = np.random.default_rng(0)
    cells = simulate_cells(design, -0.5, 0.5, 1, rng)
    batch = analyse_batch(design, cells, rng)
    rows = cell_rows(cells[0])
    entry = primary_report(rows, n_resamples=50)["families"]["f"]["m"]
    assert entry["plus"]["d"] == pytest.approx(batch["d_plus"][0], rel=1e-12)
    assert entry["minus"]["d"] == pytest.approx(batch["d_minus"][0], rel=1e-12)
    assert entry["combined_directional"]["d"] == pytest.approx(batch["combined"][0], rel=1e-12)


def test_cli_prints_every_scenario(capsys, tmp_path):
    out = tmp_path / "sim.json"
    assert main(["--studies", "10", "--resamples", "50", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("null", "effect", "boundary"):
        assert name in printed
    assert out.exists()
