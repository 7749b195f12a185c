"""The DALI loader: ``fn.readers.webdataset`` over the shards; decoding and both recipes on the GPU.

One pipeline definition, two placements (``DaliLoader(cfg, device=...)``):

- ``device="gpu"``: JPEGs decode with ``fn.decoders.image(device="mixed")`` (nvJPEG; the
  hardware engines take part of the load; ``decoders.image_slice`` decodes only the window for
  RandomResizedCrop); resize, reflect pad, flip and normalization run on the GPU and batches come
  out as CUDA tensors. On the CPU stay the reader, the per-sample parameters (random draws,
  sizes, ROIs), the label PNG decode and the label gather (below), moved to the GPU at the end.
- ``device="cpu"``: the same graph with CPU operators (DALI's CPU-only mode, ``device_id=None``):
  how the tests run it.

**Reading order** (one pipeline per epoch, so the order depends only on seed, epoch, rank and
world size; ``epoch_tar_order``, ``rank_range``):

1. Tars: with ``shuffle`` permuted by ``numpy.random.default_rng([seed, epoch])`` (the same on
   every rank); without, manifest order.
2. Ranks: DALI's ``shard_id=rank, num_shards=world_size`` gives rank ``r`` the contiguous
   samples ``[floor(r N / k), floor((r + 1) N / k))`` of that concatenated list: every sample
   of an epoch belongs to exactly one rank, and a rank's share changes with the tar order.
3. Within a rank: read in tar order into a buffer of ``SHUFFLE_BUFFER`` samples and drawn from
   it at random (``random_shuffle``, seeded by (seed, epoch, rank)); the converter shuffled the
   samples globally, so a local buffer is enough. Without ``shuffle``: tar order.
4. Remainder, as in the torch twin (``order.py``): every rank yields ``n = N // world_size``
   samples, so all ranks run the same number of batches; a rank whose range holds ``n + 1``
   drops the last sample it reads (with shuffling, another one every epoch). ``drop_last``
   drops each rank's last ``n mod batch_size`` too; otherwise the last batch is short. Each
   sample is seen at most once per epoch, and exactly once when nothing is dropped. The reader
   pads the end of a rank's share (``pad_last_batch``): no batch reaches into the next epoch.

The torch twin reads a global permutation by index, which DALI's streaming reader cannot, so
the two loaders share the counts, the ``Batch`` contract and the per-sample transforms, not
the order.

**Recipes.** Geometry is computed once per sample as DALI data nodes (float64) and applied to
the image and the label map alike:

- ``eval`` (Patch-Seg): largest centre square (floor offsets) as the ``fn.resize`` ROI, S x S,
  bilinear with antialias.
- ``train``, ``kind="rkrc"`` (MaskEmbed: timm ``ResizeKeepRatio`` + ``CenterCropOrPad``):
  ``rkrc_geometry`` (sizes and crop offsets rounded half to even as Python does); ``fn.resize``
  computes only the kept window (its ROI: the same pixels as resizing everything and cropping,
  within one grey level); short sides are reflect-padded (edge not repeated, torchvision's
  ``reflect``) with ``fn.slice`` + ``fn.flip`` + ``fn.cat``; the interpolation is drawn per
  sample (``interp_type`` as a per-sample argument); horizontal flip by a coin
  (``crop_mirror_normalize(mirror=...)``).
- ``train``, ``kind="rrc"``: ``fn.random_crop_generator`` (torchvision's algorithm) draws the
  window, the image decodes only that window and is resized to S x S.

Label maps are never interpolated: ``fn.python_function`` gathers them with PIL's NEAREST
tables (the twin's ``transforms.pil_nearest_indices``), so they equal PIL's and the twin's
exactly. DALI's own ``INTERP_NN`` samples ``floor((i + 0.5) in / out)``; PIL accumulates that
coordinate in float64 and lands one pixel lower at some exact ties (e.g. 36 -> 33), and through
a float32 ROI DALI itself can land either side of a tie, so no ``fn.resize`` setting reproduces
PIL. The gather touches only the S x S output pixels, on the CPU where the PNG was decoded.

Images leave through ``fn.crop_mirror_normalize``: (x - 255 mean) / (255 std), CHW float32, or
CHW uint8 when ``cfg.normalize`` is False.

**Resumption.** ``state_dict()`` holds the epoch and position (plain ints, the twin's format and
fingerprint) plus, mid-epoch, this rank's DALI pipeline checkpoint (``enable_checkpointing``:
reader position, shuffle buffer and random operator states) as the ASCII string
``dali_rank{r}``. The ranks' dicts merge into one (``dict.update``; the shared keys agree). A
restore without this rank's checkpoint rebuilds the epoch and runs ``position`` batches
(correct, but it decodes them).

**Corrupt samples.** A decode error aborts a DALI pipeline. The loader then reads the failing
batch's keys (a reader-only pipeline with the same arguments, ``build_keys_pipeline``), runs the
recipe on each of those samples alone to find the culprit(s), writes a patched copy of that
shard's index in which their members point at another sample of the same tar (the name kept,
so the order is unchanged), rebuilds the pipeline from its last checkpoint (at most
``CHECKPOINT_EVERY`` batches back) and leaves them out of their batch, which comes out shorter.
Each is counted in ``skipped`` every time it is met and warned about once
(``SkippedSampleWarning``, naming shard and key). A label map of the wrong size or type, or a
``cls`` that is not a class index, is left out the same way without a rebuild. A missing or
truncated shard or index is a ``ShardError`` when the loader is built (``order.open_shards``).
"""

