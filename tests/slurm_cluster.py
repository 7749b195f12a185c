"""A real single-node SLURM cluster, with real slurmdbd accounting, on localhost, for tests.

Why: submitit reads job states through ``sacct``, so a launcher test is only honest against a cluster whose
accounting answers as a production one does. This module installs Debian's SLURM, munge and MariaDB packages
when they are missing (:func:`install`) and runs MariaDB, slurmdbd, slurmctld and slurmd by hand, as root, with
every config, state, spool, log and pid file, the database and its socket under one directory::

    reason = install()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path) as cluster:
        subprocess.run(["sbatch", "--wrap", "true"], env={**os.environ, **cluster.env}, check=True)

Only munge is system-wide (``/etc/munge/munge.key``, ``/run/munge``): a munged that already answers is reused and
left alone; one this module starts (as the ``munge`` user) is stopped again on exit. Exit cancels every job, waits
for the ``slurmstepd`` processes to end, stops the daemons by PID and kills anything left that they started.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

CLUSTER_NAME = "fastloc-test"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "slurmdbd", "munge", "mariadb-server")
PROGRAMS = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "sacctmgr", "munge", "munged")
MARIADB_PROGRAMS = ("mariadbd", "mariadb-install-db", "mariadb")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
# Set in every daemon's environment (and so inherited by slurmstepd): finds what a cluster left behind.
MARKER = "FASTLOC_SLURM_CLUSTER"
# A small, unsafe-on-power-loss InnoDB: the test database is thrown away anyway.
MARIADB_OPTIONS = (
    "--innodb-log-file-size=8M",
    "--innodb-buffer-pool-size=32M",
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
)
DB_USER, DB_PASSWORD, DB_NAME = "slurm", "fastloc-test", "slurm_acct_db"
STOP_GRACE_S = 10.0


def _which(program: str) -> str | None:
    return shutil.which(program, path=SEARCH_PATH)


def _missing() -> list[str]:
    return [p for p in PROGRAMS + MARIADB_PROGRAMS if _which(p) is None]


def available() -> str | None:
    """Why a :class:`SlurmCluster` cannot start here (without installing anything), or None if it can."""
    missing = _missing()
    if os.geteuid() != 0:
        installed = f"SLURM is not installed (missing: {' '.join(missing)}) and " if missing else ""
        return f"{installed}a local SLURM cluster needs root (its daemons run as root and munge)"
    if missing:
        return f"SLURM is not installed (missing: {' '.join(missing)}); install() can install it"
    return None


def _apt_install() -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def install() -> str | None:
    """Install SLURM, munge and MariaDB with apt if missing; None when a cluster can start, else the reason."""
    if _missing() and os.geteuid() == 0:
        if shutil.which("apt-get") is None:
            return f"SLURM is not installed (missing: {' '.join(_missing())}) and there is no apt-get"
        try:
            done = _apt_install()
            if done.returncode != 0:  # most often stale package lists: refresh them once and retry
                subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=600)
                done = _apt_install()
        except (OSError, subprocess.SubprocessError) as exc:
            return f"apt-get install {' '.join(PACKAGES)} failed: {exc}"
        if done.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {_tail(done.stdout + done.stderr)}"
    return available()


def _free_ports(count: int) -> list[int]:
    """Distinct free TCP ports (all held open together while they are chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _marked_pids(tag: str) -> list[int]:
    """PIDs of processes whose environment holds ``MARKER=tag``: the cluster's daemons and their slurmstepd."""
    needle = f"{MARKER}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:  # gone, or a kernel thread
                pass
    return pids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE_S."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _munge_answers() -> bool:
    return subprocess.run([_which("munge") or "munge", "-n"], capture_output=True).returncode == 0


def _ensure_munge_key() -> None:
    if MUNGE_KEY.exists():
        return
    MUNGE_KEY.parent.mkdir(mode=0o700, exist_ok=True)
    MUNGE_KEY.write_bytes(os.urandom(128))
    munge = pwd.getpwnam("munge")
    for path in (MUNGE_KEY.parent, MUNGE_KEY):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    MUNGE_KEY.chmod(0o400)


class SlurmCluster:
    """MariaDB + slurmdbd + slurmctld + one slurmd (node ``localhost``, partition ``debug``) under ``root``.

    ``env`` holds the variables a client (sbatch, squeue, sacct, submitit) needs to reach this cluster.
    """

    def __init__(self, root: Path, timeout: float = 60.0) -> None:
        self.root = Path(root).resolve()
        self.timeout = timeout
        self.conf = self.root / "etc" / "slurm.conf"
        self.logs = self.root / "log"
        self.env = {"SLURM_CONF": str(self.conf)}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> SlurmCluster:
        try:
            self._start()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._teardown()

    # -- helpers ------------------------------------------------------------------------------------------------

    def _client_env(self) -> dict[str, str]:
        """This environment without SLURM_* (from an enclosing allocation, say), plus ``env``."""
        return {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **self.env}

    def _daemon_env(self) -> dict[str, str]:
        return {**self._client_env(), MARKER: str(self.root), "PATH": SEARCH_PATH}

    def client(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (or any command) against this cluster; output captured as text."""
        env = self._client_env()
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)

    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> None:
        with open(self.logs / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                argv, env=self._daemon_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, user=user, group=user, extra_groups=[] if user else None,
            )  # fmt: skip

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for error messages."""
        parts = []
        for log in sorted(self.logs.glob("*")):
            if log.suffix == ".out" and log.with_suffix(".log").exists():  # the same lines, from -D's stderr
                continue
            text = log.read_text(errors="replace").strip()
            if text:
                parts.append(f"--- {log.name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        """Poll ``ready`` until it holds; RuntimeError (with the logs) on timeout or when a daemon dies."""
        deadline = time.monotonic() + self.timeout
        while not ready():
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) waiting for {what}\n{self.log_tails()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not ready after {self.timeout:.0f} s\n{self.log_tails()}")
            time.sleep(0.2)

    # -- bring-up -----------------------------------------------------------------------------------------------

    def _start(self) -> None:
        reason = available()
        if reason:
            raise RuntimeError(reason)
        for sub in ("etc", "log", "run", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port, dbd_port, db_port = _free_ports(4)
        self._start_munge()
        self._start_mariadb(db_port)
        self._write_slurmdbd_conf(dbd_port, db_port)
        self._write_slurm_conf(ctld_port, slurmd_port, dbd_port)
        self._spawn("slurmdbd", [_which("slurmdbd") or "slurmdbd", "-D"])
        self._wait("slurmdbd", lambda: self.client("sacctmgr", "-n", "list", "cluster").returncode == 0)
        self._check(self.client("sacctmgr", "-i", "add", "cluster", CLUSTER_NAME))
        self._spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-i"])
        self._spawn("slurmd", [_which("slurmd") or "slurmd", "-D", "-N", "localhost"])
        self._wait("node localhost idle", lambda: self.client("sinfo", "-h", "-o", "%T").stdout.strip() == "idle")
        self._wait("sacct", lambda: self.client("sacct", "-n", "-X", "-a").returncode == 0)

    def _check(self, done: subprocess.CompletedProcess[str]) -> None:
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, done.args))} failed: {done.stdout}{done.stderr}\n{self.log_tails()}"
            )

    def _start_munge(self) -> None:
        if _munge_answers():
            return
        _ensure_munge_key()
        munge = pwd.getpwnam("munge")
        MUNGE_RUN_DIR.mkdir(mode=0o755, exist_ok=True)
        os.chown(MUNGE_RUN_DIR, munge.pw_uid, munge.pw_gid)
        self._spawn("munged", [_which("munged") or "munged", "--foreground"], user="munge")
        self._wait("munged", _munge_answers)

    def _start_mariadb(self, port: int) -> None:
        datadir, sock = self.root / "mysql", self.root / "run" / "mysqld.sock"
        install_db = [_which("mariadb-install-db") or "mariadb-install-db", "--no-defaults", f"--datadir={datadir}"]
        install_db += ["--user=root", "--auth-root-authentication-method=socket", "--skip-test-db", *MARIADB_OPTIONS]
        self._check(subprocess.run(install_db, env=self._daemon_env(), capture_output=True, text=True, timeout=120))
        self._spawn("mysqld", [
            _which("mariadbd") or "mariadbd", "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
            f"--port={port}", "--bind-address=127.0.0.1", "--skip-name-resolve", "--user=root",
            f"--pid-file={self.root / 'run' / 'mysqld.pid'}", f"--log-error={self.logs / 'mysqld.log'}",
            *MARIADB_OPTIONS,
        ])  # fmt: skip
        sql = [_which("mariadb") or "mariadb", "--no-defaults", f"--socket={sock}", "--user=root", "-e"]
        self._wait("mariadb", lambda: subprocess.run([*sql, "SELECT 1"], capture_output=True).returncode == 0)
        user = f"'{DB_USER}'@'127.0.0.1'"
        statements = (
            f"CREATE DATABASE {DB_NAME}; CREATE USER {user} IDENTIFIED BY '{DB_PASSWORD}';"
            f" GRANT ALL ON {DB_NAME}.* TO {user};"
        )
        self._check(subprocess.run([*sql, statements], capture_output=True, text=True, timeout=60))

    def _write_slurmdbd_conf(self, dbd_port: int, db_port: int) -> None:
        path = self.conf.parent / "slurmdbd.conf"
        path.write_text(
            _conf_lines(
                AuthType="auth/munge",
                DbdHost="localhost",
                DbdPort=dbd_port,
                SlurmUser="root",
                LogFile=self.logs / "slurmdbd.log",
                PidFile=self.root / "run" / "slurmdbd.pid",
                StorageType="accounting_storage/mysql",
                StorageHost="127.0.0.1",
                StoragePort=db_port,
                StorageUser=DB_USER,
                StoragePass=DB_PASSWORD,
                StorageLoc=DB_NAME,
            )
        )
        path.chmod(0o600)

    def _write_slurm_conf(self, ctld_port: int, slurmd_port: int, dbd_port: int) -> None:
        hardware = self._hardware()
        run = self.root / "run"
        self.conf.write_text(
            _conf_lines(
                ClusterName=CLUSTER_NAME,
                SlurmctldHost="localhost",
                SlurmctldPort=ctld_port,
                SlurmdPort=slurmd_port,
                SlurmUser="root",
                AuthType="auth/munge",
                StateSaveLocation=self.root / "state",
                SlurmdSpoolDir=self.root / "spool",
                SlurmctldPidFile=run / "slurmctld.pid",
                SlurmdPidFile=run / "slurmd.pid",
                SlurmctldLogFile=self.logs / "slurmctld.log",
                SlurmdLogFile=self.logs / "slurmd.log",
                ProctrackType="proctrack/linuxproc",
                TaskPlugin="task/none",
                JobAcctGatherType="jobacct_gather/linux",
                AccountingStorageType="accounting_storage/slurmdbd",
                AccountingStorageHost="localhost",
                AccountingStoragePort=dbd_port,
                JobCompType="jobcomp/none",
                SelectType="select/cons_tres",
                SelectTypeParameters="CR_CPU",
                MinJobAge=30,
                KillWait=5,
                ReturnToService=2,
                MpiDefault="none",
                MailProg="/bin/true",
            )
            + f"NodeName=localhost NodeAddr=127.0.0.1 {hardware} State=UNKNOWN\n"
            + "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n"
        )

    def _hardware(self) -> str:
        """This machine's CPUs, topology and memory as ``slurmd -C`` reports them (NodeName and UpTime dropped)."""
        done = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30)
        self._check(done)
        fields = done.stdout.splitlines()[0].split()
        return " ".join(f for f in fields if not f.startswith(("NodeName=", "UpTime=")))

    # -- teardown -----------------------------------------------------------------------------------------------

    def _teardown(self) -> None:
        if self._alive("slurmctld"):
            self._cancel_all_jobs()
        for name in ("slurmd", "slurmctld", "slurmdbd", "mysqld", "munged"):
            if name in self._procs:
                _stop(self._procs.pop(name))
        for pid in self.processes():  # e.g. a slurmstepd that outlived slurmd
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def processes(self) -> list[int]:
        """PIDs of the processes this cluster started (daemons, slurmstepd) that are still alive."""
        return _marked_pids(str(self.root))

    def _alive(self, name: str) -> bool:
        return name in self._procs and self._procs[name].poll() is None

    def _cancel_all_jobs(self) -> None:
        """scancel every job, then wait (KillWait and a margin) for the queue and the slurmstepd to empty."""
        jobs = self.client("squeue", "-h", "-o", "%A").stdout.split()
        if jobs:
            self.client("scancel", *jobs)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
            self._stepds() or self.client("squeue", "-h", "-o", "%A").stdout.strip()
        ):
            time.sleep(0.2)

    def _stepds(self) -> list[int]:
        return [pid for pid in self.processes() if _comm(pid) == "slurmstepd"]


def _conf_lines(**settings: object) -> str:
    return "".join(f"{key}={value}\n" for key, value in settings.items())
