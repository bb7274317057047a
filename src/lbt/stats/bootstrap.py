"""Vectorised hierarchical bootstrap of d and of the combined directional estimate.

One resample, for an array of cell values `values[arm, seed, item]` (S seeds, N base items):

1. draw S seed indices with replacement (`seed_level=True`; with one seed, or `seed_level=False`, every
   seed is kept once and only items are resampled — the item-level fallback);
2. within each drawn seed slot, draw N base-item indices with replacement;
3. apply the *same* seed and item draws to every arm: items are shared by the arms, so item difficulty
   cancels in arm differences exactly as it does in the point estimate, and seed k of every arm is
   drawn together (the arms of one seed share data order and LoRA initialisation);
4. compute the point-estimate formulas of `effect_size` on the resampled cells (arm means over all
   drawn cells, neutral SD with ddof=1 over the drawn neutral cells, NaN cells skipped).

All resamples are drawn as index arrays, turned into per-cell draw counts, and evaluated at once as
one matrix product (in blocks that bound memory), never in a Python loop over resamples. A leading
batch axis lets `simulate` bootstrap many studies together.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from lbt.study import FRAMED_ARMS, MINUS, PLUS, REFERENCE_ARM

ItemDraw = Literal["per_seed", "shared"]


def _draw_flat(
    rng: np.random.Generator,
    batch: int,
    n_resamples: int,
    n_seeds: int,
    n_items: int,
    seed_level: bool,
    item_draw: ItemDraw,
    resample_offsets: bool,
) -> np.ndarray:
    """Drawn cell indices, (batch, n_resamples, n_seeds, n_items); with `resample_offsets` every resample's
    indices are shifted by resample_number * cells, ready for one bincount over all resamples."""
    cells = n_seeds * n_items
    if seed_level:
        seed_idx = rng.integers(0, n_seeds, size=(batch, n_resamples, n_seeds), dtype=np.int32)
    else:
        seed_idx = np.broadcast_to(np.arange(n_seeds, dtype=np.int32), (batch, n_resamples, n_seeds))
    # the per-slot term (seed × items, plus the resample offset) is small; the big array is added once
    term = seed_idx.astype(np.int64) * n_items
    if resample_offsets:
        term = term + (np.arange(batch * n_resamples, dtype=np.int64) * cells).reshape(batch, n_resamples, 1)
    item_slots = n_seeds if item_draw == "per_seed" else 1
    # int16 draws are the cheapest to generate
    item_dtype = np.int16 if n_items <= np.iinfo(np.int16).max else np.int32
    item_idx = rng.integers(0, n_items, size=(batch, n_resamples, item_slots, n_items), dtype=item_dtype)
    return item_idx + term[..., None]


def draw_indices(
    rng: np.random.Generator,
    batch: int,
    n_resamples: int,
    n_seeds: int,
    n_items: int,
    seed_level: bool = True,
    item_draw: ItemDraw = "per_seed",
) -> np.ndarray:
    """Flat cell indices (seed * n_items + item) of shape (batch, n_resamples, n_seeds * n_items).

    `item_draw="per_seed"` (the pre-registered scheme) draws items afresh within every seed slot;
    `"shared"` draws one item multiset per resample and uses it in every seed slot (for the simulation's
    comparison: it keeps item × arm interactions correlated across seeds).
    """
    flat = _draw_flat(rng, batch, n_resamples, n_seeds, n_items, seed_level, item_draw, False)
    return flat.reshape(batch, n_resamples, n_seeds * n_items)


def draw_counts(
    rng: np.random.Generator,
    batch: int,
    n_resamples: int,
    n_seeds: int,
    n_items: int,
    seed_level: bool = True,
    item_draw: ItemDraw = "per_seed",
) -> np.ndarray:
    """How often each cell is drawn, shape (batch, n_resamples, n_seeds * n_items), float.

    Every statistic here is a function of per-arm sums over the drawn cells, so counts times values
    give all resamples in one matrix product instead of gathering every drawn value. Uses the same
    random draws as `draw_indices` with the same generator state.
    """
    flat = _draw_flat(rng, batch, n_resamples, n_seeds, n_items, seed_level, item_draw, True)
    cells = n_seeds * n_items
    counts = np.bincount(flat.ravel(), minlength=batch * n_resamples * cells)
    return counts.reshape(batch, n_resamples, cells).astype(float)


def bootstrap_effects(
    values: np.ndarray,
    arms: tuple[str, ...],
    n_resamples: int,
    rng: np.random.Generator,
    seed_level: bool = True,
    item_draw: ItemDraw = "per_seed",
    max_elements: int = 1 << 16,
) -> dict[str, np.ndarray]:
    """Bootstrap draws of d per framed arm and of the combined estimate.

    `values` is (arm, seed, item) or (batch, arm, seed, item); `arms` names axis `arm` and must contain
    "neutral". Returns arrays of shape (n_resamples,) or (batch, n_resamples) keyed by the framed arms
    present and, when both are, "combined". Resamples are processed in blocks of about `max_elements`
    drawn cells (at least 256 resamples): the default keeps a block's arrays in the CPU cache (measured
    fastest for the study's shape); the simulation, with many studies per call, passes a larger budget.
    """
    squeeze = values.ndim == 3
    batched = values[None] if squeeze else values
    batch, _, n_seeds, n_items = batched.shape
    cells = n_seeds * n_items
    flat_values = batched.reshape(batch, len(arms), cells)
    neutral = arms.index(REFERENCE_ARM)
    framed = [arm for arm in FRAMED_ARMS if arm in arms]
    # d is invariant to a common shift; centring on the neutral mean keeps the mean-of-squares SD exact
    centred = flat_values - np.nanmean(flat_values[:, neutral], axis=-1)[:, None, None]
    finite = np.isfinite(centred)
    filled = np.where(finite, centred, 0.0)
    # columns per batch element: [finite count and sum for every arm ..., neutral sum of squares]
    columns = np.concatenate(
        [finite.astype(float), filled, (filled[:, neutral] ** 2)[:, None]], axis=1
    ).transpose(0, 2, 1)  # (batch, cells, 2 * arms + 1)
    n_arms = len(arms)
    out = {arm: np.empty((batch, n_resamples)) for arm in framed}
    # at least 256 resamples per block, so that even huge designs never loop resample by resample
    block = min(n_resamples, max(256, max_elements // max(1, batch * cells)))
    for start in range(0, n_resamples, block):  # blocks of resamples bound memory; each is vectorised
        stop = min(n_resamples, start + block)
        counts = draw_counts(rng, batch, stop - start, n_seeds, n_items, seed_level, item_draw)
        sums = counts @ columns  # (batch, resamples, 2 * arms + 1); the same draw for every arm
        count, total = sums[..., :n_arms], sums[..., n_arms : 2 * n_arms]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / count
            n_neutral = count[..., neutral]
            second = sums[..., -1] / n_neutral
            variance = np.maximum(second - mean[..., neutral] ** 2, 0.0) * n_neutral / (n_neutral - 1)
            neutral_sd = np.sqrt(variance)
            for arm in framed:
                out[arm][:, start:stop] = (mean[..., arms.index(arm)] - mean[..., neutral]) / neutral_sd
    if len(framed) == 2:
        out["combined"] = (out[MINUS.name] - out[PLUS.name]) / 2
    return {key: (draws[0] if squeeze else draws) for key, draws in out.items()}


def percentile_ci(draws: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Percentile interval over the last axis, ignoring non-finite draws; shape (..., 2)."""
    tail = 100 * (1 - level) / 2
    finite = np.isfinite(draws)
    if draws.ndim == 1:
        return np.percentile(draws[finite], [tail, 100 - tail]) if finite.any() else np.full(2, np.nan)
    if finite.all():
        return np.moveaxis(np.percentile(draws, [tail, 100 - tail], axis=-1), 0, -1)
    masked = np.where(finite, draws, np.nan)
    return np.moveaxis(np.nanpercentile(masked, [tail, 100 - tail], axis=-1), 0, -1)


def share_at_or_below_zero(draws: np.ndarray) -> np.ndarray:
    """One-sided bootstrap p for 'effect > 0': the share of finite draws ≤ 0 (last axis)."""
    finite = np.isfinite(draws)
    return (finite & (draws <= 0)).sum(axis=-1) / finite.sum(axis=-1)
