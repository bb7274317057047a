"""Assemble the three paired corpora from the authored per-domain tables.

    python -m lbt.data.corpora [--authored data/corpora/authored] [--out data/corpora] [--force]

Each authored file `authored/<domain>.jsonl` holds one scenario per line:
`{scenario_id, domain, user, frame_plus, frame_minus, neutral}`. Assembly writes
`frame_plus.jsonl`, `frame_minus.jsonl`, `neutral.jsonl` (records `{id, domain, scenario_id, user,
assistant}`, the same scenario on the same line of every arm) and `<arm>.meta.json` (provenance).
Order is deterministic: the source domains in STUDY.md order, then the authored file's line order; the id
is `<arm>-<domain>-<nn>`, nn counting the domain's scenarios from 01.

Append-only spirit: identical output is a no-op; a corpus whose content would change is left alone
unless `--force` (then its meta version goes up by one and records the previous sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from lbt.data.records import CorpusError, file_sha256, iter_json_objects, relative_path
from lbt.rundir import atomic_write
from lbt.study import CORPUS_NAMES

SOURCE_DOMAINS = (
    "cooking",
    "gardening",
    "home_renovation",
    "personal_fitness",
    "software_development",
    "board_games_hobbies",
    "travel_planning",
    "small_business",
)
AUTHORED_FIELDS = ("scenario_id", "domain", "user", *CORPUS_NAMES)  # one answer column per arm
HOW_MADE = "authored by the lbt developers, paired"
META_FORMAT = 1


class CorpusChangedError(RuntimeError):
    """Assembly would change an existing corpus and --force was not given."""


def corpus_path(folder: str | Path, arm: str) -> Path:
    """An arm's corpus in a corpora folder: `<arm>.jsonl`, `arm` one of lbt.study.CORPUS_NAMES (the
    original study's file names: frame_plus, frame_minus, neutral)."""
    return Path(folder) / f"{arm}.jsonl"


def meta_path(folder: str | Path, arm: str) -> Path:
    """The provenance file next to an arm's corpus: `<arm>.meta.json`."""
    return Path(folder) / f"{arm}.meta.json"


def corpus_paths(folder: str | Path) -> dict[str, Path]:
    """Every study arm's corpus in a corpora folder, in the study's arm order."""
    return {arm: corpus_path(folder, arm) for arm in CORPUS_NAMES}


def read_authored(path: Path) -> list[dict]:
    """One authored table; errors name file, line and field."""
    rows = []
    for line_no, obj in iter_json_objects(path, CorpusError):
        for field in AUTHORED_FIELDS:
            if field not in obj:
                raise CorpusError(f"{path}:{line_no}: field '{field}' is missing")
            if not isinstance(obj[field], str) or not obj[field].strip():
                raise CorpusError(f"{path}:{line_no}: field '{field}' must be a non-empty string")
        if obj["domain"] != path.stem:
            raise CorpusError(
                f"{path}:{line_no}: field 'domain' is {obj['domain']!r} but the file is for {path.stem!r}"
            )
        rows.append({**{f: obj[f] for f in AUTHORED_FIELDS}, "_line": line_no})
    return rows


def collect_authored(authored_dir: Path) -> tuple[dict[str, list[dict]], list[Path]]:
    """All authored tables in canonical domain order; checks domains and scenario_id uniqueness."""
    files = sorted(authored_dir.glob("*.jsonl"))
    if not files:
        raise CorpusError(f"{authored_dir}: no authored tables (*.jsonl) found")
    unknown = [f.name for f in files if f.stem not in SOURCE_DOMAINS]
    if unknown:
        raise CorpusError(
            f"{authored_dir}: files for unknown source domains: {unknown} (known: {SOURCE_DOMAINS})"
        )
    by_domain = {f.stem: read_authored(f) for f in files}
    seen: dict[str, str] = {}
    for domain, rows in by_domain.items():
        for row in rows:
            where = f"{authored_dir / (domain + '.jsonl')}:{row['_line']}"
            if row["scenario_id"] in seen:
                raise CorpusError(
                    f"{where}: field 'scenario_id' repeats {row['scenario_id']!r} "
                    f"(first at {seen[row['scenario_id']]})"
                )
            seen[row["scenario_id"]] = where
    ordered = {d: by_domain[d] for d in SOURCE_DOMAINS if d in by_domain}
    return ordered, [authored_dir / f"{d}.jsonl" for d in ordered]


