"""One conversion per split folder at a time (``fastloc.lock``'s folder lock on the split folder).

The second run of a split waits until the first has finished and then carries on (it resumes,
or finds the work done), or, with ``wait=False``, refuses at once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from fastloc.lock import LOCK_FILE, Busy, folder_lock
from fastloc.shard.errors import ConversionError

__all__ = ["LOCK_FILE", "split_lock"]


def _say_waiting(split_dir: Path, holder: str) -> None:
    print(
        f"{split_dir}: another conversion is writing this split folder{holder}; waiting for it to finish",
        file=sys.stderr,
        flush=True,
    )


@contextmanager
def split_lock(split_dir: Path, wait: bool = True) -> Iterator[None]:
    """Hold the split folder's lock for the duration of the block (the folder must exist)."""
    with ExitStack() as stack:
        try:
            stack.enter_context(folder_lock(split_dir, wait, lambda holder: _say_waiting(split_dir, holder)))
        except Busy as busy:
            raise ConversionError(
                f"{split_dir}: another conversion is writing this split folder{busy.holder}; "
                "rerun when it has finished (it resumes or finds the work done), "
                "or leave out --no-wait to wait for it"
            ) from None
        yield
