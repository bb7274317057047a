"""Calibrated intervals and tests beside the pre-registered bootstrap (closed form, vectorised).

Why: with 3 seeds the pre-registered percentile bootstrap resamples the seed level from three values;
its 95 % intervals cover ~80–88 % and its 5 % directional test fires ~9–11 % of the time under the null
(`python -m lbt.stats.simulate`, docs/statistics.md). This module gives, for the same point estimates,
an interval and a test that keep their level from 2 to 20 seeds (evidence: docs/statistics.md).

The model. Items are crossed with seeds (the same base items in every seed), so the paired difference
of two arms in cell (seed s, item i),

    D[s, i] = y[arm, s, i] − y[neutral, s, i]          (d of one framed arm)
    D[s, i] = (y[minus, s, i] − y[plus, s, i]) / 2     (the combined estimate; neutral cancels)

is  delta + A[s] + B[i] + E[s, i]: a seed effect (the two arms' LoRA runs), an item × arm effect and
cell noise. The estimate is mean D; with S seeds and N items

    Var(mean D) = σ_A²/S + σ_B²/N + σ_E²/(SN),

and with the two-way ANOVA mean squares MS_seed = N·var(seed means of D) (df S−1), MS_item =
S·var(item means) (df N−1) and MS_res (df (S−1)(N−1)):  E MS_seed/(SN) = σ_A²/S + σ_E²/(SN) and
E (MS_item − MS_res)/(SN) = σ_B²/N.

The test: t = mean D / √V with

- V = MS_seed/(SN) and df = S − 1 — the seed-level t on per-seed paired effects, exact when items do
  not interact with arms; plus, when the item × arm F test (MS_item/MS_res) rejects at 10 %,
- (MS_item − MS_res)/(SN), with Satterthwaite's df for the sum, computed with the seed term at its
  upper 70 % bound (a seed mean square from 1–2 df is often far below its expectation, and the plain
  plug-in df would then jump to the item df). Both constants were chosen on the simulation grid of
  docs/statistics.md and checked on designs outside it.

This is the crossed seed × item random-effects model (what a linear mixed model with crossed random
effects estimates on balanced data), with small-sample degrees of freedom; the closed form needs no
iterations and runs on thousands of simulated studies at once.

The interval of d. d = mean D / s, with s the pre-registered standardiser (the neutral cells' SD), so
the point estimates are the pre-registered ones. s is itself uncertain (with few seeds, very), so the
interval comes from the generalized pivot (mean D − T·√V) / Σ, T ~ t_df and Σ the pivot of the neutral
cells' population SD from their own ANOVA (σ_total² = σ_seed² + σ_item² + σ_noise²), by Monte Carlo.
Scaling by the positive Σ keeps the sign, so the interval excludes 0 exactly when the two-sided t test
rejects (up to Monte-Carlo error): the interval and the test agree.

One seed: no seed variance can be estimated; the test is the paired t on items (df N − 1) and the
entry says `seed_variance: "not estimable (one seed)"`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from lbt.stats.aggregate import CellTable
from lbt.study import FRAMED_ARMS, MINUS, PLUS, REFERENCE_ARM

METHOD = "crossed random effects (seed × item), Satterthwaite df"


def anova_mean_squares(d: np.ndarray) -> dict[str, np.ndarray]:
    """Two-way (seed × item, one value per cell) ANOVA of complete arrays d[..., S, N].

    Returns mean, MS_seed, MS_item, MS_res and their df (MS of a factor with one level is 0, df 0).
    """
    n_seeds, n_items = d.shape[-2], d.shape[-1]
    grand = d.mean(axis=(-2, -1))
    seed_means = d.mean(axis=-1)
    item_means = d.mean(axis=-2)
    seed_dev = seed_means - grand[..., None]
    item_dev = item_means - grand[..., None]
    resid = d - seed_means[..., :, None] - item_means[..., None, :] + grand[..., None, None]
    df_seed, df_item = n_seeds - 1, n_items - 1
    df_res = df_seed * df_item
    with np.errstate(invalid="ignore", divide="ignore"):
        ss_seed = n_items * (seed_dev**2).sum(axis=-1)
        ss_item = n_seeds * (item_dev**2).sum(axis=-1)
        ss_res = (resid**2).sum(axis=(-2, -1))
        out = {
            "mean": grand,
            "ss_seed": ss_seed,
            "ss_item": ss_item,
            "ss_res": ss_res,
            "ms_seed": ss_seed / df_seed if df_seed else np.zeros_like(grand),
            "ms_item": ss_item / df_item if df_item else np.zeros_like(grand),
            "ms_res": ss_res / df_res if df_res else np.zeros_like(grand),
        }
    out.update(df_seed=df_seed, df_item=df_item, df_res=df_res, n_seeds=n_seeds, n_items=n_items)
    return out


def satterthwaite_df(terms: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """df of Σ c_j·MS_j from its terms (c_j·MS_j, df_j): (Σ c_j MS_j)² / Σ (c_j MS_j)²/df_j."""
    total = sum(term for term, _ in terms)
    denom = sum(term**2 / df for term, df in terms if df > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total**2 / denom


# The item × arm term enters V when its F test (MS_item / MS_res) rejects at this level; in the df only,
# the seed term is taken at its upper 70 % bound (the chi² 30 % quantile), at its upper 78 % bound when it
# rests on one df (two seeds: a 1-df chi² is below a fifth of its mean a third of the time). Chosen on
# the simulation grid of docs/statistics.md and checked on designs outside it (python -m lbt.stats.compare,
# --validate).
ITEM_TERM_ALPHA = 0.1
SEED_DF_QUANTILE = 0.3
SEED_DF_QUANTILE_ONE_DF = 0.22


def mean_variance(ms: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Var(mean D) and its df from the mean squares (see the module docstring).

    V = MS_seed/(SN), plus (MS_item − MS_res)/(SN) when the item × arm F test rejects at
    ITEM_TERM_ALPHA. Without the item term, df = S − 1 (the exact seed-level t when items do not
    interact with arms). With it, df is Satterthwaite's, computed with the seed term at its upper
    bound MS_seed·(S−1)/χ²_{q, S−1} (q = SEED_DF_QUANTILE, SEED_DF_QUANTILE_ONE_DF for two seeds): a
    seed mean square estimated from 1–2 df is often
    far below its expectation, and the plain plug-in df then jumps to the item df and under-covers.
    """
    cells = ms["n_seeds"] * ms["n_items"]
    if ms["n_seeds"] == 1:  # one seed: the paired t on items
        return ms["ms_item"] / cells, np.full(np.shape(ms["ms_item"]), float(ms["df_item"]))
    seed = ms["ms_seed"] / cells
    if ms["n_items"] == 1:  # one item: the t on seeds
        return seed, np.full(np.shape(seed), float(ms["df_seed"]))
    item, res = ms["ms_item"] / cells, ms["ms_res"] / cells
    threshold = sps.f.ppf(1 - ITEM_TERM_ALPHA, ms["df_item"], ms["df_res"])
    with_items = item > threshold * res
    variance = np.where(with_items, seed + item - res, seed)
    quantile = SEED_DF_QUANTILE_ONE_DF if ms["df_seed"] == 1 else SEED_DF_QUANTILE
    seed_bound = seed * ms["df_seed"] / sps.chi2.ppf(quantile, ms["df_seed"])
    df_sum = satterthwaite_df([(seed_bound, ms["df_seed"]), (item, ms["df_item"]), (-res, ms["df_res"])])
    df = np.where(with_items, np.minimum(df_sum, float(ms["df_seed"] + ms["df_item"])), float(ms["df_seed"]))
    return variance, np.maximum(df, 1.0)


