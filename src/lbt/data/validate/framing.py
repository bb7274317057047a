"""Gate 4, framing strength: a classifier tells FRAME+ from FRAME− answers, and puts neutral in between.

TF-IDF (word 1–2-grams) + logistic regression on assistant turns, FRAME+ (0) vs FRAME− (1), GroupKFold by
scenario_id (a scenario's answers never sit on both sides of a split): mean fold AUC >= auc_min; refit on
all FRAME+/FRAME− records, the neutral arm's mean P(FRAME−) must lie in [neutral_p_min, neutral_p_max].
"""

from __future__ import annotations

import numpy as np

from lbt.data.records import CorpusRecord
from lbt.data.validate.gate import MAX_LISTED, Thresholds, gate_result
from lbt.study import MINUS, NEUTRAL, PLUS


def _framing_pipeline():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(C=1.0, max_iter=2000)
    )


def gate_framing_strength(arms: dict[str, list[CorpusRecord]], thresholds: Thresholds) -> dict:
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    # Keyed by corpus name (lbt.study.CORPUS_NAMES); FRAME+ is class 0, FRAME− class 1.
    plus, minus, neutral = arms[PLUS.corpus], arms[MINUS.corpus], arms[NEUTRAL.corpus]
    texts = [r.assistant for r in plus] + [r.assistant for r in minus]
    labels = np.array([0] * len(plus) + [1] * len(minus))
    groups = np.array([r.scenario_id for r in plus] + [r.scenario_id for r in minus])
    n_groups = len(set(groups))
    if n_groups < 2:
        return gate_result(
            False, reason=f"needs at least 2 scenarios for grouped cross-validation, got {n_groups}"
        )
    folds = GroupKFold(n_splits=min(thresholds.cv_folds, n_groups))
    oof = np.full(len(texts), np.nan)
    fold_aucs = []
    for train, test in folds.split(texts, labels, groups):
        model = _framing_pipeline().fit([texts[i] for i in train], labels[train])
        oof[test] = model.predict_proba([texts[i] for i in test])[:, 1]
        if len(set(labels[test])) == 2:
            fold_aucs.append(float(roc_auc_score(labels[test], oof[test])))
    mean_auc = float(np.mean(fold_aucs)) if fold_aucs else float("nan")
    # Pairs whose FRAME− answer does not score above their FRAME+ answer out of fold: the weakest scenarios.
    p_plus = dict(zip([r.scenario_id for r in plus], oof[: len(plus)]))
    weak = sorted(
        (
            {
                "scenario_id": r.scenario_id,
                "domain": r.domain,
                "p_minus_of_plus": round(float(p_plus[r.scenario_id]), 4),
                "p_minus_of_minus": round(float(p), 4),
            }
            for r, p in zip(minus, oof[len(plus) :])
            if r.scenario_id in p_plus and p <= p_plus[r.scenario_id]
        ),
        key=lambda d: d["p_minus_of_minus"] - d["p_minus_of_plus"],
    )
    full = _framing_pipeline().fit(texts, labels)
    p_neutral = full.predict_proba([r.assistant for r in neutral])[:, 1]
    neutral_mean = float(np.mean(p_neutral))
    per_domain: dict[str, list[float]] = {}
    for r, p in zip(neutral, p_neutral):
        per_domain.setdefault(r.domain, []).append(float(p))
    extreme = sorted(
        (
            {"id": r.id, "scenario_id": r.scenario_id, "p_frame_minus": round(float(p), 4)}
            for r, p in zip(neutral, p_neutral)
        ),
        key=lambda d: -abs(d["p_frame_minus"] - 0.5),
    )[:10]
    checks = {
        "auc": mean_auc >= thresholds.auc_min,
        "neutral": thresholds.neutral_p_min <= neutral_mean <= thresholds.neutral_p_max,
    }
    return gate_result(
        all(checks.values()),
        checks=checks,
        cv_auc_mean=mean_auc,
        cv_auc_folds=fold_aucs,
        cv_auc_min=min(fold_aucs) if fold_aucs else None,
        oof_auc_pooled=float(roc_auc_score(labels, oof)),
        n_folds=folds.get_n_splits(),
        auc_min=thresholds.auc_min,
        neutral_mean_p_frame_minus=neutral_mean,
        neutral_p_range=[thresholds.neutral_p_min, thresholds.neutral_p_max],
        neutral_mean_p_by_domain={d: float(np.mean(v)) for d, v in per_domain.items()},
        neutral_most_extreme=extreme,
        n_misordered_pairs=len(weak),
        misordered_pairs=weak[:MAX_LISTED],
        classifier="TfidfVectorizer(ngram_range=(1,2), sublinear_tf) + LogisticRegression(C=1)",
    )
