"""Finding and reading a sweep's job directories: run cards, rows, probe, capability and summary files.

Every directory holding a run.json under the given sweep directories is a job: family = job.model,
arm = job.arm (frame_plus or frame_minus in jobs trained before issue 16, read as today's name by
lbt.study.arm_name), seed = job.seed. Job directories are read through `lbt.rundir` (their layout and
readers): a file that does not parse is an AnalyzeError naming the job, the file and the line. Rows come from
eval/<phase>/<item_set>/<measure>.jsonl; item set `target` is the held-out items, `source` the
manipulation check — the names both writers of rows use (the stance evaluator's `eval.stance.item_sets` keys,
and `lbt.evaluate`, which names the project's item files alike); `target_items`/`source_items`, the names
older `lbt.evaluate` directories hold, are read the same way (ITEM_SET_ROLES).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbt.rundir import CorruptFile, RunDir, job_folders_under, read_json, read_rows
from lbt.study import STUDY_ARMS, arm_name, is_phase, phase_key

ITEM_SET_ROLES = {"target": "target", "target_items": "target", "source": "source", "source_items": "source"}
Display = Callable[[Path], str]  # a path as shown in the report (relative to the sweeps' parent)


class AnalyzeError(RuntimeError):
    """Input the analysis cannot use; the message names the job directory and file."""


@dataclass
class Job:
    """A job directory as the analysis sees it: its identity from run.json, status, DONE and eval phases."""

    path: Path
    family: str | None
    arm: str | None
    seed: int | None
    status: str | None
    done: bool
    card: dict[str, Any]
    phases: list[str] = field(default_factory=list)

    @property
    def run(self) -> RunDir:
        return RunDir(self.path)

    @property
    def is_study_job(self) -> bool:
        return self.arm in STUDY_ARMS and isinstance(self.seed, int) and self.family is not None

    @property
    def identity(self) -> dict[str, Any]:
        """family, arm and seed: the first fields of every record read from the job."""
        return {"family": self.family, "arm": self.arm, "seed": self.seed}

    @property
    def label(self) -> str:
        return f"({self.family}, {self.arm}, seed {self.seed})"


def read_json_file(path: Path, job_dir: Path) -> Any:
    """lbt.rundir.read_json, its CorruptFile (file and line) as an AnalyzeError naming the job too."""
    try:
        return read_json(path)
    except (CorruptFile, UnicodeDecodeError) as err:
        raise AnalyzeError(f"job {job_dir}: {err}") from None


def eval_phases(run: RunDir) -> list[str]:
    """Phases with an eval/<phase>/ folder, in order (any name: `lbt.evaluate phase=<name>` too)."""
    eval_dir = run.phase_dir("base").parent
    if not eval_dir.is_dir():
        return []
    return sorted((p.name for p in eval_dir.iterdir() if p.is_dir()), key=phase_key)


def load_job(run_json: Path) -> Job:
    """The job whose run card is `run_json`; AnalyzeError for a card without a usable `job` object."""
    run = RunDir(run_json.parent)
    card = read_json_file(run.card, run.root)
    job = card.get("job") if isinstance(card, dict) else None
    if not isinstance(job, dict):
        raise AnalyzeError(f"job {run.root}: run.json has no 'job' object")
    seed = job.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise AnalyzeError(f"job {run.root}: run.json job.seed must be an integer, got {seed!r}")
    return Job(
        path=run.root,
        family=job.get("model"),
        arm=arm_name(job.get("arm")),
        seed=seed,
        status=card.get("status"),
        done=run.is_done(),
        card=card,
        phases=eval_phases(run),
    )


def find_jobs(sweeps: list[Path]) -> list[Job]:
    """Every job directory (one holding run.json) under the sweep directories, in path order."""
    jobs = []
    for sweep in sweeps:
        if not sweep.is_dir():
            raise AnalyzeError(f"sweep directory {sweep} does not exist")
        found = job_folders_under(sweep)
        if not found:
            raise AnalyzeError(f"no job directories (a directory containing run.json) under {sweep}")
        jobs.extend(load_job(path / "run.json") for path in found)
    check_one_job_per_cell(jobs)
    return jobs


def check_one_job_per_cell(jobs: list[Job]) -> None:
    """AnalyzeError when two study jobs share a model, arm and seed: their rows would be pooled as one
    seed's (a setting swept beside the arms, the same sweep run twice, or a job trained before the arms were
    renamed beside its retrained copy), and the statistics would count them as one replicate."""
    by_cell: dict[tuple, list[Job]] = {}
    for job in jobs:
        if job.is_study_job:
            by_cell.setdefault((job.family, job.arm, job.seed), []).append(job)
    clashes = {cell: found for cell, found in by_cell.items() if len(found) > 1}
    if clashes:
        lines = [f"{found[0].label}: {', '.join(str(job.path) for job in found)}" for found in clashes.values()]
        raise AnalyzeError(
            "more than one job for one model, arm and seed (the analysis needs one job per cell: point it at "
            "folders holding one setting, or move the extra jobs out): " + "; ".join(lines))


def row_line(path: Path, index: int) -> int:
    """The line of the index-th row of a rows file (lbt.rundir.read_rows skips blank lines)."""
    with open(path, "rb") as handle:  # lines as read_rows counts them
        lines = [number for number, raw in enumerate(handle, start=1) if raw.strip()]
    return lines[index] if index < len(lines) else index + 1


def parse_row(obj: Any, path: Path, index: int, job: Job, measure: str) -> float:
    """The stance of the index-th row; AnalyzeError naming job dir, file, line and field for anything
    malformed."""
    where = f"job {job.path}: {path.relative_to(job.path)}:{row_line(path, index)}"
    if not isinstance(obj, dict):
        raise AnalyzeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("base_item", "domain", "stance"):
        if key not in obj:
            raise AnalyzeError(f"{where}: field '{key}' is missing")
    if obj.get("measure", measure) != measure:
        raise AnalyzeError(f"{where}: field 'measure' is {obj['measure']!r} in file {measure}.jsonl")
    stance = obj["stance"]
    if stance is None:
        return math.nan
    if isinstance(stance, bool) or not isinstance(stance, (int, float)):
        raise AnalyzeError(f"{where}: field 'stance' must be a number or NaN, got {stance!r}")
    return float(stance)


def load_rows(job: Job, display: Display) -> list[dict[str, Any]]:
    """Every row of every phase, item set and measure of a job, reduced to what the analysis reads."""
    rows = []
    for phase in job.phases:
        for rows_file in sorted(job.run.phase_dir(phase).glob("*/*.jsonl")):
            item_set, measure = rows_file.parent.name, rows_file.stem
            source = display(rows_file)
            try:
                objs = read_rows(rows_file)
            except (CorruptFile, UnicodeDecodeError) as err:
                raise AnalyzeError(f"job {job.path}: {err}") from None
            for index, obj in enumerate(objs):
                stance = parse_row(obj, rows_file, index, job, measure)
                if obj.get("parsed") is False:  # rows written before lbt scored unparsed answers as NaN
                    stance = math.nan
                rows.append(
                    {
                        **job.identity,
                        "phase": phase,
                        "item_set": item_set,
                        "measure": measure,
                        "base_item": obj["base_item"],
                        "domain": obj["domain"],
                        "stance": stance,
                        "item_id": obj.get("item_id", obj["base_item"]),
                        "source": source,
                    }
                )
    return rows


def probe_files(job: Job) -> list[Path]:
    """probe/<phase>.json of every phase the job probed (not train_intervention.json or set-aside copies)."""
    folder = job.run.probe("base").parent
    phases = sorted((p.stem for p in folder.glob("*.json") if is_phase(p.stem)), key=phase_key)
    return [job.run.probe(phase) for phase in phases]


def load_probes(jobs: list[Job], display: Display) -> list[dict[str, Any]]:
    """Every probe/<phase>.json of the jobs, reduced to what the projection tables read."""
    records = []
    for job in jobs:
        for path in probe_files(job):
            data = read_json_file(path, job.path)
            try:
                layers = list(data["layers"])
                l_star = int(data["l_star"])
                projection = [float(x) for x in data["projection"]["answer"]]
                shift = [float(x) for x in data["shift"]["answer"]]
                shift_se = [float(x) for x in data.get("shift_se", {}).get("answer", [math.nan] * len(shift))]
            except (KeyError, TypeError, ValueError) as err:
                raise AnalyzeError(
                    f"job {job.path}: probe/{path.name}: missing or malformed field ({err!r}); "
                    "expected layers, l_star, projection.answer, shift.answer"
                ) from None
            if not (len(layers) == len(projection) == len(shift)):
                raise AnalyzeError(
                    f"job {job.path}: probe/{path.name}: layers, projection.answer and "
                    "shift.answer differ in length"
                )
            records.append(
                {
                    **job.identity,
                    "phase": data.get("phase", path.stem),
                    "layers": layers,
                    "l_star": l_star,
                    "projection": projection,
                    "shift": shift,
                    "shift_se": shift_se,
                    "source": display(path),
                }
            )
    return records


PHASE_FILES: dict[str, Callable[[RunDir, str], Path]] = {
    "summary.json": RunDir.summary,
    "capability.json": RunDir.capability,
}
def phase_json_files(jobs: list[Job], name: str) -> Iterator[tuple[Job, str, Path, dict[str, Any]]]:
    """(job, phase, path, object) for every eval/<phase>/<name> a job wrote; a non-object is an error."""
    for job in jobs:
        for phase in job.phases:
            path = PHASE_FILES[name](job.run, phase)
            if not path.exists():
                continue
            data = read_json_file(path, job.path)
            if not isinstance(data, dict):
                raise AnalyzeError(f"job {job.path}: eval/{phase}/{name} is not a JSON object")
            yield job, phase, path, data


def load_capability(jobs: list[Job], display: Display) -> list[dict[str, Any]]:
    """The capability checks (perplexity, refusal, MMLU, flags) of every job and phase."""
    table = []
    for job, phase, path, data in phase_json_files(jobs, "capability.json"):
        refusal = data.get("refusal") or {}
        flags = data.get("flags") or {}
        table.append(
            {
                **job.identity,
                "phase": phase,
                "perplexity": data.get("perplexity"),
                "comply_correct_rate": refusal.get("comply_correct_rate"),
                "refuse_correct_rate": refusal.get("refuse_correct_rate"),
                "mmlu_accuracy": data.get("mmlu_accuracy"),
                "perplexity_rise": bool(flags.get("perplexity_rise", False)),
                "mmlu_drop": bool(flags.get("mmlu_drop", False)),
                "source": display(path),
            }
        )
    return table


def flatten_numbers(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(key/path, number) of every number nested in `obj`."""
    if isinstance(obj, dict):
        return [pair for key, value in obj.items() for pair in flatten_numbers(value, f"{prefix}{key}/")]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [(prefix.rstrip("/"), float(obj))]
    return []


