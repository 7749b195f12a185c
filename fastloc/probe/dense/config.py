"""The dense evaluations' configs: what every protocol shares, then each protocol's own knobs.

The defaults are the published recipes (../shared/methods/OTHER-METHODS.md section 1, the
open-hummingbird-eval and DINOv3 code); a knob that moves numbers (section 4) is a field, and the
result JSON records every field under the protocol's name. ``validate()`` refuses a value out of
its range (a BadValue naming the option) before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

import tyro

from fastloc.cli import flowing_help, require
from fastloc.probe.config import at_least, check_names, check_seed, field, positive


@dataclass(frozen=True, kw_only=True)
class DenseConfig:
    """What every dense protocol shares: the data, the frozen backbone, where results go."""

    data: Annotated[tyro.conf.Positional[Path], tyro.conf.arg(metavar="DATA")]
    """The shard set (e.g. shards/voc from python -m fastloc.shard voc), holding the splits named below."""

    backbone: str = "dino-vit-s"
    """A registered short name (python -m fastloc.probe --help lists them), a timm id, or a file
    written by python -m fastloc.align export. dino-vit-s is Leopart's starting point."""

    weights: str = "pretrained"
    """pretrained (timm's hub), random, or a local weights file (safetensors or a timm checkpoint)."""

    skip_blocks: int = 0
    """Drop the backbone's last k blocks (its final norm is kept); 0 = last-block tokens, as the protocols."""

    image_size: int = 448
    """The side of the square input; the backbone's position embedding is resampled to it."""

    zero_is_ignore: bool = False
    """Score label 0 as void and shift the other classes down by one (mmseg's reduce_zero_label:
    ADE20k's and COCO-Stuff's 'unlabeled'). VOC's class 0 is background, a class like any other."""

    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 autocast for the backbone (cached features are then bf16); fp32 for everything."""

    eval_batch_size: int = 60
    """Feature-extraction batch (Leopart: 60)."""

    seed: int = 0
    """Seed of everything random in the protocol (k-means, heads, memory sampling, order)."""

    cache: bool = True
    """Keep the evaluation split's features and label maps in the feature cache, to be reused."""

    cache_dir: Path = Path("runs/probe/cache")
    """Where feature caches live (shared with Patch-Seg's)."""

    out: Path = Path("runs/probe")
    """Parent folder of run directories (result.json)."""

    name: str = ""
    """Run directory name under out (default: protocol-dataset-backbone-sizeN)."""

    results: Path = Path("results")
    """Folder of the results CSV (dense-PROTOCOL-DATASET.csv, one row per figure, appended)."""

    train_split: str = ""
    """The training split's folder under data (default: trainaug when there, else train or training,
    for leopart-voc and hummingbird, as their references; train or training for dinov3-ade20k)."""

    val_split: str = ""
    """The evaluation split's folder under data (default: val or validation)."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """cuda when available, else cpu."""

    loader: Literal["auto", "gpu", "cpu"] = "auto"
    """gpu = DALI decoding on the GPU, cpu = the torch twin; auto = gpu when CUDA is present."""

    workers: int = 4
    """Host worker processes of the loaders (0: in this process)."""

    def protocol_name(self) -> str:
        """The protocol's name in results, CSV file names and run directories."""
        return {OverclusterConfig: "overcluster", HummingbirdConfig: "hummingbird"}.get(type(self), "dense")

    def train_splits(self) -> tuple[str, ...] | None:
        """The training split's folder names in order of preference when --train-split is not given
        (None: the protocol trains on nothing)."""
        return None

    def resolved(self) -> DenseConfig:
        """The config as the protocol runs it (the protocol's own values for the fields left to it):
        what its run directory is named by."""
        self.validate()
        return self

    def folders(self) -> list[tuple[str, Path]]:
        """(flag, folder) of every folder the run writes into, in the order they are checked."""
        return [("--cache-dir", self.cache_dir), ("--out", self.out), ("--results", self.results)]

    def validate(self) -> None:
        """A ``BadValue`` for the first shared option out of its range (nothing read or written);
        each protocol adds its own knobs' rules."""
        at_least("--skip-blocks", self.skip_blocks, 0)
        at_least("--image-size", self.image_size, 1, "a multiple of the backbone's patch")
        at_least("--eval-batch-size", self.eval_batch_size, 1)
        check_seed(self.seed)
        at_least("--workers", self.workers, 0, "0: in this process")
        check_names(self)


