"""The DALI graph of ``DaliLoader``: JPEG bytes and their ``Window``s in, normalized images out.

Everything that decides *what* to compute (the order, the random draws, the geometry, the label
maps) is done on the host by ``samples.py``, identically for both loaders; this graph only
makes the pixels: decode each window's crop (``decoders.image_slice``: nvJPEG with
``device="gpu"``, libjpeg-turbo with ``"cpu"``; rkrc's crop is the whole image), resize its
box to its size (the drawn interpolation, antialiased), reflect-pad to S x S (slices, flips and
a concatenation: the edge pixel is not repeated, torchvision's ``reflect``), and flip and
normalize in ``crop_mirror_normalize``: (x - 255 mean) / (255 std), CHW float32, or CHW uint8
without normalization.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

INPUTS = ("crop", "box", "out", "pads", "interp", "flip")  # samples.window_arrays, after the JPEGs
PREFETCH = 2  # batches DALI runs ahead of the one being output


@dataclass(frozen=True)
class Spec:
    """Everything the graph depends on."""

    device: Literal["gpu", "cpu"]
    normalize: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _reflect_pad(x, axis: int, pads):
    """Mirror ``pads`` = (head start, head length, tail start, tail length) rows of an HWC node
    about its edges along ``axis``."""
    from nvidia.dali import fn

    head = fn.slice(x, start=pads[0:1], shape=pads[1:2], axes=[axis])
    tail = fn.slice(x, start=pads[2:3], shape=pads[3:4], axes=[axis])
    flip = {"vertical": int(axis == 0), "horizontal": int(axis == 1)}
    return fn.cat(fn.flip(head, **flip), x, fn.flip(tail, **flip), axis=axis)


def transform(spec: Spec, jpg, crop, box, out, pads, interp, flip):
    """Encoded JPEG node and window nodes -> image [3, S, S]."""
    from nvidia.dali import fn, types

    decode = {"output_type": types.RGB, "adjust_orientation": False}  # as PIL: no EXIF rotation
    if spec.device == "gpu":
        decode["jpeg_fancy_upsampling"] = True  # chroma upsampling as libjpeg-turbo's (the CPU decoder's and PIL's)
    device = "mixed" if spec.device == "gpu" else "cpu"
    image = fn.decoders.image_slice(jpg, crop[0:2], crop[2:4], axis_names="HW", device=device, **decode)
    image = fn.resize(
        image,
        size=out,
        roi_start=box[0:2],
        roi_end=box[2:4],
        interp_type=fn.cast(interp, dtype=types.INTERP_TYPE),
        antialias=True,
    )
    image = _reflect_pad(_reflect_pad(image, 0, pads[0:4]), 1, pads[4:8])
    if spec.normalize:
        return fn.crop_mirror_normalize(
            image,
            dtype=types.FLOAT,
            output_layout="CHW",
            mirror=flip,
            mean=[255.0 * v for v in spec.mean],
            std=[255.0 * v for v in spec.std],
        )
    return fn.crop_mirror_normalize(image, dtype=types.UINT8, output_layout="CHW", mirror=flip, mean=0.0, std=1.0)


def build_pipeline(
    spec: Spec,
    source: Callable[[], tuple] | None,
    batch_size: int,
    threads: int,
    device_id: int | None,
    prefetch: int = PREFETCH,
    graph: Callable = transform,
):
    """A built pipeline. With ``source``, it pulls one batch per call, in order: a tuple of the
    JPEGs (a list of uint8 arrays) and the arrays named in ``INPUTS``. Without, each input is
    an external source of that name ("jpg" and ``INPUTS``), fed with ``feed_input`` before a run.
    ``graph(spec, jpg, *inputs)`` makes the outputs (the benchmark swaps in a pass-through)."""
    from nvidia.dali import fn, pipeline_def, types

    dtypes = [types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32, types.INT32, types.INT32]
    ndims = [1, 1, 1, 1, 1, 0, 0]

    @pipeline_def(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        exec_dynamic=True,
    )
    def pipe():
        if source is not None:
            inputs = fn.external_source(  # no copy: the loader keeps each batch's arrays until its output
                source=source, num_outputs=len(dtypes), batch=True, dtype=dtypes, ndim=ndims, no_copy=True
            )
        else:
            names = ("jpg", *INPUTS)
            inputs = [fn.external_source(name=n, dtype=t, ndim=d) for n, t, d in zip(names, dtypes, ndims)]
        return graph(spec, *inputs)

    p = pipe()
    p.build()
    return p
