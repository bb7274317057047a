"""Self-check by simulation: do the pre-registered statistics keep their promises on this design?

`python -m lbt.stats.simulate [--studies 1000] [--seeds 3] [--items 18] [--resamples 1000] ...`

Generates whole studies with known effects and runs the same estimators as `primary_report` (the
same vectorised bootstrap, the same TOST), many studies at once. The generative model for the cell
value (one stance per arm, seed, base item — rows are averaged into cells, so row-level noise is part
of `sigma_noise`) is

    y[a, s, i] = mu[a] + w[i] + v[a, i] + u[a, s] + e[a, s, i]

with item effects w ~ N(0, sigma_item²) shared by all arms and seeds, optional item × arm interactions
v ~ N(0, sigma_item_arm²) shared by the seeds of an arm, seed effects u ~ N(0, sigma_seed²) per arm and
seed (a LoRA run), and cell noise e ~ N(0, sigma_noise²). The true effect sizes are
d[a] = (mu[a] − mu[neutral]) / sigma_total with sigma_total² the sum of the four variances (the SD of a
neutral cell in the population), and combined = (d[minus] − d[plus]) / 2. Families are independent
studies of the same design.

Beside the pre-registered figures it reports the calibrated method's (`lbt.stats.calibrated`, rows
`calib.`: coverage of its d intervals, its directional and Holm rejection rates) on the same studies.

Reported over all simulated family-studies, per scenario (null: d = 0; effect: d = ∓0.5; boundary:
d = ∓SESOI): coverage of the percentile CIs of d(plus), d(minus) and the combined estimate,
the one-sided directional test's rejection rate (its false-positive rate under the null), Holm's
family-wise rejection rate across the families, and the rate at which TOST declares equivalence
(power under the null, its real size at the SESOI boundary, which should be ≤ alpha).

Where the bootstrap is valid, and where not (see docs/statistics.md for measured numbers):
- With many seeds and items (e.g. 20 × 30) and no item × arm interaction, CI coverage is close to
  nominal; resampling at both levels counts cell noise twice, so it errs slightly conservative when
  `sigma_noise²/n_items` is not small against `sigma_seed²`.
- With 3 seeds (the study's design) the seed level is resampled from 3 values: the bootstrap variance
  of a mean of 3 clusters is 2/3 of the true one and only 10 distinct seed multisets exist, so CIs
  under-cover and the directional test is liberal whenever seed-to-seed variation matters.
- Item × arm interactions persist across seeds, but items are redrawn independently within each seed
  slot, which shrinks their contribution by the number of seeds: under-coverage even with many seeds
  (`--item-draw shared` shows the alternative).
- TOST treats all cells as independent; with seed-level variation it declares equivalence too often.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from lbt.stats.bootstrap import ItemDraw, bootstrap_effects, percentile_ci, share_at_or_below_zero
from lbt.stats.calibrated import batch_intervals
from lbt.stats.tost import tost_from_moments
from lbt.study import MINUS, PLUS, STUDY_ARMS

ARMS = STUDY_ARMS  # the cells' arm axis: plus, minus, neutral (columns 0, 1, 2)


@dataclass(frozen=True)
class Design:
    n_studies: int = 1000
    n_families: int = 2
    n_seeds: int = 3
    n_items: int = 18
    sigma_item: float = 1.0
    sigma_item_arm: float = 0.0
    sigma_seed: float = 0.3
    sigma_noise: float = 0.7
    n_resamples: int = 1000
    sesoi_d: float = 0.2
    alpha: float = 0.05
    item_draw: ItemDraw = "per_seed"
    seed: int = 0
    calibrated_draws: int = 2000  # Monte-Carlo draws of the calibrated interval of d

    @property
    def sigma_total(self) -> float:
        return float(
            np.sqrt(self.sigma_item**2 + self.sigma_item_arm**2 + self.sigma_seed**2 + self.sigma_noise**2)
        )


SCENARIOS = {"null": (0.0, 0.0), "effect": (-0.5, 0.5), "boundary": None}  # boundary: ∓sesoi_d


def simulate_cells(
    design: Design, d_plus: float, d_minus: float, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Cell values for n independent family-studies, shape (n, arm, seed, item)."""
    s, k = design.n_seeds, design.n_items
    mu = np.array([d_plus, d_minus, 0.0]) * design.sigma_total
    item = rng.normal(0, design.sigma_item, (n, 1, 1, k))
    item_arm = rng.normal(0, design.sigma_item_arm, (n, 3, 1, k))
    seed = rng.normal(0, design.sigma_seed, (n, 3, s, 1))
    noise = rng.normal(0, design.sigma_noise, (n, 3, s, k))
    return mu[None, :, None, None] + item + item_arm + seed + noise


