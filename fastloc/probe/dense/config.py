"""The dense evaluations' configs: what every protocol shares, then each protocol's own knobs.

The defaults are the published recipes (../shared/methods/OTHER-METHODS.md section 1, the
Leopart, open-hummingbird-eval and DINOv3 code); a knob that moves numbers (section 4) is a field,
and the result JSON records every field under the protocol's name. ``validate()`` refuses a value
out of its range (a BadValue naming the option) before any work; ``parse`` picks the config of a
command line (the linear probes' by --protocol).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import tyro

from fastloc.cli import BadValue, flowing_help, require
from fastloc.probe.config import EvalConfig, at_least, field, positive


@dataclass(frozen=True, kw_only=True)
class DenseConfig(EvalConfig):
    """What every dense protocol shares: the data, the frozen backbone, where results go (their
    defaults and names). Each protocol also has ``image_size`` (the backbone's input side, set by
    SIZE_FLAG) and ``zero_is_ignore``."""

    PROTOCOL: ClassVar[str]  # the name in results, CSV file names and run directories
    SIZE_FLAG: ClassVar[str] = "--image-size"

    backbone: str = "dino-vit-s"
    """A registered short name (python -m fastloc.probe --help lists them), a timm id, or a file
    written by python -m fastloc.align export. dino-vit-s is Leopart's starting point."""

    eval_batch_size: int = 60
    """Feature-extraction batch (Leopart: 60)."""

    name: str = ""
    """Run directory name under out (default: protocol-dataset-backbone-sizeN)."""

    results: Path = Path("results")
    """Folder of the results CSV (dense-PROTOCOL-DATASET.csv, one row per figure, appended)."""

    train_split: str = ""
    """The training split's folder under data (default: trainaug when there, else train or training,
    for leopart-voc and hummingbird, as their references; train or training for dinov3-ade20k)."""

    def protocol_name(self) -> str:
        """The protocol's name in results, CSV file names and run directories."""
        return self.PROTOCOL

    def train_splits(self) -> tuple[str, ...] | None:
        """The training split's folder names in order of preference when --train-split is not given
        (None: the protocol trains on nothing)."""
        return None

    def folders(self) -> list[tuple[str, Path]]:
        """(flag, folder) of every folder the run writes into, in the order they are checked."""
        return [("--cache-dir", self.cache_dir), ("--out", self.out), ("--results", self.results)]


@dataclass(frozen=True, kw_only=True)
class SquareConfig(DenseConfig):
    """A protocol that feeds the backbone every image resized to one square and scores the
    evaluation split so (from the feature cache); label 0 is read as the user says."""

    image_size: int = 448
    """The side of the square input; the backbone's position embedding is resampled to it."""

    zero_is_ignore: bool = False
    """Score label 0 as void and shift the other classes down by one (mmseg's reduce_zero_label:
    ADE20k's and COCO-Stuff's 'unlabeled'). VOC's class 0 is background, a class like any other."""

    def validate(self) -> None:
        super().validate()
        at_least("--image-size", self.image_size, 1, "a multiple of the backbone's patch")


@flowing_help
@dataclass(frozen=True, kw_only=True)
class OverclusterConfig(SquareConfig):
    """Leopart's overclustering: k-means on the evaluation split's patch tokens, clusters matched to
    classes, mIoU. Defaults: VOC val, 448 square, StandardScaler + PCA-50 fitted on the eval set,
    k-means 100 iterations x 5 restarts, K 100/300/500 many-to-one (precision) and 21 Hungarian,
    maps at 100 x 100, mean of 5 seeds."""

    PROTOCOL = "overcluster"

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


LinearProtocol = Literal["leopart-voc", "dinov3-ade20k"]  # the keys of LINEAR


