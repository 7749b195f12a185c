"""Options every conversion shares. Each dataset's subcommand config extends ``ConvertConfig``.

``validate()`` rejects option values that make no sense (a negative --limit, a JPEG quality of 500)
with a ``ConversionError`` naming the option, before anything is read or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fastloc.shard.encode import MAX_PIXELS_CAP, MAX_PIXELS_DEFAULT
from fastloc.shard.errors import ConversionError

if TYPE_CHECKING:
    from fastloc.shard.sources.base import Source


def require(ok: bool, flag: str, value: object, rule: str) -> None:
    """A ConversionError ``--flag must ..., got VALUE`` unless ``ok``."""
    if not ok:
        raise ConversionError(f"{flag} {rule}, got {value!r}")


def check_max_pixels(value: int | None, flag: str = "--max-pixels") -> None:
    if value is not None:
        require(1 <= value <= MAX_PIXELS_CAP, flag, value, f"must be between 1 and {MAX_PIXELS_CAP} (Pillow's limit)")


def check_path_name(what: str, value: str) -> None:
    """Dataset and split names become folder and file names: one plain path component each."""
    bad = not value or value in (".", "..") or value.startswith(".") or any(c in value for c in "/\\\0")
    require(not bad, what, value, "must be a plain name (not empty, no '/', not starting with '.')")


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    out: Path = Path("shards")
    """Output root: shards go to OUT/NAME/SPLIT/NAME-SPLIT-NNNNNN.tar. The split folder must not
    overlap the input (neither inside it nor holding it)."""

    name: str | None = None
    """Dataset folder name under OUT (default: the dataset's own name, e.g. coco, ade20k)."""

    processes: int = 0
    """Worker processes (0 = one per CPU core). The output does not depend on this."""

    shard_samples: int | None = None
    """Samples per shard (at least 1). When unset, shards are cut by --shard-bytes instead."""

    shard_bytes: int = 1_000_000_000
    """Target shard size in bytes of source files (image + label), used when --shard-samples is unset."""

    shuffle: bool = True
    """Shuffle samples globally before cutting shards, so classes spread across shards."""

    seed: int = 0
    """Seed of the global shuffle (0 or more)."""

    limit: int | None = None
    """Convert only the first N samples (N >= 1) of the (shuffled) plan: a quick subset for debugging."""

    check: Literal["header", "decode"] = "header"
    """How passed-through JPEGs are checked: 'header' parses the markers and requires the
    end-of-image marker (fast, catches truncation and non-JPEG data); 'decode' also fully decodes
    every image with PIL (slow; `verify` decodes every sample either way)."""

    keep_progressive: bool = False
    """Pass progressive JPEGs through untouched. Off by default: GPU hardware JPEG decoders take
    baseline JPEGs only, so progressive ones are re-encoded as baseline."""

    reencode_quality: int = 95
    """JPEG quality (1-100) for images that must be re-encoded (CMYK, PNG named .jpg, progressive, ...)."""

    max_pixels: int = MAX_PIXELS_DEFAULT
    """Largest image accepted, in pixels (width x height), read from the image header before anything
    is decoded; larger images are skipped and reported. The default (64 million, e.g. 8000x8000) is
    far above the photographs of ImageNet, COCO and ADE20K and stops absurd headers (a 50000x50000
    JPEG of a few bytes)."""

    strict: bool = False
    """Stop at the first unreadable sample with a non-zero exit, removing this split's partial output."""

    overwrite: bool = False
    """Delete an existing conversion of this split (finished or not) and start again. Only files
    fastloc wrote there are deleted: the manifest, the work records, and tar, index and partial
    files named like this split's shards."""

    wait: bool = True
    """When another conversion is writing the same split folder (it holds the folder's lock),
    wait for it to end and then continue: resume, or find the work done. --no-wait refuses at
    once instead (exit status 2)."""

    fsync: bool = True
    """Flush each shard to disk before publishing it, so that even a machine crash never leaves a
    shard that looks complete. Turning it off trades that for speed on slow disks; a killed
    process is safe either way."""

    progress: bool = True
    """Show progress on stderr: a bar (rate and ETA) on a terminal, a line every 10% or 30 s in a
    log file."""

    def source(self) -> Source:
        """The dataset source this config describes."""
        raise NotImplementedError

    def validate(self) -> None:
        """Reject nonsense option values with a ConversionError naming the option."""
        if self.name is not None:
            check_path_name("--name", self.name)
        require(self.processes >= 0, "--processes", self.processes, "must be 0 (one per CPU core) or more")
        if self.shard_samples is not None:
            require(self.shard_samples >= 1, "--shard-samples", self.shard_samples, "must be at least 1")
        require(self.shard_bytes >= 1, "--shard-bytes", self.shard_bytes, "must be at least 1")
        require(self.seed >= 0, "--seed", self.seed, "must be 0 or more")
        if self.limit is not None:
            require(self.limit >= 1, "--limit", self.limit, "must be at least 1")
        require(self.check in ("header", "decode"), "--check", self.check, "must be 'header' or 'decode'")
        require(1 <= self.reencode_quality <= 100, "--reencode-quality", self.reencode_quality, "must be 1 to 100")
        check_max_pixels(self.max_pixels)
