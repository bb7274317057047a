"""Variance components of a sweep's cells, and the design check: how well does each method do on a
study shaped like this one?

The components are those of the simulation's model (`lbt.stats.simulate`),

    y[a, s, i] = mu[a] + w[i] + v[a, i] + u[a, s] + e[a, s, i],

estimated by the method of moments on the complete (seed, item) block of all arms:

- per arm, the two-way ANOVA mean squares MS_seed, MS_item, MS_res of y[a] (df S−1, N−1,
  (S−1)(N−1)); E MS_res = σ_noise², E MS_seed = σ_noise² + N σ_seed²,
  E MS_item = σ_noise² + S (σ_item² + σ_item×arm²);
- σ_item² (shared by the arms) = the mean over arm pairs of the covariance, across items, of the two
  arms' item means (seed and noise terms are independent between arms);
- σ_noise² = mean MS_res; σ_seed² = mean (MS_seed − MS_res)/N; σ_item×arm² = mean (MS_item −
  MS_res)/S − σ_item²; negative estimates are set to 0 (and said so).

With 3 seeds σ_seed² rests on 2 df per arm: it is a rough number, and the design check built on it is
a plausibility check of this design, not a measurement of the true coverage.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lbt.stats.aggregate import CellTable
from lbt.stats.calibrated import anova_mean_squares, complete_block

COMPONENTS = ("sigma_item", "sigma_item_arm", "sigma_seed", "sigma_noise")


@dataclass(frozen=True)
class Components:
    """Standard deviations (stance units) of the simulation model's four random effects."""

    sigma_item: float
    sigma_item_arm: float
    sigma_seed: float
    sigma_noise: float

    @property
    def sigma_total(self) -> float:
        return float(np.sqrt(sum(getattr(self, name) ** 2 for name in COMPONENTS)))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def estimate_components(values: np.ndarray) -> tuple[Components | None, list[str]]:
    """Components from complete cells values[arm, S, N] (≥ 2 arms, ≥ 2 seeds, ≥ 2 items); (None,
    reasons) when they cannot be estimated. Also returns notes (components set to 0)."""
    n_arms, n_seeds, n_items = values.shape
    if n_arms < 2 or n_seeds < 2 or n_items < 2:
        reason = (
            f"variance components need ≥ 2 arms, ≥ 2 seeds and ≥ 2 complete items (have {n_arms} arm(s), "
            f"{n_seeds} seed(s), {n_items} item(s)): seed and noise variation cannot be told apart"
        )
        return None, [reason]
    ms = anova_mean_squares(values)  # per arm
    noise = float(ms["ms_res"].mean())
    seed = float(((ms["ms_seed"] - ms["ms_res"]) / n_items).mean())
    item_level = float(((ms["ms_item"] - ms["ms_res"]) / n_seeds).mean())
    item_means = values.mean(axis=1)  # (arm, item)
    shared = float(
        np.mean(
            [np.cov(item_means[a], item_means[b])[0, 1] for a, b in itertools.combinations(range(n_arms), 2)]
        )
    )
    interaction = item_level - max(shared, 0.0)
    notes = []
    raw = {"sigma_item": shared, "sigma_item_arm": interaction, "sigma_seed": seed, "sigma_noise": noise}
    for name, variance in raw.items():
        if variance < 0:
            notes.append(f"{name}² estimated negative ({variance:.3g}); set to 0")
    return Components(**{name: float(np.sqrt(max(v, 0.0))) for name, v in raw.items()}), notes


def table_components(table: CellTable) -> tuple[Components | None, dict[str, Any]]:
    """Components of one (family, measure) from the complete (seed, item) block of all its arms."""
    index, block = complete_block(list(table.values), table.seeds, table.items)
    cells = np.stack([arm[index] for arm in table.values])
    components, notes = estimate_components(cells)
    info = {
        "n_seeds": len(block.seeds),
        "n_items": len(block.items),
        "arms": list(table.arms),
        "notes": notes,
    }
    if block.dropped_seeds or block.dropped_items:
        info["notes"].append(
            f"estimated on {len(block.seeds)} seed(s) × {len(block.items)} item(s): "
            f"{len(block.dropped_seeds)} seed(s) and {block.dropped_items} item(s) with empty cells left out"
        )
    return components, info


def design_check(
    components: Components,
    n_seeds: int,
    n_items: int,
    effect: tuple[float, float] = (0.0, 0.0),
    n_studies: int = 400,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    item_draw: str = "per_seed",
) -> dict[str, Any]:
    """Simulate `n_studies` single-family studies of this design (S seeds × N items, these components)
    under the null and at `effect` = (d_plus, d_minus) (scenario "at_estimate", when not 0), and report
    each method's coverage and the directional test's rejection rate: its false-positive rate under
    the null, its power at the estimate."""
    from lbt.stats.simulate import Design, run_scenario  # simulate imports this package's modules

    design = Design(
        n_studies=n_studies,
        n_families=1,
        n_seeds=n_seeds,
        n_items=n_items,
        n_resamples=n_resamples,
        alpha=alpha,
        item_draw=item_draw,  # type: ignore[arg-type]
        seed=seed,
        **components.as_dict(),
    )
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {
        "n_studies": n_studies,
        "n_resamples": n_resamples,
        "n_seeds": n_seeds,
        "n_items": n_items,
        "components": components.as_dict(),
        "effect": {"d_plus": effect[0], "d_minus": effect[1]},
    }
    scenarios = {"null": (0.0, 0.0)}
    if any(abs(x) > 0 for x in effect):
        scenarios["at_estimate"] = effect
    for name, (d_plus, d_minus) in scenarios.items():
        result = run_scenario(design, d_plus, d_minus, rng)
        out[name] = {
            "preregistered": {
                "coverage_d_plus": result["coverage_d_plus"],
                "coverage_d_minus": result["coverage_d_minus"],
                "coverage_combined": result["coverage_combined"],
                "directional_rejection_rate": result["directional_rejection_rate"],
            },
            "calibrated": {
                key: result["calibrated"][key]
                for key in (
                    "coverage_d_plus",
                    "coverage_d_minus",
                    "coverage_combined",
                    "directional_rejection_rate",
                )
            },
        }
    return out