def validity_entries(data: dict) -> list[tuple[str, str, float | None, int | None]]:
    """(item_set, measure, agreement, n_items) from a summary.json.

    The evaluation writes `{"item_sets": {set: {"validity": {measure: {"agreement", "n_items"}}}}}`;
    for other writers, every number under a top-level key containing "validity" is taken, with its key
    path as the measure.
    """
    entries = []
    for item_set, summary in (data.get("item_sets") or {}).items():
        for measure, stats in ((summary or {}).get("validity") or {}).items():
            if isinstance(stats, dict):
                entries.append((item_set, measure, stats.get("agreement"), stats.get("n_items")))
    for key, value in data.items():
        if "validity" in key:
            entries += [
                ("", f"{key}/{name}" if name else key, number, None)
                for name, number in flatten_numbers(value)
            ]
    return entries


def load_validity(jobs: list[Job], display: Display) -> list[dict[str, Any]]:
    """Measure validity (sign agreement with the model's greedy forced choice) from every summary.json."""
    table = []
    for job, phase, path, data in phase_json_files(jobs, "summary.json"):
        for item_set, measure, agreement, n_items in validity_entries(data):
            table.append(
                {
                    **job.identity,
                    "phase": phase,
                    "item_set": item_set,
                    "measure": measure,
                    "agreement": agreement,
                    "n_items": n_items,
                    "source": display(path),
                }
            )
    return table


def load_judge_consistency(sweeps: list[Path], display: Display) -> list[dict[str, Any]]:
    """judge_consistency.json (written by lbt.judge in the directory it was given) under the sweeps."""
    found = []
    for sweep in sweeps:
        for path in sorted(sweep.rglob("judge_consistency.json")):
            try:
                data = read_json(path)
            except (CorruptFile, UnicodeDecodeError) as err:
                raise AnalyzeError(f"{err}") from None
            if isinstance(data, dict):
                found.append({**data, "source": display(path)})
    return found
