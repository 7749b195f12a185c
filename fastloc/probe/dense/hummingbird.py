"""Hummingbird in-context retrieval (open-hummingbird-eval, hbird/hbird_eval.py @ 0fd976f): a
memory bank of augmented training patch tokens with their label distributions (a bounded bank
keeps each image's rare-class patches first), softmax(cosine / 0.02)-weighted k-NN label transfer
onto the evaluation patches, mIoU after Hungarian matching. It measures how well frozen features
alone carry dense labels. The knobs are ``HummingbirdConfig``'s (defaults: the reference); what
else differs (exact search, jitter after the crop, ...) is ``DIFFERENCES``, written into every
result. One process: the bank and the search are one device's work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from fastloc.data.config import SOLO
from fastloc.data.loader import make_loader
from fastloc.data.recipes import Rrc, RrcDraw
from fastloc.data.transforms import normalize
from fastloc.probe.dense.config import HummingbirdConfig
from fastloc.probe.dense.data import (
    VOID,
    Backbone,
    LabelSpace,
    eval_batches,
    eval_split,
    feature_dtype,
    loader_config,
    open_run,
    patch_encoder,
)
from fastloc.probe.dense.metrics import (
    SegCounts,
    class_iou,
    fold_clusters,
    hungarian,
    knn_transfer,
    mean_iou,
    pixel_accuracy,
)
from fastloc.probe.dense.report import counted, write_result
from fastloc.probe.run import timed
from fastloc.progress import Progress

JITTER_P = 0.5  # each of brightness, contrast, saturation, hue, in this order
JITTER = 0.1  # ColorJitter(x=0.1): factor U(0.9, 1.1) for the first three, hue shift U(-0.1, 0.1)
JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
EMPTY_SCORE = 1e6  # sample_features: a patch with no class is taken last
UPSAMPLE_IMAGES = 8  # images upsampled at once: [8, C, S, S] float temporaries

DIFFERENCES = {
    "search": "exact cosine, chunked (the reference: approximate ScaNN, or faiss)",
    "jitter": "on the loader's device on the uint8 crop, after RandomResizedCrop, drawn per sample from the "
    "loader's sample_rng (the reference: on the PIL image before the crop, so contrast's grey mean is the whole "
    "image's there)",
    "crop": "fastloc's rrc recipe: PIL bilinear image, PIL-nearest labels (the reference: torchvision on tensors)",
    "bank": "only the rows filled, memory_size // (images x epochs) per image (the reference keeps the unfilled "
    "rest of memory_size as zero rows)",
    "mean": "classes with no pixel and no prediction are left out of the mean (the reference: IoU 0, kept)",
    "order": "the training split in order, as the reference's loader (shuffle=False)",
    "train_images": "the first N images of the split (the reference's data-efficiency runs: a random fraction)",
    "precision": "under --precision bf16 (the default) the backbone runs under bf16 autocast and the memory bank and "
    "feature cache hold bf16 features (the reference: float32 throughout); --precision fp32 is the reference's",
}


# --- The bank's labels and sampling -----------------------------------------------------------------------------


def patch_distributions(labels: torch.Tensor, patch: int, num_classes: int, void: str = "background") -> torch.Tensor:
    """[B, H, W] int64 class ids (VOID for void) -> [B, N, C] float32: each patch's mean one-hot label
    over its p x p pixels (row-major patches). void="background" counts void as class 0 (the
    reference's y[y == 255] = 0); "ignore" averages over the patch's other pixels (an all-void patch: 0)."""
    B, H, W = labels.shape
    gh, gw = H // patch, W // patch
    spare = 0 if void == "background" else num_classes  # "ignore": a column dropped below
    ids = torch.where(labels == VOID, spare, labels)
    ids = ids.view(B, gh, patch, gw, patch).permute(0, 1, 3, 2, 4).reshape(B, gh * gw, patch * patch)
    counts = torch.zeros(B, gh * gw, num_classes + 1, device=labels.device)
    counts.scatter_add_(2, ids, torch.ones_like(ids, dtype=counts.dtype))
    counts = counts[..., :num_classes]
    return counts / counts.sum(-1, keepdim=True).clamp(min=1)


def sample_patches(distributions: torch.Tensor, count: int, uniform: torch.Tensor) -> torch.Tensor:
    """The reference's sample_features, over a batch: [B, N, C] distributions, U(0, 1) [B, N] ->
    [B, count] patch indices. A class's frequency is the number of the image's patches holding it;
    a patch scores the sum of its classes' frequencies times its uniform; the lowest scores (the
    rarest classes) are taken; a patch with no class scores EMPTY_SCORE."""
    present = distributions > 0  # [B, N, C]
    frequency = present.sum(1).to(torch.float32)  # [B, C]
    score = (present * frequency[:, None, :]).sum(-1)  # [B, N]
    score = torch.where(present.any(-1), score * uniform.to(score.device), EMPTY_SCORE)
    return score.topk(count, dim=1, largest=False).indices


def samples_per_image(memory_size: int, images: int, epochs: int, tokens: int) -> int:
    """The reference's num_sampled_features = memory_size // (dataset_size x augmentation_epoch);
    every token when memory_size is 0."""
    if memory_size == 0:
        return tokens
    count = memory_size // (images * epochs)
    if not 1 <= count <= tokens:
        raise ValueError(
            f"--memory-size {memory_size} gives {count} patches per image ({images} images x {epochs} epochs); "
            f"it must be between 1 and the {tokens} patches of an image"
        )
    return count


# --- Colour jitter ----------------------------------------------------------------------------------------------


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The bank's patch sampling of one augmentation epoch: a CPU generator, so a seed gives one
    bank on any device."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass(frozen=True)
class JitteredDraw:
    crop: RrcDraw
    applied: tuple[bool, ...]  # brightness, contrast, saturation, hue: RandomApply's p each
    factors: tuple[float, ...]  # the first three's factors, the hue shift


@dataclass(frozen=True, kw_only=True)
class JitteredCrop(Rrc):
    """get_hbird_train_transforms: RandomResizedCrop (flip commented out there), then four
    RandomApply([ColorJitter(x=0.1)], p=0.5), the jitter made on the loader's device (``finish``)."""

    jitter: float = JITTER
    jitter_p: float = JITTER_P

    def draw(self, rng, h, w) -> JitteredDraw:
        """The crop's draws, then eight uniforms: four gates and the brightness, contrast and
        saturation factors U(1 - x, 1 + x) and the hue shift U(-x, x)."""
        crop = super().draw(rng, h, w)
        u = rng.random(8)
        low = np.array([1 - self.jitter] * 3 + [-self.jitter])
        return JitteredDraw(
            crop, tuple((u[:4] < self.jitter_p).tolist()), tuple((low + 2 * self.jitter * u[4:]).tolist())
        )

    def window(self, h, w, size, draw):
        return super().window(h, w, size, draw.crop)

    def label(self, label, size, draw):
        return super().label(label, size, draw.crop)

    def image(self, image, size, draw):
        return super().image(image, size, draw.crop)

    def finish(self, images, draws):
        applied = torch.tensor([d.applied for d in draws], dtype=torch.bool)
        return colour_jitter(images, applied, torch.tensor([d.factors for d in draws], dtype=torch.float64))


