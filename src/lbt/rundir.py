"""The job directory: its layout, its files' writers and readers, and the check behind DONE.

A job directory never lies. `DONE` is written only after `completeness` passes: every planned optimizer
step ran, `adapter/` exists and loads, and every planned phase's files exist, parse and hold the expected
rows. Rows and phase files are written once, atomically (a temporary file renamed into place), and never
overwritten; a file found corrupt is set aside (renamed `<name>.corrupt-<time>`), never deleted, and the
phase that wrote it runs again. Only the run card (`run.json`) is rewritten, as the job's status changes.

Layout (`RunDir` holds every name):

    run.json                      run card: job identity, resolved config (no secrets), status, attempts
    train.log                     the job's log (every attempt appends)
    job.lock                      the live process that owns the directory (lbt.joblock)
    DONE                          written last, after the completeness check
    adapter/                      final peft adapter
    checkpoints/last.ckpt         resumable Lightning checkpoint (prev.ckpt: the one before it)
    checkpoints/adapter_step_<n>/ adapter at each checkpoint fraction
    eval/<phase>/<item_set>/<measure>.jsonl   stance rows, one JSON object per line
    eval/<phase>/summary.json     per-phase stance summary
    eval/<phase>/capability.json  capability checks (base and final)
    probe/<phase>.json            probe projections
    csv/metrics.csv               metrics of logger=csv (appended across attempts)
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbt.study import phase_kind, phase_step, step_phase  # noqa: F401  (the job directory names phases)

log = logging.getLogger(__name__)

STATUSES = ("running", "interrupted", "failed", "incomplete", "done")


class CorruptFile(ValueError):
    """A file of the job directory that does not parse; the message names the file (and line)."""


@dataclass(frozen=True)
class RunDir:
    """Every path of one job directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def card(self) -> Path:
        return self.root / "run.json"

    @property
    def done(self) -> Path:
        return self.root / "DONE"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def lock(self) -> Path:
        return self.root / "job.lock"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def prev_ckpt(self) -> Path:
        return self.checkpoints / "prev.ckpt"

    def adapter_at(self, step: int) -> Path:
        return self.checkpoints / f"adapter_step_{step}"

    def phase_dir(self, phase: str) -> Path:
        return self.root / "eval" / phase

    def rows(self, phase: str, item_set: str, measure: str) -> Path:
        return self.phase_dir(phase) / item_set / f"{measure}.jsonl"

    def summary(self, phase: str) -> Path:
        return self.phase_dir(phase) / "summary.json"

    def capability(self, phase: str) -> Path:
        return self.phase_dir(phase) / "capability.json"

    def probe(self, phase: str) -> Path:
        return self.root / "probe" / f"{phase}.json"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "csv" / "metrics.csv"

    def is_done(self) -> bool:
        return self.done.exists()


# -- a finished job under its earlier name ----------------------------------------------------------------

# A job folder named <model>-<arm>-s<seed> (a sweep's subdir; a single run adds _<hash> of its overrides).
_CELL_NAME = re.compile(r"^(?P<model>.+)-(?P<arm>[^-]+)-s(?P<seed>\d+)(?P<rest>_[0-9a-f]{8})?$")


def legacy_twin(folder: Path) -> Path | None:
    """The folder this job's cell was trained in before the arms took today's names (issue 16), if it
    exists beside it: `qwen-frame_plus-s0` for `qwen-plus-s0` (and minus); None otherwise."""
    from lbt.study import LEGACY_ARM_NAMES

    match = _CELL_NAME.match(Path(folder).name)
    old = {new: old for old, new in LEGACY_ARM_NAMES.items()}.get(match["arm"]) if match else None
    if old is None:
        return None
    twin = Path(folder).with_name(f"{match['model']}-{old}-s{match['seed']}{match['rest'] or ''}")
    return twin if twin.is_dir() else None


def finished_folder(folder: Path) -> Path | None:
    """Where this job already finished: `folder` if it holds DONE, else its pre-rename twin (`legacy_twin`)
    if that does; None when the job still has to run. A sweep re-run after the arms were renamed then skips
    the cells it finished before, instead of training them again under the new name."""
    if RunDir(folder).is_done():
        return Path(folder)
    twin = legacy_twin(folder)
    return twin if twin is not None and RunDir(twin).is_done() else None


def job_folders_under(folder: Path) -> list[Path]:
    """Every job folder (one holding run.json) at or below `folder`, in path order: a sweep's jobs, the jobs
    of several sweeps under one multirun folder, or `folder` itself when it is a job. lbt.check and
    lbt.analyze both find jobs this way, so they agree on what a folder holds."""
    folder = Path(folder)
    if (folder / "run.json").is_file():
        return [folder]
    return sorted(p.parent for p in folder.rglob("run.json"))