def analyse_batch(design: Design, cells: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Point estimates, CIs, directional p and TOST verdicts for a batch of family-studies."""
    flat = cells.reshape(cells.shape[0], 3, -1)
    mean = flat.mean(axis=-1)
    var = flat.var(axis=-1, ddof=1)
    sd_neutral = np.sqrt(var[:, 2])
    d_plus = (mean[:, 0] - mean[:, 2]) / sd_neutral
    d_minus = (mean[:, 1] - mean[:, 2]) / sd_neutral
    draws = bootstrap_effects(
        cells,
        ARMS,
        design.n_resamples,
        rng,
        seed_level=design.n_seeds > 1,
        item_draw=design.item_draw,
        max_elements=1 << 22,
    )
    level = 1 - design.alpha
    out = {
        "d_plus": d_plus,
        "d_minus": d_minus,
        "combined": (d_minus - d_plus) / 2,
        "ci_plus": percentile_ci(draws[PLUS.name], level),
        "ci_minus": percentile_ci(draws[MINUS.name], level),
        "ci_combined": percentile_ci(draws["combined"], level),
        "p_directional": share_at_or_below_zero(draws["combined"]),
    }
    calibrated = batch_intervals(cells, ARMS, level, rng, draws=design.calibrated_draws)
    out.update(
        cal_ci_plus=calibrated[PLUS.name]["ci"],
        cal_ci_minus=calibrated[MINUS.name]["ci"],
        cal_ci_combined=calibrated["combined"]["ci"],
        cal_p_directional=calibrated["combined"]["p_one_sided"],
    )
    n = flat.shape[-1]
    for arm, column in (("plus", 0), ("minus", 1)):
        p_lower, p_upper, *_ = tost_from_moments(
            mean[:, column], var[:, column], n, mean[:, 2], var[:, 2], n, design.sesoi_d
        )
        out[f"equivalent_{arm}"] = (p_lower < design.alpha) & (p_upper < design.alpha)
    return out


def run_scenario(
    design: Design, d_plus: float, d_minus: float, rng: np.random.Generator, max_elements: int = 1 << 22
) -> dict:
    """Simulate n_studies × n_families family-studies in memory-bounded chunks and summarise."""
    total = design.n_studies * design.n_families
    cells = design.n_seeds * design.n_items
    chunk = max(1, max_elements // (cells * design.n_resamples))
    parts = []
    for start in range(0, total, chunk):
        batch = simulate_cells(design, d_plus, d_minus, min(chunk, total - start), rng)
        parts.append(analyse_batch(design, batch, rng))
    res = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    truth = {"plus": d_plus, "minus": d_minus, "combined": (d_minus - d_plus) / 2}

    def covered(key: str, prefix: str = "") -> float:
        ci = res[f"{prefix}ci_{key}"]
        return float(np.mean((ci[:, 0] <= truth[key]) & (truth[key] <= ci[:, 1])))

    def holm_any(p: np.ndarray) -> float:
        # Holm rejects at least one family iff the smallest p is ≤ alpha / m
        by_study = p.reshape(design.n_studies, design.n_families)
        return float((by_study.min(axis=1) <= design.alpha / design.n_families).mean())

    rejected = res["p_directional"] <= design.alpha
    calibrated = {
        "coverage_d_plus": covered("plus", "cal_"),
        "coverage_d_minus": covered("minus", "cal_"),
        "coverage_combined": covered("combined", "cal_"),
        "directional_rejection_rate": float((res["cal_p_directional"] <= design.alpha).mean()),
        "holm_familywise_rejection_rate": holm_any(res["cal_p_directional"]),
    }
    return {
        "d_plus": d_plus,
        "d_minus": d_minus,
        "n_family_studies": total,
        "coverage_d_plus": covered("plus"),
        "coverage_d_minus": covered("minus"),
        "coverage_combined": covered("combined"),
        "mean_combined_estimate": float(res["combined"].mean()),
        "directional_rejection_rate": float(rejected.mean()),
        "holm_familywise_rejection_rate": holm_any(res["p_directional"]),
        "tost_equivalence_rate_plus": float(res["equivalent_plus"].mean()),
        "tost_equivalence_rate_minus": float(res["equivalent_minus"].mean()),
        "calibrated": calibrated,
    }


def run(design: Design, scenarios: tuple[str, ...] = ("null", "effect", "boundary")) -> dict:
    """All requested scenarios; one random stream for the whole run (deterministic given design.seed)."""
    rng = np.random.default_rng(design.seed)
    results = {}
    for name in scenarios:
        effect = SCENARIOS[name] or (-design.sesoi_d, design.sesoi_d)
        results[name] = run_scenario(design, *effect, rng)
    return {"design": asdict(design), "sigma_total": design.sigma_total, "scenarios": results}


def format_results(results: dict) -> str:
    design = results["design"]
    lines = [
        (
            f"{design['n_studies']} studies × {design['n_families']} families; {design['n_seeds']} seeds × "
            f"{design['n_items']} base items; sigma item {design['sigma_item']}, item×arm "
            f"{design['sigma_item_arm']}, seed {design['sigma_seed']}, noise {design['sigma_noise']}; "
            f"{design['n_resamples']} resamples, item draw {design['item_draw']}"
        ),
        (
            f"{'scenario':<10}{'cov d+':>8}{'cov d-':>8}{'cov comb':>10}{'dir rej':>9}{'holm fw':>9}"
            f"{'TOST eq+':>10}{'TOST eq-':>10}"
        ),
    ]
    for name, r in results["scenarios"].items():
        lines.append(
            f"{name:<10}{r['coverage_d_plus']:>8.3f}{r['coverage_d_minus']:>8.3f}{r['coverage_combined']:>10.3f}"
            f"{r['directional_rejection_rate']:>9.3f}{r['holm_familywise_rejection_rate']:>9.3f}"
            f"{r['tost_equivalence_rate_plus']:>10.3f}{r['tost_equivalence_rate_minus']:>10.3f}"
        )
        c = r["calibrated"]
        lines.append(
            f"{'  calib.':<10}{c['coverage_d_plus']:>8.3f}{c['coverage_d_minus']:>8.3f}"
            f"{c['coverage_combined']:>10.3f}{c['directional_rejection_rate']:>9.3f}"
            f"{c['holm_familywise_rejection_rate']:>9.3f}"
        )
    n = design["n_studies"] * design["n_families"]
    lines.append(f"binomial SE of a 95 % coverage over {n} family-studies: {np.sqrt(0.95 * 0.05 / n):.4f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[Design, argparse.Namespace]:
    base = Design()
    parser = argparse.ArgumentParser(prog="python -m lbt.stats.simulate", description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=base.n_studies)
    parser.add_argument("--families", type=int, default=base.n_families)
    parser.add_argument("--seeds", type=int, default=base.n_seeds)
    parser.add_argument("--items", type=int, default=base.n_items)
    parser.add_argument("--sigma-item", type=float, default=base.sigma_item)
    parser.add_argument("--sigma-item-arm", type=float, default=base.sigma_item_arm)
    parser.add_argument("--sigma-seed", type=float, default=base.sigma_seed)
    parser.add_argument("--sigma-noise", type=float, default=base.sigma_noise)
    parser.add_argument(
        "--resamples",
        type=int,
        default=base.n_resamples,
        help="bootstrap resamples per simulated study (fewer than the analysis' 10,000)",
    )
    parser.add_argument("--sesoi-d", type=float, default=base.sesoi_d)
    parser.add_argument("--alpha", type=float, default=base.alpha)
    parser.add_argument("--item-draw", choices=["per_seed", "shared"], default=base.item_draw)
    parser.add_argument("--scenarios", default="null,effect,boundary")
    parser.add_argument("--seed", type=int, default=base.seed)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    design = replace(
        base,
        n_studies=args.studies,
        n_families=args.families,
        n_seeds=args.seeds,
        n_items=args.items,
        sigma_item=args.sigma_item,
        sigma_item_arm=args.sigma_item_arm,
        sigma_seed=args.sigma_seed,
        sigma_noise=args.sigma_noise,
        n_resamples=args.resamples,
        sesoi_d=args.sesoi_d,
        alpha=args.alpha,
        item_draw=args.item_draw,
        seed=args.seed,
    )
    return design, args


def main(argv: list[str] | None = None) -> int:
    design, args = parse_args(argv)
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = run(design, scenarios)
    results["wall_time_s"] = time.perf_counter() - started
    print(format_results(results))
    print(f"wall time {results['wall_time_s']:.1f} s")
    if args.json:
        with open(args.json, "x") as handle:  # never overwrite an earlier result
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