CROP = JitteredCrop(scale=(0.5, 2.0), flip_p=0.0, interpolations=("bilinear",))


def colour_jitter(images: torch.Tensor, applied: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] uint8 (any device) -> jittered uint8: per image, the applied ops ([B, 4] bool) in
    order with their factors ([B, 4] float64), each quantized to uint8 as the reference's PIL ops
    are. The draws are host tensors: no sync."""
    out = images.clone()
    for i, (ops, values) in enumerate(zip(applied.tolist(), factors.tolist())):
        image = images[i]
        for op, on, value in zip(JITTER_OPS, ops, values):
            if on:
                image = op(image, value)
        out[i] = image
    return out


# --- The bank ---------------------------------------------------------------------------------------------------


@dataclass
class Bank:
    features: torch.Tensor  # [M, D] L2-normalized, the feature dtype, on the device
    labels: torch.Tensor  # [M, C] float32 label distributions
    per_image: int
    images: int  # training images per epoch
    epochs: int

    @property
    def size(self) -> int:
        return self.features.shape[0]


def bank_loader(cfg: HummingbirdConfig, split, backbone: Backbone):
    """The training split in order, every sample once per epoch, uint8 images: RandomResizedCrop
    and colour jitter (cfg.augment, ``CROP``) or the square resize."""
    recipe = {"recipe": CROP} if cfg.augment else {}
    config = loader_config(
        split, backbone.image, cfg.eval_batch_size, cfg, shuffle=False, drop_last=False, normalize=False, **recipe
    )
    return make_loader(config, SOLO)


def kept_slots(index: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Batch slots holding a sample not yet in this epoch's bank among the first len(seen): the
    cycled repeats of an epoch's last batch and replacements of unusable samples are left out."""
    rows = []
    for slot, g in enumerate(index.tolist()):
        if g < len(seen) and not seen[g]:
            seen[g] = True
            rows.append(slot)
    return np.asarray(rows, dtype=np.int64)