@flowing_help
@dataclass(frozen=True, kw_only=True)
class LeopartVocConfig(SquareConfig):
    """Leopart's VOC linear probe: a 1x1 conv on frozen patch tokens, trained by SGD on live
    RandomResizedCrop batches, then scored by mIoU over the evaluation split (its square cached
    features, logits bilinear to --image-size)."""

    PROTOCOL = "linear-leopart-voc"

    protocol: LinearProtocol = "leopart-voc"
    """The recipe: leopart-voc (these options) or dinov3-ade20k (python -m fastloc.probe linear
    --protocol dinov3-ade20k --help)."""

    lr: float = 0.01
    """Learning rate: Leopart's for DINO/Leopart ViT-S (0.1 for ViT-B and MAE, 1.0 for MoCo-v3)."""

    epochs: int = 25
    """Passes over the training split (lr x 0.1 at 80% of them, epoch 20 of 25)."""

    batch_size: int = 120
    """Global training batch (Leopart: 60 x 2 GPUs)."""

    probe_size: int = 100
    """Features are bilinearly upsampled to this side, and the loss is computed there."""

    def train_splits(self) -> tuple[str, ...]:
        """Leopart trains on VOC's trainaug where the shard set has it."""
        return ("trainaug", "train")

    def validate(self) -> None:
        super().validate()
        positive(self.lr, "--lr")
        for flag in ("--epochs", "--batch-size", "--probe-size"):
            at_least(flag, getattr(self, field(flag)), 1)


@flowing_help
@dataclass(frozen=True, kw_only=True)
class Dinov3Ade20kConfig(DenseConfig):
    """DINOv2/v3's ADE20k linear probe: BatchNorm + a 1x1 conv on frozen patch tokens, trained by
    AdamW on the reference's training pipeline, then scored by sliding windows at full resolution
    (mIoU). Label 0 is void (reduce_zero_label) and the backbone's input side is the crop."""

    PROTOCOL = "linear-dinov3-ade20k"
    SIZE_FLAG = "--crop-size"

    protocol: LinearProtocol = "dinov3-ade20k"
    """The recipe: dinov3-ade20k (these options) or leopart-voc (python -m fastloc.probe linear
    --protocol leopart-voc --help)."""

    lr: float = 1e-3
    """Learning rate (dinov3's)."""

    iterations: int = 40_000
    """Updates (scale it down on small hardware and say so, the result records it)."""

    batch_size: int = 16
    """Global training batch (dinov3: 2 x 8 GPUs)."""

    crop_size: int = 512
    """The training crop, the sliding window's side and the backbone's input side; a multiple of
    the patch size."""

    stride: int = 341
    """The sliding window's stride."""

    short_side: int = 512
    """Evaluation images are resized (aspect kept) to this short side, scored at their original
    resolution; training images to int(short_side x U(0.5, 2)) (dinov3's img_size 512 for both)."""

    @property
    def image_size(self) -> int:
        return self.crop_size

    @property
    def zero_is_ignore(self) -> bool:
        return True

    def train_splits(self) -> tuple[str, ...]:
        return ("train", "training")

    def validate(self) -> None:
        super().validate()
        positive(self.lr, "--lr")
        for flag in ("--iterations", "--batch-size", "--crop-size", "--short-side"):
            at_least(flag, getattr(self, field(flag)), 1)
        rule = f"must be in [1, --crop-size {self.crop_size}] (windows further apart leave pixels unscored)"
        require(1 <= self.stride <= self.crop_size, "--stride", self.stride, rule)


@flowing_help
@dataclass(frozen=True, kw_only=True)
class HummingbirdConfig(SquareConfig):
    """Hummingbird in-context retrieval (open-hummingbird-eval): a memory bank of training patch
    tokens with their label distributions, k-NN label transfer onto evaluation patches, mIoU."""

    PROTOCOL = "hummingbird"

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

    bank_void: Literal["background", "ignore"] = "background"
    """Void pixels (VOC's 255) in the bank's label distributions: background counts them as class 0
    (the reference's y[y == 255] = 0); ignore leaves them out of each patch's distribution."""

    def train_splits(self) -> tuple[str, ...]:
        """The reference's bank comes from VOC's trainaug, where the shard set has it."""
        return ("trainaug", "train", "training")

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


