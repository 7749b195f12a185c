"""The card's config, and the protocols it runs: each one's data folder and the command line it is
given, so that a card's run is exactly ``python -m fastloc.probe COMMAND ...`` (and a launched job
the same command line).

Per-protocol knobs go through ``--knobs PROTOCOL="--flag value ..."`` and are parsed by the
protocol's own command line, so a card knows no protocol's fields beyond the shared ones.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from fastloc.cli import BadValue, flowing_help, require
from fastloc.launch.config import LaunchConfig
from fastloc.probe.config import at_least, check_seed


@dataclass(frozen=True)
class Protocol:
    """One row group of the card: the words before DATA on its command line, and the shard set
    it reads under --shards (``dataset``)."""

    command: tuple[str, ...]  # () for Patch-Seg: python -m fastloc.probe DATA ...
    dataset: str

    @property
    def patch_seg(self) -> bool:
        return not self.command

    @property
    def zeroshot(self) -> bool:
        return self.command == ("zeroshot",)


PROTOCOLS: dict[str, Protocol] = {
    "patch-seg-coco": Protocol((), "coco"),
    "patch-seg-ade20k": Protocol((), "ade20k"),
    "overcluster": Protocol(("overcluster",), "voc"),
    "linear-leopart-voc": Protocol(("linear", "--protocol", "leopart-voc"), "voc"),
    "linear-dinov3-ade20k": Protocol(("linear", "--protocol", "dinov3-ade20k"), "ade20k"),
    "hummingbird": Protocol(("hummingbird",), "voc"),
    "knn": Protocol(("knn",), "imagenet"),
    "zeroshot": Protocol(("zeroshot",), "voc"),
}


@flowing_help
@dataclass(frozen=True, kw_only=True)
class CardConfig:
    """Run every protocol whose data is present for each backbone (reusing the results already
    there), and write one card: a table (card.md, card.csv), a figure (card.png) and every
    protocol's knobs (card.json). Several backbones stand side by side with their differences."""

    backbones: Annotated[tyro.conf.Positional[tuple[str, ...]], tyro.conf.arg(metavar="BACKBONE [BACKBONE ...]")]
    """Registered names, timm ids or files written by python -m fastloc.align export."""

    weights: str = "pretrained"
    """The weights of every backbone that is not an export (an export holds its own): pretrained,
    random, or a weights file."""

    shards: Path = Path("shards")
    """The shard sets' root: shards/coco, ade20k, voc and imagenet (python -m fastloc.shard converts them)."""

    data: tuple[str, ...] = ()
    """Another shard set for a protocol, as PROTOCOL=PATH (e.g. knn=shards/imagenet100)."""

    protocols: tuple[str, ...] = ()
    """The protocols to run (default: all): patch-seg-coco, patch-seg-ade20k, overcluster,
    linear-leopart-voc, linear-dinov3-ade20k, hummingbird, knn, zeroshot."""

    knobs: tuple[str, ...] = ()
    """A protocol's own options, as PROTOCOL="--flag value ..." (its command's --help lists them),
    e.g. overcluster="--clusters 100 21"."""

    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 autocast (cached features are then bf16); fp32 for everything. k-NN keeps its own default
    (fp32) unless --knobs says otherwise."""

    seed: int = 0
    """Every protocol's seed."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """cuda when available, else cpu."""

    loader: Literal["auto", "gpu", "cpu"] = "auto"
    """gpu = DALI decoding on the GPU, cpu = the torch twin; auto = gpu when CUDA is present."""

    workers: int = 4
    """Host worker processes of the loaders (0: in this process)."""

    out: Path = Path("runs/probe")
    """Parent of the protocols' run directories (the protocols' own default, so their earlier runs are reused)."""

    cache_dir: Path = Path("runs/probe/cache")
    """The feature caches (shared with the protocols' own runs)."""

    results: Path = Path("results")
    """Folder of the protocols' results CSVs."""

    card_dir: Path | None = None
    """Where card.md, card.csv, card.json and card.png go (default: OUT/cards/BACKBONE[-vs-BACKBONE...])."""

    slurm: bool = False
    """Run the missing protocols as one SLURM job array through fastloc.launch (--launch.* says
    where), wait for it, then write the card."""

    launch: LaunchConfig = field(default_factory=lambda: LaunchConfig(gpus_per_node=1))
    """The array's resources (each protocol runs in one process: one task on one node)."""

    def chosen(self) -> list[str]:
        """The protocols to run, in the card's order."""
        return [name for name in PROTOCOLS if not self.protocols or name in self.protocols]

    def data_root(self, protocol: str) -> Path:
        """The shard set a protocol reads: --data's, else SHARDS/DATASET."""
        return self.overrides("--data", self.data).get(protocol) or self.shards / PROTOCOLS[protocol].dataset

    def knob_args(self, protocol: str) -> list[str]:
        """A protocol's own options from --knobs (shell words)."""
        text = self.overrides("--knobs", self.knobs).get(protocol)
        try:
            return shlex.split(str(text)) if text else []
        except ValueError as exc:  # an unclosed quote
            raise BadValue(f"--knobs {protocol}={text}: not shell words ({exc})") from None

    def overrides(self, flag: str, pairs: tuple[str, ...]) -> dict[str, str]:
        """PROTOCOL=VALUE pairs by protocol (a BadValue for a malformed pair or an unknown protocol)."""
        out = {}
        for pair in pairs:
            name, eq, value = pair.partition("=")
            require(bool(eq) and bool(value), flag, pair, "must be PROTOCOL=VALUE")
            require(name in PROTOCOLS, flag, pair, f"names a protocol: one of {', '.join(PROTOCOLS)}")
            out[name] = Path(value) if flag == "--data" else value
        return out

    def validate(self) -> None:
        """A ``BadValue`` for the first option out of its range (nothing is read or written)."""
        require(bool(self.backbones), "BACKBONE", "", "give at least one backbone")
        require(len(set(self.backbones)) == len(self.backbones), "BACKBONE", self.backbones, "each one once")
        for name in self.protocols:
            require(name in PROTOCOLS, "--protocols", name, f"must be one of {', '.join(PROTOCOLS)}")
        self.overrides("--data", self.data)
        for protocol in self.overrides("--knobs", self.knobs):
            self.knob_args(protocol)
        check_seed(self.seed)
        at_least("--workers", self.workers, 0, "0: in this process")
        if self.slurm:
            self.launch.validate()
            one = "each protocol runs in one process"
            require(self.launch.nodes == 1, "--launch.nodes", self.launch.nodes, f"must be 1 ({one})")
            require(self.launch.tasks == 1, "--launch.tasks-per-node", self.launch.tasks, f"must be 1 ({one})")
            require(not self.launch.sweep, "--launch.sweep", self.launch.sweep, "is the card's to make: leave it out")
        elif self.launch != LaunchConfig(gpus_per_node=1):
            raise BadValue("--launch.* options say where a SLURM array runs: give --slurm with them")

    def folders(self) -> list[tuple[str, Path]]:
        """(flag, folder) of every folder the card writes into, in the order they are checked."""
        return [("--cache-dir", self.cache_dir), ("--out", self.out), ("--results", self.results)]
