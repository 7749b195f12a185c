"""Files written whole or not at all: into a hidden temporary file beside the target, renamed
into place. A failed write (a full disk, a read-only folder) removes the temporary file and
raises an ``OSError`` that names the target, so the old file stays as it was and the message
says where."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, data: bytes | str | Callable[[BinaryIO], None], fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` (bytes, text, or a function that writes into the open file).
    ``fsync``: the content and the rename reach the disk before this returns (a checkpoint)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno or errno.EIO, exc.strerror or str(exc), str(path)) from None
    if fsync:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a crash
        finally:
            os.close(fd)


def temporary_files(folder: Path) -> list[Path]:
    """The temporary files that writes killed before their rename left in ``folder``."""
    return sorted(Path(folder).glob(".*.tmp"))
