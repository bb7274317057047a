"""Point estimates of the pre-registered effect sizes, on cell values (see `aggregate`).

Definitions (the bootstrap in `bootstrap.py` computes exactly these on every resample):

- An arm's mean is the mean of its finite cell values over all (seed, base item) cells.
- The standardiser is the neutral arm's *cell-level* sample SD (ddof=1) over all its (seed, base item)
  cells — the "item-level values" of the study, one per (arm, base item, seed). It therefore contains
  seed-to-seed as well as item-to-item variation. (The alternative, the SD of item means over seeds,
  would shrink with the number of seeds; we do not use it anywhere.)
- `d(arm) = (mean_arm − mean_neutral) / sd_neutral`.
- `combined = (d(minus) − d(plus)) / 2`
  `= ((minus − neutral) − (plus − neutral)) / (2 · sd_neutral)`, predicted positive.

Sums use `math.fsum` (correctly rounded, order-independent), so any implementation of these formulas
reproduces the point estimates bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def fmean(values: Sequence[float]) -> float:
    """Correctly rounded mean."""
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def sample_sd(values: Sequence[float]) -> float:
    """Sample SD (ddof=1) with correctly rounded sums."""
    if len(values) < 2:
        raise ValueError(f"SD needs at least 2 values, got {len(values)}")
    mean = fmean(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def effect_size(arm_values: Sequence[float], neutral_values: Sequence[float]) -> float:
    """d of an arm against neutral, standardised by the neutral cell-level SD."""
    sd = sample_sd(neutral_values)
    if sd == 0:
        return math.nan
    return (fmean(arm_values) - fmean(neutral_values)) / sd


def combined_directional(d_plus: float, d_minus: float) -> float:
    """((minus − neutral) − (plus − neutral)) / 2 in neutral-SD units; positive = the predicted order."""
    return (d_minus - d_plus) / 2