@flowing_help
@dataclass(frozen=True, kw_only=True)
class OverclusterConfig(DenseConfig):
    """Leopart's overclustering: k-means on the evaluation split's patch tokens, clusters matched to
    classes, mIoU. Defaults: VOC val, 448 square, StandardScaler + PCA-50 fitted on the eval set,
    k-means 100 iterations x 5 restarts, K 100/300/500 many-to-one (precision) and 21 Hungarian,
    maps at 100 x 100, mean of 5 seeds."""

    clusters: tuple[int, ...] = (100, 300, 500, 21)
    """The values of K. K = the number of classes is matched one-to-one (Hungarian on IoU); a larger
    K many-to-one."""

    seeds: int = 5
    """Clusterings per K (seeds seed .. seed + seeds - 1); the figure is their mean."""

    iterations: int = 100
    """k-means (Lloyd) iterations per restart (faiss niter)."""

    restarts: int = 5
    """k-means restarts per clustering, the lowest objective kept (faiss nredo)."""

    max_points_per_centroid: int = 256
    """faiss's default: k-means trains on a random subset of K x this many points (0: all points);
    every point is then assigned to its nearest centroid."""

    pca_dim: int = 50
    """PCA output dimension after the StandardScaler (0: no scaler, no PCA)."""

    mask_size: int = 100
    """Cluster maps (nearest from the patch grid) and ground truth (nearest from the input size)
    are compared at this side."""

    many_to_one: Literal["precision", "iou"] = "precision"
    """K > classes: each cluster goes to the class of highest precision (Leopart) or IoU."""

    batch_size: int = 60
    """Images per batch; with drop_last the split's last partial batch is left out (Leopart: 60 ->
    1,440 of VOC val's 1,449)."""

    drop_last: bool = True
    """Leave out the last partial batch (Leopart's loader); False clusters every image."""

    def validate(self) -> None:
        super().validate()
        rule = "must be one or more K >= 1"
        require(bool(self.clusters) and min(self.clusters) >= 1, "--clusters", self.clusters, rule)
        for flag in ("--seeds", "--iterations", "--restarts", "--mask-size", "--batch-size"):
            at_least(flag, getattr(self, field(flag)), 1)
        at_least("--max-points-per-centroid", self.max_points_per_centroid, 0, "0: all points")
        at_least("--pca-dim", self.pca_dim, 0, "0: no scaler, no PCA")


@dataclass(frozen=True)
class Recipe:
    """A protocol's values for the LinearConfig fields left at 0."""

    lr: float
    epochs: int
    iterations: int
    batch_size: int


RECIPES = {
    "leopart-voc": Recipe(lr=0.01, epochs=25, iterations=0, batch_size=120),
    "dinov3-ade20k": Recipe(lr=1e-3, epochs=0, iterations=40_000, batch_size=16),
}


@flowing_help
@dataclass(frozen=True, kw_only=True)
class LinearConfig(DenseConfig):
    """A linear probe on frozen patch tokens, trained then scored by mIoU over the evaluation split.
    Two named protocols: leopart-voc (Leopart's VOC linear probe) and dinov3-ade20k (DINOv2/v3's
    ADE20k linear probe: BatchNorm + linear, sliding-window full-resolution mIoU)."""

    protocol: Literal["leopart-voc", "dinov3-ade20k"] = "leopart-voc"
    """The recipe; the fields below left at 0 take its values (python -m fastloc.probe linear --help)."""

    lr: float = 0.0
    """Learning rate (0: the protocol's: leopart-voc 0.01, Leopart's for DINO/Leopart ViT-S (0.1 for
    ViT-B and MAE, 1.0 for MoCo-v3); dinov3-ade20k 1e-3)."""

    epochs: int = 0
    """leopart-voc: passes over the training split (0: 25; lr x 0.1 at 80% of them, epoch 20 of 25)."""

    iterations: int = 0
    """dinov3-ade20k: updates (0: 40,000; scale it down on small hardware and say so, the result records it)."""

    batch_size: int = 0
    """Global training batch (0: leopart-voc 120 = 60 x 2 GPUs; dinov3-ade20k 16 = 2 x 8 GPUs)."""

    crop_size: int = 512
    """dinov3-ade20k: the training crop, the sliding window's side and the backbone's input side
    (--image-size is set to it); a multiple of the patch size."""

    stride: int = 341
    """dinov3-ade20k: the sliding window's stride."""

    short_side: int = 512
    """dinov3-ade20k: evaluation images are resized (aspect kept) to this short side, scored at
    their original resolution; training images to int(short_side x U(0.5, 2)) (dinov3's img_size 512
    for both)."""

    probe_size: int = 100
    """leopart-voc: features are bilinearly upsampled to this side, and the loss is computed there."""

    def protocol_name(self) -> str:
        return f"linear-{self.protocol}"

    def resolved(self) -> LinearConfig:
        """The protocol's values for the fields left at 0 (the values checked first); dinov3-ade20k
        also scores label 0 as void (reduce_zero_label) and feeds the backbone the crop (image_size =
        crop_size)."""
        self.validate()
        recipe = RECIPES[self.protocol]
        cfg = replace(
            self,
            lr=self.lr or recipe.lr,
            epochs=self.epochs or recipe.epochs,
            iterations=self.iterations or recipe.iterations,
            batch_size=self.batch_size or recipe.batch_size,
        )
        if cfg.protocol == "dinov3-ade20k":
            cfg = replace(cfg, zero_is_ignore=True, image_size=cfg.crop_size)
        return cfg

    def validate(self) -> None:
        super().validate()
        require(math.isfinite(self.lr) and self.lr >= 0, "--lr", self.lr, "must be >= 0 (0: the protocol's)")
        for flag in ("--epochs", "--iterations", "--batch-size"):
            at_least(flag, getattr(self, field(flag)), 0, "0: the protocol's")
        require(
            not (self.protocol == "leopart-voc" and self.iterations),
            "--iterations",
            self.iterations,
            "belongs to dinov3-ade20k; leopart-voc trains for --epochs",
        )
        require(
            not (self.protocol == "dinov3-ade20k" and self.epochs),
            "--epochs",
            self.epochs,
            "belongs to leopart-voc; dinov3-ade20k trains for --iterations",
        )
        for flag in ("--crop-size", "--short-side", "--probe-size"):
            at_least(flag, getattr(self, field(flag)), 1)
        rule = f"must be in [1, --crop-size {self.crop_size}] (windows further apart leave pixels unscored)"
        require(1 <= self.stride <= self.crop_size, "--stride", self.stride, rule)

    def train_splits(self) -> tuple[str, ...]:
        """Leopart trains on VOC's trainaug where the shard set has it."""
        return ("trainaug", "train") if self.protocol == "leopart-voc" else ("train", "training")