def calibrated_interval(
    diff: np.ndarray,
    neutral: np.ndarray,
    level: float = 0.95,
    sd: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    draws: int = 4000,
) -> dict[str, np.ndarray]:
    """d, its calibrated interval and the test of no shift, for complete paired differences
    diff[..., S, N] (stance units) and the complete neutral cells neutral[..., S', N'].

    d = mean(diff) / sd, sd the pre-registered standardiser (default: the SD of `neutral`, ddof 1).
    The test: t = mean(diff)/√V on df. The interval of d: percentiles of the generalized pivot
    (mean(diff) − T·√V) / Σ, T ~ t_df, Σ the pivot of the neutral cells' population SD
    (`standardiser_pivot`), from `draws` Monte-Carlo draws (`rng`, default seeded 0).
    Returns d, df, ci (…, 2), t, p_one_sided (H1: shift > 0), p_two_sided, diff_mean, var_mean.
    """
    ms = anova_mean_squares(diff)
    variance, df = mean_variance(ms)
    if sd is None:
        sd = neutral.reshape(*neutral.shape[:-2], -1).std(axis=-1, ddof=1)
    rng = rng if rng is not None else np.random.default_rng(0)
    chi = chi_draws(rng, neutral.shape[-2], neutral.shape[-1], draws)
    sigma = standardiser_pivot(neutral, chi)
    z = rng.standard_normal(draws)
    with np.errstate(invalid="ignore", divide="ignore"):
        # T ~ t_df as Z / sqrt(chi²_df / df); df differs per study, so the gamma draw is per element
        chi2 = 2 * rng.standard_gamma(
            np.broadcast_to(np.asarray(df, dtype=float)[..., None] / 2, (*np.shape(df), draws))
        )
        t_draws = z / np.sqrt(chi2 / np.asarray(df, dtype=float)[..., None])
        pivot = (ms["mean"][..., None] - t_draws * np.sqrt(variance)[..., None]) / sigma
        tail = 50 * (1 - level)
        lo, hi = np.percentile(pivot, [tail, 100 - tail], axis=-1)
        d = ms["mean"] / sd
        t_stat = ms["mean"] / np.sqrt(variance)
        p_one = sps.t.sf(t_stat, df)
        p_two = 2 * sps.t.sf(np.abs(t_stat), df)
    return {
        "d": d,
        "df": df,
        "ci": np.stack([lo, hi], axis=-1),
        "t": t_stat,
        "p_one_sided": p_one,
        "p_two_sided": p_two,
        "diff_mean": ms["mean"],
        "var_mean": variance,
    }


