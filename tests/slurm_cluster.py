"""A real one-node SLURM cluster for tests: Debian's daemons on localhost, all state in one folder.

`start_cluster(folder)` brings up munged (authentication), mariadbd + slurmdbd (accounting, so that
`sacct` answers: submitit polls job states with it), slurmctld and slurmd (the node `localhost` with
this machine's CPUs, several one-CPU jobs at a time, in the default partition `debug` and in `lbt`, the
tests' one), waits until `sinfo` shows the node idle, and returns a `SlurmCluster` whose `env` points SLURM's commands at it (`SLURM_CONF`). `stop()`
cancels every job, waits for them to leave the node, and ends the daemons it started (by process id).

The daemons need root (slurmd starts jobs as their user) and the Debian packages in `PACKAGES`;
`ensure_packages()` installs them with apt-get when missing. Anything that keeps the cluster from
starting raises `ClusterUnavailable` with the reason, so that tests can skip instead of failing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("munge", "slurm-client", "slurmctld", "slurmd", "slurmdbd", "mariadb-server")
BINARIES = ("munged", "sbatch", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "mariadb-install-db")
CLUSTER = "lbt"
PARTITION = "lbt"       # not the default partition (that is `debug`)
ACCOUNT = "lbt-ci"      # a SLURM account root may charge (associations are enforced, as on real clusters)


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run here (not root, packages missing and not installable, a daemon that does
    not start): the reason, for a test's skip message."""


