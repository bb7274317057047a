"""The validation report: every gate run on the three corpora, written as `validation_report.json`.

The report keys each corpus by its sha256, so training can tell a current report from a stale one
(`lbt.data.validate.training_gate`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

from lbt.data.blocklist import Blocklist, default_blocklist
from lbt.data.corpora import corpus_paths
from lbt.data.records import file_sha256, load_corpus, relative_path
from lbt.data.validate.dedup import gate_dedup
from lbt.data.validate.framing import gate_framing_strength
from lbt.data.validate.gate import Thresholds
from lbt.data.validate.isolation import gate_eval_isolation
from lbt.data.validate.pairing import gate_pairing
from lbt.data.validate.record_checks import gate_record_level
from lbt.data.validate.surface import gate_surface_match
from lbt.rundir import atomic_write

REPORT_NAME = "validation_report.json"
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


def validate(
    corpora_dir: str | Path,
    items_dir: str | Path | None = None,
    thresholds: Thresholds | None = None,
    blocklist: Blocklist | None = None,
) -> dict:
    """Run every gate on corpora_dir/<arm>.jsonl for the study's arms; returns the report dict."""
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
            "path": relative_path(blocklist.source, Path.cwd()),
            "sha256": file_sha256(blocklist.source) if Path(blocklist.source).is_file() else None,
            "version": blocklist.version,
        },
        "thresholds": dataclasses.asdict(thresholds),
        "gates": gates,
    }


def write_report(report: dict, path: Path) -> None:
    atomic_write(Path(path), json.dumps(report, indent=2, ensure_ascii=False, allow_nan=True) + "\n")
