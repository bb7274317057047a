"""lbt.stats.plan: the closed-form power against the paired t test (seed variance 0, one seed) worked out
with scipy and by simulation, against the calibrated test's simulated rejection rate with seed
variance, and the command line on defaults and on a pilot report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as sps

from lbt.stats.calibrated import batch_intervals
from lbt.stats.plan import main, power
from lbt.stats.simulate import ARMS, Design, simulate_cells
from lbt.stats.variance import Components


def test_one_seed_without_seed_variance_is_the_paired_t_test_power():
    comp = Components(sigma_item=1.0, sigma_item_arm=0.0, sigma_seed=0.0, sigma_noise=0.7)
    n, sesoi, alpha = 30, 0.4, 0.05
    # combined: D = (y_minus − y_plus)/2 has SD sqrt(2·0.49)/2; effect 0.4 · sigma_total
    sd_d = np.sqrt(2 * 0.49) / 2
    ncp = sesoi * comp.sigma_total / (sd_d / np.sqrt(n))
    expected = sps.nct.sf(sps.t.ppf(1 - alpha, n - 1), n - 1, ncp)
    got = power(comp, 1, n, sesoi, alpha, "combined")
    assert got["power"] == pytest.approx(expected, rel=1e-12) and got["df"] == n - 1
    # and by simulation of scipy's one-sample t test on the paired differences
    rng = np.random.default_rng(0)
    d = rng.normal(sesoi * comp.sigma_total, sd_d, (20000, n))
    rejected = sps.ttest_1samp(d, 0.0, axis=1, alternative="greater").pvalue <= alpha
    assert rejected.mean() == pytest.approx(got["power"], abs=0.01)


def test_power_agrees_with_the_simulated_calibrated_test_with_seed_variance():
    comp = Components(sigma_item=1.0, sigma_item_arm=0.0, sigma_seed=0.3, sigma_noise=0.7)
    design = Design(n_seeds=5, n_items=24, **comp.as_dict())
    d = 0.3
    cells = simulate_cells(design, -d, d, 4000, np.random.default_rng(1))
    p = batch_intervals(cells, ARMS, rng=np.random.default_rng(2), draws=200)["combined"]["p_one_sided"]
    assert np.mean(p <= 0.05) == pytest.approx(power(comp, 5, 24, d, 0.05)["power"], abs=0.03)


def test_cli_defaults_and_pilot(tmp_path, capsys):
    assert main(["--coverage-studies", "0", "--seeds", "2,3,10", "--items", "18,48"]) == 0
    assert "smallest design with power" in capsys.readouterr().out
    pilot = {
        "primary": {
            "families": {
                "qwen": {
                    "letter_logprob": {
                        "variance_components": {
                            "components": {
                                "sigma_item": 0.5,
                                "sigma_item_arm": 0.0,
                                "sigma_seed": 0.05,
                                "sigma_noise": 0.5,
                            }
                        }
                    }
                }
            }
        }
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(pilot))
    out = tmp_path / "plan"
    assert (
        main(
            [
                "--pilot",
                str(path),
                "--coverage-studies",
                "20",
                "--seeds",
                "2,3",
                "--items",
                "18,48",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "qwen: components" in printed and (out / "plan.png").stat().st_size > 1000
    saved = json.loads((out / "plan.json").read_text())
    assert set(saved["qwen: "]["bootstrap_coverage"]) == {"2", "3"}
    assert main(["--pilot", str(path), "--measure", "likert"]) == 2