def ensure_packages() -> None:
    """Install the Debian packages of SLURM, munge and MariaDB when a binary is missing (root only)."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"SLURM packages missing ({' '.join(PACKAGES)}), and not root to install")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    for command in (install, ["apt-get", "update", "-qq"], install):   # update only when install fails
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                                    check=False)
        except (OSError, subprocess.SubprocessError) as err:
            raise ClusterUnavailable(f"{' '.join(command)}: {err}") from err
        if result.returncode == 0 and command is install:
            return
    raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-500:]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_version() -> str:
    """e.g. `slurm-wlm 22.05.8` (slurmctld answers without a configuration)."""
    out = subprocess.run(["slurmctld", "-V"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


@dataclass
class SlurmCluster:
    """A running one-node cluster: `env` (SLURM_CONF, PATH) for SLURM's commands, `partition`, logs."""

    folder: Path
    env: dict[str, str]
    partition: str = PARTITION
    cpus: int = 1
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> str:
        """A SLURM command against this cluster; its stdout."""
        result = subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=timeout,
                                check=False)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(command)} -> {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-N", "-p", self.partition, "-o", "%t", check=False).strip()

    def queue(self) -> list[dict[str, str]]:
        """Jobs slurmctld knows, pending or running: id (array tasks as <job>_<task>), state, name."""
        out = self.run("squeue", "-h", "-o", "%i|%T|%j|%r", check=False)
        return [dict(zip(("id", "state", "name", "reason"), line.split("|")))
                for line in out.splitlines() if line]

    def show_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (finished jobs stay visible for MinJobAge seconds)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        fields: dict[str, str] = {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def accounting(self, job_id: str) -> list[dict[str, str]]:
        """`sacct` rows of a job, every attempt (--duplicates): JobID, State, ExitCode, Restarts."""
        out = self.run("sacct", "-D", "-n", "-P", "-X", "-S", "2000-01-01",
                       "-o", "JobID,State,ExitCode,Elapsed", "-j", job_id, check=False)
        return [dict(zip(("JobID", "State", "ExitCode", "Elapsed"), line.split("|")))
                for line in out.splitlines() if line]

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for path in sorted((self.folder / "log").glob("*")):
            if path.stat().st_size:
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def cancel_all(self, wait_s: float = 60) -> None:
        """Cancel every job and wait until none is left on the node."""
        self.run("scancel", "--user=root", check=False)
        deadline = time.time() + wait_s
        while time.time() < deadline and self.queue():
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel the jobs, then end the daemons this cluster started, last started first."""
        if self.daemons.get("slurmctld") is not None and self.daemons["slurmctld"].poll() is None:
            try:
                self.cancel_all()
            except (OSError, subprocess.SubprocessError):
                pass
        for name, proc in reversed(list(self.daemons.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
        self.daemons.clear()


def _wait(what: str, ready, timeout: float, cluster: SlurmCluster,
          proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            raise ClusterUnavailable(f"{what} exited with {proc.returncode}\n{cluster.logs()}")
        time.sleep(0.2)
    raise ClusterUnavailable(f"{what} not ready after {timeout:.0f} s\n{cluster.logs()}")


def _start(cluster: SlurmCluster, name: str, command: list[str]) -> subprocess.Popen:
    log = open(cluster.folder / "log" / f"{name}.out", "w")  # noqa: SIM115 -- the daemon's stdout
    try:
        proc = subprocess.Popen(command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as err:
        raise ClusterUnavailable(f"cannot start {name}: {err}") from err
    finally:
        log.close()
    cluster.daemons[name] = proc
    return proc


def slurm_conf(folder: Path, cpus: int, memory_mb: int, ports: dict[str, int]) -> str:
    return f"""\
# One node, written by tests/slurm_cluster.py.
ClusterName={CLUSTER}
SlurmctldHost=localhost
SlurmctldPort={ports['slurmctld']}
SlurmdPort={ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={folder / 'munge' / 'munge.socket'},cred_expire=5
CredType=cred/munge
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'run' / 'slurmctld.pid'}
SlurmdPidFile={folder / 'run' / 'slurmd.pid'}
SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}
SlurmdLogFile={folder / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: processes tracked by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
PropagateResourceLimits=NONE
# Several one-CPU jobs at a time on the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1
# Accounting through slurmdbd: sacct answers (submitit polls job states with it).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={ports['slurmdbd']}
# (for connections to slurmdbd SLURM takes munged's socket from here, not from AuthInfo)
AccountingStoragePass={folder / 'munge' / 'munge.socket'}
AccountingStorageEnforce=associations
JobCompType=jobcomp/none
# Requeue allowed (scontrol requeue, submitit's requeue), a down node comes back by itself, short waits.
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
MessageTimeout=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
# The tests' partition is not the default one: a job that lost its --partition would land in `debug`.
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName={PARTITION} Nodes=localhost Default=NO MaxTime=INFINITE State=UP
"""


def slurmdbd_conf(folder: Path, ports: dict[str, int], password: str) -> str:
    return f"""\
AuthType=auth/munge
AuthInfo=socket={folder / 'munge' / 'munge.socket'}
DbdHost=localhost
DbdPort={ports['slurmdbd']}
SlurmUser=root
LogFile={folder / 'log' / 'slurmdbd.log'}
PidFile={folder / 'run' / 'slurmdbd.pid'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mariadb']}
StorageUser=slurm
StoragePass={password}
StorageLoc=slurm_acct_db
"""


def memory_mb() -> int:
    with open("/proc/meminfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024 * 9 // 10
    return 1024


def start_cluster(folder: Path, timeout: float = 90) -> SlurmCluster:
    """Start the one-node cluster under `folder`; ClusterUnavailable (after cleaning up) if it can't."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("the SLURM daemons need root (slurmd runs jobs as their user)")
    ensure_packages()
    folder = Path(folder).resolve()
    for sub in ("munge", "state", "spool", "run", "log", "mariadb", "etc"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(folder / "munge", 0o700)
    ports = {name: free_port() for name in ("slurmctld", "slurmd", "slurmdbd", "mariadb")}
    cpus = os.cpu_count() or 1
    password = os.urandom(8).hex()
    conf = folder / "etc" / "slurm.conf"
    conf.write_text(slurm_conf(folder, cpus, memory_mb(), ports))
    dbd_conf = folder / "etc" / "slurmdbd.conf"       # slurmdbd reads it next to SLURM_CONF
    dbd_conf.write_text(slurmdbd_conf(folder, ports, password))
    os.chmod(dbd_conf, 0o600)
    env = dict(os.environ)
    for name in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
        del env[name]   # the tests may themselves run inside a SLURM job: nothing of it leaks into ours
    env["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(folder=folder, env=env, cpus=cpus)
    try:
        _start_daemons(cluster, ports, password, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_daemons(cluster: SlurmCluster, ports: dict[str, int], password: str, timeout: float) -> None:
    folder = cluster.folder
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    munge_socket = folder / "munge" / "munge.socket"
    munged = _start(cluster, "munged", [
        "munged", "--foreground", f"--key-file={key}", f"--socket={munge_socket}",
        f"--pid-file={folder / 'run' / 'munged.pid'}", f"--log-file={folder / 'log' / 'munged.log'}",
        f"--seed-file={folder / 'munge' / 'munge.seed'}", "--force"])
    _wait("munged", munge_socket.exists, 20, cluster, munged)

    datadir = folder / "mariadb" / "data"
    install = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
                              "--auth-root-authentication-method=socket", "--skip-test-db"],
                             capture_output=True, text=True, check=False, timeout=120)
    if install.returncode:
        raise ClusterUnavailable(f"mariadb-install-db failed: {install.stderr.strip()[-1000:]}")
    db_socket = folder / "mariadb" / "mariadb.socket"
    mariadb = _start(cluster, "mariadb", [
        "mariadbd", "--no-defaults", f"--datadir={datadir}", "--user=root", f"--socket={db_socket}",
        f"--port={ports['mariadb']}", "--bind-address=127.0.0.1", "--skip-name-resolve",
        f"--pid-file={folder / 'run' / 'mariadb.pid'}", f"--log-error={folder / 'log' / 'mariadb.log'}",
        "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=8M", "--skip-log-bin"])
    _wait("mariadbd", db_socket.exists, 60, cluster, mariadb)
    grant = ("CREATE DATABASE IF NOT EXISTS slurm_acct_db; "
             f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
             "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
    result = subprocess.run(["mariadb", "--no-defaults", f"--socket={db_socket}", "-u", "root", "-e", grant],
                            capture_output=True, text=True, check=False, timeout=60)
    if result.returncode:
        raise ClusterUnavailable(f"mariadb user setup failed: {result.stderr.strip()}")

    slurmdbd = _start(cluster, "slurmdbd", ["slurmdbd", "-D"])
    _wait("slurmdbd", lambda: _dbd_answers(cluster), 60, cluster, slurmdbd)
    cluster.run("sacctmgr", "-i", "add", "cluster", CLUSTER)
    cluster.run("sacctmgr", "-i", "add", "account", ACCOUNT, f"Cluster={CLUSTER}", "Description=lbt tests")
    cluster.run("sacctmgr", "-i", "add", "user", "root", f"Account={ACCOUNT}", f"Cluster={CLUSTER}")

    slurmctld = _start(cluster, "slurmctld", ["slurmctld", "-D", "-i"])
    slurmd = _start(cluster, "slurmd", ["slurmd", "-D", "-N", "localhost"])
    _wait("slurmctld", lambda: cluster.run("scontrol", "ping", check=False, timeout=10).count("UP") >= 1,
          timeout, cluster, slurmctld)
    _wait("slurmd (node localhost idle)", lambda: cluster.node_state() == "idle", timeout, cluster, slurmd)


def _dbd_answers(cluster: SlurmCluster) -> bool:
    result = subprocess.run(["sacctmgr", "-n", "-P", "list", "cluster"], env=cluster.env, capture_output=True,
                            text=True, timeout=10, check=False)
    return result.returncode == 0


def main(argv: list[str]) -> int:
    """`python -m tests.slurm_cluster install`: the packages, installed as the fixture does (.ci/run)."""
    if argv != ["install"]:
        print("usage: python -m tests.slurm_cluster install", file=sys.stderr)
        return 2
    try:
        ensure_packages()
    except ClusterUnavailable as err:
        print(f"SLURM packages not installed, tests/test_slurm.py will skip: {err}", file=sys.stderr)
        return 1
    print(f"SLURM for tests/test_slurm.py: {slurm_version()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
