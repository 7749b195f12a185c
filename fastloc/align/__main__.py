"""python -m fastloc.align: locality alignment (MaskEmbed) of a pre-trained ViT.

    python -m fastloc.align train PRESET [--section.field VALUE ...]   run or resume a run
    python -m fastloc.align export RUN [--which best|last] [--out FILE] the aligned encoder for timm

"train --help" lists the presets, "train PRESET --help" every field. Running the same train
command again resumes the run from its newest checkpoint. Under torchrun every rank runs the
same command: torchrun --nproc-per-node 8 -m fastloc.align train clip-vit-b
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from fastloc.align.loop import NonFiniteLoss
from fastloc.align.presets import PRESETS, parse_train
from fastloc.cli import flowing_help, run_command


@flowing_help
@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Write a run's aligned encoder as a safetensors file that timm loads."""

    run: tyro.conf.Positional[Path]
    """The run directory (runs/align/NAME)."""

    which: Literal["best", "last"] = "best"
    """best: the lowest validation loss; last: the newest checkpoint."""

    out: Path | None = None
    """The file to write (default: RUN/encoder-WHICH.safetensors)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("train", "export"):
        from fastloc.models.registry import BACKBONES

        text = f"{__doc__.strip()}\n\nPresets: {', '.join(PRESETS)}\nBackbones: {', '.join(BACKBONES)}, or a timm id"
        asked = argv[:1] in (["-h"], ["--help"])
        print(text, file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    command, rest = argv[0], argv[1:]
    interrupted = "run the same command again to resume from the last checkpoint"
    return run_command(
        lambda: (export_command if command == "export" else train_command)(rest), interrupted, (NonFiniteLoss,)
    )


def export_command(args: list[str]) -> int:
    from fastloc.align.export import export

    cfg = tyro.cli(ExportConfig, args=args, prog="python -m fastloc.align export")
    print(f"encoder: {export(cfg.run, cfg.which, cfg.out)}")
    return 0


def train_command(args: list[str]) -> int:
    from fastloc.align.loop import train

    print(f"run: {train(*parse_train(args, 'python -m fastloc.align train'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
