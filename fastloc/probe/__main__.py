"""python -m fastloc.probe: the Patch-Seg benchmark and the dense evaluations beside it.

    python -m fastloc.probe DATA [--backbone NAME] [--field VALUE ...]   Patch-Seg: train a head, score it
    python -m fastloc.probe overcluster DATA [...]                         Leopart's overclustering mIoU
    python -m fastloc.probe linear DATA --protocol leopart-voc|dinov3-ade20k   linear-probe mIoU
    python -m fastloc.probe hummingbird DATA [...]                         in-context retrieval mIoU
    python -m fastloc.probe knn DATA [...]                                 DINO's weighted k-NN top-1/top-5 (cls)
    python -m fastloc.probe zeroshot DATA [--benchmark B]                  zero-shot segmentation by class name
    python -m fastloc.probe compare A.json B.json [--out PNG]             before/after of two runs
    python -m fastloc.probe card BACKBONE [BACKBONE ...] [--slurm]        every protocol with data: one card

DATA is a shard set with train and validation splits (python -m fastloc.shard converts COCO,
ADE20k and the synthetic set). "--help" explains every field. The run writes DATA's results
CSV row (results/outputs-DATASET.csv) and a run directory: result.json, head.safetensors,
recall.png, predictions.png. Under torchrun every rank runs the same command. Option values and
the output folders are checked before any work: a bad one is one "error:" line, exit 2.
Each dense protocol writes result.json (its name and every knob) and rows of
results/dense-PROTOCOL-DATASET.csv; python -m fastloc.shard voc converts Pascal VOC for them.
"""

from __future__ import annotations

import sys

import tyro

from fastloc.cli import run_command
from fastloc.probe.dense.config import PROTOCOLS


def refuse_early(cfg) -> None:
    """The option values and the output folders, checked before torch is imported (seconds of
    start-up): a bad one is refused at once. The run checks them again, with the data. Under
    torchrun only rank 0 checks the folders here: the check removes the folders it made, and a
    second rank checking at the same moment would find its folder gone (the run's own check comes
    after the ranks have met, when rank 0's is over)."""
    import os

    from fastloc.probe.report import check_folders

    cfg.validate()
    if os.environ.get("RANK", "0") == "0":
        check_folders(*cfg.folders())


def dense(protocol: str, args: list[str]) -> int:
    """Parse one dense protocol's config, check its values, run it (fastloc.probe.dense.PROTOCOL.run)."""
    import importlib

    from fastloc.probe.dense.config import parse

    cfg = parse(protocol, args)
    refuse_early(cfg)
    importlib.import_module(f"fastloc.probe.dense.{protocol}").run(cfg)
    return 0


def zeroshot(args: list[str]) -> int:
    """The training-free zero-shot benchmark (fastloc.probe.zeroshot.run)."""
    from fastloc.probe.zeroshot.config import ZeroShotConfig

    cfg = tyro.cli(ZeroShotConfig, args=args, prog="python -m fastloc.probe zeroshot")
    refuse_early(cfg)
    from fastloc.probe.zeroshot.run import run

    run(cfg)
    return 0


def card(args: list[str]) -> int:
    """Every protocol whose data is present, for each backbone, in one card (fastloc.probe.card);
    exit 1 when a protocol's run failed (its line in the card says how)."""
    from fastloc.probe.card.config import CardConfig

    cfg = tyro.cli(CardConfig, args=args, prog="python -m fastloc.probe card")
    cfg.validate()
    from fastloc.probe.card.run import card as write

    path, cells = write(cfg)
    print(f"\n{path.read_text()}\ncard: {path} (and card.csv, card.json, card.png beside it)")
    return 1 if any(c.status.startswith("failed") for c in cells) else 0


def patch_seg(argv: list[str]) -> int:
    """Parse Patch-Seg's config, check its values, run the probe."""
    from fastloc.probe.config import ProbeConfig

    description = __doc__.strip()
    if "-h" in argv or "--help" in argv:  # the backbone list imports timm: only the help shows it
        from fastloc.models.registry import BACKBONES

        description += f"\n\nBackbones: {', '.join(BACKBONES)}, a timm id, or an aligned export."
    cfg = tyro.cli(ProbeConfig, args=argv, prog="python -m fastloc.probe", description=description)
    refuse_early(cfg)
    from fastloc.probe.run import probe

    probe(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return run_command(lambda: command(argv), "the feature cache keeps only complete splits; run the command again")


def command(argv: list[str]) -> int:
    if argv[0] == "compare":
        from fastloc.probe.compare import CompareConfig, run_compare

        return run_compare(tyro.cli(CompareConfig, args=argv[1:], prog="python -m fastloc.probe compare"))
    if argv[0] == "zeroshot":
        return zeroshot(argv[1:])
    if argv[0] == "card":
        return card(argv[1:])
    if argv[0] in PROTOCOLS:
        return dense(argv[0], argv[1:])
    return patch_seg(argv)


if __name__ == "__main__":
    sys.exit(main())
