"""``probe(cfg)``: one Patch-Seg run, from the shards to the CSV row, the JSON and the plots.

In this order: seed, backbone, head (the original's order, so a seed gives one head), the two
sources (the feature cache reused or built, or the loader live), then epochs of training, each
scored on the whole validation split, then the report. Under torchrun or SLURM every rank runs
this: the cache build and the evaluation are split by rank (each validation sample counted once,
the confusion counts summed), and the head trains under DDP with ``batch_size`` per rank.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastloc.data.config import SOLO, LoaderConfig
from fastloc.data.loader import make_loader
from fastloc.data.order import EpochPlan
from fastloc.data.recipes import CentreSquare
from fastloc.models.registry import ImageConfig, fingerprint, image_config
from fastloc.probe import report
from fastloc.probe.backbone import backbone_tag, describe, load_backbone
from fastloc.probe.cache import (
    build_from_loader,
    cache_key,
    cache_path,
    feature_storage,
    image_key,
    pool_targets,
    reuse_or_build,
)
from fastloc.probe.config import ProbeConfig
from fastloc.probe.data import ProbeData, open_data
from fastloc.probe.heads import HeadShape, build_head
from fastloc.probe.metrics import Evaluator, group_metrics, majority_prediction, selected_epoch
from fastloc.probe.sources import CachedSource, LiveSource
from fastloc.progress import Progress
from fastloc.runtime import Runtime, autocast, setup


class FineTuned(nn.Module):
    """Backbone and head trained together (--full-finetune): images in, logits out."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(images))


def feature_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def frozen_encoder(model: nn.Module, precision: str, device: torch.device):
    """Images -> features [B, T, D] in the cache's dtype (bf16 under bf16 autocast): the same
    function whether the features are cached or computed live."""

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return model.forward_features(images.to(device, non_blocking=True)).to(feature_dtype(precision))

    return encode


def loss_per_image(reduction: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B]: BCE with logits averaged over the image's N x C entries (union, global-union), or
    cross-entropy averaged over its N patches (majority; class 0 is a target like any other)."""
    if reduction == "majority":
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return ce.view(targets.shape).mean(1)
    return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").mean((1, 2))


def eval_recipe(split, image: ImageConfig, batch: int) -> LoaderConfig:
    """The eval recipe (PATCHSEG.md section 2) over a split in its order, every sample once."""
    return LoaderConfig(
        shards=split.root,
        batch_size=batch,
        size=image.size,
        recipe=CentreSquare(),
        mean=image.mean,
        std=image.std,
        shuffle=False,
        drop_last=False,
    )


def loader_config(cfg: ProbeConfig, split, image: ImageConfig, train: bool, batch: int):
    """The eval recipe for both splits; training shuffles and drops the rank's last partial batch."""
    return replace(
        eval_recipe(split, image, batch),
        shuffle=train,
        drop_last=train,
        seed=cfg.seed,
        loader=cfg.loader,
        workers=cfg.workers,
    )


def cached_split(cfg, split, model, digest, image, runtime, encode) -> object:
    """The split's feature cache: reused when it is there, else built (and said so)."""
    key = cache_key(digest, split.manifest, image_key(image), cfg.skip_blocks, str(feature_dtype(cfg.precision))[6:])
    n, c8 = split.num_samples, math.ceil(key["num_classes"] / 8)
    shapes = {
        "features": (n, image.tokens, int(model.num_features)),
        "union": (n, image.grid**2, c8),
        "majority": (n, image.grid**2),
        "global": (n, c8),
        "usable": (n,),
    }
    dtypes = {
        "features": feature_storage(cfg.precision),
        "union": np.uint8,
        "majority": np.uint8 if key["num_classes"] <= 256 else np.int16,
        "global": np.uint8,
        "usable": np.bool_,
    }
    pool = lambda labels: pool_targets(labels, image.patch_size, key["num_classes"])  # noqa: E731

    def build():
        loader = make_loader(loader_config(cfg, split, image, train=False, batch=cfg.eval_batch_size), runtime)
        return build_from_loader(path, key, loader, encode, shapes, dtypes, pool, runtime.main)

    path = cache_path(cfg.cache_dir, key)
    return reuse_or_build(path, key, build, runtime.main)


