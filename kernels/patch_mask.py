"""Patch masking for the MaskEmbed teacher: normalise + mask + repeat M times, in one pass.

Images [B, 3, H, W] (uint8 or float) and keep-masks [B, M, N] -> [B * M, 3, H, W] in the compute
dtype, a masked patch (and the pixels past the last whole patch) set to 0, the mean colour; the
semantics, the one normalization formula (``normalization_coefficients``, shared with the loaders)
and the byte-count floor are in the README ("Kernels"). Pieces: ``patch_mask`` (what callers use),
``patch_mask_reference`` (the spec and CPU implementation), ``patch_mask_triton`` (the launcher) and
the op ``torch.ops.fastloc.patch_mask`` (CUDA -> Triton, CPU -> reference; opaque to torch.compile).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = [
    "normalization_coefficients",
    "patch_mask",
    "patch_mask_reference",
    "patch_mask_triton",
]

IMAGE_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK_DTYPES = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
) + OUT_DTYPES  # 0/1 floats too


def normalization_coefficients(
    mean: Sequence[float], std: Sequence[float], image_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(offset, denom)``, float32 CPU tensors ``[3]``: ``y = (x - offset) / denom``.

    The reference uses these tensors; the launcher passes their ``tolist()`` (Python floats that
    hold the float32 values exactly) as float32 kernel arguments: the same numbers either way.
    """
    unit = 255.0 if image_dtype == torch.uint8 else 1.0  # the decoder's 0..255 pixels, or floats in [0, 1]
    offset = torch.tensor([unit * float(v) for v in mean], dtype=torch.float32)  # [3], products in float64
    denom = torch.tensor([unit * float(v) for v in std], dtype=torch.float32)  # [3]
    return offset, denom


def _check_inputs(images, masks, mean, std, patch_size, out_dtype) -> None:
    """Shape and dtype checks shared by the reference, the launcher and the fake implementation."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype not in IMAGE_DTYPES:
        raise ValueError(f"images must be uint8 or float, got {images.dtype}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {len(mean)} and {len(std)}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if masks.dtype not in MASK_DTYPES:
        raise ValueError(f"masks must be bool, integer or float 0/1, got {masks.dtype}")
    B, _, H, W = images.shape
    n_patches = (H // patch_size) * (W // patch_size)
    if masks.dim() != 3 or masks.shape[0] != B or masks.shape[2] != n_patches:
        raise ValueError(
            f"masks must be [B, M, N] = [{B}, M, {n_patches}] for images {tuple(images.shape)} "
            f"and patch size {patch_size} (N = (H // p) * (W // p)), got {tuple(masks.shape)}"
        )
    if masks.device != images.device:
        raise ValueError(f"masks are on {masks.device} but images on {images.device}")


def patch_mask_reference(
    images: torch.Tensor,  # [B, 3, H, W] uint8 (0..255) or float ([0, 1])
    masks: torch.Tensor,  # [B, M, N] bool / int / float, nonzero = keep
    mean: Sequence[float],
    std: Sequence[float],
    patch_size: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [B * M, 3, H, W] out_dtype
    """The spec, in plain torch (also the op's CPU implementation)."""
    _check_inputs(images, masks, mean, std, patch_size, out_dtype)
    B, _, H, W = images.shape
    M, p = masks.shape[1], patch_size
    gh, gw = H // p, W // p
    offset, denom = normalization_coefficients(mean, std, images.dtype)
    offset = offset.to(images.device).view(1, 3, 1, 1)
    denom = denom.to(images.device).view(1, 3, 1, 1)
    y = (images.float() - offset) / denom  # [B, 3, H, W] float32

    keep_grid = (masks != 0).view(B, M, gh, gw)
    keep = torch.zeros(B, M, H, W, dtype=torch.bool, device=images.device)  # border stays False
    keep[:, :, : gh * p, : gw * p] = keep_grid.repeat_interleave(p, 2).repeat_interleave(p, 3)
    out = torch.where(keep[:, :, None], y[:, None], 0.0)  # [B, M, 3, H, W]
    return out.to(out_dtype).reshape(B * M, 3, H, W)


@triton.jit
def _patch_mask_kernel(
    img_ptr,  # [B, 3, H, W] contiguous, uint8 or float
    mask_ptr,  # [B, M, N] contiguous, integer (bool viewed as uint8)
    out_ptr,  # [B * M, 3, H, W] contiguous, output dtype
    off0,
    off1,
    off2,  # float32 per-channel offset
    den0,
    den1,
    den2,  # float32 per-channel divisor
    M,
    H,
    W,
    N,
    GH,
    GW,  # runtime sizes; GH, GW = H // P, W // P
    P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program: BLOCK pixels of one (b, c) plane; read once, written M times.
    pid_bc = tl.program_id(0)  # b * 3 + c
    pid_s = tl.program_id(1)
    b = pid_bc // 3
    c = pid_bc % 3
    HW = H * W
    offs = pid_s * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] pixel index in the plane
    in_plane = offs < HW
    row = offs // W
    col = offs % W
    # Pixels right of / below the last whole patch never keep: their mask load is skipped.
    in_grid = in_plane & (row < GH * P) & (col < GW * P)
    patch = (row // P) * GW + col // P  # [BLOCK] patch index n

    offset = tl.where(c == 0, off0, tl.where(c == 1, off1, off2))
    denom = tl.where(c == 0, den0, tl.where(c == 1, den1, den2))
    x = tl.load(img_ptr + pid_bc.to(tl.int64) * HW + offs, mask=in_plane, other=0)
    y = tl.math.div_rn(x.to(tl.float32) - offset, denom)  # [BLOCK] float32, correctly rounded as torch

    for m in range(M):
        keep = tl.load(mask_ptr + (b * M + m).to(tl.int64) * N + patch, mask=in_grid, other=0)
        val = tl.where(keep != 0, y, 0.0)
        out_plane = ((b * M + m) * 3 + c).to(tl.int64) * HW
        tl.store(out_ptr + out_plane + offs, val.to(out_ptr.dtype.element_ty), mask=in_plane)


# For CUDA tensors only: Triton's autotuner times configs on the GPU. Keyed on the image size
# (the work per program and the number of programs per plane); never on B, which changes every
# last batch. Argument dtypes (uint8 vs float in, fp32 vs bf16 out) are part of the key anyway.
_patch_mask_kernel_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in ((512, 4), (1024, 4), (2048, 8), (4096, 8))
    ],
    key=["H", "W"],
)(_patch_mask_kernel)

