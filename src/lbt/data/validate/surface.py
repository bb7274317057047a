"""Gate 3, surface match: the arms' answers are alike in length (KS, mean) and lexical diversity (MATTR).

Assistant word counts: pairwise two-sample KS statistic <= ks_max, each arm's mean within ±mean_length_tol
of the grand mean; each arm's mean MATTR within ±ttr_tol of the mean across arms. MATTR, the mean
type-token ratio over every window of `ttr_window` consecutive lower-cased words, does not fall with text
length the way a plain TTR does, so arms with slightly different lengths compare fairly.
"""

from __future__ import annotations

import numpy as np

from lbt.data.records import CorpusRecord
from lbt.data.validate.gate import Thresholds, gate_result
from lbt.data.validate.text import mattr, word_count, words


def gate_surface_match(arms: dict[str, list[CorpusRecord]], thresholds: Thresholds) -> dict:
    from scipy.stats import ks_2samp

    lengths = {
        arm: np.array([word_count(r.assistant) for r in recs], dtype=float) for arm, recs in arms.items()
    }
    diversity = {
        arm: float(
            np.mean([mattr([w.lower() for w in words(r.assistant)], thresholds.ttr_window) for r in recs])
        )
        for arm, recs in arms.items()
    }
    names = list(arms)
    ks = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ks[f"{a}|{b}"] = float(ks_2samp(lengths[a], lengths[b]).statistic)
    grand_mean = float(np.mean(np.concatenate(list(lengths.values()))))
    mean_dev = {a: float(lengths[a].mean() / grand_mean - 1.0) for a in names}
    grand_ttr = float(np.mean(list(diversity.values())))
    ttr_dev = {a: float(diversity[a] / grand_ttr - 1.0) for a in names}
    by_domain: dict[str, dict[str, list[int]]] = {}
    by_scenario: dict[str, dict[str, int]] = {}
    for arm, recs in arms.items():
        for r, n in zip(recs, lengths[arm]):
            by_domain.setdefault(r.domain, {}).setdefault(arm, []).append(int(n))
            by_scenario.setdefault(r.scenario_id, {})[arm] = int(n)
    # Where the arms' lengths part most: the scenarios to rebalance when KS or the mean check fails.
    spread = sorted(
        (
            {"scenario_id": sid, "words": counts, "spread": max(counts.values()) - min(counts.values())}
            for sid, counts in by_scenario.items()
        ),
        key=lambda d: -d["spread"],
    )[:20]
    checks = {
        "ks": all(v <= thresholds.ks_max for v in ks.values()),
        "mean_length": all(abs(v) <= thresholds.mean_length_tol for v in mean_dev.values()),
        "ttr": all(abs(v) <= thresholds.ttr_tol for v in ttr_dev.values()),
    }
    return gate_result(
        all(checks.values()),
        checks=checks,
        ks_statistic=ks,
        ks_max=thresholds.ks_max,
        mean_words={a: float(lengths[a].mean()) for a in names},
        grand_mean_words=grand_mean,
        mean_words_rel_dev=mean_dev,
        mean_length_tol=thresholds.mean_length_tol,
        sd_words={a: float(lengths[a].std(ddof=1)) if len(lengths[a]) > 1 else 0.0 for a in names},
        mean_words_by_domain={
            d: {a: float(np.mean(v)) for a, v in per.items()} for d, per in by_domain.items()
        },
        largest_length_spread=spread,
        mattr=diversity,
        mattr_window=thresholds.ttr_window,
        mattr_rel_dev=ttr_dev,
        ttr_tol=thresholds.ttr_tol,
    )