from __future__ import annotations

import base64
import functools
import math
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fastloc.data.batch import Batch
from fastloc.data.config import LoaderConfig
from fastloc.data.order import (
    EpochPlan,
    LoaderState,
    ShardSet,
    loader_state_dict,
    open_shards,
    restore_state,
    shard_index,
    warn_skipped,
)  # fmt: skip
from fastloc.data.transforms import largest_center_square, pil_nearest_indices
from fastloc.shard.tario import split_name

SHUFFLE_BUFFER = 1024  # samples in DALI's shuffle buffer per rank (its default initial_fill)
CHECKPOINT_EVERY = 16  # batches between the pipeline checkpoints a corrupt-sample recovery restarts from
PREFETCH = 2  # pipeline prefetch queue depth (batches)
INTERPOLATIONS = {"nearest": 0, "bilinear": 1, "bicubic": 2, "lanczos": 3}  # DALIInterpType values


# ---------------------------------------------------------------- what one epoch reads


def epoch_tar_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """[num_shards] int64: the tars of ``epoch`` in reading order (the same on every rank)."""
    if shuffle:
        return np.random.default_rng([seed, epoch]).permutation(num_shards).astype(np.int64)
    return np.arange(num_shards, dtype=np.int64)


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the samples (in epoch tar order) that DALI's reader gives ``rank``."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def _seed(*parts: int) -> int:
    """A 31-bit DALI seed from integers (distinct streams per epoch, rank and operator)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass(frozen=True)
class ReaderArgs:
    """The arguments of one epoch's ``fn.readers.webdataset`` (identical in the probe pipelines)."""

    paths: tuple[str, ...]
    index_paths: tuple[str, ...]
    shard_id: int
    num_shards: int
    shuffle: bool
    seed: int

    def kwargs(self) -> dict[str, Any]:
        return {
            "paths": list(self.paths), "index_paths": list(self.index_paths), "shard_id": self.shard_id,
            "num_shards": self.num_shards, "random_shuffle": self.shuffle, "initial_fill": SHUFFLE_BUFFER,
            "seed": self.seed, "pad_last_batch": True, "stick_to_shard": True, "missing_component_behavior": "error",
        }  # fmt: skip


# ---------------------------------------------------------------- the pipeline graph


@dataclass(frozen=True)
class Spec:
    """Everything the graph depends on besides the reader."""

    device: Literal["gpu", "cpu"]
    recipe: Literal["train", "eval"]
    size: int
    train: Any  # TrainRecipe
    normalize: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    label_dtype: str | None  # "uint8" / "uint16", None without labels
    cls: bool
    seeds: tuple[int, ...]  # one per random operator


def _f64(x):
    from nvidia.dali import fn, types

    return fn.cast(x, dtype=types.FLOAT64)


def _round_half_even(x):
    """Python's ``round`` for a float64 node (timm rounds sizes and crop offsets this way)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    low = dmath.floor(x)
    frac = x - low
    odd = low - 2.0 * dmath.floor(low * 0.5)
    up = (frac > 0.5) | ((frac == 0.5) & (odd == 1.0))
    return low + fn.cast(up, dtype=types.FLOAT64)


def _i32(*xs):
    """A [len(xs)] int32 node from scalar nodes (slice starts and shapes)."""
    from nvidia.dali import fn, types

    return fn.cast(fn.stack(*xs), dtype=types.INT32)


def _f32(*xs):
    """A [len(xs)] float32 node from scalar nodes (resize sizes and ROIs)."""
    from nvidia.dali import fn, types

    return fn.cast(fn.stack(*xs), dtype=types.FLOAT)


def _reflect_pad(x, axis: int, n, before, after):
    """Pad axis ``axis`` of an HWC node by ``before``/``after`` (int nodes, each < n) mirrored
    about the edge pixels, which are not repeated (numpy/torchvision ``reflect``). Zero pads
    slice zero-length pieces, so the graph is the same for every sample."""
    from nvidia.dali import fn

    head = fn.slice(x, start=_i32(_f64(before > 0)), shape=_i32(before), axes=[axis])
    tail_start = (n - 1.0 - after) * _f64(after > 0)
    tail = fn.slice(x, start=_i32(tail_start), shape=_i32(after), axes=[axis])
    flip = {"vertical": int(axis == 0), "horizontal": int(axis == 1)}
    return fn.cat(fn.flip(head, **flip), x, fn.flip(tail, **flip), axis=axis)


# Label maps: never interpolated, and gathered exactly as PIL's NEAREST resize does it (the torch
# twin's tables, ``transforms.pil_nearest_indices``). DALI's INTERP_NN samples floor((i + 0.5)
# in / out) (through a float32 ROI), while PIL accumulates that coordinate in float64 and lands one
# pixel lower at some exact ties, so only a table gather is identical. The gather runs on the CPU
# in ``fn.python_function`` (the PNG is decoded there anyway) over the S x S output pixels only.


def _gather(label: np.ndarray, rows: np.ndarray, cols: np.ndarray, flip: bool) -> np.ndarray:
    out = label[rows[:, None], cols[None, :] if not flip else cols[None, ::-1]]  # [S, S, 1]
    return np.ascontiguousarray(out)


def _window(n_in: int, n_out: int, size: int) -> np.ndarray:
    """[size] source indices along one axis: PIL-nearest resize n_in -> n_out, then timm's
    centre crop or reflect pad (floor(d/2) before; crop at round((n_out - size) / 2))."""
    table = pil_nearest_indices(n_in, n_out)
    if n_out >= size:
        offset = round((n_out - size) / 2.0)  # half to even, as timm
        return table[offset : offset + size]
    short = size - n_out
    return table[np.pad(np.arange(n_out), (short // 2, short - short // 2), mode="reflect")]


def label_eval(label: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 1] -> [S, S, 1]: Patch-Seg's largest centre square, then PIL NEAREST."""
    top, left, m = largest_center_square(label.shape[0], label.shape[1])
    idx = pil_nearest_indices(m, size)
    return _gather(label, top + idx, left + idx, False)


