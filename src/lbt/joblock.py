"""One live process per job directory: `job.lock` in the job folder (see lbt.rundir for the layout)."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from typing_extensions import Self

from lbt.rundir import RunDir, atomic_write

log = logging.getLogger(__name__)


class JobLocked(RuntimeError):
    """Another live process owns the job directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(path: Path) -> dict[str, Any] | None:
    """A lock file's record; None when it is missing or not a JSON object with a numeric pid and heartbeat
    (half written, or not a lock of ours)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(owner, dict):
            float(owner.get("heartbeat", 0))   # raise on a record that is not ours
            int(owner.get("pid", -1))
            return owner
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
        pass
    return None


def slurm_job_id() -> str | None:
    """This process's SLURM job: `<array job>_<task>` for an array task, else SLURM_JOB_ID (None outside
    SLURM)."""
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
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": slurm_job_id(),
                      "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def read_owner(self) -> dict[str, Any] | None:
        return read_lock(self.path)

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

    def _create(self) -> None:
        """Create the lock file exclusively (FileExistsError when another process holds it)."""
        record = dict(self.owner, heartbeat=time.time())
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                self._create()
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
                if self._take_over(owner):
                    log.warning("job lock %s is stale (%s): taken over", self.path, why)
        else:
            raise JobLocked(f"{self.path}: could not take the lock (contended)")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="lbt-job-lock", daemon=True)
        self._thread.start()

    def _take_over(self, stale: dict[str, Any] | None) -> bool:
        """Move the stale lock aside (atomically), then make sure it was the one judged stale: a racing taker
        may have replaced it by its own fresh lock in between, which goes back where it was (the loop then
        finds that owner alive). A racing create loses to O_EXCL either way."""
        aside = self.path.with_name(f"job.lock.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False  # another taker moved it first: try to create again
        moved = read_lock(aside)
        if moved == stale:
            aside.unlink(missing_ok=True)
            return True
        try:
            os.link(aside, self.path)  # give it back, unless yet another lock was created meanwhile
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            owner = self.read_owner()
            if owner is None:  # a racing taker may have it aside for an instant (_take_over): look again
                time.sleep(1.0)
                owner = self.read_owner()
            if not owner or owner.get("pid") != self.owner["pid"] or owner.get("host") != self.owner["host"]:
                # This process was stopped longer than the stale limit and another one took the folder
                # over: end at once, before writing anything more into a folder it no longer owns.
                log.error("job lock %s was taken over by another process (%s); this process ends now "
                          "without writing more", self.path, owner)
                logging.shutdown()
                os._exit(75)
            try:
                atomic_write(self.path, json.dumps(dict(self.owner, heartbeat=time.time())))
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
