"""Convert datasets to WebDataset shards (format: shards/README.md), verify them, inspect them.

Examples:
    python -m fastloc.shard synthetic --num-samples 512
    python -m fastloc.shard coco --root /data/coco --split val --labels json
    python -m fastloc.shard verify shards/coco/val
    python -m fastloc.shard inspect shards/coco/val
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Union

import tyro

from fastloc.cli import flowing_help
from fastloc.shard.config import ConvertConfig, check_max_pixels, require
from fastloc.shard.convert import convert
from fastloc.shard.errors import ConversionError
from fastloc.shard.inspect import contact_sheet, summarize
from fastloc.shard.manifest import read_manifest
from fastloc.shard.sources import CONVERTERS
from fastloc.shard.verify import verify
from fastloc.shard.words import plural


@flowing_help
@dataclass(frozen=True, kw_only=True)
class VerifyConfig:
    """Re-read a shard set: sizes, SHA-256, index files, and a full decode of every sample."""

    path: tyro.conf.Positional[Path]
    """The split folder (holding manifest.json) or the manifest itself."""

    processes: int = 0
    """Worker processes (0 = one per CPU core)."""

    max_pixels: int | None = None
    """Largest image or label map decoded, in pixels (width x height); larger ones are reported from
    their header without decoding. Default: the limit the set was converted with."""

    def validate(self) -> None:
        require(self.processes >= 0, "--processes", self.processes, "must be 0 (one per CPU core) or more")
        check_max_pixels(self.max_pixels)


@flowing_help
@dataclass(frozen=True, kw_only=True)
class InspectConfig:
    """Print a manifest summary and write a PNG contact sheet of samples with labels overlaid."""

    path: tyro.conf.Positional[Path]
    """The split folder (holding manifest.json) or the manifest itself."""

    samples: int = 16
    """How many samples (from the first shards) to draw, at least 1."""

    sheet: Path | None = None
    """Where to write the contact sheet (default: DATASET-SPLIT-samples.png in the current folder)."""

    max_pixels: int | None = None
    """Largest image or label map decoded, in pixels (width x height); larger ones get a tile that
    names them. Default: the limit the set was converted with."""

    def validate(self) -> None:
        require(self.samples >= 1, "--samples", self.samples, "must be at least 1")
        check_max_pixels(self.max_pixels)


def _subcommands():
    options = [Annotated[cfg, tyro.conf.subcommand(name)] for name, cfg in CONVERTERS.items()]
    options += [
        Annotated[VerifyConfig, tyro.conf.subcommand("verify")],
        Annotated[InspectConfig, tyro.conf.subcommand("inspect")],
    ]
    return Union[tuple(options)]  # noqa: UP007 (tyro needs a runtime Union)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = tyro.cli(_subcommands(), args=argv, prog="python -m fastloc.shard", description=__doc__)
    try:
        cfg.validate()
        if isinstance(cfg, ConvertConfig):
            convert(cfg, command=shlex.join(["python", "-m", "fastloc.shard", *argv]))
            return 0
        if isinstance(cfg, VerifyConfig):
            return _verify(cfg)
        return _inspect(cfg)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file system problem outside the conversion's own handling
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the shard loop (listing, verify): nothing half-written
        print("interrupted", file=sys.stderr)
        return 130


def _verify(cfg: VerifyConfig) -> int:
    result = verify(cfg.path, cfg.processes, cfg.max_pixels)
    for problem in result.problems:
        print(f"FAIL {problem}", file=sys.stderr)
    status = "OK" if result.ok else f"FAILED ({plural(len(result.problems), 'problem')})"
    print(f"verify {cfg.path}: {plural(result.shards, 'shard')}, {plural(result.samples, 'sample')}: {status}")
    return 0 if result.ok else 1


def _inspect(cfg: InspectConfig) -> int:
    manifest = read_manifest(cfg.path)
    print(summarize(manifest))
    sheet = cfg.sheet or Path(f"{manifest['dataset']}-{manifest['split']}-samples.png")
    path, problems = contact_sheet(cfg.path, sheet, cfg.samples, max_pixels=cfg.max_pixels)
    for problem in problems:
        print(f"not drawn: {problem}", file=sys.stderr)
    note = f" ({len(problems)} not drawn: see the 'not drawn' lines)" if problems else ""
    print(f"contact sheet: {path}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