def label_rkrc(label: np.ndarray, geometry: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 1] -> [S, S, 1]; ``geometry`` = (resized height, resized width, flip)."""
    n_h, n_w, flip = (int(v) for v in geometry)
    rows, cols = _window(label.shape[0], n_h, size), _window(label.shape[1], n_w, size)
    return _gather(label, rows, cols, bool(flip))


def label_rrc(label: np.ndarray, geometry: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 1] -> [S, S, 1]; ``geometry`` = (top, left, height, width, flip) of the crop."""
    top, left, h, w, flip = (int(v) for v in geometry)
    return _gather(label, top + pil_nearest_indices(h, size), left + pil_nearest_indices(w, size), bool(flip))


# The random parameters of one sample, by recipe kind. ``transform`` draws them with DALI's random
# operators; the tests feed them from the host instead (``build_probe_pipeline(draws=True)``).
DRAWS = {
    "rkrc": ("zoom", "u", "jitter", "log_r", "interp", "flip"),  # float64 x 4, int32 x 2
    "rrc": ("anchor", "window", "interp", "flip"),  # int32 [2] (y, x), int32 [2] (h, w), int32 x 2
}


def random_draws(spec: Spec, hw) -> dict[str, Any]:
    """DALI random operators for the train recipe's parameters (seeded by ``spec.seeds``)."""
    from nvidia.dali import fn, types

    t, seeds = spec.train, iter(spec.seeds)
    names = tuple(t.interpolations)
    unknown = [n for n in names if n not in INTERPOLATIONS]
    if unknown or not names:
        raise ValueError(f"unknown interpolations {unknown or names}; choose from {sorted(INTERPOLATIONS)}")
    values = [INTERPOLATIONS[n] for n in names]
    pick = fn.random.choice(values, seed=next(seeds)) if len(values) > 1 else values[0]
    draws = {"interp": pick, "flip": fn.random.coin_flip(probability=t.flip_p, seed=next(seeds), dtype=types.INT32)}
    if t.kind == "rkrc":
        draws["zoom"] = fn.random.coin_flip(probability=t.zoom_p, seed=next(seeds))
        draws["u"] = fn.random.uniform(range=list(t.scale), seed=next(seeds), dtype=types.FLOAT64)
        draws["jitter"] = fn.random.coin_flip(probability=t.aspect_p, seed=next(seeds))
        log_ratio = [math.log(t.ratio[0]), math.log(t.ratio[1])]
        draws["log_r"] = fn.random.uniform(range=log_ratio, seed=next(seeds), dtype=types.FLOAT64)
    elif t.kind == "rrc":  # torchvision's RandomResizedCrop window (10 tries, then the centre fallback)
        draws["anchor"], draws["window"] = fn.random_crop_generator(
            hw, random_area=list(t.scale), random_aspect_ratio=list(t.ratio), num_attempts=10, seed=next(seeds)
        )
    else:
        raise ValueError(f"unknown train recipe kind {t.kind!r}")
    return draws


def rkrc_geometry(H, W, S: float, zoom, u, jitter, log_r):
    """timm ``ResizeKeepRatio`` + ``CenterCropOrPad`` as float64 nodes, per axis (y, then x):
    (roi start, roi end, resized length kept, pad before, pad after, resized length).

    f = 1/sqrt(u) when ``zoom`` else 1; s = sqrt(exp(log_r)), f_h = f/s, f_w = f s when
    ``jitter``; resized side N = round(X f_x / r), r = min(H/S, W/S) (half to even, in timm's
    operation order); a side N >= S keeps the window [o, o + S), o = round((N - S) / 2); a side
    N < S is kept whole and padded floor(d/2) before, ceil(d/2) after (d = S - N). The ROI is
    the kept window in source coordinates, so resizing it equals resizing all and cropping.
    """
    import nvidia.dali.math as dmath

    zoom, u, jitter, log_r = _f64(zoom), _f64(u), _f64(jitter), _f64(log_r)
    f = zoom * (1.0 / dmath.sqrt(u)) + (1.0 - zoom)  # exactly 1 or 1 / sqrt(u)
    s = dmath.sqrt(dmath.exp(log_r))
    f_h = jitter * (f / s) + (1.0 - jitter) * f
    f_w = jitter * (f * s) + (1.0 - jitter) * f
    ratio = dmath.min(H / S, W / S)
    axes = []
    for X, f_x in ((H, f_h), (W, f_w)):
        N = dmath.max(_round_half_even(X * f_x / ratio), 1.0)  # resized side
        kept = dmath.min(N, S)
        offset = _round_half_even(dmath.max(N - S, 0.0) * 0.5)
        short = dmath.max(S - N, 0.0)
        before = dmath.floor(short * 0.5)
        axes.append((X / N * offset, X / N * (offset + kept), kept, before, short - before, N))
    return axes