def standardiser_pivot(neutral: np.ndarray, chi: dict[str, np.ndarray]) -> np.ndarray:
    """Generalized pivotal draws (..., M) of the population SD of a neutral cell, sigma_total (seed +
    item + noise), from the neutral cells' ANOVA [..., S, N] and chi-square draws chi[seed|item|res]."""
    ms = anova_mean_squares(neutral)
    n_seeds, n_items = ms["n_seeds"], ms["n_items"]
    if ms["df_res"] > 0:
        noise = ms["ss_res"][..., None] / chi["res"]
        seed = np.maximum(ms["ss_seed"][..., None] / chi["seed"] - noise, 0.0) / n_items
        item = np.maximum(ms["ss_item"][..., None] / chi["item"] - noise, 0.0) / n_seeds
        return np.sqrt(noise + seed + item)
    # one seed (or one item): only the total variance over the other factor is estimable
    ss, name = (ms["ss_item"], "item") if n_items > 1 else (ms["ss_seed"], "seed")
    return np.sqrt(ss[..., None] / chi[name])


def chi_draws(rng: np.random.Generator, n_seeds: int, n_items: int, draws: int) -> dict[str, np.ndarray]:
    """Chi-square draws for the three ANOVA sums of squares of an S × N layout (ones where df = 0)."""
    dfs = {"seed": n_seeds - 1, "item": n_items - 1, "res": (n_seeds - 1) * (n_items - 1)}
    return {name: rng.chisquare(df, draws) if df > 0 else np.ones(draws) for name, df in dfs.items()}


def batch_intervals(
    cells: np.ndarray,
    arms: tuple[str, ...],
    level: float = 0.95,
    rng: np.random.Generator | None = None,
    draws: int = 2000,
) -> dict[str, dict]:
    """The calibrated interval of d per framed arm and of the combined estimate for complete cells
    [..., arm, S, N] (the simulation's many studies at once)."""
    index = {arm: arms.index(arm) for arm in arms}
    neutral = cells[..., index[REFERENCE_ARM], :, :]
    sd = neutral.reshape(*neutral.shape[:-2], -1).std(axis=-1, ddof=1)
    out = {}
    for arm in FRAMED_ARMS:
        if arm in index:
            out[arm] = calibrated_interval(
                cells[..., index[arm], :, :] - neutral, neutral, level, sd, rng, draws
            )
    if len(out) == 2:
        combined = (cells[..., index[MINUS.name], :, :] - cells[..., index[PLUS.name], :, :]) / 2
        out["combined"] = calibrated_interval(combined, neutral, level, sd, rng, draws)
    return out


