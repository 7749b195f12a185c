"""Options every conversion shares. Each dataset's subcommand config extends ``ConvertConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from fastloc.shard.sources.base import Source


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    out: Path = Path("shards")
    """Output root: shards go to OUT/NAME/SPLIT/NAME-SPLIT-NNNNNN.tar."""

    name: str | None = None
    """Dataset folder name under OUT (default: the dataset's own name, e.g. coco, ade20k)."""

    processes: int = 0
    """Worker processes (0 = one per CPU core). The output does not depend on this."""

    shard_samples: int | None = None
    """Samples per shard. When unset, shards are cut by --shard-bytes instead."""

    shard_bytes: int = 1_000_000_000
    """Target shard size in bytes of source files (image + label), used when --shard-samples is unset."""

    shuffle: bool = True
    """Shuffle samples globally before cutting shards, so classes spread across shards."""

    seed: int = 0
    """Seed of the global shuffle."""

    limit: int | None = None
    """Convert only the first N samples of the (shuffled) plan: a quick subset for debugging."""

    check: Literal["header", "decode"] = "header"
    """How passed-through JPEGs are checked: 'header' parses the markers and requires the
    end-of-image marker (fast, catches truncation and non-JPEG data); 'decode' also fully decodes
    every image with PIL (slow; `verify` decodes every sample either way)."""

    keep_progressive: bool = False
    """Pass progressive JPEGs through untouched. Off by default: GPU hardware JPEG decoders take
    baseline JPEGs only, so progressive ones are re-encoded as baseline."""

    reencode_quality: int = 95
    """JPEG quality for images that must be re-encoded (CMYK, PNG named .jpg, progressive, ...)."""

    strict: bool = False
    """Stop at the first unreadable sample with a non-zero exit, removing this split's partial output."""

    overwrite: bool = False
    """Delete an existing conversion of this split (finished or not) and start again."""

    fsync: bool = True
    """Flush each shard to disk before publishing it, so that even a machine crash never leaves a
    shard that looks complete. Turning it off trades that for speed on slow disks; a killed
    process is safe either way."""

    progress: bool = True
    """Show a progress bar (rate and ETA) on stderr."""

    def source(self) -> Source:
        """The dataset source this config describes."""
        raise NotImplementedError