def check_reflect_pad(recipe: Any, size: int) -> None:
    """DALI's reflect pad mirrors once: a side N < S needs ceil((S - N) / 2) <= N - 1. With the
    default ranges N >= 0.866 S; raise for recipes that could shrink a side further."""
    f = min(1.0, 1.0 / math.sqrt(recipe.scale[1])) if recipe.zoom_p > 0 else 1.0
    if recipe.aspect_p > 0:
        f *= min(1.0, 1.0 / math.sqrt(recipe.ratio[1]), math.sqrt(recipe.ratio[0]))
    n = max(1, round(size * f))  # the shorter side at the extreme draw
    if n < size and (size - n + 1) // 2 > n - 1:
        raise ValueError(f"rkrc with scale {recipe.scale} and ratio {recipe.ratio} can shrink a side to {n} px "
                         f"at size {size}: too short to reflect-pad to {size}")  # fmt: skip


def apply_rkrc(x, axes, interp, antialias: bool):
    """Resize the kept window of an HWC node to its resized length, then reflect-pad to S x S."""
    from nvidia.dali import fn

    (y0, y1, kh, bh, ah, _), (x0, x1, kw, bw, aw, _) = axes
    x = fn.resize(x, size=_f32(kh, kw), roi_start=_f32(y0, x0), roi_end=_f32(y1, x1), interp_type=interp, antialias=antialias)
    return _reflect_pad(_reflect_pad(x, 0, kh, bh, ah), 1, kw, bw, aw)


def transform(spec: Spec, jpg, seg, draws: dict[str, Any] | None = None):
    """Encoded JPEG (and label PNG) nodes -> (image [3, S, S], label [S, S, 1] or None, image
    [H, W], label [H, W] or None): the last two are the decoded sizes, compared on the host.

    ``draws`` (train only) replaces the random operators with given nodes (``DRAWS``).
    """
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    gpu = spec.device == "gpu"
    decode_device = "mixed" if gpu else "cpu"
    S = float(spec.size)
    decode = {"device": decode_device, "output_type": types.RGB, "adjust_orientation": False}  # as PIL: no EXIF rotation
    if gpu:
        decode["jpeg_fancy_upsampling"] = True  # chroma upsampling as libjpeg-turbo's (the CPU decoder's and PIL's)
    if spec.recipe == "train" and spec.train.kind == "rrc":  # the window is drawn before decoding (ROI decode)
        image, shape = None, fn.peek_image_shape(jpg, adjust_orientation=False)  # [H, W, C] int64
    else:
        image = fn.decoders.image(jpg, **decode)
        shape = image.shape()  # [H, W, 3] int64, on the CPU also for GPU images
    hw = shape[0:2]
    H, W = _f64(shape[0]), _f64(shape[1])
    label = label_hw = None
    if seg is not None:
        dtype = types.UINT16 if spec.label_dtype == "uint16" else types.UINT8
        label = fn.decoders.image(seg, device="cpu", output_type=types.ANY_DATA, dtype=dtype, adjust_orientation=False)
        label_hw = label.shape()[0:2]
    flip = None

    if spec.recipe == "eval":
        m = dmath.min(H, W)
        top, left = dmath.floor((H - m) * 0.5), dmath.floor((W - m) * 0.5)
        image = fn.resize(
            image, size=[S, S], roi_start=_f32(top, left), roi_end=_f32(top + m, left + m),
            interp_type=types.INTERP_LINEAR, antialias=True,
        )  # fmt: skip
        if label is not None:
            label = fn.python_function(label, function=functools.partial(label_eval, size=spec.size), output_layouts="HWC")
    else:
        d = draws if draws is not None else random_draws(spec, hw)
        interp = d["interp"] if isinstance(d["interp"], int) else fn.cast(d["interp"], dtype=types.INTERP_TYPE)
        flip = d["flip"]
        if spec.train.kind == "rkrc":
            axes = rkrc_geometry(H, W, S, d["zoom"], d["u"], d["jitter"], d["log_r"])
            image = apply_rkrc(image, axes, interp, antialias=True)
            if label is not None:
                geometry = fn.cast(fn.stack(axes[0][5], axes[1][5], _f64(flip)), dtype=types.INT64)  # [3]
                label = fn.python_function(label, geometry, function=functools.partial(label_rkrc, size=spec.size),
                                           output_layouts="HWC")  # fmt: skip
        else:  # rrc: decode only the window (ROI decoding), slice the label map with the same window
            image = fn.decoders.image_slice(jpg, d["anchor"], d["window"], axis_names="HW", **decode)
            image = fn.resize(image, size=[S, S], interp_type=interp, antialias=True)
            if label is not None:
                geometry = fn.cat(fn.cast(d["anchor"], dtype=types.INT64), fn.cast(d["window"], dtype=types.INT64),
                                  fn.cast(fn.stack(flip), dtype=types.INT64))  # [5] fmt: skip
                label = fn.python_function(label, geometry, function=functools.partial(label_rrc, size=spec.size),
                                           output_layouts="HWC")  # fmt: skip

    mirror = 0 if flip is None else flip
    if spec.normalize:
        image = fn.crop_mirror_normalize(
            image, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
            mean=[255.0 * v for v in spec.mean], std=[255.0 * v for v in spec.std],
        )  # fmt: skip
    else:
        image = fn.crop_mirror_normalize(image, dtype=types.UINT8, output_layout="CHW", mirror=mirror, mean=0.0, std=1.0)
    if label is not None:
        if spec.label_dtype == "uint16":
            label = fn.cast(label, dtype=types.INT32)  # torch has no full uint16 support
        label = label.gpu() if gpu else label
    return image, label, hw, label_hw


