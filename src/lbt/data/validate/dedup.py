"""Gate 5, dedup: no exact and no near duplicates among the training texts.

Exact: the same text after lower-casing, stripping punctuation and collapsing whitespace (`text_hash`).
Near: cosine > near_dup_cosine, the mean of a word (1–2-gram) and a character (3–5-gram) TF-IDF cosine.
Assistant turns are compared across all records (records of the same scenario in different arms
included); user messages across different scenarios only, since a scenario's arms share it by design.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lbt.data.records import CorpusRecord
from lbt.data.validate.gate import MAX_LISTED, Thresholds, gate_result, where
from lbt.data.validate.text import text_hash

Located = tuple[str, CorpusRecord]  # (arm, record): where a text sits is paths[arm]:record.line


def _similarity_matrix_parts(texts: list[str]):
    """Rows whose dot products are mean(word 1–2-gram cosine, char 3–5-gram cosine)."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform(texts)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True).fit_transform(texts)
    return hstack([word * np.sqrt(0.5), char * np.sqrt(0.5)]).tocsr()


def _pairs_above(matrix, threshold: float, block: int = 1000) -> tuple[float, list[tuple[int, int, float]]]:
    """Max off-diagonal cosine and every pair (i < j) above threshold, computed in row blocks."""
    best, pairs = 0.0, []
    n = matrix.shape[0]
    for start in range(0, n, block):
        sims = (matrix[start : start + block] @ matrix.T).toarray()
        for local in range(sims.shape[0]):
            sims[local, : start + local + 1] = -1.0  # keep i < j only
        if sims.size:
            best = max(best, float(sims.max()))
        for i, j in zip(*np.nonzero(sims > threshold)):
            pairs.append((start + int(i), int(j), float(sims[i, j])))
    return best, pairs


def _exact_duplicates(items: list[Located], field: str, paths: dict[str, Path]) -> list[dict]:
    """Every text whose normalised hash an earlier text already had, paired with that first text."""
    found, first = [], {}
    for arm, r in items:
        h = text_hash(getattr(r, field))
        if h in first:
            earlier = where(paths[first[h][0]], first[h][1])
            found.append({"field": field, "a": earlier, "b": where(paths[arm], r)})
        else:
            first[h] = (arm, r)
    return found


def _near_duplicates(
    items: list[Located], field: str, paths: dict[str, Path], threshold: float
) -> tuple[float, list[dict]]:
    """The largest cosine between two texts and every pair above threshold, most similar first."""
    if len(items) < 2:
        return 0.0, []
    matrix = _similarity_matrix_parts([getattr(r, field) for _, r in items])
    best, pairs = _pairs_above(matrix, threshold)
    near = [
        {
            "field": field,
            "a": where(paths[items[i][0]], items[i][1]),
            "b": where(paths[items[j][0]], items[j][1]),
            "cosine": round(c, 4),
        }
        for i, j, c in sorted(pairs, key=lambda p: -p[2])
    ]
    return best, near


def gate_dedup(arms: dict[str, list[CorpusRecord]], paths: dict[str, Path], thresholds: Thresholds) -> dict:
    records = [(arm, r) for arm, recs in arms.items() for r in recs]
    users: dict[str, Located] = {}
    for arm, r in records:
        users.setdefault(r.scenario_id, (arm, r))  # one user message per scenario
    user_list = list(users.values())
    exact = _exact_duplicates(records, "assistant", paths) + _exact_duplicates(user_list, "user", paths)
    max_assistant, near_assistant = _near_duplicates(records, "assistant", paths, thresholds.near_dup_cosine)
    max_user, near_user = _near_duplicates(user_list, "user", paths, thresholds.near_dup_cosine)
    near_all = near_assistant + near_user
    return gate_result(
        not exact and not near_all,
        n_exact=len(exact),
        exact=exact[:MAX_LISTED],
        n_near=len(near_all),
        near=near_all[:MAX_LISTED],
        threshold=thresholds.near_dup_cosine,
        max_cosine_assistant=max_assistant,
        max_cosine_user=max_user,
        similarity="mean of word 1-2-gram and char_wb 3-5-gram TF-IDF cosines",
    )
