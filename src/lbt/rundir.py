"""The job directory: its layout, its files' writers and readers, its lock, and the check behind DONE.

A job directory never lies. `DONE` is written only after `completeness` passes: every planned optimizer
step ran, `adapter/` exists and loads, and every planned phase's files exist, parse and hold the expected
rows. Rows and phase files are written once, atomically (a temporary file renamed into place), and never
overwritten; a file found corrupt is set aside (renamed `<name>.corrupt-<time>`), never deleted, and the
phase that wrote it runs again. Only the run card (`run.json`) is rewritten, as the job's status changes.

Layout (`RunDir` holds every name):

    run.json                      run card: job identity, resolved config (no secrets), status, attempts
    train.log                     the job's log (every attempt appends)
    job.lock                      the live process that owns the directory (host, pid, heartbeat)
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
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing_extensions import Self

log = logging.getLogger(__name__)

STATUSES = ("running", "interrupted", "failed", "incomplete", "done")


class CorruptFile(ValueError):
    """A file of the job directory that does not parse; the message names the file (and line)."""


class JobLocked(RuntimeError):
    """Another live process owns the job directory."""


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

def step_phase(step: int) -> str:
    return f"step_{int(step)}"


def phase_step(phase: str, total_steps: int) -> int:
    """The optimizer step a phase evaluates: base 0, step_<n> n, final the last."""
    if phase == "base":
        return 0
    if phase == "final":
        return int(total_steps)
    if phase.startswith("step_") and phase[5:].isdigit():
        return int(phase[5:])
    raise ValueError(f"unknown phase {phase!r}: base, step_<n> or final")


def phase_kind(phase: str) -> str:
    """base | step | final, for base, step_<n>, final."""
    return "step" if phase.startswith("step_") else phase


def planned_phases(checkpoint_steps: Sequence[int], total_steps: int) -> list[str]:
    """base, step_<n> at every checkpoint step before the last, final."""
    return ["base", *(step_phase(s) for s in checkpoint_steps if s != total_steps), "final"]


# -- writers and readers ----------------------------------------------------------------------------------

def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_rows(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows once; an existing file is an error (rows are never overwritten)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; rows are never overwritten")
    _atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


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
    _atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """A JSON file replaced atomically (the run card, whose status changes)."""
    _atomic_write(Path(path), json.dumps(data, indent=2, default=str) + "\n")


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


# -- one live process per job directory -------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_job() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class JobLock:
    """One live process per job directory, on a shared filesystem too.

    `job.lock` is created exclusively (O_EXCL, atomic on local and NFS filesystems) and holds the owner's
    host, pid, SLURM job and a heartbeat the owner refreshes every `heartbeat_s`. A lock is stale, and is
    taken over, when its heartbeat is older than `stale_s`, when its owner is a dead process on this host,
    or when its owner is an earlier attempt of this same SLURM job (a requeue). Otherwise `acquire` raises
    JobLocked naming the owner, without touching anything else.
    """

    def __init__(self, run: RunDir, heartbeat_s: float | None = None, stale_s: float | None = None):
        self.path = run.lock
        self.heartbeat_s = float(heartbeat_s or os.environ.get("LBT_LOCK_HEARTBEAT_S") or 30)
        self.stale_s = float(stale_s or os.environ.get("LBT_LOCK_STALE_S") or 300)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": _slurm_job(),
                      "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def read_owner(self) -> dict[str, Any] | None:
        """The lock file's record; None when it is missing or not a JSON object with a numeric pid and
        heartbeat (half written, or not a lock of ours)."""
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(owner, dict):
                float(owner.get("heartbeat", 0))   # raise on a record that is not ours
                int(owner.get("pid", -1))
                return owner
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
            pass
        return None

    def stale_reason(self, owner: dict[str, Any] | None) -> str | None:
        if owner is None:
            return "unreadable lock file"
        age = time.time() - float(owner.get("heartbeat", 0))
        if age > self.stale_s:
            return f"heartbeat {age:.0f} s old"
        if owner.get("host") == self.owner["host"] and not _pid_alive(int(owner.get("pid", -1))):
            return f"process {owner.get('pid')} on this host is gone"
        if owner.get("slurm_job") and owner.get("slurm_job") == self.owner["slurm_job"] and \
                owner.get("pid") != self.owner["pid"]:
            return f"an earlier attempt of SLURM job {owner['slurm_job']}"
        return None

    def _write(self, flags: int) -> None:
        record = dict(self.owner, heartbeat=time.time())
        fd = os.open(self.path, flags, 0o644)
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                self._write(os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                break
            except FileExistsError:
                owner = self.read_owner()
                if owner is None:  # being created right now: read again before calling it stale
                    time.sleep(0.5)
                    owner = self.read_owner()
                why = self.stale_reason(owner)
                if why is None:
                    beat = time.time() - float(owner.get("heartbeat", 0))
                    raise JobLocked(
                        f"{self.path.parent} is in use by pid {owner.get('pid')} on {owner.get('host')}"
                        + (f" (SLURM job {owner['slurm_job']})" if owner.get("slurm_job") else "")
                        + f", heartbeat {beat:.0f} s ago; nothing was touched. If that process is gone "
                        f"(another host), the lock is taken over {self.stale_s:.0f} s after its last "
                        f"heartbeat, or remove {self.path} by hand.") from None
                log.warning("job lock %s is stale (%s): taken over", self.path, why)
                # Take-over: move the stale lock aside atomically; a racing taker loses the O_EXCL create.
                try:
                    os.replace(self.path, self.path.with_name(f"job.lock.stale-{os.getpid()}"))
                    os.unlink(self.path.with_name(f"job.lock.stale-{os.getpid()}"))
                except FileNotFoundError:
                    pass
        else:
            raise JobLocked(f"{self.path}: could not take the lock (contended)")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="lbt-job-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            owner = self.read_owner()
            if not owner or owner.get("pid") != self.owner["pid"] or owner.get("host") != self.owner["host"]:
                # This process was stopped longer than the stale limit and another one took the folder
                # over: end at once, before writing anything more into a folder it no longer owns.
                log.error("job lock %s was taken over by another process (%s); this process ends now "
                          "without writing more", self.path, owner)
                logging.shutdown()
                os._exit(75)
            try:
                _atomic_write(self.path, json.dumps(dict(self.owner, heartbeat=time.time())))
            except OSError as err:
                log.warning("job lock heartbeat failed: %s", err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held:
            owner = self.read_owner()
            if owner and owner.get("pid") == self.owner["pid"] and owner.get("host") == self.owner["host"]:
                self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
