"""MaskEmbed's mask samplers (MASKEMBED.md section 3): keep-masks [B, M, N], 1 = kept.

Each image gets a group of rows: the sampled mask, then (``antithetical``) its complement, then
(``null``) all ones. ``uniform`` and ``bernoulli`` draw on the generator's device (no host sync,
reproducible from the generator's state); ``block`` (BEiT-style rectangles, a loop by nature)
draws on the host from a generator seeded by the device generator, so it is reproducible too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fastloc.cli import flowing_help, require

# The reference's defaults (scripts/train.py 235-236: --bernoulli-mask-ratio 0.5,
# --blockwise-mask-ratio 0.4); uniform has no ratio.
DEFAULT_KEEP_RATIO = {"bernoulli": 0.5, "block": 0.4}


@flowing_help
@dataclass(frozen=True, kw_only=True)
class MaskConfig:
    """Which masks the teacher sees."""

    sampler: Literal["uniform", "bernoulli", "block"] = "uniform"
    """uniform: keep patch i iff u_i > t (t, u ~ U(0, 1)), so the kept count is uniform on 0..N;
    bernoulli: keep with probability keep_ratio; block: rectangles until keep_ratio is visible."""

    keep_ratio: float | None = None
    """bernoulli: the probability of keeping a patch; block: the visible fraction to reach; in
    (0, 1]. None: the sampler's reference default (bernoulli 0.5, block 0.4)."""

    antithetical: bool = True
    """Add each mask's complement."""

    null: bool = True
    """Add the all-ones mask (the full image); its view is also the student's input."""

    @property
    def rows(self) -> int:
        """Masks per image, M."""
        return 1 + int(self.antithetical) + int(self.null)

    @property
    def ratio(self) -> float | None:
        """The keep ratio in force: keep_ratio, or the sampler's reference default (uniform: None)."""
        return DEFAULT_KEEP_RATIO.get(self.sampler) if self.keep_ratio is None else self.keep_ratio

    def validate(self) -> None:
        """A ``BadValue`` naming the option for a keep ratio outside (0, 1], before any work."""
        if self.keep_ratio is not None:
            ok = 0 < self.keep_ratio <= 1  # False for NaN too
            require(ok, "--method.masks.keep-ratio", self.keep_ratio, "must be in (0, 1] (or None: the default)")


def sample_masks(cfg: MaskConfig, batch: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    """[B, M, N] bool keep-masks on ``generator.device``, N = grid * grid, rows (mask, 1 - mask, 1)."""
    n, device = grid * grid, generator.device
    if cfg.sampler == "uniform":
        u = torch.rand(batch, n + 1, generator=generator, device=device)  # [B, N + 1]: u_0 is the threshold
        first = u[:, 1:] > u[:, :1]
    elif cfg.sampler == "bernoulli":
        first = torch.rand(batch, n, generator=generator, device=device) < cfg.ratio
    elif cfg.sampler == "block":
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())  # host: a loop anyway
        first = torch.from_numpy(block_masks(batch, grid, cfg.ratio, np.random.default_rng(seed))).to(device)
    else:
        raise ValueError(f"unknown mask sampler {cfg.sampler!r}")
    rows = [first]
    if cfg.antithetical:
        rows.append(~first)
    if cfg.null:
        rows.append(torch.ones_like(first))
    return torch.stack(rows, dim=1)  # [B, M, N]


def block_masks(batch: int, grid: int, keep_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """[B, N] bool: from all masked, set rectangles visible until at least ``keep_ratio`` is
    visible; area ~ randint[16, floor(keep_ratio N)), aspect ~ U(0.3, 1 / 0.3), w = min(floor(
    sqrt(area / aspect)), g), h = min(floor(area / w), g), uniform position (the reference's rule).

    As the reference writes it (loss_utils.py 107-114), w spans the first (row) axis and h the
    second, with the row offset drawn first: the same draws give the same rectangles."""
    n = grid * grid
    target = keep_ratio * n
    low, high = min(16, max(1, int(target))), max(min(16, max(1, int(target))) + 1, math.floor(target))
    out = np.zeros((batch, grid, grid), bool)
    for b in range(batch):
        mask = out[b]
        while mask.mean() < keep_ratio:
            area = int(rng.integers(low, high))
            aspect = rng.uniform(0.3, 1 / 0.3)
            w = max(1, min(int(math.sqrt(area / aspect)), grid))
            h = max(1, min(area // w, grid))
            x, y = int(rng.integers(0, grid - w + 1)), int(rng.integers(0, grid - h + 1))
            mask[x : x + w, y : y + h] = True  # the reference's mask[x:x+width, y:y+height]
    return out.reshape(batch, n)
