"""Per-patch label pooling for Patch-Seg: label maps [B, H, W] -> patch (or image) targets.

``union`` [B, N, C] multi-hot, ``majority`` [B, N] (ties to the smallest id) or ``global-union``
[B, C], as the original's ``ReduceAnnotation`` (methods/PATCHSEG.md section 3); the semantics,
dtypes, range checks and byte-count floor are in the README ("Kernels"). Pieces: the spec and CPU
implementation ``label_pool_reference``, the original's loop ``label_pool_loop`` (a check and a
baseline), the Triton kernels and ``label_pool_triton``, and the op ``fastloc::label_pool``
(CUDA -> Triton, CPU -> reference), wrapped by ``label_pool``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

REDUCTIONS = ("union", "majority", "global-union")
LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.bool)


# ----------------------------------------------------------------------------- checks


def _check_args(
    labels: torch.Tensor, patch_size: int, num_classes: int, reduction: str, out_dtype: torch.dtype
) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if labels.dim() != 3 or labels.dtype not in LABEL_DTYPES:
        raise ValueError(f"labels must be [B, H, W] of {LABEL_DTYPES}, got {labels.dtype} {tuple(labels.shape)}")
    if patch_size < 1 or labels.shape[1] < patch_size or labels.shape[2] < patch_size:
        raise ValueError(
            f"patch size {patch_size} must be >= 1 and fit the {labels.shape[1]}x"
            f"{labels.shape[2]} label map at least once"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def _check_values(labels: torch.Tensor, num_classes: int) -> None:
    """ValueError if any label lies outside [0, C); reads min/max back (a host sync on a GPU)."""
    if labels.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"label values must lie in [0, num_classes) = [0, {num_classes}); found min {lo}, max {hi}")


def _out_shape(labels: torch.Tensor, p: int, num_classes: int, reduction: str) -> tuple[int, ...]:
    b, h, w = labels.shape
    n = (h // p) * (w // p)  # whole patches only
    shapes = {"union": (b, n, num_classes), "majority": (b, n), "global-union": (b, num_classes)}
    return shapes[reduction]


# ----------------------------------------------------------------------------- reference


def label_pool_reference(
    labels: torch.Tensor,
    patch_size: int,
    num_classes: int,
    reduction: str = "union",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The spec, vectorized: per-patch class counts by ``scatter_add_``, then each rule."""
    _check_args(labels, patch_size, num_classes, reduction, out_dtype)
    _check_values(labels, num_classes)
    p, c = patch_size, num_classes
    b, h, w = labels.shape
    gh, gw = h // p, w // p
    crop = labels[:, : gh * p, : gw * p].long()  # [B, gh*p, gw*p], border dropped
    if reduction == "global-union":
        flat = crop.reshape(b, -1)  # [B, gh*p*gw*p]
        counts = torch.zeros(b, c, dtype=torch.int32, device=labels.device)
        counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.int32))  # [B, C]
        return (counts > 0).to(out_dtype)
    patches = crop.reshape(b, gh, p, gw, p).permute(0, 1, 3, 2, 4).reshape(b, gh * gw, p * p)
    counts = torch.zeros(b, gh * gw, c, dtype=torch.int32, device=labels.device)
    counts.scatter_add_(2, patches, torch.ones_like(patches, dtype=torch.int32))  # [B, N, C]
    if reduction == "majority":
        return counts.argmax(dim=-1)  # [B, N] int64; argmax returns the first max: smallest id
    present = counts > 0  # [B, N, C]
    present[..., 0] = counts[..., 0] == p * p  # unlabeled only when the whole patch is
    return present.to(out_dtype)


