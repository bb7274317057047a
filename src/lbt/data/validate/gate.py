"""What every gate shares: the thresholds it reads and the shape of the result it returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lbt.data.records import CorpusRecord

MAX_LISTED = 200  # cap on listed offenders per gate so a broken corpus still gives a readable report


@dataclass
class Thresholds:
    min_words: int = 120
    max_words: int = 220
    ks_max: float = 0.15
    mean_length_tol: float = 0.08
    ttr_tol: float = 0.05
    ttr_window: int = 50
    auc_min: float = 0.90
    neutral_p_min: float = 0.40
    neutral_p_max: float = 0.60
    cv_folds: int = 5
    near_dup_cosine: float = 0.85
    isolation_cosine: float = 0.50
    isolation_cosine_embeddings: float = 0.80
    embeddings: str = "auto"  # auto | tfidf | minilm


def gate_result(passed: bool, **figures) -> dict:
    """A gate's report entry: pass/fail and the figures behind it."""
    return {"passed": bool(passed), "status": "pass" if passed else "fail", **figures}


def listed(items: list) -> dict:
    """The first MAX_LISTED offenders and how many more there were."""
    return {"listed": items[:MAX_LISTED], "n_listed_omitted": max(0, len(items) - MAX_LISTED)}


def where(path: Path, record: CorpusRecord) -> str:
    """`file:line` of a record, as every offender list names it."""
    return f"{path}:{record.line}"