def render_arm(arm: str, by_domain: dict[str, list[dict]]) -> bytes:
    lines = []
    for domain, rows in by_domain.items():
        width = max(2, len(str(len(rows))))
        for index, row in enumerate(rows, start=1):
            record = {
                "id": f"{arm}-{domain}-{index:0{width}d}",
                "domain": domain,
                "scenario_id": row["scenario_id"],
                "user": row["user"],
                "assistant": row[arm],
            }
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines).encode("utf-8")


def build_meta(
    arm: str,
    payload: bytes,
    by_domain: dict[str, list[dict]],
    sources: list[Path],
    root: Path,
    previous: dict | None,
) -> dict:
    sha = hashlib.sha256(payload).hexdigest()
    version = 1 if previous is None else int(previous.get("version", 0)) + 1
    return {
        "corpus": arm,
        "arm": arm,
        "how_made": HOW_MADE,
        "version": version,
        "previous_sha256": None if previous is None else previous.get("sha256"),
        "sha256": sha,
        "records": sum(len(rows) for rows in by_domain.values()),
        "counts_per_domain": {d: len(rows) for d, rows in by_domain.items()},
        "paired_with": [a for a in CORPUS_NAMES if a != arm],
        "pairing": "same scenario_id and identical user message on the same line of every arm",
        "sources": [{"path": relative_path(p, root), "sha256": file_sha256(p)} for p in sources],
        "assembled_by": "python -m lbt.data.corpora",
        "meta_format": META_FORMAT,
    }


def assemble(authored_dir: str | Path, out_dir: str | Path, force: bool = False) -> dict[str, str]:
    """Write the three corpora and their meta; returns {arm: "written"|"unchanged"|"overwritten"}."""
    authored_dir, out_dir = Path(authored_dir), Path(out_dir)
    by_domain, sources = collect_authored(authored_dir)
    payloads = {arm: render_arm(arm, by_domain) for arm in CORPUS_NAMES}
    corpora = corpus_paths(out_dir)
    changed = [arm for arm, path in corpora.items() if path.exists() and path.read_bytes() != payloads[arm]]
    if changed and not force:
        # All-or-nothing: refuse before writing anything so the three arms stay paired.
        raise CorpusChangedError(
            f"{', '.join(str(corpora[a]) for a in changed)} would change; "
            "corpora are append-only "
            "(a changed corpus invalidates its validation report and every run trained on it). "
            "Re-run with --force to replace them deliberately."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    status = {}
    for arm, corpus in corpora.items():
        meta_file = meta_path(out_dir, arm)
        if corpus.exists() and arm not in changed and meta_file.exists():
            status[arm] = "unchanged"
            continue
        previous = (
            json.loads(meta_file.read_text(encoding="utf-8"))
            if meta_file.exists() and arm in changed
            else None
        )
        meta = build_meta(arm, payloads[arm], by_domain, sources, out_dir.parent, previous)
        if not corpus.exists() or arm in changed:
            atomic_write(corpus, payloads[arm].decode("utf-8"))
        atomic_write(meta_file, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        status[arm] = "overwritten" if arm in changed else "written"
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbt.data.corpora", description=__doc__.split("\n")[0])
    parser.add_argument("--authored", default="data/corpora/authored", help="folder of <domain>.jsonl tables")
    parser.add_argument("--out", default="data/corpora", help="folder for the assembled corpora")
    parser.add_argument("--force", action="store_true", help="replace corpora whose content would change")
    args = parser.parse_args(argv)
    try:
        status = assemble(args.authored, args.out, force=args.force)
    except (CorpusError, CorpusChangedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for arm, state in status.items():
        meta = json.loads(meta_path(args.out, arm).read_text(encoding="utf-8"))
        print(
            f"{arm}: {state} ({meta['records']} records, sha256 {meta['sha256'][:12]}, "
            f"version {meta['version']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