def label_pool_loop(
    labels: torch.Tensor,
    patch_size: int,
    num_classes: int,
    reduction: str = "union",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The original Patch-Seg reduction: a Python loop with ``torch.unique`` per patch.

    Faithful to ``ReduceAnnotation`` except majority, where ``torch.mode`` (tie-break
    unspecified) is replaced by unique counts with ties to the smallest id.
    """
    _check_args(labels, patch_size, num_classes, reduction, out_dtype)
    _check_values(labels, num_classes)
    p, c = patch_size, num_classes
    b, h, w = labels.shape
    gh, gw = h // p, w // p
    labels = labels.long().cpu()
    if reduction == "global-union":
        out = torch.zeros(b, c)
        for k in range(b):
            out[k, torch.unique(labels[k, : gh * p, : gw * p])] = 1
        return out.to(out_dtype)
    patches = labels.unfold(1, p, p).unfold(2, p, p).flatten(3)  # [B, gh, gw, p*p]
    union = reduction == "union"
    out = torch.zeros(b, gh, gw, c) if union else torch.zeros(b, gh, gw, dtype=torch.long)
    for k in range(b):
        for i in range(gh):
            for j in range(gw):
                if union:
                    unique_classes = torch.unique(patches[k, i, j])
                    out[k, i, j, unique_classes] = 1
                    if len(unique_classes) > 1:  # "unlabeled" only if it is the only class
                        out[k, i, j, 0] = 0
                else:
                    values, counts = torch.unique(patches[k, i, j], return_counts=True)
                    out[k, i, j] = values[counts.argmax()]  # values ascend: first max = smallest
    out = out.flatten(1, 2)  # [B, N, C] or [B, N]
    return out.to(out_dtype) if union else out


# ----------------------------------------------------------------------------- kernels
#
# Scatter, not compare: each pixel of the whole-patch region writes straight into the row of its
# patch (union, global-union: store 1 at its class; majority: count +1 with an atomic add), so
# the work is O(pixels) rather than the O(pixels x C) of comparing every pixel with every class.
# The pixel kernels run on [BLOCK_Y, BLOCK_X] tiles of the region, grid (B, row tiles, column
# tiles). Many pixels store the same value to the same address; that race is benign.


@triton.jit
def _load_tile(labels_ptr, H, W, HC, WC, GW, P: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    """This program's tile: labels (int32), image b, patch index n and the in-region mask."""
    b = tl.program_id(0).to(tl.int64)
    y = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)  # [BLOCK_Y] rows
    x = tl.program_id(2) * BLOCK_X + tl.arange(0, BLOCK_X)  # [BLOCK_X] columns
    inside = (y < HC)[:, None] & (x < WC)[None, :]  # [BLOCK_Y, BLOCK_X]: whole patches only
    lab = tl.load(labels_ptr + b * H * W + y[:, None] * W + x[None, :], mask=inside, other=0)
    lab = tl.where(inside, lab.to(tl.int32), -1)  # cast before padding: uint8 has no -1
    n = (y // P)[:, None] * GW + (x // P)[None, :]  # [BLOCK_Y, BLOCK_X] patch, row-major
    return lab, b, n, inside


@triton.jit
def _union_kernel(
    labels_ptr,  # [B, H, W] uint8 / int16 / int32 / int64, contiguous
    out_ptr,  # [B, N, C], pre-filled: 0 everywhere, 1 at class 0
    H,
    W,
    HC,
    WC,
    GW,
    N,
    C,  # HC x WC: the whole-patch region; GW patches per row
    P: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    lab, b, n, inside = _load_tile(labels_ptr, H, W, HC, WC, GW, P, BLOCK_Y, BLOCK_X)
    row = out_ptr + (b * N + n) * C  # [BLOCK_Y, BLOCK_X] each pixel's patch row
    one = tl.full([BLOCK_Y, BLOCK_X], 1, out_ptr.dtype.element_ty)
    tl.store(row + lab, one, mask=(lab > 0) & (lab < C))
    # Class 0 stays 1 only if no pixel of the patch carries another label.
    zero = tl.zeros([BLOCK_Y, BLOCK_X], out_ptr.dtype.element_ty)
    tl.store(row, zero, mask=inside & (lab != 0))


@triton.jit
def _global_union_kernel(
    labels_ptr,  # [B, H, W] uint8 / int16 / int32 / int64, contiguous
    out_ptr,  # [B, C], pre-filled with 0
    H,
    W,
    HC,
    WC,
    GW,
    C,
    P: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    lab, b, _, _ = _load_tile(labels_ptr, H, W, HC, WC, GW, P, BLOCK_Y, BLOCK_X)
    one = tl.full([BLOCK_Y, BLOCK_X], 1, out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * C + lab, one, mask=(lab >= 0) & (lab < C))


@triton.jit
def _count_kernel(
    labels_ptr,  # [B, H, W] uint8 / int16 / int32 / int64, contiguous
    counts_ptr,  # [B, N, C] int32, pre-filled with 0
    H,
    W,
    HC,
    WC,
    GW,
    N,
    C,
    P: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    lab, b, n, _ = _load_tile(labels_ptr, H, W, HC, WC, GW, P, BLOCK_Y, BLOCK_X)
    one = tl.full([BLOCK_Y, BLOCK_X], 1, tl.int32)
    cell = counts_ptr + (b * N + n) * C + lab  # [BLOCK_Y, BLOCK_X]
    tl.atomic_add(cell, one, mask=(lab >= 0) & (lab < C), sem="relaxed")


@triton.jit
def _argmax_kernel(
    counts_ptr,  # [R, C] int32, R = B * N patches
    out_ptr,  # [R] int64
    R,
    C,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] patches
    # Per lane (class id modulo BLOCK_C) the best count so far and its id; only a strictly
    # greater count replaces it, so each lane keeps its smallest id among ties.
    best_cnt = tl.full([BLOCK_R, BLOCK_C], -1, tl.int32)
    best_id = tl.zeros([BLOCK_R, BLOCK_C], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
        mask = (r < R)[:, None] & (cls < C)[None, :]
        cnt = tl.load(counts_ptr + r[:, None] * C + cls[None, :], mask=mask, other=-1)
        better = cnt > best_cnt
        best_cnt = tl.where(better, cnt, best_cnt)
        best_id = tl.where(better, cls[None, :], best_id)
    top = tl.max(best_cnt, axis=1)  # [BLOCK_R]
    winner = tl.min(tl.where(best_cnt == top[:, None], best_id, C), axis=1)  # smallest id at top
    tl.store(out_ptr + r, winner.to(tl.int64), mask=r < R)


# Autotuned twins for CUDA tensors only (the autotuner benchmarks on the GPU), keyed on what
# changes the best tile: the region's width and the class count for the pixel kernels, the
# class count for the argmax. Never the batch size.
def _pixel_configs() -> list[triton.Config]:
    tiles = ((4, 64, 2), (8, 64, 4), (4, 128, 4), (2, 256, 4), (8, 128, 8), (16, 64, 8))
    return [triton.Config({"BLOCK_Y": by, "BLOCK_X": bx}, num_warps=nw) for by, bx, nw in tiles]


_union_tuned = triton.autotune(_pixel_configs(), key=["WC", "C"])(_union_kernel)
_global_union_tuned = triton.autotune(_pixel_configs(), key=["WC", "C"])(_global_union_kernel)
# Benchmarking adds into counts again and again; reset_to_zero clears them (and any leftover
# would only scale every count, which leaves the argmax unchanged).
_count_tuned = triton.autotune(_pixel_configs(), key=["WC", "C"], reset_to_zero=["counts_ptr"])(_count_kernel)
_argmax_tuned = triton.autotune(
    [
        triton.Config({"BLOCK_R": br, "BLOCK_C": bc}, num_warps=nw)
        for br, bc, nw in ((16, 64, 4), (32, 64, 4), (8, 128, 4), (32, 128, 8), (64, 32, 4))
    ],
    key=["C"],
)(_argmax_kernel)

# Fixed tiles for the interpreter (CPU tensors): large, since it pays per program and per op.
# BLOCK_C = 64 < C = 151 / 183 keeps the argmax's class loop crossing blocks in the tests.
_CPU_PIXEL_TILE = {"BLOCK_Y": 64, "BLOCK_X": 128}
_CPU_ARGMAX_TILE = {"BLOCK_R": 128, "BLOCK_C": 64}


def label_pool_triton(
    labels: torch.Tensor,
    patch_size: int,
    num_classes: int,
    reduction: str = "union",
    out_dtype: torch.dtype = torch.float32,
    check: bool = False,
) -> torch.Tensor:
    """Launch the Triton kernels (CUDA tensors; CPU tensors need TRITON_INTERPRET=1).

    ``check=True`` raises ValueError for labels outside [0, C), at the cost of a host sync.
    """
    _check_args(labels, patch_size, num_classes, reduction, out_dtype)
    if check:
        _check_values(labels, num_classes)
    labels = labels.contiguous()
    b, h, w = labels.shape
    p, c = patch_size, num_classes
    gh, gw = h // p, w // p
    shape = _out_shape(labels, p, c, reduction)
    store_dtype = torch.uint8 if out_dtype == torch.bool else out_dtype  # bool: 0/1 bytes
    tuned = labels.is_cuda
    pixel_tile = {} if tuned else _CPU_PIXEL_TILE

    def grid(meta):  # (images, row tiles, column tiles) of the whole-patch region
        return (b, triton.cdiv(gh * p, meta["BLOCK_Y"]), triton.cdiv(gw * p, meta["BLOCK_X"]))

    if reduction == "union":
        out = torch.zeros(shape, dtype=store_dtype, device=labels.device)  # [B, N, C]
        out[:, :, 0] = 1  # every patch wholly unlabeled until a labelled pixel says otherwise
        kernel = _union_tuned if tuned else _union_kernel
        if b:
            kernel[grid](labels, out, h, w, gh * p, gw * p, gw, gh * gw, c, P=p, **pixel_tile)
        return out.view(out_dtype)
    if reduction == "global-union":
        out = torch.zeros(shape, dtype=store_dtype, device=labels.device)  # [B, C]
        kernel = _global_union_tuned if tuned else _global_union_kernel
        if b:
            kernel[grid](labels, out, h, w, gh * p, gw * p, gw, c, P=p, **pixel_tile)
        return out.view(out_dtype)
    counts = torch.zeros(b, gh * gw, c, dtype=torch.int32, device=labels.device)  # [B, N, C]
    out = torch.empty(shape, dtype=torch.int64, device=labels.device)  # [B, N]
    if b:
        kernel = _count_tuned if tuned else _count_kernel
        kernel[grid](labels, counts, h, w, gh * p, gw * p, gw, gh * gw, c, P=p, **pixel_tile)
        rows = b * gh * gw
        if tuned:
            _argmax_tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),)](counts, out, rows, c)
        else:
            tile = _CPU_ARGMAX_TILE
            _argmax_kernel[(triton.cdiv(rows, tile["BLOCK_R"]),)](counts, out, rows, c, **tile)
    return out


# ----------------------------------------------------------------------------- op


@torch.library.custom_op("fastloc::label_pool", mutates_args=())
def _label_pool_op(
    labels: torch.Tensor, patch_size: int, num_classes: int, reduction: str, out_dtype: torch.dtype, check: bool
) -> torch.Tensor:
    # Any device without its own kernel (the CPU): the reference, which always checks values.
    return label_pool_reference(labels, patch_size, num_classes, reduction, out_dtype)


@_label_pool_op.register_kernel("cuda")
def _label_pool_cuda(labels, patch_size, num_classes, reduction, out_dtype, check):
    return label_pool_triton(labels, patch_size, num_classes, reduction, out_dtype, check)


@_label_pool_op.register_fake
def _label_pool_fake(labels, patch_size, num_classes, reduction, out_dtype, check):
    _check_args(labels, patch_size, num_classes, reduction, out_dtype)
    dtype = torch.int64 if reduction == "majority" else out_dtype
    return labels.new_empty(_out_shape(labels, patch_size, num_classes, reduction), dtype=dtype)


def label_pool(
    labels: torch.Tensor,
    patch_size: int,
    num_classes: int,
    reduction: str = "union",
    out_dtype: torch.dtype = torch.float32,
    check: bool = False,
) -> torch.Tensor:
    """Pool label maps [B, H, W] per patch via the ``fastloc::label_pool`` op (see module doc).

    Returns union [B, N, C] / global-union [B, C] in ``out_dtype``, majority [B, N] int64.
    CPU tensors always have their values checked; CUDA tensors only with ``check=True``.
    """
    op = torch.ops.fastloc.label_pool
    return op(labels, patch_size, num_classes, reduction, out_dtype, check)