@flowing_help
@dataclass(frozen=True, kw_only=True)
class KnnConfig(DenseConfig):
    """DINO's weighted k-NN classifier (eval_knn.py): the training split's image features are the
    memory bank, each evaluation image votes with its k nearest by cosine, weighted exp(cos / T);
    top-1 and top-5 accuracy over the split's image-level classes (the manifest's cls)."""

    PROTOCOL = "knn"

    data: Annotated[tyro.conf.Positional[Path], tyro.conf.arg(metavar="DATA")]
    """The shard set (python -m fastloc.shard converts one): a training split (the memory bank) and a validation
    split (the queries) whose samples carry an image-level class (cls), as ImageNet's and the synthetic set's."""

    train_split: str = ""
    """The memory bank's folder under data (default: train or training)."""

    eval_batch_size: int = 128
    """Feature-extraction batch per rank (DINO: 128 per GPU)."""

    precision: Literal["bf16", "fp32"] = "fp32"
    """fp32 throughout (DINO's); bf16 runs the backbone under bf16 autocast and caches bf16 features."""

    image_size: int = 0
    """The backbone's input side (0: its own); the eval transform is the backbone's timm one at this side:
    Resize(floor(side / crop_pct)), CenterCrop(side), as DINO's Resize 256 + CenterCrop 224 for ViT-S/16."""

    k: int = 20
    """Neighbours that vote (DINO: 20, its best of 10, 20, 100, 200)."""

    temperature: float = 0.07
    """Each neighbour votes exp(cosine / temperature) (DINO: 0.07)."""

    token: Literal["cls", "pooled"] = "cls"
    """The image feature: cls (the class token after the final norm, DINO's) or pooled (timm's pre-logits:
    the backbone's own pooling, e.g. the mean of the patch tokens of a backbone without a class token)."""

    query_chunk: int = 500
    """Evaluation images compared with the whole bank at once (DINO: the split / 100, 500 on ImageNet);
    memory: query_chunk x bank similarities. Chunks go to ranks in turn; the figures never depend on the ranks."""

    @property
    def zero_is_ignore(self) -> bool:
        return False  # image-level classes: no void

    def train_splits(self) -> tuple[str, ...]:
        """The memory bank: DINO's train split."""
        return ("train", "training")

    def validate(self) -> None:
        super().validate()
        at_least("--image-size", self.image_size, 0, "0: the backbone's own")
        at_least("--k", self.k, 1)
        positive(self.temperature, "--temperature")
        at_least("--query-chunk", self.query_chunk, 1)


LINEAR: dict[str, type[DenseConfig]] = {"leopart-voc": LeopartVocConfig, "dinov3-ade20k": Dinov3Ade20kConfig}
PROTOCOLS: dict[str, type[DenseConfig]] = {  # linear: its --protocol's default
    "overcluster": OverclusterConfig,
    "linear": LeopartVocConfig,
    "hummingbird": HummingbirdConfig,
    "knn": KnnConfig,
}


def parse(command: str, args: list[str], prog: str = "") -> DenseConfig:
    """One protocol's config from its command line, as python -m fastloc.probe COMMAND parses it
    (SystemExit on a usage error)."""
    config = linear_config(args) if command == "linear" else PROTOCOLS[command]
    return tyro.cli(config, args=args, prog=prog or f"python -m fastloc.probe {command}")


def linear_config(args: list[str]) -> type[DenseConfig]:
    """The config of the linear protocol the last --protocol names (as tyro reads it; an unknown
    name is left to tyro's error). Another protocol's option is a ``BadValue``: it would do nothing."""
    protocol = "leopart-voc"
    for arg, after in zip(args, [*args[1:], ""]):
        flag, eq, value = arg.partition("=")
        if flag == "--protocol":
            protocol = value if eq else after
    config = LINEAR.get(protocol)
    if config is None:
        return PROTOCOLS["linear"]
    own = options(config)
    foreign = {flag: name for name, other in LINEAR.items() for flag in options(other) - own}
    for flag in (arg.partition("=")[0] for arg in args):
        if flag in foreign:
            raise BadValue(f"{flag} belongs to --protocol {foreign[flag]}, not {protocol}")
    return config


def options(config: type) -> set[str]:
    """A config's command-line options (a boolean's both forms)."""
    out = set()
    for f in fields(config):
        flag = f.name.replace("_", "-")
        out |= {f"--{flag}", f"--no-{flag}"} if isinstance(f.default, bool) else {f"--{flag}"}
    return out