# Fixed block for CPU tensors under TRITON_INTERPRET=1 (no GPU to tune on); bigger is faster
# there, since the interpreter's cost is mostly per program.
_INTERPRET_BLOCK = 4096


def patch_mask_triton(
    images: torch.Tensor,  # [B, 3, H, W] uint8 or float
    masks: torch.Tensor,  # [B, M, N] bool / int, nonzero = keep
    mean: Sequence[float],
    std: Sequence[float],
    patch_size: int,
    out_dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,  # [B * M, 3, H, W] contiguous, out_dtype: written in full
) -> torch.Tensor:  # [B * M, 3, H, W] out_dtype
    """Launch the Triton kernel: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

    Non-contiguous inputs are made contiguous first (a copy; the decoder's output and the mask
    sampler's are contiguous already). Bool masks are reinterpreted as uint8 without a copy; float
    masks become uint8 (``mask != 0``, a small copy).
    ``out``, when given, is overwritten entirely (every element, border and masked pixels too).
    """
    _check_inputs(images, masks, mean, std, patch_size, out_dtype)
    B, _, H, W = images.shape
    M, N, p = masks.shape[1], masks.shape[2], patch_size
    images = images.contiguous()
    masks = masks.contiguous()
    if masks.is_floating_point():
        masks = masks != 0
    if masks.dtype == torch.bool:
        masks = masks.view(torch.uint8)
    shape = (B * M, 3, H, W)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=images.device)
    elif out.shape != shape or out.dtype != out_dtype or out.device != images.device:
        raise ValueError(
            f"out must be {list(shape)} {out_dtype} on {images.device}, "
            f"got {list(out.shape)} {out.dtype} on {out.device}"
        )
    elif not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if out.numel() == 0:
        return out
    offset, denom = normalization_coefficients(mean, std, images.dtype)
    args = (images, masks, out, *offset.tolist(), *denom.tolist(), M, H, W, N, H // p, W // p)
    if images.is_cuda:

        def grid(meta):
            return (B * 3, triton.cdiv(H * W, meta["BLOCK"]))

        with torch.cuda.device(images.device):
            _patch_mask_kernel_tuned[grid](*args, P=p)
    else:
        grid = (B * 3, triton.cdiv(H * W, _INTERPRET_BLOCK))
        _patch_mask_kernel[grid](*args, P=p, BLOCK=_INTERPRET_BLOCK)
    return out


# The op. No autograd formula: the teacher's input carries no gradient (images come from the
# decoder, masks from the sampler), so none is registered.
@torch.library.custom_op("fastloc::patch_mask", mutates_args=(), device_types="cpu")
def _patch_mask_op(
    images: torch.Tensor,
    masks: torch.Tensor,
    mean: list[float],
    std: list[float],
    patch_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return patch_mask_reference(images, masks, mean, std, patch_size, out_dtype)


@_patch_mask_op.register_kernel("cuda")
def _patch_mask_op_cuda(images, masks, mean, std, patch_size, out_dtype):
    return patch_mask_triton(images, masks, mean, std, patch_size, out_dtype)


@_patch_mask_op.register_fake
def _patch_mask_op_fake(images, masks, mean, std, patch_size, out_dtype):
    _check_inputs(images, masks, mean, std, patch_size, out_dtype)
    B, _, H, W = images.shape
    return images.new_empty((B * masks.shape[1], 3, H, W), dtype=out_dtype)


def patch_mask(
    images: torch.Tensor,  # [B, 3, H, W] uint8 (0..255) or float ([0, 1])
    masks: torch.Tensor,  # [B, M, N] bool / int / float, nonzero = keep
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    patch_size: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [B * M, 3, H, W] out_dtype
    """Normalise with the backbone's mean/std and mask each image under its M keep-masks.

    Calls ``torch.ops.fastloc.patch_mask`` (CUDA: the Triton kernel; CPU: the reference).
    Pass mean/std as Python floats (e.g. timm's ``pretrained_cfg``); a tensor is read back to the
    host (its float32 values, which differ from the floats it was made from), which syncs, and
    breaks a ``torch.compile`` graph.
    """
    if isinstance(mean, torch.Tensor):
        mean = mean.tolist()
    if isinstance(std, torch.Tensor):
        std = std.tolist()
    return torch.ops.fastloc.patch_mask(
        images, masks, [float(v) for v in mean], [float(v) for v in std], patch_size, out_dtype
    )
