"""``python -m fastloc.bench align``: MaskEmbed's training update, fastloc's against the original's
(a Leopart or NeCo preset: ``dense.py``; PACL or SegCLIP: ``language.py``).

Random weights; each row times full updates (forward, backward, AdamW) after warm-up: ``fastloc
(compiled)`` (``prepare()``'s step, also split into teacher / student + decoder / optimizer with
peak memory and MFU), ``fastloc (eager)``, ``original-style`` (as the reference runs it) and
``fastloc end to end`` (the run's loader feeding the compiled step). The rows and aims: README.md,
"Benchmarks".
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fastloc.align.config import AlignConfig, OptimConfig, SystemConfig
from fastloc.align.dense import DenseConfig
from fastloc.align.maskembed import MaskEmbed, per_image_loss
from fastloc.align.pacl import PaclConfig
from fastloc.align.prepare import Prepared, prepare
from fastloc.align.presets import PRESETS
from fastloc.align.segclip import SegclipConfig
from fastloc.align.step import Update, train_step
from fastloc.bench.common import MissingRow, at_least, check_paths, print_table, write_results
from fastloc.cli import flowing_help, require
from fastloc.data.config import SOLO, LoaderConfig
from fastloc.data.loader import make_loader
from fastloc.data.transforms import normalize
from fastloc.models.attention import SoftCapAttention
from fastloc.runtime import Runtime, autocast

STEP = Update(step=0, total=1, lr=1e-4, weight_decay=0.01)  # a fixed update for timing


@flowing_help
@dataclass(frozen=True, kw_only=True)
class AlignBench:
    """MaskEmbed's training update: fastloc's compiled step against eager and an original-style step."""

    preset: str = "auto"
    """An align preset (random weights); auto: clip-vit-b on a GPU, tiny on a CPU. A Leopart or NeCo
    preset times its update against the reference's (host crops, syncs); a PACL or SegCLIP preset
    against the direct pooling and NMS05's form, or the reference's host-side superpixel pooling."""

    batch_size: int = 0
    """Images per update (0: the preset's micro-batch)."""

    steps: int = 10
    """Timed updates per row."""

    warmup: int = 3
    """Untimed updates before each row (compilation happens here)."""

    compile: bool = True
    """Run the compiled row (on a CPU the compilation of a tiny ViT takes about a minute)."""

    workdir: Path | None = None
    """Scratch folder for the end-to-end row's shards (default: a temporary folder)."""

    host_workers: int = -1
    """Leopart and NeCo: the worker processes the original-style host crops are counted over
    (-1: min(10, cores), as the reference's 10 per GPU)."""

    out: Path | None = None
    """JSON results path (default: runs/bench/align-DATE.json)."""

    def validate(self) -> None:
        """A ``BadValue`` for the first option out of its range, before any work."""
        rule = f"must be auto or an align preset ({', '.join(PRESETS)})"
        require(self.preset == "auto" or self.preset in PRESETS, "--preset", self.preset, rule)
        at_least(self, 0, "batch_size", meaning="0: the preset's micro-batch")
        at_least(self, 1, "steps")
        at_least(self, 0, "warmup")
        rule = "must be -1 (min(10, cores)) or at least 1"
        require(self.host_workers == -1 or self.host_workers >= 1, "--host-workers", self.host_workers, rule)
        check_paths(self.out, self.workdir)


def run(cfg: AlignBench, command: str) -> Path:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = cfg.preset if cfg.preset != "auto" else ("clip-vit-b" if cuda else "tiny")
    align = PRESETS[name][1]
    if isinstance(align.method, DenseConfig):
        from fastloc.bench import dense  # it imports this module's timing

        return dense.run(cfg, command, name)
    if isinstance(align.method, (PaclConfig, SegclipConfig)):
        from fastloc.bench import language  # it imports this module's timing

        return language.run(cfg, command, name)
    batch = cfg.batch_size or align.data.batch_size // align.data.accumulation
    precision = "bf16" if cuda else align.system.precision
    method = replace(align.method, weights="random")
    runtime = Runtime(device, 0, 1, 0)
    rows, missing, split = [], [], {}
    flops = None

    def build(compiled: bool) -> tuple[MaskEmbed, Prepared]:
        torch.manual_seed(0)
        objective = MaskEmbed(method)
        system = SystemConfig(precision=precision, compile=compiled)
        return objective, prepare(objective, OptimConfig(lr=align.optim.lr), system, runtime)

    images = torch.randint(0, 256, (batch, 3, 1, 1), dtype=torch.uint8, device=device)
    if cfg.compile:
        objective, prepared = build(True)
        images = images.expand(-1, -1, objective.image.size, objective.image.size).contiguous()
        rows.append(
            result_row("fastloc (compiled)", _fastloc(objective, prepared, images, precision, cfg), batch, device)
        )
        split = _split(objective, prepared, images, precision, cfg.steps)
        flops = objective.flops_per_image()
        dali = cuda and importlib.util.find_spec("nvidia.dali") is not None
        label = "fastloc end to end" + ("" if dali or not cuda else " (torch twin: DALI is not installed)")
        times = _end_to_end(objective, prepared, align, precision, cfg, "gpu" if dali else "cpu")
        rows.append(result_row(label, times, batch, device))
        del objective, prepared
    else:
        missing.append(MissingRow("fastloc (compiled), fastloc end to end", "--no-compile"))
    objective, prepared = build(False)
    if images.shape[-1] == 1:
        images = images.expand(-1, -1, objective.image.size, objective.image.size).contiguous()
    rows.append(result_row("fastloc (eager)", _fastloc(objective, prepared, images, precision, cfg), batch, device))
    for module in objective.modules():
        if isinstance(module, SoftCapAttention):
            module.fused = False  # the reference materializes the logits
    rows.append(result_row("original-style", _original(objective, prepared, images, precision, cfg), batch, device))
    flops = flops or objective.flops_per_image()
    peak = 989e12 if cuda else None
    for row in rows:
        row["mfu"] = flops * row["images_per_s"] / peak if peak else None
    summary = _summary(rows, cuda, name, batch)
    print(f"{name}, batch {batch}, {precision}, {device}; {flops / 1e9:,.1f} GFLOP per image (3 views, fwd + bwd)")
    print_table(rows, ["step", "images_per_s", "best_ms", "peak_memory_GB", "mfu"], missing)
    for part, ms in split.items():
        print(f"  fastloc (compiled) split: {part}: {ms:,.2f} ms")
    for line in summary:
        print(line)
    payload = {"preset": name, "batch_size": batch, "precision": precision, "flops_per_image": flops}
    payload |= {"rows": rows, "split_ms": split, "summary": summary}
    return write_results("align", cfg.out, command, payload, missing)


# ---------------------------------------------------------------- the contenders


def timed_updates(update, cfg: AlignBench, device: torch.device) -> list[float]:
    """Seconds of each of ``cfg.steps`` calls of ``update`` after ``cfg.warmup`` untimed ones
    (the device synchronized; its peak memory counted from the first timed call)."""
    for _ in range(cfg.warmup):
        update()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(cfg.steps):
        start = time.perf_counter()
        update()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def _fastloc(objective, prepared, images, precision, cfg):
    generator = torch.Generator(images.device).manual_seed(0)

    def update():
        masks = objective.sample(images.shape[0], generator)
        train_step(objective, prepared, images, masks, STEP, 1, 1.0, precision)

    return timed_updates(update, cfg, images.device)


def _original(objective, prepared, images, precision, cfg):
    """The reference's update: numpy masks, torch masking, eager modules, materialized attention."""
    rng, cfg_i, device = np.random.default_rng(0), objective.image, images.device
    grid, p = cfg_i.grid, cfg_i.patch_size

    def update():
        B = images.shape[0]
        u = rng.uniform(size=(B, grid * grid + 1))
        first = (u[:, 1:] > u[:, :1]).astype(np.float32)
        masks = torch.from_numpy(np.stack([first, 1 - first, np.ones_like(first)], 1)).to(device)  # [B, 3, N]
        x = normalize(images, cfg_i.mean, cfg_i.std)  # the GPU prefetcher's float images
        up = masks.view(B, 3, grid, grid).repeat_interleave(p, 2).repeat_interleave(p, 3)
        up = torch.nn.functional.pad(up, (0, cfg_i.size - grid * p, 0, cfg_i.size - grid * p))
        with autocast(device, precision):
            views = (x.repeat_interleave(3, 0) * up.flatten(0, 1)[:, None]).contiguous()
            with torch.no_grad():
                target = objective.teacher.forward_features(views) * objective.scale
            pred = objective.trainable(x, masks.bool())
            loss = per_image_loss("mse", pred, target, objective._keep(masks.bool())).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prepared.params, 1.0)
        prepared.optimizer.step()
        prepared.optimizer.zero_grad(set_to_none=True)

    return timed_updates(update, cfg, device)


