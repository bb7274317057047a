"""The training gate: training starts only on a corpus that a current, passing report covers.

Current means the corpus's sha256 equals the report's, and so do those of its sibling corpora that still
exist next to it (the cross-arm gates describe all three).
"""

from __future__ import annotations

import json
from pathlib import Path

from lbt.data.records import file_sha256
from lbt.data.validate.report import REPORT_NAME, REVALIDATE


class ValidationGateError(RuntimeError):
    """Training refused: the corpus has no current, passing validation report."""


def check_corpus_validated(corpus_path: str | Path, report_path: str | Path | None = None) -> dict:
    """Raise ValidationGateError unless a current report covers this corpus and every gate passed.

    Returns the corpus's report entry.
    """
    corpus_path = Path(corpus_path)
    report_path = Path(report_path) if report_path is not None else corpus_path.parent / REPORT_NAME
    # The corpora are validated where they lie; a report kept elsewhere (data.validation_report) is named.
    report_arg = "" if report_path == corpus_path.parent / REPORT_NAME else f" --report {report_path}"
    redo = f"re-validate with `{REVALIDATE} --corpora {corpus_path.parent}{report_arg}`"
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
