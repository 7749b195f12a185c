"""One writer per folder at a time: an exclusive ``flock`` on ``FOLDER/.fastloc-lock``.

A converter's split folder and a training run's directory each take it, so that two runs of
one command (a requeued SLURM job that overlaps the old one, a command started twice) never write
the same files under each other. The second run waits for the first, or, with ``wait=False``,
gets ``Busy`` at once. The lock dies with its process (kernel flock), so a killed run never
leaves a stale lock behind.

The lock file records who holds it (pid, host, start time) for the other run's message, and is
deleted by its holder on release. A run that locked the file just as it was being deleted would
hold a lock nobody else sees, so after locking it checks that the path still names the file it
locked, and starts again if not.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".fastloc-lock"


class Busy(Exception):
    """The folder is locked by another process; ``holder`` says who, as far as the file tells."""

    def __init__(self, folder: Path, holder: str):
        super().__init__(f"{folder}: locked by another process{holder}")
        self.folder, self.holder = folder, holder


def _holder(fd: int) -> str:
    """Who holds the lock, as the lock file says (empty when it does not say)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f" (pid {info['pid']} on {info['host']}, started {started})"
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return ""


def _lock(path: Path, wait: bool, on_wait: Callable[[str], None]) -> int:
    """An open descriptor of ``path``, exclusively locked (``Busy`` when held and not ``wait``)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if not wait:
                    raise Busy(path.parent, holder) from None
                on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)  # the holder deleted the file as we locked it: lock the new one


@contextmanager
def folder_lock(
    folder: Path, wait: bool = True, on_wait: Callable[[str], None] = lambda holder: None
) -> Iterator[None]:
    """Hold ``folder``'s lock for the duration of the block (the folder must exist). Waiting,
    ``on_wait(holder)`` is called once first, to say so."""
    path = Path(folder) / LOCK_FILE
    fd = _lock(path, wait, on_wait)
    try:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        yield
    finally:
        try:
            path.unlink()  # still holding the lock: whoever waits finds the file gone and retries
        except OSError:
            pass
        os.close(fd)