def _end_to_end(objective, prepared, align: AlignConfig, precision: str, cfg: AlignBench, loader_device: str):
    """The loader reading synthetic shards at the backbone's size, feeding the compiled step."""
    from fastloc.shard.convert import convert
    from fastloc.shard.sources.synthetic import SyntheticConfig

    device = next(objective.trainable.parameters()).device
    batch = cfg.batch_size or align.data.batch_size // align.data.accumulation
    with tempfile.TemporaryDirectory(dir=cfg.workdir) as scratch:
        count = batch * (cfg.warmup + cfg.steps + 1)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            convert(
                SyntheticConfig(out=Path(scratch), num_samples=count, shard_samples=256, progress=False, fsync=False)
            )
        loader = make_loader(
            LoaderConfig(
                shards=Path(scratch) / "synthetic/train",
                batch_size=batch,
                size=objective.image.size,
                normalize=False,
                labels=False,
                loader=loader_device,
                workers=align.data.workers,
                threads=align.data.threads,
            ),
            SOLO,
        )
        batches, generator = iter(loader), torch.Generator(device).manual_seed(0)

        def update():
            images = next(batches).images.to(device, non_blocking=True)
            train_step(objective, prepared, images, objective.sample(batch, generator), STEP, 1, 1.0, precision)

        return timed_updates(update, cfg, device)