@torch.no_grad()
def build_bank(
    cfg: HummingbirdConfig, split, backbone: Backbone, labels: LabelSpace, device: torch.device, main: bool = True
) -> Bank:
    """create_memory: augmentation_epochs passes over the first train_images training images; each
    image's patch tokens (or its per_image rarest-class ones) and label distributions, written into
    a bank preallocated on the device."""
    images = split.num_samples if cfg.train_images == 0 else min(cfg.train_images, split.num_samples)
    image = backbone.image
    per_image = samples_per_image(cfg.memory_size, images, cfg.augmentation_epochs, image.grid**2)
    rows = images * cfg.augmentation_epochs * per_image
    features = torch.empty(rows, backbone.dim, dtype=feature_dtype(cfg.precision), device=device)
    bank_labels = torch.empty(rows, labels.num_classes, dtype=torch.float32, device=device)
    encode = patch_encoder(backbone, cfg.precision, device)
    loader = bank_loader(cfg, split, backbone)
    batches = math.ceil(images / cfg.eval_batch_size)  # in order: the first images fill the first batches
    progress = Progress(images * cfg.augmentation_epochs, 0, "memory bank", enabled=main, unit="images")
    filled = 0
    try:
        for epoch in range(cfg.augmentation_epochs):
            loader.set_epoch(epoch)
            generator, seen = epoch_generator(cfg.seed, epoch), np.zeros(images, dtype=bool)
            for _, batch in zip(range(batches), loader):
                keep = kept_slots(batch.index.numpy(), seen)
                if len(keep) == 0:
                    continue
                pixels, stored = batch.images, batch.labels
                if len(keep) < len(pixels):
                    pick = torch.from_numpy(keep).to(pixels.device)
                    pixels, stored = pixels.index_select(0, pick), stored.index_select(0, pick)
                pixels = pixels.to(device, non_blocking=True)  # [b, 3, S, S] uint8
                tokens = encode(normalize(pixels, image.mean, image.std))  # [b, N, D]
                dist = patch_distributions(
                    labels.map(stored.to(device)), image.patch_size, labels.num_classes, cfg.bank_void
                )
                if cfg.memory_size:
                    uniform = torch.rand(dist.shape[:2], generator=generator)  # [b, N]
                    chosen = sample_patches(dist, per_image, uniform)  # [b, per_image]
                    tokens = tokens.gather(1, chosen[..., None].expand(-1, -1, tokens.shape[-1]))
                    dist = dist.gather(1, chosen[..., None].expand(-1, -1, dist.shape[-1]))
                n = len(keep) * per_image
                features[filled : filled + n] = F.normalize(tokens.float(), dim=-1).flatten(0, 1).to(features.dtype)
                bank_labels[filled : filled + n] = dist.flatten(0, 1)
                filled += n
                progress.update(len(keep))
    finally:
        progress.close()
        loader.close()
    return Bank(features[:filled], bank_labels[:filled], per_image, images, cfg.augmentation_epochs)


# --- Transfer and score -----------------------------------------------------------------------------------------


def upsample_argmax(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, g, g, C] label distributions -> [B, H, W] int64: bilinear (align_corners False) to the
    label maps' size, then the most likely class, UPSAMPLE_IMAGES images at a time."""
    maps = probs.permute(0, 3, 1, 2)
    out = torch.empty(probs.shape[0], *size, dtype=torch.int64, device=probs.device)
    for start in range(0, probs.shape[0], UPSAMPLE_IMAGES):
        chunk = maps[start : start + UPSAMPLE_IMAGES].float()
        out[start : start + UPSAMPLE_IMAGES] = F.interpolate(
            chunk, size=size, mode="bilinear", align_corners=False
        ).argmax(1)
    return out


