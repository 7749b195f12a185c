"""DINO's weighted k-NN classifier (``python -m fastloc.probe knn DATA``): how well a frozen backbone's
image features carry image-level classes. It measures what dense post-training costs at the image
level beside the dense protocols (Leopart on DINO ViT-S/16: ImageNet k-NN 74.5 -> 55.0).

The recipe (facebookresearch/dino eval_knn.py @ 7c446df): both splits through the backbone's timm
eval transform (DINO ViT-S/16: Resize 256 bicubic, CenterCrop 224), the class token after the final
norm, L2-normalized; the training split is the memory bank; each evaluation image takes its k = 20
nearest bank images by cosine, each voting exp(cos / 0.07) for its class; top-1 and top-5 accuracy.
Both splits go through the feature cache. Under torchrun every rank holds the whole bank and
classifies every world_size-th chunk of queries; the integer hit counts are summed, so the figures
never depend on the number of ranks. What differs from the reference is ``DIFFERENCES``, written
into every result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastloc.cli import BadValue, require
from fastloc.data.config import LoaderConfig
from fastloc.data.loader import make_loader
from fastloc.data.recipes import CenterCrop
from fastloc.data.shards import ShardSet, open_shards
from fastloc.models.exported import is_export
from fastloc.models.registry import fingerprint, image_config
from fastloc.probe.backbone import load_backbone
from fastloc.probe.cache import (
    CachedSplit,
    build_from_loader,
    cache_key,
    cache_path,
    feature_storage,
    image_key,
    reuse_or_build,
)
from fastloc.probe.data import VAL_SPLITS, check_same_classes, split_folder
from fastloc.probe.dense import report
from fastloc.probe.dense.config import KnnConfig
from fastloc.probe.dense.data import Backbone, DenseData, LabelSpace
from fastloc.probe.report import checked_folders
from fastloc.probe.run import eval_recipe, feature_dtype, seed_everything, timed
from fastloc.runtime import Runtime, autocast, collective_device, setup

PROTOCOL = "knn"
TOP = 5  # the second figure: top-5 accuracy (DINO's; min(5, k) there)
BANK_BLOCK = 65_536  # bank rows read from the cache and normalized at once

DIFFERENCES = {
    "unusable": "samples the loader cannot use (undecodable) are left out of the bank and the queries (the "
    "reference would stop)",
    "ties": "classes of equal votes are ranked by class id (a stable sort: zero-vote classes fill the top 5 in "
    "id order when fewer than 5 classes got votes); the reference's unstable sort leaves their order to the "
    "device (on the CPU this one up to 16 classes, none set beyond)",
    "top5": "over min(5, k, classes) predictions (the reference: min(5, k); it fails with fewer than 5 classes)",
    "decoding": "the loader's JPEG decoding: PIL under --loader cpu (the reference's), nvJPEG under DALI",
    "precision": "under --precision bf16 the backbone runs under bf16 autocast and the cache holds bf16 features "
    "(the reference and the default: fp32); the search is fp32 without TF32 either way",
}


# --- The classifier (eval_knn.py knn_classifier, lines 143-182) ------------------------------------------------


def normalized(features: torch.Tensor) -> torch.Tensor:
    """[n, D] -> float32 rows of unit L2 norm (eval_knn.py:81-82, nn.functional.normalize)."""
    return F.normalize(features.float(), dim=1, p=2)


def vote(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int, temperature: float, num_classes: int
) -> torch.Tensor:
    """Normalized bank [N, D], its classes [N] int64 and normalized queries [q, D] -> votes [q, C] float32:
    per class, the sum of exp(cos / T) over the query's k nearest bank rows (eval_knn.py:158-172, its ops
    in its order, so the sums are the reference's to the bit)."""
    q = queries.shape[0]
    similarity = queries @ bank.T  # [q, N]
    distances, indices = similarity.topk(k, dim=1, largest=True, sorted=True)  # [q, k]
    neighbours = bank_labels[indices]  # [q, k]
    one_hot = torch.zeros(q * k, num_classes, device=queries.device).scatter_(1, neighbours.view(-1, 1), 1)
    weights = (distances / temperature).exp()  # [q, k]
    return (one_hot.view(q, k, num_classes) * weights.view(q, k, 1)).sum(1)