def _split(objective, prepared, images, precision, steps: int) -> dict[str, float]:
    """Median ms of the update's parts (synchronized between them, so slower than the whole)."""
    device, generator = images.device, torch.Generator(images.device).manual_seed(1)
    parts: dict[str, list[float]] = {
        "teacher (masking + 3 views)": [],
        "student + decoder (fwd + bwd)": [],
        "optimizer": [],
    }
    for _ in range(steps):
        masks = objective.sample(images.shape[0], generator)
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            views, full = objective.views(images, masks)
            target = objective.targets(views)
        sync(device)
        t1 = time.perf_counter()
        with autocast(device, precision):
            loss = per_image_loss("mse", prepared.model(full, masks), target, objective._keep(masks)).mean()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(prepared.params, 1.0)
        prepared.optimizer.step()
        prepared.optimizer.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[key].append(value)
    return {k: 1e3 * float(np.median(v)) for k, v in parts.items()}


def result_row(label: str, times: list[float], batch: int, device: torch.device) -> dict:
    """A table row: images/s and ms of the fastest update, the peak memory since the last reset."""
    best = min(times)
    memory = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {
        "step": label,
        "images_per_s": batch / best,
        "best_ms": 1e3 * best,
        "peak_memory_GB": memory,
        "times_s": times,
    }


def _summary(rows: list[dict], cuda: bool, name: str, batch: int) -> list[str]:
    rate = {r["step"]: r["images_per_s"] for r in rows}
    lines = []
    if "fastloc (compiled)" in rate:
        lines.append(f"compiled / eager: {rate['fastloc (compiled)'] / rate['fastloc (eager)']:.2f}x")
        speedup = rate["fastloc (compiled)"] / rate["original-style"]
        lines.append(f"compiled / original-style: {speedup:.2f}x (aim on one H100: >= 2.5x)")
        if cuda:
            compiled = rate["fastloc (compiled)"]
            lines.append(f"{name}, batch {batch}: {compiled:,.0f} images/s (aim: >= 2,000 for clip-vit-b at 256)")
    return lines


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