def _outputs(spec: Spec, members: dict[str, Any], info, draws: dict[str, Any] | None = None):
    """The pipeline's outputs: image, label, cls, info, hw, label hw, PNG header (None where absent)."""

    seg = members.get("seg.png")
    image, label, hw, label_hw = transform(spec, members["jpg"], seg, draws)
    png = None if seg is None else seg[24:26]  # the PNG's IHDR bit depth and colour type
    return image, label, members.get("cls"), info, hw, label_hw, png


def build_pipeline(spec: Spec, reader: ReaderArgs, batch_size: int, threads: int, device_id: int | None,
                   checkpoint: bytes | None = None):  # fmt: skip
    """The loader's pipeline: reader, decoders, recipe; built, or restored from ``checkpoint``."""
    from nvidia.dali import fn, pipeline_def

    exts = ["jpg"] + (["seg.png"] if spec.label_dtype else []) + (["cls"] if spec.cls else [])

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=PREFETCH,
                  enable_checkpointing=True, exec_dynamic=True, seed=reader.seed)  # fmt: skip
    def pipe():
        outs = fn.readers.webdataset(ext=exts, name="reader", **reader.kwargs())
        outs = outs if isinstance(outs, list) else [outs]
        members = dict(zip(exts, outs))
        info = fn.get_property(members["jpg"], key="source_info")  # "path:offset:member name"
        return tuple(o for o in _outputs(spec, members, info) if o is not None)

    p = pipe(checkpoint=checkpoint) if checkpoint is not None else pipe()
    p.build()
    return p


def build_keys_pipeline(reader: ReaderArgs, ext: str, batch_size: int, threads: int):
    """Reader only, one small member: the source info of every sample in the same order."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, prefetch_queue_depth=PREFETCH)
    def pipe():
        x = fn.readers.webdataset(ext=[ext], name="reader", **reader.kwargs())
        return fn.get_property(x, key="source_info")

    p = pipe()
    p.build()
    return p


def build_probe_pipeline(spec: Spec, exts: list[str], device_id: int | None, draws: bool = False):
    """The same recipe on one sample fed from the host (``feed_input`` by member name, and by
    draw name when ``draws``): outputs as ``build_pipeline``'s, without cls and info."""
    from nvidia.dali import fn, pipeline_def, types

    kinds = {"zoom": types.FLOAT64, "u": types.FLOAT64, "jitter": types.FLOAT64, "log_r": types.FLOAT64}

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True)
    def pipe():
        members = {e: fn.external_source(name=e, dtype=types.UINT8, ndim=1) for e in exts if e != "cls"}
        given = None
        if draws and spec.recipe == "train":
            given = {n: fn.external_source(name=n, dtype=kinds.get(n, types.INT32), ndim=1 if n in ("anchor", "window") else 0)
                     for n in DRAWS[spec.train.kind]}  # fmt: skip
        outs = _outputs(spec, members, None, given)
        return tuple(o for o in outs if o is not None)

    p = pipe()
    p.build()
    return p


# ---------------------------------------------------------------- host side


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """A uniform-shape DALI TensorList as a new torch tensor on ``device`` (a copy: DALI reuses its buffers)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tl.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, out, cuda_stream=stream)
    return out


def _text(tl, i: int) -> str:
    return bytes(np.asarray(tl.at(i))).decode("utf-8", "replace")


def parse_source_info(info: str) -> tuple[str, str]:
    """'dir/x.tar:offset:key.ext' -> (tar file name, sample key)."""
    path, _, member = info.rsplit(":", 2)
    return Path(path).name, split_name(member)[0]


def _error_reason(exc: BaseException, limit: int = 200) -> str:
    """The operator's message out of a DALI pipeline error (what follows 'encountered:'), on one line."""
    text = str(exc)
    found = re.search(r"encountered:\s*(.*?)(?:\n\s*Current pipeline object|$)", text, re.DOTALL)
    reason = " ".join((found.group(1) if found else text).split())
    return (reason[: limit - 3] + "...") if len(reason) > limit else reason or type(exc).__name__


