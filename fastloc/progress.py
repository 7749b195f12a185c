"""Progress on stderr (conversion, training): a tqdm bar on a terminal, periodic lines in a log.

A carriage-return bar written to a file (a SLURM log, ``2> log``) is one endless line that only
shows its last state when the job is over; without a terminal, progress is instead a line every
10% of the work or every 30 seconds, whichever comes first, and one at the end.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from tqdm import tqdm

tqdm.monitor_interval = 0  # no monitor thread: worker pools are forked after bars existed


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``update(n)`` as units finish; ``close()`` at the end. Safe to update from one other thread.
    ``unit`` names what is counted ("samples"), ``rate_unit`` its rate ("img/s")."""

    def __init__(
        self,
        total: int,
        initial: int,
        desc: str,
        enabled: bool = True,
        stream: TextIO | None = None,
        every_s: float = 30.0,
        every_fraction: float = 0.1,
        unit: str = "samples",
        rate_unit: str = "img/s",
    ):
        self.unit, self.rate_unit = unit, rate_unit
        self.stream = stream or sys.stderr
        self.total, self.done, self.desc = total, initial, desc
        self.bar = None
        self.lines = False
        if not enabled:
            return
        if self.stream.isatty():
            self.bar = tqdm(
                total=total,
                initial=initial,
                unit=rate_unit.split("/")[0],
                desc=desc,
                file=self.stream,
                mininterval=0.5,
                smoothing=0.05,
            )
            return
        self.lines = True
        self.every_s, self.step = every_s, max(1, round(total * every_fraction))
        self.start = self.last_time = time.monotonic()
        self.initial = initial
        self.next_count = (initial // self.step + 1) * self.step
        self.lock = threading.Lock()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines:
            with self.lock:
                self.done += n
                now = time.monotonic()
                if self.done >= self.next_count or now - self.last_time >= self.every_s:
                    if self.done < self.total:
                        self._line(now)
                    self.next_count = (self.done // self.step + 1) * self.step
                    self.last_time = now

    def _line(self, now: float, end: bool = False) -> None:
        elapsed = now - self.start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        percent = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), {rate:.1f} {self.rate_unit}"
        if end:
            text += f", {_duration(elapsed)} elapsed"
        elif rate > 0:
            text += f", ETA {_duration((self.total - self.done) / rate)}"
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines:
            with self.lock:
                self._line(time.monotonic(), end=True)
                self.lines = False
