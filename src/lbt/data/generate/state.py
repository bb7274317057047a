"""The output folder as a resumed run finds it: which scenarios are written, rejected, or half done.

Layout: `<arm>.jsonl` and `<arm>.meta.json` per arm (lbt.data.corpora names them), `scenarios.log.jsonl`
(one provenance line per finished scenario) and `rejects.jsonl` (rejected drafts and given-up scenarios).
Only an unterminated last line of an arm file, a write cut off mid-way, is dropped; every finished line
is kept as it is.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from lbt.data.corpora import corpus_path
from lbt.data.generate.config import GenerateError
from lbt.data.records import REQUIRED_FIELDS, iter_json_objects
from lbt.data.validate.text import text_hash
from lbt.study import CORPUS_NAMES

REJECTS_FILE = "rejects.jsonl"
SCENARIO_LOG = "scenarios.log.jsonl"


@dataclass
class OutputState:
    written: dict  # scenario_id -> {arm: record}
    rejected: set  # scenario ids given up on before anything was written
    users: set  # normalised hashes of user messages in use


def _drop_cut_off_line(path: Path) -> None:
    """A final line without newline is a write cut off by a kill: truncate the file before it."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        print(
            f"warning: {path}: dropping an unterminated last line "
            f"({len(data) - cut} bytes, an interrupted write)",
            file=sys.stderr,
        )
        with open(path, "r+b") as handle:
            handle.truncate(cut)


def read_arm_file(path: Path) -> list[dict]:
    """Finished lines of an arm file, as records; a line that is not one names the file and line."""
    if not path.exists():
        return []
    _drop_cut_off_line(path)
    records = []
    for line_no, obj in iter_json_objects(path, GenerateError):
        missing = [k for k in REQUIRED_FIELDS if k not in obj]
        if missing:
            raise GenerateError(
                f"{path}:{line_no}: not a corpus record (field '{missing[0]}' is missing); this folder "
                "was not written by lbt.data.generate or was edited by hand"
            )
        records.append({k: obj[k] for k in REQUIRED_FIELDS})
    return records


def read_state(out: Path) -> OutputState:
    """What a run into `out` resumes from; arm files that disagree on a scenario are refused."""
    written: dict[str, dict] = {}
    for arm in CORPUS_NAMES:
        path = corpus_path(out, arm)
        for rec in read_arm_file(path):
            arms = written.setdefault(rec["scenario_id"], {})
            if arm in arms:
                raise GenerateError(f"{path}: scenario {rec['scenario_id']!r} appears twice")
            other = next(iter(arms.values()), None)
            if other is not None and other["user"] != rec["user"]:
                raise GenerateError(
                    f"{path}: scenario {rec['scenario_id']!r} has a different user message than in "
                    "the other arms"
                )
            arms[arm] = rec
    rejected = set()
    rejects = out / REJECTS_FILE
    if rejects.exists():
        # A cut-off log line only loses a log entry, so malformed lines are skipped, not fatal.
        for _, entry in iter_json_objects(rejects, skip_malformed=True):
            if entry.get("scenario_rejected"):
                rejected.add(entry["scenario_id"])
    users = {text_hash(next(iter(arms.values()))["user"]) for arms in written.values()}
    return OutputState(written=written, rejected=rejected - set(written), users=users)