# -- the folder of a single run ---------------------------------------------------------------------------

def run_dir_name(run_name: str | None, identity: str, overrides: str) -> str:
    """A single run's folder name: run_name if given, else the job identity (model-arm-seed) plus a short
    hash of the other command-line overrides, so the same command always finds the same folder."""
    if run_name not in (None, "", "None", "null"):
        return str(run_name)
    if not overrides:
        return identity
    import hashlib

    return f"{identity}_{hashlib.sha1(str(overrides).encode()).hexdigest()[:8]}"


def register_resolvers() -> None:
    """`${lbt.run_dir_name:...}`, used by conf/train.yaml's hydra.run.dir."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("lbt.run_dir_name"):
        OmegaConf.register_new_resolver("lbt.run_dir_name", run_dir_name)


register_resolvers()


# -- phases ---------------------------------------------------------------------------------------------

def planned_phases(checkpoint_steps: Sequence[int], total_steps: int) -> list[str]:
    """base, step_<n> at every checkpoint step before the last, final."""
    return ["base", *(step_phase(s) for s in checkpoint_steps if s != total_steps), "final"]


# -- writers and readers ----------------------------------------------------------------------------------

def atomic_save(path: Path, save: Callable[[Path], Any]) -> None:
    """Write a file through `save(temporary path)`, fsync it and rename it into place: a reader sees the
    old file or the whole new one, never half of it (torch.save, bytes, text alike)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write(path: Path, text: str) -> None:
    """Write a text file atomically (`atomic_save`)."""
    atomic_save(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_rows(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows once; an existing file is an error (rows are never overwritten)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; rows are never overwritten")
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a line that does not parse raises CorruptFile naming the file and line."""
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CorruptFile(f"{path}, line {number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorruptFile(f"{path}, line {number}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise CorruptFile(f"{path}, line {number}: a row must be a JSON object")
            rows.append(row)
    return rows


def write_json_once(path: Path, data: Mapping[str, Any]) -> None:
    """A JSON file written atomically, only if it does not exist yet."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; it is never overwritten")
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """A JSON file replaced atomically (the run card, whose status changes)."""
    atomic_write(Path(path), json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    """A JSON file; one that does not parse raises CorruptFile naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CorruptFile(f"{path}: not UTF-8 text, not JSON") from None
    except json.JSONDecodeError as err:
        raise CorruptFile(f"{path}: not JSON ({err.msg}, line {err.lineno})") from None


def set_aside(path: Path, reason: str) -> Path:
    """Rename a corrupt file or folder out of the way (kept for inspection, never deleted)."""
    path = Path(path)
    name = f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    target, n = path.with_name(name), 1
    while target.exists():  # set aside twice within a second: keep both
        target, n = path.with_name(f"{name}-{n}"), n + 1
    os.replace(path, target)
    log.warning("set aside %s (%s) as %s", path, reason, target.name)
    return target


# -- the completeness check -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expected:
    """A file a phase must leave: a JSON object (rows=None) or a JSONL file of exactly `rows` rows."""

    path: Path
    rows: int | None = None


def file_problem(expected: Expected) -> str | None:
    """Why the file is not what was planned (missing, corrupt, wrong row count), or None when it is."""
    path = expected.path
    if not path.is_file():
        return f"{path}: missing"
    try:
        if expected.rows is None:
            if not isinstance(read_json(path), dict):
                return f"{path}: corrupt (not a JSON object)"
            return None
        found = len(read_rows(path))
    except CorruptFile as err:
        return f"corrupt: {err}"
    if found != expected.rows:
        return f"{path}: {found} rows, {expected.rows} expected (truncated or foreign)"
    return None


def adapter_problem(folder: Path) -> str | None:
    """Why a saved peft adapter folder would not load (missing files, unreadable tensors), or None."""
    config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not folder.is_dir():
        return f"{folder}: missing"
    for path in (config, weights):
        if not path.is_file():
            return f"{path}: missing"
    try:
        read_json(config)
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
            for key in keys:
                handle.get_tensor(key)
    except Exception as err:  # noqa: BLE001 -- any failure to read means the adapter does not load
        return f"{folder}: does not load ({type(err).__name__}: {err})"
    if not keys:
        return f"{weights}: holds no tensors"
    return None


@dataclass
class Completeness:
    """The outcome of the check behind DONE: what is missing, per part of the job."""

    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing


def completeness(run: RunDir, planned_steps: int, trained_steps: int,
                 phase_files: Mapping[str, Sequence[Expected]]) -> Completeness:
    """Every planned step ran, adapter/ loads, every planned phase's files exist, parse and hold their rows."""
    result = Completeness()
    if trained_steps != planned_steps:
        result.missing.append(f"training: {trained_steps} of {planned_steps} optimizer steps ran")
    problem = adapter_problem(run.adapter)
    if problem:
        result.missing.append(f"adapter: {problem}")
    for phase, files in phase_files.items():
        for expected in files:
            problem = file_problem(expected)
            if problem:
                result.missing.append(f"phase {phase}: {problem}")
    return result


def incomplete_phases(phase_files: Mapping[str, Sequence[Expected]], set_aside_corrupt: bool = True) -> list[str]:
    """Phases with a missing or corrupt file; corrupt files (and the phase summary built from them) are
    set aside, so that the phase's writer produces them again."""
    phases = []
    for phase, files in phase_files.items():
        bad = [(e, file_problem(e)) for e in files]
        bad = [(e, why) for e, why in bad if why]
        if not bad:
            continue
        phases.append(phase)
        if not set_aside_corrupt:
            continue
        for expected, why in bad:
            if expected.path.exists():
                set_aside(expected.path, why)
        # A summary is derived from its phase's rows: once a rows file goes, the summary goes with it.
        for expected in files:
            if expected.path.name == "summary.json" and expected.path.exists() and \
                    any(e.path.suffix == ".jsonl" and e.path.parent.parent == expected.path.parent for e, _ in bad):
                set_aside(expected.path, "its rows were set aside")
    return phases


# -- a resumed job's settings ----------------------------------------------------------------------------

# What decides a job's numbers. A folder that holds results of a job (checkpoints, adapters, rows, probes)
# resumes only under the values these had when it started; where and how the job runs (paths, logger,
# hardware's workers, devices and speed levers, which change rounding only), its batch sizes, caches and how
# often it logs or checkpoints may change between attempts (a requeue on another node, a smaller batch after
# running out of memory).
RESULT_KEYS = ("seed", "data", "train", "model", "arm", "eval", "directions", "probe", "intervention",
               "hardware.dtype", "hardware.precision")
FREE_KEYS = frozenset({"train.log_every_steps", "train.resume_every_steps", "eval.stance.log_tables",
                       "data.require_validation", "data.validation_report"})
FREE_SUFFIXES = (".batch_size", "_batch_size", ".cache_dir")


class ResumeMismatch(ValueError):
    """A job folder holds results of the job under other settings than the command's."""


def holds_results(run: RunDir) -> bool:
    return any(path.exists() for path in (run.checkpoints, run.adapter, run.root / "eval",
                                          run.root / "probe"))


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every value of a nested mapping by its dotted key; a list, or an empty mapping, is one value."""
    leaves: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            leaves.update(_leaves(value, name))
        else:
            leaves[name] = value
    return leaves


def decides_results(key: str) -> bool:
    return (any(key == k or key.startswith(k + ".") for k in RESULT_KEYS) and key not in FREE_KEYS
            and not key.endswith(FREE_SUFFIXES))


def settings_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """'key: before -> now' for each setting that decides results and differs. A key that only one side has
    (a setting that a newer lbt added or dropped) is not compared."""
    old, new = _leaves(before), _leaves(now)
    return [f"{key}: {json.dumps(old[key])} -> {json.dumps(new[key])}"
            for key in sorted(old.keys() & new.keys()) if decides_results(key) and old[key] != new[key]]


def refuse_changed_resume(run: RunDir, config: Mapping[str, Any]) -> None:
    """ResumeMismatch when the folder holds results made under other settings than `config` (the run card's
    resolved config): resuming would mix the two, and the run card would describe neither."""
    if not (run.card.exists() and holds_results(run)):
        return
    try:
        previous = read_json(run.card)
    except CorruptFile:
        return  # no settings to compare: the job sets the card aside and records what it does now
    earlier = previous.get("config") if isinstance(previous, dict) else None
    if not isinstance(earlier, Mapping):
        return
    changes = settings_changes(earlier, config)
    if changes:
        raise ResumeMismatch(
            f"{run.root} holds results of this job under other settings ({'; '.join(changes)}); resuming "
            f"would mix the two. To resume, run it with the settings it started with; to train it anew, give "
            f"it a fresh folder (run_name=<name>, or sweep_name=<name> for a sweep). Nothing was touched.")
