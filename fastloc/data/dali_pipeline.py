"""The DALI graph of ``DaliLoader``: reader arguments, per-sample geometry, both recipes.

Pure pipeline construction (no state): what one epoch reads (``epoch_tar_order``,
``rank_range``, ``ReaderArgs``), the recipes as DALI operators on data nodes (``transform``,
``rkrc_geometry``, reflect padding, the label gathers with PIL's NEAREST tables), and the
pipelines built from them (``build_pipeline`` and the small ones corrupt-sample recovery uses).
The semantics are documented in ``dali_loader.py``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fastloc.data.transforms import largest_center_square, pil_nearest_indices

SHUFFLE_BUFFER = 1024  # samples in DALI's shuffle buffer per rank (its default initial_fill)
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


def combine_seed(*parts: int) -> int:
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
