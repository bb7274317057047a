"""Holm's step-down correction (here: the directional test across model families, per measure)."""

from __future__ import annotations

import math
from collections.abc import Mapping


def holm(pvalues: Mapping[str, float], alpha: float = 0.05) -> dict[str, dict]:
    """Sort p ascending; the k-th smallest (k = 0, 1, …) is compared with alpha / (m − k) and rejected
    when p ≤ threshold and every smaller p was rejected. Missing (None/NaN) p-values are left out of m
    and reported with reject False."""
    usable = {key: p for key, p in pvalues.items() if p is not None and not math.isnan(p)}
    m = len(usable)
    out: dict[str, dict] = {}
    still_rejecting = True
    for rank, (key, p) in enumerate(sorted(usable.items(), key=lambda kv: (kv[1], kv[0]))):
        threshold = alpha / (m - rank)
        still_rejecting = still_rejecting and p <= threshold
        out[key] = {"p": float(p), "threshold": threshold, "reject": still_rejecting}
    for key in pvalues:
        if key not in out:
            out[key] = {"p": None, "threshold": None, "reject": False}
    return out
