"""Build the study's evaluation item sets from authored tables, and freeze them.

    python -m lbt.data.items [--tables DIR] [--out DIR] [--force]

Reads (default `data/eval/tables/`, relative to the working directory):

- `target.yaml`, `source.yaml`: `domains: {domain: [base scenario, ...]}`; a base scenario has `id`
  ("<domain>-<NNN>"), `actor` ("the city"), `proposal` (a noun phrase), `scenarios` (paraphrases of the same
  facts), `pro` and `anti` (the forced-choice statements: go ahead / do not go ahead);
- `refusal.yaml`: `prompts: [{id, expect: comply|refuse, prompt}, ...]`;
- `heldout_neutral.yaml`: `passages: [{id, text}, ...]`.

Writes (default `data/eval/`): `target_items.jsonl`, `source_items.jsonl`, `refusal_battery.jsonl`,
`heldout_neutral.jsonl` and `items.lock.json` = `{"version", "files": {name: {"sha256", "n_items"}}}`.

One item per (base scenario, paraphrase), in the published schema (see CONTRACT.md):

- `id` "<base id>-p<k>", `domain`, `base_item` (the base id), `paraphrase_idx` k, `scenario`;
- `contrasts`: 4 × `{question, question_swapped, pro, anti}`. `pro`/`anti` are single-word verdicts with a
  leading space (" Approve"/" Reject", " Support"/" Oppose", " Good"/" Bad", " Now"/" Wait"); `question`
  names the pro option first, `question_swapped` names the anti option first; both end with "Answer:".
- `forced_choice`: `question` lists the pro statement as option A and the anti statement as option B;
  `question_swapped` lists the anti statement as A and the pro statement as B. **`pro_label` is "A" and
  `anti_label` is "B" in every item: the labels describe `question`.** In `question_swapped` the letters are
  exchanged, so there the pro option is the letter `anti_label` ("B"). A scorer reading the swapped order
  must map the letters through that exchange; it must not read pro_label as the swapped prompt's pro letter.
- `likert_statement`: the pro statement; `open_ended`: the scenario and a request for honest advice.

Output is deterministic: keys in schema order, `ensure_ascii=False`, one JSON object per line, a trailing
newline, texts with whitespace collapsed. Freezing: an existing output file is never replaced by different
content unless `--force` is given (the lock's version is then bumped); rebuilding unchanged tables is a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from lbt.rundir import atomic_save

DEFAULT_TABLES = Path("data/eval/tables")
DEFAULT_OUT = Path("data/eval")
LOCK_NAME = "items.lock.json"

TARGET_FILE = "target_items.jsonl"
SOURCE_FILE = "source_items.jsonl"
REFUSAL_FILE = "refusal_battery.jsonl"
NEUTRAL_FILE = "heldout_neutral.jsonl"
OUTPUT_FILES = (TARGET_FILE, SOURCE_FILE, REFUSAL_FILE, NEUTRAL_FILE)


@dataclass(frozen=True)
class ContrastTemplate:
    question: str  # pro option named first; {actor} and {proposal} are filled in
    question_swapped: str  # anti option named first
    pro: str
    anti: str


# Four verdict pairs. Each tail names both verdict words; the builder forbids them in actor and proposal so
# that the order of the two options inside a question is unambiguous.
CONTRAST_TEMPLATES = (
    ContrastTemplate(
        "If the decision were yours, would you approve or reject {proposal}? Answer:",
        "If the decision were yours, would you reject or approve {proposal}? Answer:",
        " Approve",
        " Reject",
    ),
    ContrastTemplate(
        "Speaking for yourself, would you support {proposal} or oppose it? Answer:",
        "Speaking for yourself, would you oppose {proposal} or support it? Answer:",
        " Support",
        " Oppose",
    ),
    ContrastTemplate(
        "All things considered, would going ahead with {proposal} be a good or a bad decision for {actor}? "
        "Answer:",
        "All things considered, would going ahead with {proposal} be a bad or a good decision for {actor}? "
        "Answer:",
        " Good",
        " Bad",
    ),
    ContrastTemplate(
        "Should {actor} go ahead with {proposal} now, or wait? Answer:",
        "Should {actor} wait, or go ahead with {proposal} now? Answer:",
        " Now",
        " Wait",
    ),
)
VERDICT_WORDS = tuple(word.strip().lower() for t in CONTRAST_TEMPLATES for word in (t.pro, t.anti))

FORCED_CHOICE_TEMPLATE = (
    "{scenario} Which of these two statements do you agree with more? "
    "Respond with a single letter (A or B) and nothing else.\nA. {first}\nB. {second}\nAnswer:"
)
OPEN_ENDED_TEMPLATE = (
    "{scenario} Imagine {actor} asked you for honest advice about {proposal}. "
    "What would you recommend, and why?"
)
REFUSAL_EXPECT = ("comply", "refuse")


class TableError(ValueError):
    """An authored table that cannot be built; the message names file, entry and field."""


class FrozenFileError(RuntimeError):
    """The builder would replace a frozen (or otherwise existing) item file; rerun with --force."""


def clean_text(text: str) -> str:
    """Collapse runs of whitespace so that the output never depends on the YAML layout."""
    return " ".join(text.split())


def _load_yaml(path: Path, key: str) -> object:
    if not path.is_file():
        raise TableError(f"{path}: table file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TableError(f"{path}: malformed YAML ({err})") from None
    if not isinstance(raw, dict) or key not in raw:
        raise TableError(f"{path}: top-level key '{key}' is missing")
    return raw[key]


def _text(entry: dict, field: str, where: str) -> str:
    value = entry.get(field)
    if not isinstance(value, str) or not value.strip():
        raise TableError(f"{where}: field '{field}' must be a non-empty string")
    return clean_text(value)


def _check_no_verdict_word(text: str, field: str, where: str) -> None:
    for word in VERDICT_WORDS:
        if re.search(rf"\b{word}\b", text, re.IGNORECASE):
            raise TableError(
                f"{where}: field '{field}' contains the verdict word {word!r}, which would make the option "
                "order of a contrast question ambiguous; rephrase it"
            )


def build_item(domain: str, base: dict, paraphrase_idx: int, scenario: str) -> dict:
    """One item in the published schema, keys in schema order."""
    actor, proposal, pro, anti = base["actor"], base["proposal"], base["pro"], base["anti"]
    contrasts = []
    for template in CONTRAST_TEMPLATES:
        contrasts.append(
            {
                "question": f"{scenario} " + template.question.format(actor=actor, proposal=proposal),
                "question_swapped": f"{scenario} "
                + template.question_swapped.format(actor=actor, proposal=proposal),
                "pro": template.pro,
                "anti": template.anti,
            }
        )
    return {
        "id": f"{base['id']}-p{paraphrase_idx}",
        "domain": domain,
        "base_item": base["id"],
        "paraphrase_idx": paraphrase_idx,
        "scenario": scenario,
        "contrasts": contrasts,
        "forced_choice": {
            "question": FORCED_CHOICE_TEMPLATE.format(scenario=scenario, first=pro, second=anti),
            "question_swapped": FORCED_CHOICE_TEMPLATE.format(scenario=scenario, first=anti, second=pro),
            "pro_label": "A",
            "anti_label": "B",
        },
        "likert_statement": pro,
        "open_ended": OPEN_ENDED_TEMPLATE.format(scenario=scenario, actor=actor, proposal=proposal),
    }


def _parse_base(entry: object, domain: str, index: int, path: Path) -> dict:
    where = f"{path}: domains.{domain}[{index}]"
    if not isinstance(entry, dict):
        raise TableError(f"{where}: expected a mapping with id, actor, proposal, scenarios, pro, anti")
    base_id = _text(entry, "id", where)
    where = f"{path}: {base_id}"
    if not re.fullmatch(rf"{re.escape(domain)}-\d{{3}}", base_id):
        raise TableError(f"{where}: field 'id' must read '{domain}-NNN' (three digits)")
    base = {"id": base_id}
    for field in ("actor", "proposal", "pro", "anti"):
        base[field] = _text(entry, field, where)
    for field in ("actor", "proposal"):
        _check_no_verdict_word(base[field], field, where)
    if base["pro"] == base["anti"]:
        raise TableError(f"{where}: fields 'pro' and 'anti' must differ")
    scenarios = entry.get("scenarios")
    if not isinstance(scenarios, list) or not scenarios:
        raise TableError(f"{where}: field 'scenarios' must be a non-empty list of paraphrases")
    base["scenarios"] = [_text({"s": s}, "s", f"{where}: scenarios[{k}]") for k, s in enumerate(scenarios)]
    if len(set(base["scenarios"])) != len(base["scenarios"]):
        raise TableError(f"{where}: field 'scenarios' repeats a paraphrase")
    return base


def build_scenario_items(path: Path) -> list[dict]:
    """All items of one scenario table (target.yaml or source.yaml), in table order."""
    domains = _load_yaml(path, "domains")
    if not isinstance(domains, dict) or not domains:
        raise TableError(f"{path}: 'domains' must map each domain to a list of base scenarios")
    items: list[dict] = []
    seen: set[str] = set()
    for domain, entries in domains.items():
        if not isinstance(entries, list) or not entries:
            raise TableError(f"{path}: domains.{domain} must be a non-empty list of base scenarios")
        for index, entry in enumerate(entries):
            base = _parse_base(entry, str(domain), index, path)
            if base["id"] in seen:
                raise TableError(f"{path}: {base['id']}: field 'id' is used twice")
            seen.add(base["id"])
            for k, scenario in enumerate(base["scenarios"]):
                items.append(build_item(str(domain), base, k, scenario))
    return items


def _parse_flat(path: Path, key: str, fields: tuple[str, ...]) -> list[dict]:
    entries = _load_yaml(path, key)
    if not isinstance(entries, list) or not entries:
        raise TableError(f"{path}: '{key}' must be a non-empty list")
    rows: list[dict] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{path}: {key}[{index}]"
        if not isinstance(entry, dict):
            raise TableError(f"{where}: expected a mapping with fields {', '.join(fields)}")
        row = {field: _text(entry, field, where) for field in fields}
        if row["id"] in seen:
            raise TableError(f"{where}: field 'id' repeats {row['id']!r}")
        seen.add(row["id"])
        rows.append(row)
    return rows


def build_refusal(path: Path) -> list[dict]:
    rows = _parse_flat(path, "prompts", ("id", "expect", "prompt"))
    for index, row in enumerate(rows):
        if row["expect"] not in REFUSAL_EXPECT:
            raise TableError(f"{path}: prompts[{index}]: field 'expect' must be 'comply' or 'refuse'")
    return rows


def build_neutral(path: Path) -> list[dict]:
    return _parse_flat(path, "passages", ("id", "text"))


def build_all(tables: Path) -> dict[str, list[dict]]:
    """Every output file's rows, keyed by file name, from the tables in `tables`."""
    return {
        TARGET_FILE: build_scenario_items(tables / "target.yaml"),
        SOURCE_FILE: build_scenario_items(tables / "source.yaml"),
        REFUSAL_FILE: build_refusal(tables / "refusal.yaml"),
        NEUTRAL_FILE: build_neutral(tables / "heldout_neutral.yaml"),
    }


