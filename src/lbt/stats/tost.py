"""TOST equivalence of a framed arm and neutral within ±SESOI, on cell values.

With arm cells x (n_x of them) and neutral cells y (n_y):

- diff = mean(x) − mean(y); bound Δ = sesoi_d · sd(y) (the SESOI in d units converted to stance units
  with the same neutral SD that standardises d);
- SE = sqrt(s_x²/n_x + s_y²/n_y) (sample variances, ddof=1);
- df = n_x + n_y − 2 as in the study, or the Welch–Satterthwaite df with `welch=True`;
- lower test H0: diff ≤ −Δ, t_l = (diff + Δ)/SE, p_lower = P(T ≥ t_l);
  upper test H0: diff ≥ +Δ, t_u = (diff − Δ)/SE, p_upper = P(T ≤ t_u);
- equivalent when both p < alpha.

The cells are treated as independent (as in the study); with seed-level variation they are not, which
makes TOST liberal — `simulate` measures by how much.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class TostResult:
    p_lower: float
    p_upper: float
    equivalent: bool
    diff: float
    bound: float
    se: float
    df: float

    def as_dict(self) -> dict:
        return asdict(self)


def tost_from_moments(
    mean_x: np.ndarray,
    var_x: np.ndarray,
    n_x: np.ndarray,
    mean_y: np.ndarray,
    var_y: np.ndarray,
    n_y: np.ndarray,
    sesoi_d: float = 0.2,
    welch: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised core: (p_lower, p_upper, bound, se, df) from means, ddof=1 variances and counts."""
    diff = mean_x - mean_y
    bound = sesoi_d * np.sqrt(var_y)
    a, b = var_x / n_x, var_y / n_y
    se = np.sqrt(a + b)
    if welch:
        df = (a + b) ** 2 / (a**2 / (n_x - 1) + b**2 / (n_y - 1))
    else:
        df = np.asarray(n_x + n_y - 2, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_lower = sps.t.sf((diff + bound) / se, df)
        p_upper = sps.t.cdf((diff - bound) / se, df)
    return p_lower, p_upper, bound, se, df


def tost(
    arm_values: Sequence[float],
    neutral_values: Sequence[float],
    sesoi_d: float = 0.2,
    alpha: float = 0.05,
    welch: bool = False,
) -> TostResult:
    """TOST of an arm's cells against the neutral cells (see module docstring)."""
    x = np.asarray(arm_values, dtype=float)
    y = np.asarray(neutral_values, dtype=float)
    if x.size < 2 or y.size < 2:
        raise ValueError(f"TOST needs at least 2 values per arm, got {x.size} and {y.size}")
    p_lower, p_upper, bound, se, df = tost_from_moments(
        x.mean(), x.var(ddof=1), x.size, y.mean(), y.var(ddof=1), y.size, sesoi_d, welch
    )
    p_lower, p_upper = float(p_lower), float(p_upper)
    return TostResult(
        p_lower=p_lower,
        p_upper=p_upper,
        equivalent=bool(p_lower < alpha and p_upper < alpha),
        diff=float(x.mean() - y.mean()),
        bound=float(bound),
        se=float(se),
        df=float(df),
    )
