"""``python -m fastloc.bench align --preset pacl-... / segclip-...``: a PACL or SegCLIP update,
fastloc's against original-style ones.

Random weights (both towers), the preset's micro-batch and precision (bf16 on a GPU). Every update
goes the run's way: the objective's draws, its ``step_sample`` (the captions tokenized on the host,
SegCLIP's per-patch segments pooled on the device from superpixel maps), ``train_step``. The rows:

- ``fastloc (compiled)`` / ``fastloc (eager)``;
- PACL ``direct pooling``: the paper's per-pair pooling as the formula reads, one [B, B, P] weight
  tensor (no chunks, no recomputation): the same loss, the memory the chunks avoid;
  ``NMS05-style``: each image pooled with its own caption, sigmoid weights (NMS05's model/pacl.py),
  a different and cheaper loss, shown for its cost only;
- SegCLIP ``original-style``: eager, and each patch's segment pooled on the host from the maps as
  the reference's loader does (``get_felzenszwalb_from_cache``: numpy, int(mean)), copied to the
  device every update.

``pooling alone`` times PACL's pairwise pooling (forward and backward) of the step's shapes, chunked
and direct, with the bytes its [B, c, P] intermediates move: the figure that says whether a fused
kernel would pay (BENCHMARKS.md).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fastloc.align.config import OBJECTIVES, OptimConfig, SystemConfig
from fastloc.align.pacl import PaclConfig
from fastloc.align.pacl_ops import pair_scores
from fastloc.align.prepare import prepare
from fastloc.align.presets import PRESETS
from fastloc.align.segclip_ops import patch_segments
from fastloc.align.step import train_step
from fastloc.bench.align import STEP, result_row, sync, timed_updates
from fastloc.bench.common import MissingRow, print_table, write_results
from fastloc.data.batch import Batch
from fastloc.runtime import Runtime

CAPTION = "a photo of a small dog next to a red car on a street"  # every caption of the batch


def run(cfg, command: str, name: str) -> Path:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    align = PRESETS[name][1]
    batch = cfg.batch_size or align.data.batch_size // align.data.accumulation
    precision = "bf16" if cuda else align.system.precision
    method = replace(align.method, weights="random", text_weights="random")
    runtime = Runtime(device, 0, 1, 0)
    optim = OptimConfig(lr=align.optim.lr, head_lr=align.optim.head_lr)
    rows, missing = [], []

    def row(label: str, method, compiled: bool = False, host_segments: bool = False) -> None:
        torch.manual_seed(0)
        objective = OBJECTIVES[type(method)](method)
        prepared = prepare(objective, optim, SystemConfig(precision=precision, compile=compiled), runtime)
        times = timed_updates(_update(objective, prepared, batch, device, precision, host_segments), cfg, device)
        rows.append(result_row(label, times, batch, device))

    if cfg.compile:
        row("fastloc (compiled)", method, compiled=True)
    else:
        missing.append(MissingRow("fastloc (compiled)", "--no-compile"))
    row("fastloc (eager)", method)
    if isinstance(method, PaclConfig):
        row("direct pooling (one [B, B, P] tensor)", replace(method, text_chunk=batch))
        row("NMS05-style (own caption, sigmoid: another loss)", replace(method, own_caption=True, weighting="sigmoid"))
        pooling = _pooling(method, batch, device, cfg.steps)
    else:
        row("original-style (host segments, eager)", method, host_segments=True)
        pooling = {}
    summary = _summary(rows) + _pooling_lines(pooling)
    print(f"{name}, batch {batch}, {precision}, {device}")
    print_table(rows, ["step", "images_per_s", "best_ms", "peak_memory_GB"], missing)
    for line in summary:
        print(line)
    payload = {"preset": name, "objective": OBJECTIVES[type(method)].__name__, "batch_size": batch}
    payload |= {"precision": precision, "rows": rows, "pooling": pooling, "summary": summary}
    return write_results("align", cfg.out, command, payload, missing)


def _update(objective, prepared, batch: int, device: torch.device, precision: str, host_segments: bool):
    """One update as the run makes it: draws, ``step_sample`` on a batch of random images with one
    caption each (and superpixel maps of 4 x 4 px blocks), ``train_step``."""
    size = objective.image.size
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device, generator=generator)
    side = torch.arange(size, device=device) // 4
    labels = (side[:, None] * (size // 4 + 1) + side[None, :]).expand(batch, size, size).contiguous()
    data = Batch(images=images, labels=labels, captions=((CAPTION,),) * batch)

    def update():
        sample = objective.step_sample(data, objective.sample(batch, generator))
        if host_segments:  # the reference's loader: int(mean) per patch on the host, then copied over
            segments = patch_segments(labels.cpu(), objective.image.patch_size, "mean")
            sample = (*sample[:-1], segments.to(device))
        train_step(objective, prepared, images, sample, STEP, 1, 1.0, precision)

    return update


def _pooling(method: PaclConfig, batch: int, device: torch.device, steps: int) -> dict:
    """PACL's pairwise pooling alone, forward and backward, chunked (the run's) and direct: median
    ms and the bytes its [B, c, P] intermediates write and read once each (fp32)."""
    objective = OBJECTIVES[type(method)](method)
    grid, width = objective.image.grid, objective.embedder().linear.out_features
    P = grid * grid
    patches = torch.randn(batch, P, width, device=device, requires_grad=True)
    texts = torch.randn(batch, width, device=device)
    out = {"batch": batch, "patches": P, "width": width, "chunk": method.text_chunk}
    for label, chunk in (("chunked", method.text_chunk), ("direct", batch)):
        times = []
        for i in range(steps + 1):
            sync(device)
            start = time.perf_counter()
            pair_scores(patches, texts, method.weighting, chunk).sum().backward()
            sync(device)
            if i:  # the first call warms up
                times.append(time.perf_counter() - start)
        out[f"{label}_ms"] = 1e3 * float(np.median(times))
    out["intermediate_bytes"] = 4 * batch * batch * P * 4  # scores, weights: written and read once each
    out["pooling_flops"] = 2 * 2 * batch * batch * P * width * 3  # two [B, c, P] x d products, fwd + bwd
    return out


def _summary(rows: list[dict]) -> list[str]:
    """Each other row's rate against the eager step's (and the compiled step's, when timed)."""
    rate = {r["step"]: r["images_per_s"] for r in rows}
    lines = [f"fastloc (eager) / {step}: {rate['fastloc (eager)'] / r:.2f}x" for step, r in list(rate.items())[1:]]
    if "fastloc (compiled)" in rate:
        lines = [f"fastloc (compiled) / {s}: {rate['fastloc (compiled)'] / r:.2f}x" for s, r in list(rate.items())[1:]]
    return lines


def _pooling_lines(pooling: dict) -> list[str]:
    if not pooling:
        return []
    seconds = pooling["chunked_ms"] / 1e3
    return [
        f"pairwise pooling alone (B {pooling['batch']}, P {pooling['patches']}, d {pooling['width']}): "
        f"chunked {pooling['chunked_ms']:,.2f} ms, direct {pooling['direct_ms']:,.2f} ms",
        f"  chunked: its [B, c, P] intermediates at {pooling['intermediate_bytes'] / seconds / 1e9:.3g} GB/s, "
        f"its products at {pooling['pooling_flops'] / seconds / 1e12:.3g} TFLOP/s",
    ]