class _Probe:
    """Runs the loader's recipe on single samples read from the tars (original bytes): the
    pipeline is built once and rebuilt after each failure (a failed DALI pipeline is done)."""

    def __init__(self, loader: DaliLoader):
        self.loader = loader
        self.spec = loader._spec_for(loader.state.epoch)
        self.exts = ["jpg"] + (["seg.png"] if loader.has_labels else [])
        self.pipes: dict[tuple[str, ...], Any] = {}

    def _run(self, exts: tuple[str, ...], data: dict[str, bytes]) -> str | None:
        try:
            if exts not in self.pipes:
                spec = self.spec if "seg.png" in exts else replace(self.spec, label_dtype=None)
                self.pipes[exts] = build_probe_pipeline(spec, list(exts), self.loader.device_id)
            pipe = self.pipes[exts]
            for e in exts:
                pipe.feed_input(e, [np.frombuffer(data[e], dtype=np.uint8)])
            pipe.run()
        except Exception as exc:  # noqa: BLE001 -- any operator may be the one that fails
            self.pipes.pop(exts, None)
            return _error_reason(exc)
        return None

    def fails(self, shard: str, key: str) -> str | None:
        """None when the sample passes alone; else which member fails and DALI's message."""
        shards = self.loader.shards
        i = next(j for j, t in enumerate(shards.tars) if t.name == shard)
        entry = shards.manifest["shards"][i]
        index = shard_index(str(shards.indexes[i]), entry["samples"], entry["bytes"], shards.stamps[i])
        j = int(np.flatnonzero(index.keys == key)[0])
        _, _, data = shards.read(int(shards.starts[i]) + j, tuple(self.exts))
        reason = self._run(tuple(self.exts), data)
        if reason is None:
            return None
        if len(self.exts) > 1 and self._run(("jpg",), data) is None:
            return f"seg.png does not decode: {reason}"
        return f"jpg does not decode: {reason}"


