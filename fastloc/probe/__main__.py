"""python -m fastloc.probe: the Patch-Seg benchmark and the dense evaluations beside it.

    python -m fastloc.probe DATA [--backbone NAME] [--field VALUE ...]   Patch-Seg: train a head, score it
    python -m fastloc.probe overcluster DATA [...]                         Leopart's overclustering mIoU
    python -m fastloc.probe linear DATA --protocol leopart-voc|dinov3-ade20k   linear-probe mIoU
    python -m fastloc.probe hummingbird DATA [...]                         in-context retrieval mIoU
    python -m fastloc.probe compare A.json B.json [--out PNG]             before/after of two runs

DATA is a shard set with train and validation splits (python -m fastloc.shard converts COCO,
ADE20k and the synthetic set). "--help" explains every field. The run writes DATA's results
CSV row (results/outputs-DATASET.csv) and a run directory: result.json, head.safetensors,
recall.png, predictions.png. Under torchrun every rank runs the same command.
Each dense protocol writes result.json (its name and every knob) and rows of
results/dense-PROTOCOL-DATASET.csv; python -m fastloc.shard voc converts Pascal VOC for them.
"""

from __future__ import annotations

import sys

import tyro

from fastloc.data.shards import ShardError
from fastloc.models.registry import WeightsError
from fastloc.probe.cache import CacheError
from fastloc.probe.dense.config import PROTOCOLS


def dense(protocol: str, args: list[str]) -> int:
    """Parse one dense protocol's config and run it (fastloc.probe.dense.PROTOCOL.run)."""
    import importlib

    from fastloc.probe.dense.config import parse

    importlib.import_module(f"fastloc.probe.dense.{protocol}").run(parse(protocol, args))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        if argv[0] == "compare":
            from fastloc.probe.compare import CompareConfig, run_compare

            return run_compare(tyro.cli(CompareConfig, args=argv[1:], prog="python -m fastloc.probe compare"))
        if argv[0] in PROTOCOLS:
            return dense(argv[0], argv[1:])
        from fastloc.models.registry import BACKBONES
        from fastloc.probe.config import ProbeConfig
        from fastloc.probe.run import probe

        description = f"{__doc__.strip()}\n\nBackbones: {', '.join(BACKBONES)}, a timm id, or an aligned export."
        cfg = tyro.cli(ProbeConfig, args=argv, prog="python -m fastloc.probe", description=description)
        probe(cfg)
        return 0
    except (WeightsError, ShardError, CacheError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help (0) or a usage error tyro has explained (2)
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        print("interrupted: the feature cache keeps only complete splits; run the command again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
