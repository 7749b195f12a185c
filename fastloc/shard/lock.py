"""One conversion per split folder at a time: an exclusive ``flock`` on ``SPLIT/.fastloc-lock``.

Two runs of the same split (a requeued SLURM job that overlaps the old one, a command started
twice) would write the same partial files and rename them under each other. The second run
therefore waits until the first has finished and then carries on (it resumes, or finds the work
done), or, with ``wait=False``, refuses at once. The lock dies with its process (kernel flock),
so a killed run never leaves a stale lock behind.

The lock file records who holds it (pid, host, start time) for the message the other run shows,
and is deleted by its holder on release. A run that locked the file just as it was being deleted
would hold a lock nobody else sees, so after locking it checks that the path still names the
file it locked, and starts again if not.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastloc.shard.errors import ConversionError

LOCK_FILE = ".fastloc-lock"


def _holder(fd: int) -> str:
    """Who holds the lock, as the lock file says (empty when it does not say)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f" (pid {info['pid']} on {info['host']}, started {started})"
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return ""


@contextmanager
def split_lock(split_dir: Path, wait: bool = True) -> Iterator[None]:
    """Hold the split folder's lock for the duration of the block (the folder must exist)."""
    path = Path(split_dir) / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if not wait:
                    raise ConversionError(
                        f"{split_dir}: another conversion is writing this split folder{holder}; "
                        "rerun when it has finished (it resumes or finds the work done), "
                        "or leave out --no-wait to wait for it"
                    ) from None
                print(
                    f"{split_dir}: another conversion is writing this split folder{holder}; waiting for it to finish",
                    file=sys.stderr,
                    flush=True,
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder deleted the file as we locked it: lock the new one
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
