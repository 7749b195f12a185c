"""The per-update cosine every schedule of a run follows (learning rate, weight decay, EMA momentum)."""

from __future__ import annotations

import math


def cosine(start: float, end: float, update: int, total: int) -> float:
    """end + (start - end) (1 + cos(pi t / T)) / 2 at update t of T: DINO's and Leopart's
    ``cosine_scheduler`` indexed by the update (held at ``end`` past the last)."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(update, total) / max(total, 1)))