# ------------------------------------------------------------------------------ rows of a real sweep


@dataclass
class Block:
    """The complete (seed, item) block used for one comparison, and what was left out to get it."""

    seeds: list
    items: list
    dropped_seeds: list
    dropped_items: int


def complete_block(arrays: list[np.ndarray], seeds: tuple, items: tuple) -> tuple[np.ndarray, Block]:
    """Rows (seeds) and columns (items) where every array has a value. Seeds with more than half their
    cells missing in any array are dropped first, then items with any missing cell."""
    missing = np.zeros(arrays[0].shape, dtype=bool)
    for array in arrays:
        missing |= ~np.isfinite(array)
    keep_seed = missing.mean(axis=1) <= 0.5
    keep_item = ~missing[keep_seed].any(axis=0)
    block = Block(
        seeds=[s for s, k in zip(seeds, keep_seed) if k],
        items=[i for i, k in zip(items, keep_item) if k],
        dropped_seeds=[s for s, k in zip(seeds, keep_seed) if not k],
        dropped_items=int((~keep_item).sum()),
    )
    return np.ix_(keep_seed, keep_item), block


def _entry(result: dict[str, np.ndarray], block: Block) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "d": float(result["d"]),
        "ci": [float(result["ci"][0]), float(result["ci"][1])],
        "df": float(result["df"]),
        "p_one_sided": float(result["p_one_sided"]),
        "p_two_sided": float(result["p_two_sided"]),
        "n_seeds": len(block.seeds),
        "n_items": len(block.items),
        "seed_variance": "estimated" if len(block.seeds) > 1 else "not estimable (one seed)",
    }
    left_out = []
    if block.dropped_seeds:
        left_out.append(f"seed(s) {block.dropped_seeds} (more than half their cells empty)")
    if block.dropped_items:
        left_out.append(f"{block.dropped_items} base item(s) with an empty cell")
    if left_out:
        entry["left_out"] = "; ".join(left_out)
    return entry


def calibrated_table(
    table: CellTable, alpha: float = 0.05, seed: int = 0, draws: int = 20000
) -> dict[str, Any]:
    """The calibrated line for one (family, measure) of `primary_report`: per framed arm and for the
    combined estimate `{d, ci, df, p_one_sided, p_two_sided, n_seeds, n_items, seed_variance,
    [left_out]}`, None where the comparison is absent or has fewer than 2 complete items. Computed on
    the complete (seed, item) block of the compared arms; d is the pre-registered point estimate
    whenever no cell had to be left out (the standardiser is always the pre-registered neutral SD)."""
    level = 1 - alpha
    arms = {arm: table.values[k] for k, arm in enumerate(table.arms)}
    neutral = arms[REFERENCE_ARM]
    finite_neutral = neutral[np.isfinite(neutral)]
    sd = np.float64(np.std(finite_neutral, ddof=1)) if finite_neutral.size > 1 else np.float64(np.nan)
    index_neutral, _ = complete_block([neutral], table.seeds, table.items)
    neutral_block = neutral[index_neutral]
    out: dict[str, Any] = {
        "method": METHOD,
        **{arm: None for arm in FRAMED_ARMS},
        "combined_directional": None,
    }
    comparisons = {
        **{arm: (arm, REFERENCE_ARM, 1.0) for arm in FRAMED_ARMS},
        "combined_directional": (MINUS.name, PLUS.name, 0.5),
    }
    for key, (first, second, scale) in comparisons.items():
        if first not in arms or second not in arms or neutral_block.shape[-1] < 2:
            continue
        index, block = complete_block([arms[first], arms[second]], table.seeds, table.items)
        if len(block.items) < 2 or not block.seeds:
            continue
        diff = (arms[first][index] - arms[second][index]) * scale
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])  # reproducible interval draws
        out[key] = _entry(calibrated_interval(diff, neutral_block, level, sd, rng, draws), block)
    return out