def ranked(votes: torch.Tensor, top: int) -> torch.Tensor:
    """[q, C] votes -> [q, top] classes, most votes first, ties by class id (eval_knn.py:173, stable)."""
    return votes.sort(dim=1, descending=True, stable=True).indices[:, :top]


def hits(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[q, top] ranked classes and true classes [q] -> [3, C] int64 per true class: top-1 hits, top-5 hits,
    queries (eval_knn.py:176-179, by class)."""
    correct = predicted == labels[:, None]  # [q, top]
    rows = torch.stack([correct[:, 0], correct.any(1), torch.ones_like(correct[:, 0])]).long()  # [3, q]
    return torch.zeros(3, num_classes, dtype=torch.long, device=labels.device).index_add_(1, labels, rows)


def top_count(k: int, num_classes: int) -> int:
    """How many ranked classes the second figure looks at: min(5, k, classes)."""
    return min(TOP, k, num_classes)


@torch.no_grad()
def knn_counts(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    k: int,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """[3, C] int64 hit counts (``hits``) over query chunks of (normalized features [q, D], classes [q]);
    on the bank's device, no host sync."""
    counts = torch.zeros(3, num_classes, dtype=torch.long, device=bank.device)
    top = top_count(k, num_classes)
    with exact_matmul():
        for queries, labels in chunks:
            predicted = ranked(vote(bank, bank_labels, queries, k, temperature, num_classes), top)
            counts += hits(predicted, labels, num_classes)
    return counts


def percent(counts: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-5) accuracy in percent of [3, C] hit counts, as the reference computes it
    (hits * 100.0 / total, eval_knn.py:180-181; one host read)."""
    top1, top5, total = counts.sum(1).tolist()
    return top1 * 100.0 / total, top5 * 100.0 / total


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int = 1000,
    chunk: int = 500,
) -> tuple[float, float]:
    """The reference's knn_classifier on in-memory, L2-normalized features: (top-1, top-5) in percent."""
    pieces = zip(test_features.split(chunk), test_labels.split(chunk))
    return percent(knn_counts(train_features, train_labels, pieces, k, temperature, num_classes))


@contextmanager
def exact_matmul() -> Iterator[None]:
    """TF32 off for the search (the runtime turns it on for CUDA): the reference's similarities are fp32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# --- The run's inputs -------------------------------------------------------------------------------------------


def rank_chunks(count: int, chunk: int, rank: int, world_size: int) -> list[slice]:
    """The query chunks (slices of the ``count`` usable queries, ``chunk`` each) of one rank: every
    world_size-th from its rank's. The chunks are the same whatever the ranks, so is every sum."""
    starts = range(rank * chunk, count, world_size * chunk)
    return [slice(start, min(start + chunk, count)) for start in starts]


def has_cls(split: ShardSet) -> bool:
    return bool(split.manifest.get("cls")) and "cls" in split.manifest["keys"]


def open_class_data(cfg: KnnConfig) -> DenseData:
    """The memory bank's split (--train-split, else train or training) and the queries' (--val-split,
    else val or validation), each with image-level classes, one class table, at least k bank images."""
    root = Path(cfg.data)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such shard set (python -m fastloc.shard converts one)")
    val = open_shards(split_folder(root, cfg.val_split, VAL_SPLITS, "validation"))
    train = open_shards(split_folder(root, cfg.train_split, cfg.train_splits(), "training"))
    for split in (train, val):
        if not has_cls(split):
            raise ValueError(
                f"{split.root}: its samples have no image-level class (cls; members {split.manifest['keys']}), "
                "which the k-NN classifier votes with; convert a set that has one (ImageNet, the synthetic set)"
            )
    check_same_classes(train, val)
    bank = train.num_samples
    require(cfg.k <= bank, "--k", cfg.k, f"must be at most the {bank} images of the memory bank {train.root}")
    return DenseData(val, train)


def pooling(model: nn.Module) -> str:
    """What timm's pre-logits pooling of ``model`` is: attention, avg, token, ... or none."""
    if getattr(model, "attn_pool", None) is not None:
        return "attention"
    return getattr(model, "global_pool", "") or "none"


def check_token(model: nn.Module, cfg: KnnConfig) -> None:
    """A ``BadValue`` for a --token the backbone cannot give: cls without a class token, pooled after
    --skip-blocks pruned timm's pooling."""
    if cfg.token == "cls" and getattr(model, "cls_token", None) is None:
        raise BadValue(
            f"--token cls: {cfg.backbone} has no class token (it pools by {pooling(model)}); use --token pooled"
        )
    if cfg.token == "pooled" and pooling(model) == "none":
        raise BadValue(
            f"--token pooled: {cfg.backbone} has no pooling left (--skip-blocks {cfg.skip_blocks} prunes timm's head "
            "with the blocks); use --token cls"
        )


def planned(cfg: KnnConfig) -> tuple[KnnConfig, str]:
    """What the SLURM launcher checks before submitting (launch/job.py): the splits and k as
    ``open_knn`` checks them, and the config with its image size resolved, which names the run
    directory; a registered backbone is built on the meta device (no weights read)."""
    data = open_class_data(cfg)
    if not cfg.image_size:
        if is_export(cfg.backbone):
            model = load_backbone(cfg.backbone, cfg.weights, cfg.skip_blocks)
        else:
            with torch.device("meta"):
                model = load_backbone(cfg.backbone, "random", cfg.skip_blocks)
        cfg = replace(cfg, image_size=image_config(model).size)
    return cfg, data.dataset


def knn_backbone(cfg: KnnConfig, device: torch.device) -> Backbone:
    """``cfg.backbone`` frozen, at --image-size (0: its own; another side resamples its position embedding)."""
    model = load_backbone(cfg.backbone, cfg.weights, cfg.skip_blocks)
    check_token(model, cfg)
    own = image_config(model)
    size = cfg.image_size or own.size
    if size < own.patch_size or size % own.patch_size:
        raise ValueError(f"--image-size {size}: must be a positive multiple of {cfg.backbone}'s patch {own.patch_size}")
    if size != own.size:
        model.set_input_size(img_size=size)
    model = model.to(device).eval().requires_grad_(False)
    return Backbone(model, image_config(model), fingerprint(model))


def feature_dim(model: nn.Module, token: str) -> int:
    """The width of the image feature: the class token's, or timm's pre-logits'."""
    if token == "pooled":
        return int(getattr(model, "head_hidden_size", model.num_features))
    return int(getattr(model, "embed_dim", model.num_features))


def image_encoder(
    model: nn.Module, token: str, precision: str, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images [B, 3, S, S] -> [B, 1, D] in the cache's dtype: the class token after the final norm
    (eval_knn.py:105, DINO's model(x)), or timm's pre-logits pooling (forward_head)."""

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            tokens = model.forward_features(images.to(device, non_blocking=True))  # [B, T, D]
            feature = tokens[:, 0] if token == "cls" else model.forward_head(tokens, pre_logits=True)  # [B, D]
        return feature.to(feature_dtype(precision))[:, None]

    return encode


def loader_config(split: ShardSet, backbone: Backbone, cfg: KnnConfig) -> LoaderConfig:
    """A split through the backbone's timm eval transform (eval_knn.py:32-37 at the backbone's size and
    normalization), in order, every sample once, no label maps."""
    image = backbone.image
    recipe = CenterCrop(crop_pct=image.crop_pct, interpolation=image.interpolation)
    base = eval_recipe(split, image, cfg.eval_batch_size)
    return replace(base, recipe=recipe, labels=False, seed=cfg.seed, loader=cfg.loader, workers=cfg.workers)


class ClassBatches:
    """A loader whose batches carry their classes where the cache's ``targets`` reads label maps
    (``build_cache`` stores what ``targets(batch.labels)`` gives); a class outside the table is an error."""

    def __init__(self, loader, num_classes: int, root: Path):
        self.loader, self.num_classes, self.root = loader, num_classes, root

    def __iter__(self):
        for batch in self.loader:
            cls = batch.cls.long()
            bad = (cls < 0) | (cls >= self.num_classes)
            if bad.any():  # one host sync per batch, as the cache's label check
                keys = [key for key, b in zip(batch.keys or [], bad.tolist()) if b][:4]
                raise ValueError(
                    f"{self.root}: samples {', '.join(keys)} have a class outside the manifest's {self.num_classes}"
                )
            yield replace(batch, labels=cls)

    def close(self) -> None:
        self.loader.close()


def class_split(cfg: KnnConfig, split: ShardSet, backbone: Backbone, runtime: Runtime) -> CachedSplit:
    """The split's cache of image features [N, 1, D] and classes [N]: reused when it is there, else
    built (every rank its share of the samples)."""
    image = backbone.image
    key = cache_key(
        backbone.digest, split.manifest, image_key(image), cfg.skip_blocks, str(feature_dtype(cfg.precision))[6:]
    )
    key["recipe"] = f"center-crop {image.crop_pct} {image.interpolation}"
    key["arrays"] = f"{cfg.token}+cls"
    n, dim = split.num_samples, feature_dim(backbone.model, cfg.token)
    shapes = {"features": (n, 1, dim), "cls": (n,), "usable": (n,)}
    dtypes = {"features": feature_storage(cfg.precision), "cls": np.int64, "usable": np.bool_}

    def build() -> CachedSplit:
        batches = ClassBatches(
            make_loader(loader_config(split, backbone, cfg), runtime), key["num_classes"], split.root
        )
        encode = image_encoder(backbone.model, cfg.token, cfg.precision, runtime.device)
        return build_from_loader(path, key, batches, encode, shapes, dtypes, lambda cls: {"cls": cls}, runtime.main)

    path = cache_path(cfg.cache_dir, key)
    return reuse_or_build(path, key, build, runtime.main, reuse=cfg.cache)


def read_rows(cache: CachedSplit, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized features [n, D] float32 and classes [n] int64 of ``rows``, on ``device``."""
    features = torch.empty(len(rows), cache.meta["shape"]["dim"], device=device)
    labels = torch.empty(len(rows), dtype=torch.long, device=device)
    for start in range(0, len(rows), BANK_BLOCK):
        block, stored = cache.rows(rows[start : start + BANK_BLOCK])
        features[start : start + len(block)] = normalized(block[:, 0].to(device, non_blocking=True))
        labels[start : start + len(block)] = stored["cls"].to(device, non_blocking=True)
    return features, labels


def query_chunks(
    cache: CachedSplit, rows: np.ndarray, cfg: KnnConfig, runtime: Runtime
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's chunks of queries (``rank_chunks``), read from the cache as they are needed."""
    for part in rank_chunks(len(rows), cfg.query_chunk, runtime.rank, runtime.world_size):
        yield read_rows(cache, rows[part], runtime.device)


def summed(counts: torch.Tensor) -> torch.Tensor:
    """The hit counts summed over ranks (integers: exact in any order)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return counts
    total = counts.to(collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(counts.device)


# --- The run ----------------------------------------------------------------------------------------------------


@dataclass
class KnnRun:
    """An opened k-NN run: its config with the image size resolved, ranks and device, splits, classes
    and frozen backbone, and the seconds of each stage."""

    cfg: KnnConfig
    runtime: Runtime
    data: DenseData
    labels: LabelSpace
    backbone: Backbone
    timings: dict[str, float] = field(default_factory=dict)


def open_knn(cfg: KnnConfig) -> KnnRun:
    """Every check before the work, in order: option values, the ranks and device (everything seeded
    from ``cfg.seed``, so every rank builds the same random weights), the output folders, the data
    and k, the backbone and its token, the run directory and the results CSV. A refused run leaves
    nothing behind."""
    cfg.validate()
    runtime = setup(cfg.device, flag="--device")
    seed_everything(cfg.seed)
    with checked_folders(*cfg.folders()):
        data = open_class_data(cfg)
        backbone = knn_backbone(cfg, runtime.device)
        cfg = replace(cfg, image_size=backbone.image.size)
        report.check_outputs(cfg, data.dataset)
    return KnnRun(cfg, runtime, data, LabelSpace(data.classes, None, False), backbone)


def protocol(cfg: KnnConfig, num_classes: int, train_split: str) -> dict:
    """The protocol's name and every knob (the CSV's knobs column; what compare checks)."""
    return {
        "name": PROTOCOL,
        "k": cfg.k,
        "temperature": cfg.temperature,
        "token": cfg.token,
        "image_size": cfg.image_size,
        "transform": "the backbone's timm eval transform: Resize(floor(size / crop_pct)), CenterCrop(size)",
        "similarity": "cosine (L2-normalized features), exact, fp32",
        "voting": "sum of exp(cosine / temperature) over the k nearest, per class",
        "top": top_count(cfg.k, num_classes),
        "train_split": train_split,
        "feature_dtype": str(feature_dtype(cfg.precision))[6:],
    }


def usable_rows(cache: CachedSplit) -> np.ndarray:
    return np.flatnonzero(np.asarray(cache.usable))


def details(opened: KnnRun, counts: torch.Tensor, bank: CachedSplit, queries: CachedSplit) -> dict:
    """What result.json holds beside the figures: the reference's percentages, the images counted,
    the transform and pooling resolved, how the run ran, and ``DIFFERENCES``."""
    cfg, image = opened.cfg, opened.backbone.image
    top1, top5 = percent(counts)
    bank_used, queries_used = int(bank.usable.sum()), int(queries.usable.sum())
    return {
        "accuracy_percent": {"top1": top1, "top5": top5},  # as eval_knn.py prints them
        "queries_per_class": counts[2].tolist(),
        "images": {
            "bank": bank_used,
            "queries": queries_used,
            "bank_unusable": bank.num_samples - bank_used,
            "queries_unusable": queries.num_samples - queries_used,
        },
        "transform": {
            "size": image.size,
            "resize": image.eval_resize,
            "crop_pct": image.crop_pct,
            "interpolation": image.interpolation,
        },
        "pooling": pooling(opened.backbone.model) if cfg.token == "pooled" else "class token",
        "query_chunk": cfg.query_chunk,
        "world_size": opened.runtime.world_size,
        "device": str(opened.runtime.device),
        "timings_s": opened.timings,
        "differences": DIFFERENCES,
    }


def run(cfg: KnnConfig) -> Path:
    """Features of both splits, the bank on every rank, the queries by rank; returns the run directory
    (result.json and the CSV rows, written by rank 0)."""
    opened = open_knn(cfg)
    cfg, runtime, data, backbone = opened.cfg, opened.runtime, opened.data, opened.backbone
    num_classes = opened.labels.num_classes
    with timed(opened.timings, "features_s"):
        bank_cache = class_split(cfg, data.train, backbone, runtime)
        query_cache = class_split(cfg, data.val, backbone, runtime)
    bank_rows, query_rows = usable_rows(bank_cache), usable_rows(query_cache)
    require(cfg.k <= len(bank_rows), "--k", cfg.k, f"must be at most the {len(bank_rows)} usable images of the bank")
    if len(query_rows) == 0:
        raise ValueError(f"{data.val.root}: no usable image to classify")
    with timed(opened.timings, "search_s"):
        bank, bank_labels = read_rows(bank_cache, bank_rows, runtime.device)
        chunks = query_chunks(query_cache, query_rows, cfg, runtime)
        counts = summed(knn_counts(bank, bank_labels, chunks, cfg.k, cfg.temperature, num_classes)).cpu()  # [3, C]
    if runtime.main:
        per_class = counts[:2].double() / counts[2].double()  # [2, C] accuracy in [0, 1]; NaN: a class with no query
        figures = (counts[:2].sum(1).double() / counts[2].sum()).tolist()
        knobs = protocol(cfg, num_classes, data.train.manifest["split"])
        report.write_result(
            cfg,
            knobs,
            data,
            opened.labels,
            backbone.model,
            {"top1": figures[0], "top5": figures[1]},
            {"top1": per_class[0].tolist(), "top5": per_class[1].tolist()},  # per-class accuracy, not IoU
            details(opened, counts, bank_cache, query_cache),
        )
    return report.run_dir(cfg, data.dataset)