@flowing_help
@dataclass(frozen=True, kw_only=True)
class HummingbirdConfig(DenseConfig):
    """Hummingbird in-context retrieval (open-hummingbird-eval): a memory bank of training patch
    tokens with their label distributions, k-NN label transfer onto evaluation patches, mIoU."""

    image_size: int = 512
    """The side of the square input (the reference's script: 512)."""

    neighbours: int = 30
    """Neighbours retrieved per patch (the reference: 30)."""

    temperature: float = 0.02
    """Softmax temperature on the cosine similarities (the reference's beta: 0.02)."""

    memory_size: int = 102_400
    """Bank entries (0: every patch of every augmented training image). The reference's script:
    1024 x 10^2; its paper runs: 1024 x 10^4. Each image gives memory_size // (images x
    augmentation_epochs) patches, those of its rarest classes first."""

    augmentation_epochs: int = 1
    """Passes over the training split into the bank, each with fresh augmentation."""

    augment: bool = True
    """The reference's bank augmentation: RandomResizedCrop(scale 0.5-2.0) and colour jitter
    (brightness, contrast, saturation, hue 0.1, each with probability 0.5). False: the square resize."""

    train_images: int = 0
    """Use only the first N training images (0: all); the reference's data-efficiency runs take a
    random fraction instead."""

    matching: Literal["hungarian", "none"] = "hungarian"
    """The reference scores predictions after Hungarian matching to the classes (its PredsmIoU);
    none scores them as predicted."""

    bank_chunk: int = 65_536
    """Bank rows compared per step of the exact k-NN search (memory: queries x chunk similarities)."""

    def train_splits(self) -> tuple[str, ...]:
        """The reference's bank comes from VOC's trainaug, where the shard set has it."""
        return ("trainaug", "train", "training")

    bank_void: Literal["background", "ignore"] = "background"
    """Void pixels (VOC's 255) in the bank's label distributions: background counts them as class 0
    (the reference's y[y == 255] = 0); ignore leaves them out of each patch's distribution."""

    def validate(self) -> None:
        super().validate()
        at_least("--neighbours", self.neighbours, 1)
        positive(self.temperature, "--temperature")
        at_least("--memory-size", self.memory_size, 0, "0: every patch")
        if self.memory_size:
            rule = f"must be at most --memory-size {self.memory_size}"
            require(self.neighbours <= self.memory_size, "--neighbours", self.neighbours, rule)
        at_least("--augmentation-epochs", self.augmentation_epochs, 1)
        at_least("--train-images", self.train_images, 0, "0: all")
        at_least("--bank-chunk", self.bank_chunk, 1)
        rule = "leaves no background class for void: use --bank-void ignore"
        require(not (self.zero_is_ignore and self.bank_void == "background"), "--zero-is-ignore", True, rule)


PROTOCOLS: dict[str, type[DenseConfig]] = {
    "overcluster": OverclusterConfig,
    "linear": LinearConfig,
    "hummingbird": HummingbirdConfig,
}


def parse(protocol: str, args: list[str], prog: str = "") -> DenseConfig:
    """One protocol's config from its command line, as python -m fastloc.probe PROTOCOL parses it
    (SystemExit on a usage error)."""
    return tyro.cli(PROTOCOLS[protocol], args=args, prog=prog or f"python -m fastloc.probe {protocol}")