@torch.no_grad()
def transfer_counts(
    cfg: HummingbirdConfig, cache, bank: Bank, labels: LabelSpace, grid: int, device: torch.device, main: bool = True
) -> SegCounts:
    """The evaluation split's counts[pred, target] of the transferred labels (void not counted)."""
    counts = SegCounts(labels.num_classes, device, ignore=VOID)
    progress = Progress(cache.num_samples, 0, "retrieval", enabled=main, unit="images")
    for query, target in eval_batches(cache, cfg.eval_batch_size, device, labels):
        B = query.shape[0]
        probs, _ = knn_transfer(
            query.flatten(0, 1), bank.features, bank.labels, cfg.neighbours, cfg.temperature, bank_chunk=cfg.bank_chunk
        )
        counts.update(upsample_argmax(probs.view(B, grid, grid, -1), tuple(target.shape[-2:])), target)
        progress.update(B)
    progress.close()
    return counts


def matched_counts(counts: torch.Tensor, matching: str) -> torch.Tensor:
    """C x C counts[pred, target] after PredsmIoU's Hungarian matching of predictions to classes
    (maximum total IoU), or as predicted (none)."""
    if matching == "none":
        return counts
    if matching == "hungarian":
        return fold_clusters(counts, hungarian(counts), counts.shape[1])
    raise ValueError(f"unknown matching {matching!r}")


# --- The run ----------------------------------------------------------------------------------------------------


def protocol(cfg: HummingbirdConfig, bank: Bank, backbone: Backbone, split_name: str) -> dict:
    """The protocol's name and every knob (the CSV's knobs column); the prose of DIFFERENCES goes
    into result.json beside it."""
    image = backbone.image
    augment = (
        f"RandomResizedCrop scale {CROP.scale}, colour jitter {JITTER} each p {JITTER_P}"
        if cfg.augment
        else "square resize"
    )
    return {
        "name": "hummingbird",
        "image_size": image.size,
        "patch_size": image.patch_size,
        "grid": image.grid,
        "neighbours": cfg.neighbours,
        "temperature": cfg.temperature,
        "memory_size": cfg.memory_size,
        "bank_size": bank.size,
        "samples_per_image": bank.per_image,
        "augmentation_epochs": cfg.augmentation_epochs,
        "augment": augment,
        "bank_void": cfg.bank_void,
        "train_images": cfg.train_images,
        "train_images_used": bank.images,
        "train_split": split_name,
        "matching": cfg.matching,
        "search": "exact cosine, chunked (reference: approximate ScaNN)",
        "feature_dtype": str(feature_dtype(cfg.precision))[6:],
        "include_background": True,
    }


def wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(cfg: HummingbirdConfig) -> Path:
    """Build the bank, transfer labels onto the evaluation split, score; returns the run directory."""
    opened = open_run(cfg)
    device, data, labels, backbone = opened.device, opened.data, opened.labels, opened.backbone
    with timed(opened.timings, "bank_s"):
        bank = build_bank(cfg, data.train, backbone, labels, device)
        wait(device)
    print(
        f"memory bank: {bank.size} patches ({bank.per_image} per image x {bank.images} images x {bank.epochs} epochs)"
    )
    with timed(opened.timings, "features_s"):
        cache = eval_split(cfg, data.val, backbone, device)
    with timed(opened.timings, "search_s"):
        segcounts = transfer_counts(cfg, cache, bank, labels, backbone.image.grid, device)
        counts = segcounts.checked_counts()
    scored = matched_counts(counts, cfg.matching)
    figures = {"miou": mean_iou(scored, include_background=True), "pixel_accuracy": pixel_accuracy(scored)}
    per_class = {"miou": class_iou(scored).tolist()}
    extra = {"timings_s": opened.timings, "differences": DIFFERENCES, **counted(segcounts)}
    knobs = protocol(cfg, bank, backbone, data.train.manifest["split"])
    return write_result(cfg, knobs, data, labels, backbone.model, figures, per_class, extra)