class DaliLoader:
    """One epoch of ``Batch``es per iteration, for this rank; resumable with ``state_dict``.

    Same interface as ``TorchLoader``: ``epoch``, ``len()``, ``set_epoch``, ``state_dict``,
    ``load_state_dict``, ``skipped`` and ``skipped_samples``.
    """

    def __init__(self, cfg: LoaderConfig, device: Literal["gpu", "cpu"] = "gpu"):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        if cfg.recipe not in ("train", "eval"):
            raise ValueError(f"unknown recipe {cfg.recipe!r}")
        self.cfg, self.device = cfg, device
        self.shards: ShardSet = open_shards(cfg.shards)  # ShardError now for missing or truncated shards
        manifest = self.shards.manifest
        self.has_labels = bool(cfg.labels and manifest.get("label") and "seg.png" in manifest["keys"])
        self.has_cls = bool(manifest.get("cls") and "cls" in manifest["keys"])
        self.num_classes = int(manifest["num_classes"])
        label_dtype = str(manifest["label"]["dtype"]) if self.has_labels else None
        if label_dtype not in (None, "uint8", "uint16"):
            raise ValueError(f"{cfg.shards}: label dtype {label_dtype!r} is neither uint8 nor uint16")
        self.plan = EpochPlan(num_samples=self.shards.num_samples, batch_size=cfg.batch_size, seed=cfg.seed,
                              shuffle=cfg.shuffle, rank=cfg.rank, world_size=cfg.world_size, drop_last=cfg.drop_last)  # fmt: skip
        if device == "gpu":
            if not torch.cuda.is_available():
                raise RuntimeError("DaliLoader(device='gpu') needs CUDA; use device='cpu' for DALI's CPU-only mode")
            self.device_id: int | None = torch.cuda.current_device()
            self.torch_device = torch.device("cuda", self.device_id)
        else:
            self.device_id, self.torch_device = None, torch.device("cpu")
        if cfg.recipe == "train" and cfg.train.kind == "rkrc":
            check_reflect_pad(cfg.train, cfg.size)
        self.threads = max(1, int(cfg.workers))
        self._spec = Spec(device=device, recipe=cfg.recipe, size=cfg.size, train=cfg.train, normalize=cfg.normalize,
                          mean=tuple(cfg.mean), std=tuple(cfg.std), label_dtype=label_dtype, cls=self.has_cls,
                          seeds=())  # fmt: skip
        self.state = LoaderState()
        self.skipped = 0  # skip events (a bad sample counts again in every epoch that reads it)
        self.skipped_samples: dict[tuple[str, str], str] = {}  # (shard, key) -> reason, each warned once
        self._bad: dict[str, dict[str, str]] = {}  # tar name -> {key: reason}: patched out of the index
        self._patch_dir: Path | None = None
        self._pipe = None
        self._pipe_at: tuple[int, int] | None = None  # (epoch, position) of the live pipeline's next batch
        self._mark: tuple[int, int, bytes | None] | None = None  # last (epoch, position, checkpoint) to rebuild from
        self._restore: tuple[int, int, bytes] | None = None  # a loaded checkpoint, not yet used

    # ------------------------------------------------------------ the public interface

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank, the same on every rank (fewer only if a whole batch is corrupt)."""
        return len(self.plan)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch, unless it is the current epoch (a restored position stays)."""
        if epoch != self.state.epoch:
            self.state = LoaderState(epoch, 0)

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position and fingerprint (ints) plus ``dali_rank{r}``: this rank's pipeline
        checkpoint (ASCII), when mid-epoch. Safe for ``torch.load(weights_only=True)``."""
        state = loader_state_dict(self.state, self.plan)
        checkpoint = None
        at = (self.state.epoch, self.state.position)
        if 0 < self.state.position < len(self.plan):
            if self._pipe is not None and self._pipe_at == at:
                checkpoint = self._pipe.checkpoint()
            elif self._restore is not None and self._restore[:2] == at:
                checkpoint = self._restore[2]
        if checkpoint is not None:
            state[self._checkpoint_key] = base64.b64encode(checkpoint).decode("ascii")
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (epoch, position); this rank's DALI checkpoint is used when present."""
        self.state = restore_state(state, self.plan)
        self._close()
        encoded = state.get(self._checkpoint_key)
        at = (self.state.epoch, self.state.position)
        self._restore = (*at, base64.b64decode(encoded)) if encoded and self.state.position > 0 else None

    def close(self) -> None:
        """Release the pipeline and the patched index files."""
        self._close()
        if self._patch_dir is not None:
            shutil.rmtree(self._patch_dir, ignore_errors=True)
            self._patch_dir = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 -- at interpreter shutdown modules may be gone
            pass

    def __iter__(self) -> Iterator[Batch]:
        epoch, n, b = self.state.epoch, len(self.plan), self.cfg.batch_size
        per_rank = self.shards.num_samples // self.cfg.world_size
        while self.state.position < n:
            pipe = self._pipeline(epoch, self.state.position)
            at = self._pipe_at[1]  # < position while catching up after a rebuild
            if at - self._mark[1] >= CHECKPOINT_EVERY:
                self._mark = (epoch, at, pipe.checkpoint())
            try:
                if self.device == "gpu":  # GPU outputs ordered on torch's current stream
                    outputs = pipe.run(torch.cuda.current_stream(self.torch_device))
                else:
                    outputs = pipe.run()
            except Exception as exc:  # noqa: BLE001 -- a sample that does not decode aborts the pipeline
                self._recover(epoch, at, exc)
                continue
            self._pipe_at = (epoch, at + 1)
            if at < self.state.position:
                continue
            self.state.position += 1  # counted when handed over: a checkpoint taken now resumes after it
            batch = self._batch(outputs, min(b, per_rank - at * b))
            if batch is not None:
                yield batch
        self._close()
        self.state = LoaderState(epoch + 1, 0)

    # ------------------------------------------------------------ pipelines

    @property
    def _checkpoint_key(self) -> str:
        return f"dali_rank{self.cfg.rank}"

    def _reader(self, epoch: int) -> ReaderArgs:
        cfg = self.cfg
        order = epoch_tar_order(len(self.shards.tars), cfg.seed, epoch, cfg.shuffle)
        paths = tuple(str(self.shards.tars[i]) for i in order)
        index_paths = tuple(self._index_path(i) for i in order)
        return ReaderArgs(paths, index_paths, cfg.rank, cfg.world_size, cfg.shuffle, _seed(cfg.seed, epoch, cfg.rank, 0))

    def _spec_for(self, epoch: int) -> Spec:
        return replace(self._spec, seeds=tuple(_seed(self.cfg.seed, epoch, self.cfg.rank, k) for k in range(1, 9)))

    def _build(self, epoch: int, checkpoint: bytes | None = None):
        return build_pipeline(self._spec_for(epoch), self._reader(epoch), self.cfg.batch_size, self.threads,
                              self.device_id, checkpoint)  # fmt: skip

    def _pipeline(self, epoch: int, position: int):
        """The live pipeline if it is at (epoch, p <= position); else one built at the latest
        usable checkpoint (a loaded one, or the last mark) or at the epoch's start. The caller
        runs it forward to ``position``."""
        if self._pipe is not None and self._pipe_at[0] == epoch and self._pipe_at[1] <= position:
            return self._pipe
        self._close()
        pipe, start = None, 0
        for source in (self._restore, self._mark):
            if source is not None and source[0] == epoch and 0 < source[1] <= position and source[2] is not None:
                try:
                    pipe, start = self._build(epoch, source[2]), source[1]
                    break
                except Exception as exc:  # noqa: BLE001 -- e.g. saved by another pipeline definition
                    warnings.warn(f"DALI checkpoint not usable ({_error_reason(exc)}); re-reading the epoch", stacklevel=3)
        if pipe is None:
            pipe = self._build(epoch)
        self._restore = None
        self._pipe, self._pipe_at = pipe, (epoch, start)
        if self._mark is None or self._mark[:2] != (epoch, start):
            self._mark = (epoch, start, pipe.checkpoint() if start else None)
        return pipe

    def _close(self) -> None:
        self._pipe, self._pipe_at = None, None  # DALI frees the pipeline with its last reference

    # ------------------------------------------------------------ batches

    def _batch(self, outputs, valid: int) -> Batch | None:
        """The first ``valid`` samples of a pipeline run (the rest is the reader's padding) as a
        ``Batch``, without the samples that must be left out."""
        outs = list(outputs)
        images = outs.pop(0)
        labels = outs.pop(0) if self.has_labels else None
        cls = outs.pop(0) if self.has_cls else None
        info, hw = outs.pop(0), np.asarray(outs.pop(0).as_tensor())  # hw: [B, 2] decoded image sizes
        if self.has_labels:
            label_hw, png = np.asarray(outs.pop(0).as_tensor()), np.asarray(outs.pop(0).as_tensor())  # [B, 2] each
        keep, keys, classes = [], [], []
        for i in range(valid):
            shard, key = parse_source_info(_text(info, i))
            reason = self._bad.get(shard, {}).get(key)
            number = _text(cls, i).strip() if cls is not None else "0"
            if reason is None and (not number.isdigit() or int(number) >= self.num_classes):
                reason = f"cls {number!r} is not a class index"
            if reason is None and self.has_labels:
                reason = self._label_problem(hw[i], label_hw[i], png[i])
            if reason is not None:
                self._note(shard, key, reason)
                continue
            keep.append(i)
            keys.append(key)
            classes.append(int(number))
        if not keep:
            return None
        image_t = _to_torch(images, self.torch_device)  # [B, 3, S, S] (B = the pipeline's batch size)
        label_t = None if labels is None else _to_torch(labels, self.torch_device)[..., 0]  # [B, S, S]
        if len(keep) != image_t.shape[0]:  # a short last batch, or samples left out
            select = torch.tensor(keep, device=self.torch_device)
            image_t = image_t.index_select(0, select)
            label_t = None if label_t is None else label_t.index_select(0, select)
        label_t = None if label_t is None else label_t.to(torch.int64)
        cls_t = torch.tensor(classes, dtype=torch.int64).to(self.torch_device, non_blocking=True) if cls is not None else None
        return Batch(images=image_t, labels=label_t, cls=cls_t, keys=keys)

    def _label_problem(self, image_hw: np.ndarray, label_hw: np.ndarray, png: np.ndarray) -> str | None:
        """Why a decoded label map cannot serve its image (wrong PNG type, other size), or None."""
        depth, colour = int(png[0]), int(png[1])
        want = 16 if self._spec.label_dtype == "uint16" else 8
        if depth != want or colour != 0:
            return f"seg.png is a {depth}-bit PNG of colour type {colour}, expected {want}-bit grayscale"
        if image_hw.tolist() != label_hw.tolist():
            return f"seg.png is {label_hw[1]}x{label_hw[0]} but the image is {image_hw[1]}x{image_hw[0]}"
        return None

    def _note(self, shard: str, key: str, reason: str) -> None:
        self.skipped += 1
        if (shard, key) not in self.skipped_samples:
            self.skipped_samples[(shard, key)] = reason
            warn_skipped(shard, key, reason)

    # ------------------------------------------------------------ corrupt samples

    def _index_path(self, shard: int) -> str:
        tar = self.shards.tars[shard].name
        if tar in self._bad and self._patch_dir is not None:
            return str(self._patch_dir / self.shards.indexes[shard].name)
        return str(self.shards.indexes[shard])

    def _recover(self, epoch: int, position: int, exc: BaseException) -> None:
        """Find the sample(s) of batch ``position`` that fail alone, patch them out, or re-raise."""
        self._close()
        keys = list(dict.fromkeys(self._batch_keys(self._reader(epoch), position)))
        probe = _Probe(self)
        found = {(s, k): r for s, k in keys if k not in self._bad.get(s, {}) and (r := probe.fails(s, k)) is not None}
        if not found:
            names = ", ".join(f"{s}:{k}" for s, k in keys)
            raise RuntimeError(f"DALI pipeline failed at epoch {epoch}, batch {position} ({names}), "
                               f"and no single sample fails alone: {_error_reason(exc)}") from exc  # fmt: skip
        for (shard, key), reason in found.items():
            self._bad.setdefault(shard, {})[key] = reason
        for shard in {s for s, _ in found}:
            self._write_patched_index(shard)

    def _batch_keys(self, reader: ReaderArgs, position: int) -> list[tuple[str, str]]:
        """(shard, key) of every sample of batch ``position``: a reader-only pipeline of the same
        arguments reads the smallest member up to that batch (no decoding)."""
        keys = self.shards.manifest["keys"]
        ext = next((e for e in ("cls", "json", "txt") if e in keys), "jpg")
        pipe = build_keys_pipeline(reader, ext, self.cfg.batch_size, self.threads)
        for _ in range(position):
            pipe.run()
        (info,) = pipe.run()
        return [parse_source_info(_text(info, i)) for i in range(self.cfg.batch_size)]

    def _write_patched_index(self, shard: str) -> None:
        """A copy of the shard's index whose bad samples point at a good sample's members."""
        i = next(j for j, t in enumerate(self.shards.tars) if t.name == shard)
        bad = self._bad[shard]
        lines = self.shards.indexes[i].read_text().splitlines()
        rows = [line.split() for line in lines[1:]]
        donor = next((r for r in rows if split_name(r[3])[0] not in bad), None)
        if donor is None:
            raise RuntimeError(f"{shard}: every sample fails to decode ({next(iter(bad.values()))})")
        for r in rows:
            if split_name(r[3])[0] in bad:
                for g in range(0, len(r), 4):  # keep ext and member name, borrow offset and size
                    r[g + 1], r[g + 2] = donor[g + 1], donor[g + 2]
        if self._patch_dir is None:
            self._patch_dir = Path(tempfile.mkdtemp(prefix="fastloc-dali-idx-"))
        path = self._patch_dir / self.shards.indexes[i].name
        path.write_text("\n".join([lines[0], *(" ".join(r) for r in rows)]) + "\n")


__all__ = [
    "CHECKPOINT_EVERY",
    "SHUFFLE_BUFFER",
    "DaliLoader",
    "ReaderArgs",
    "Spec",
    "build_keys_pipeline",
    "build_pipeline",
    "build_probe_pipeline",
    "epoch_tar_order",
    "parse_source_info",
    "rank_range",
    "transform",
]  # fmt: skip