def make_sources(cfg, data: ProbeData, model, image, runtime, pool=pool_targets):
    """(train, val) sources: the cache, or the loaders live (``--no-cache``, --full-finetune)."""
    device, classes = runtime.device, data.num_classes
    encode = frozen_encoder(model, cfg.precision, device)
    if cfg.cache and not cfg.full_finetune:
        digest = fingerprint(model)
        out = []
        for split, train in ((data.train, True), (data.val, False)):
            cache = cached_split(cfg, split, model, digest, image, runtime, encode)
            batch = cfg.batch_size if train else cfg.eval_batch_size
            plan = EpochPlan(split.num_samples, batch, cfg.seed, train, runtime.rank, runtime.world_size, train)
            out.append(CachedSource(cache, plan, cfg.reduction, device, cfg.workers))
        return tuple(out)
    if cfg.full_finetune:
        encode = lambda images: images.to(device, non_blocking=True)  # noqa: E731 (the backbone runs in the step)
    out = []
    for split, train in ((data.train, True), (data.val, False)):
        batch = cfg.batch_size if train else cfg.eval_batch_size
        loader = make_loader(loader_config(cfg, split, image, train, batch), runtime)
        out.append(LiveSource(loader, encode, cfg.reduction, image.patch_size, classes, pool))
    return tuple(out)


def schedule(optimizer: torch.optim.Optimizer, cfg: ProbeConfig, updates_per_epoch: int) -> CosineLRScheduler:
    """The original's timm scheduler: linear warmup from 0, then the (unshifted) cosine to min_lr
    over all updates, stepped per update."""
    return CosineLRScheduler(
        optimizer,
        t_initial=cfg.epochs * updates_per_epoch,
        lr_min=cfg.min_lr,
        warmup_t=cfg.warmup_updates,
        warmup_lr_init=0.0,
        t_in_epochs=False,
    )


def train_epoch(model, optimizer, scheduler, source, epoch, cfg, device, progress) -> float:
    """One pass over the training split; the mean loss, read once at the end."""
    model.train()
    total, first = torch.zeros((), device=device), epoch * len(source)
    for i, (x, targets, _) in enumerate(source.batches(epoch)):
        with autocast(device, cfg.precision):
            loss = loss_per_image(cfg.reduction, model(x), targets).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(num_updates=first + i + 1)  # update k runs at lr(k): the first at warmup_lr_init
        total += loss.detach()
        progress.update(1)
    return float(total) / max(len(source), 1)