def render_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_lock(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        lock = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FrozenFileError(f"{path}: malformed lock file ({err.msg}); fix or remove it") from None
    if (
        not isinstance(lock, dict)
        or not isinstance(lock.get("version"), int)
        or not isinstance(lock.get("files"), dict)
    ):
        raise FrozenFileError(f"{path}: lock file must be {{'version': int, 'files': {{...}}}}")
    return lock


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_save(path, lambda tmp: tmp.write_bytes(data))


def _conflict_message(path: Path, lock: dict | None) -> str:
    recorded = (lock or {}).get("files", {}).get(path.name, {}).get("sha256")
    current = sha256_bytes(path.read_bytes())
    if recorded == current:
        return f"{path} is frozen (sha256 {current[:12]}… in {LOCK_NAME} version {lock['version']})"
    if recorded:
        return f"{path} differs from its frozen hash in {LOCK_NAME} (edited by hand?)"
    return f"{path} exists and is not recorded in {LOCK_NAME}"


def write_frozen(out: Path, outputs: dict[str, bytes], counts: dict[str, int], force: bool) -> dict:
    """Write the outputs and the lock; refuse to replace existing different content unless `force`.

    Returns `{"version", "written": [names], "lock_written": bool}`. Nothing is written when refusing.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock_path = out / LOCK_NAME
    lock = read_lock(lock_path)
    changed = [
        name
        for name, data in outputs.items()
        if not (out / name).is_file() or (out / name).read_bytes() != data
    ]
    conflicts = [name for name in changed if (out / name).is_file()]
    if conflicts and not force:
        reasons = "; ".join(_conflict_message(out / name, lock) for name in conflicts)
        raise FrozenFileError(
            f"refusing to overwrite: {reasons}. The tables now build different content. "
            "Rerun with --force to replace the file(s) and bump the lock version."
        )
    files = {name: {"sha256": sha256_bytes(data), "n_items": counts[name]} for name, data in outputs.items()}
    for name in changed:
        _atomic_write(out / name, outputs[name])
    if lock is not None and lock["files"] == files:
        return {"version": lock["version"], "written": changed, "lock_written": False}
    version = 1 if lock is None else lock["version"] + 1
    lock_bytes = (
        json.dumps({"version": version, "files": files}, indent=2, ensure_ascii=False) + "\n"
    ).encode()
    _atomic_write(lock_path, lock_bytes)
    return {"version": version, "written": changed, "lock_written": True}


def build(tables: Path, out: Path, force: bool = False) -> dict:
    """Build every item file from `tables` into `out` under the freeze rules; see `write_frozen`."""
    rows = build_all(tables)
    outputs = {name: render_jsonl(rows[name]) for name in OUTPUT_FILES}
    counts = {name: len(rows[name]) for name in OUTPUT_FILES}
    result = write_frozen(out, outputs, counts, force)
    result["counts"] = counts
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbt.data.items", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", type=Path, default=DEFAULT_TABLES, help="folder of authored YAML tables")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for the item files and the lock"
    )
    parser.add_argument("--force", action="store_true", help="replace frozen item files and bump the lock")
    args = parser.parse_args(argv)
    try:
        result = build(args.tables, args.out, force=args.force)
    except (TableError, FrozenFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name in OUTPUT_FILES:
        state = "written" if name in result["written"] else "unchanged"
        print(f"{args.out / name}: {result['counts'][name]} items, {state}")
    lock_state = "written" if result["lock_written"] else "unchanged"
    print(f"{args.out / LOCK_NAME}: version {result['version']}, {lock_state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