@torch.no_grad()
def evaluate(model, source, reduction: str, classes: int, device: torch.device, precision: str) -> dict:
    """The whole validation split (every sample once over all ranks): counts on the device,
    summed over ranks, metrics once at the end."""
    model.eval()
    evaluator = Evaluator(reduction, classes, device, float_logits=precision == "fp32")
    for x, targets, valid in source.batches(0):
        with autocast(device, precision):
            logits = model(x)
        per_image = loss_per_image(reduction, logits, targets)
        evaluator.update(logits, targets, valid, (per_image * valid).sum())
    evaluator.all_reduce()
    return evaluator.compute()


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the block's seconds to ``timings[stage]`` (result.json's timings)."""
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_name(cfg: ProbeConfig, dataset: str) -> str:
    """--name, or DATASET-REDUCTION-HEAD-BACKBONE-skipK[-ft] (BACKBONE: ``backbone_tag``)."""
    if cfg.name:
        return cfg.name
    tail = "-ft" if cfg.full_finetune else ""
    return f"{dataset}-{cfg.reduction}-{cfg.head}-{backbone_tag(cfg.backbone, cfg.weights)}-skip{cfg.skip_blocks}{tail}"


def open_run(cfg: ProbeConfig) -> tuple[Runtime, ProbeData, Path]:
    """The checks before any work, in order: option values, the device, the output folders, the
    data, the run directory and the results CSV; (runtime, data, run directory). A refused run
    leaves nothing behind."""
    cfg.validate()
    runtime = setup(cfg.device, flag="--device")
    with report.checked_folders(*cfg.folders()):
        data = open_data(cfg.data, cfg.train_split, cfg.val_split)
        void = (data.val.manifest.get("label") or {}).get("ignore")
        if void is not None:
            raise ValueError(
                f"{data.val.root}: its label maps mark void pixels ({void}), and Patch-Seg's reductions have no "
                "void; score this set with the dense protocols (python -m fastloc.probe overcluster | linear | "
                "hummingbird)"
            )
        run_dir = Path(cfg.out) / run_name(cfg, data.dataset)
        report.check_run_dir("--name" if cfg.name else "--out", run_dir)
        report.check_csv(results_csv(cfg, data.dataset), report.COLUMNS)
    return runtime, data, run_dir


def results_csv(cfg: ProbeConfig, dataset: str) -> Path:
    return Path(cfg.results) / f"outputs-{dataset}.csv"


def probe(cfg: ProbeConfig, pool=pool_targets) -> Path:
    """Run the probe; returns the run directory (on every rank)."""
    runtime, data, run_dir = open_run(cfg)
    seed_everything(cfg.seed)
    model = load_backbone(cfg.backbone, cfg.weights, cfg.skip_blocks).to(runtime.device)
    image = image_config(model)
    shape = HeadShape(
        dim=int(model.num_features),
        num_heads=int(model.blocks[0].attn.num_heads),
        prefix=image.prefix_tokens,
        patches=image.grid**2,
        classes=data.num_classes,
        reduction=cfg.reduction,
    )
    head = build_head(cfg.head, shape, cfg.num_layers, cfg.hidden_size).to(runtime.device)
    model.requires_grad_(cfg.full_finetune)
    trainable = FineTuned(model, head) if cfg.full_finetune else head
    timings = {}
    with timed(timings, "sources_s"):
        train_source, val_source = make_sources(cfg, data, model, image, runtime, pool)
    step_model = trainable
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        # a fine-tuned backbone may hold parameters forward_features never uses (SigLIP's pooling head)
        step_model = DistributedDataParallel(trainable, device_ids=ids, find_unused_parameters=cfg.full_finetune)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = schedule(optimizer, cfg, len(train_source))
    history = []
    for epoch in range(cfg.epochs):
        progress = Progress(
            len(train_source), 0, f"head epoch {epoch + 1}/{cfg.epochs}", runtime.main, unit="updates", rate_unit="it/s"
        )
        with timed(timings, "train_s"):
            train_loss = train_epoch(
                step_model, optimizer, scheduler, train_source, epoch, cfg, runtime.device, progress
            )
            progress.close()
        with timed(timings, "eval_s"):
            metrics = evaluate(trainable, val_source, cfg.reduction, data.num_classes, runtime.device, cfg.precision)
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, **metrics}
        metrics["groups"] = group_metrics(metrics, data.groups)
        history.append(metrics)
        if runtime.main:
            print(
                f"epoch {epoch + 1}: loss {metrics['loss']:.4f}  macro recall {metrics['macro_recall']:.4f}  "
                f"precision {metrics['macro_precision_nansafe']:.4f}  AP {metrics['macro_ap']:.4f}"
            )
    if runtime.main:
        write_run(cfg, data, model, head, image, runtime, history, timings, run_dir)
    return run_dir


def write_run(cfg, data, model, head, image, runtime, history, timings, run_dir: Path) -> None:
    """The run directory (config, result JSON, head weights, plots) and the CSV row."""
    run_dir.mkdir(parents=True, exist_ok=True)
    best = selected_epoch(history)
    flags = [f for f in (report.prevalence_flag(history[best]),) if f]
    result = {
        "protocol": {
            "name": "patch-seg",
            "reduction": cfg.reduction,
            "image_size": image.size,
            "patch_size": image.patch_size,
            "grid": image.grid,
            "threshold": 0.5,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "feature_dtype": str(feature_dtype(cfg.precision))[6:],
            "world_size": runtime.world_size,
            "selection": "best macro recall (strict >, ties keep the earlier epoch)",
        },
        "dataset": {
            "name": data.dataset,
            "train": str(data.train.root),
            "val": str(data.val.root),
            "num_classes": data.num_classes,
            "classes": data.classes,
            "groups": data.groups,
        },
        "backbone": describe(cfg.backbone, cfg.weights, model),
        "head": cfg.head,
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "selected_epoch": best,
        "epochs": history,
        "selected": history[best],
        "last": history[-1],
        "flags": flags,
        "timings_s": timings,
    }
    for flag in flags:
        print(f"warning: {flag}")
    report.write_json(run_dir / "result.json", result)
    save_state(head, run_dir / "head.safetensors")
    if cfg.full_finetune:  # the trained backbone, under timm's key names: --weights FILE loads it
        save_state(model, run_dir / "backbone.safetensors")
    try:
        from fastloc.probe.plots import plot_recall_by_class
    except ImportError as exc:  # a GPU machine with torch and timm only: the figures are what matter
        print(f"pictures skipped: {exc}")
    else:
        plot_recall_by_class(result, run_dir / "recall.png")
        if cfg.predictions and cfg.reduction != "global-union":
            draw_predictions(cfg, data, model, head, image, runtime, run_dir / "predictions.png")
    csv = results_csv(cfg, data.dataset)
    report.append_csv(csv, report.csv_row(cfg, data.dataset, history[best]))
    selected = history[best]
    print(
        f"selected epoch {best + 1} (best macro recall): recall {selected['macro_recall']:.4f}, precision "
        f"{selected['macro_precision']:.4f} (NaN-safe {selected['macro_precision_nansafe']:.4f}), "
        f"AP {selected['macro_ap']:.4f}; last epoch recall {history[-1]['macro_recall']:.4f}"
    )
    print(f"results: {run_dir / 'result.json'}, row appended to {csv}")


def save_state(module: nn.Module, path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


def first_images(data_split, image: ImageConfig, count: int):
    """The first ``count`` samples of a split in the eval recipe (the torch twin, in this process)."""
    from fastloc.data.torch_loader import TorchLoader

    loader = TorchLoader(replace(eval_recipe(data_split, image, count), workers=0), SOLO)
    try:
        return next(iter(loader))
    finally:
        loader.close()


@torch.no_grad()
def patch_classes(model, head, images, image: ImageConfig, precision: str, device) -> torch.Tensor:
    """[K, g, g]: the head's most confident class per patch, by the rule the majority reduction is
    scored with (``majority_prediction``: the argmax of the softmax in the logits' dtype)."""
    head.eval()
    model.eval()
    with autocast(device, precision):
        logits = head(model.forward_features(images.to(device)))  # [K, N, C]
    return majority_prediction(logits).view(-1, image.grid, image.grid).cpu()


def true_classes(labels: torch.Tensor, image: ImageConfig, classes: int) -> torch.Tensor:
    """[K, g, g]: the majority label of each patch."""
    from fastloc.kernels.label_pool import label_pool

    return label_pool(labels, image.patch_size, classes, "majority").view(-1, image.grid, image.grid)


def pixels(images: torch.Tensor, image: ImageConfig) -> torch.Tensor:
    """Normalized images back to [0, 1] for display."""
    mean, std = torch.tensor(image.mean).view(1, 3, 1, 1), torch.tensor(image.std).view(1, 3, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1)


def draw_predictions(cfg, data, model, head, image, runtime, path: Path) -> None:
    """The first validation images: ground truth (majority label per patch) and the head's most
    confident class per patch."""
    from fastloc.probe.plots import plot_predictions

    batch = first_images(data.val, image, min(cfg.predictions, data.val.num_samples))
    predicted = patch_classes(model, head, batch.images, image, cfg.precision, runtime.device)
    truth = true_classes(batch.labels, image, data.num_classes)
    title = f"{cfg.backbone} ({cfg.head} head, {cfg.reduction}): ground truth and prediction per patch"
    plot_predictions(pixels(batch.images, image), truth, predicted, data.classes, path, title)
