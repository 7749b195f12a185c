"""Patch masking: the Triton kernel (interpreted on CPU tensors) against its torch reference.

tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, so ``patch_mask_triton``
runs the kernel in Triton's interpreter here. The interpreter mishandles bf16, so bf16 output is
compared with the kernel only on a GPU (``-m gpu``); on the CPU its shape, dtype and values are
checked through the reference and the op.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastloc.kernels.patch_mask import (
    normalization_coefficients,
    patch_mask,
    patch_mask_reference,
    patch_mask_triton,
)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def make_inputs(B, M, H, W, p, dtype, seed=0, mask_dtype=torch.bool):
    """Random images ([B, 3, H, W] uint8 0..255 or float in [0, 1]) and keep-masks [B, M, N]."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (B, 3, H, W), generator=gen, dtype=torch.uint8)
    else:
        images = torch.rand(B, 3, H, W, generator=gen).to(dtype)
    masks = torch.rand(B, M, (H // p) * (W // p), generator=gen) < 0.5  # [B, M, N]
    return images, masks.to(mask_dtype)


def run_kernel_poisoned(images, masks, mean, std, p):
    """The kernel into a NaN-filled buffer: an element it fails to write stays NaN."""
    B, _, H, W = images.shape
    out = torch.full((B * masks.shape[1], 3, H, W), float("nan"))
    result = patch_mask_triton(images, masks, mean, std, p, torch.float32, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), "the kernel left output elements unwritten"
    return out


# ----------------------------------------------------------------- kernel == reference


# (B, M, H, W, p): 14x14, 16x16, 24x24 and 27x27 grids (384 / 14 leaves a 6 px border),
# non-square with a border on both axes, batch 1, M = 1 and 3.
SHAPES = [
    pytest.param(1, 3, 224, 224, 16, id="14x14-p16-b1"),
    pytest.param(2, 3, 224, 224, 14, id="16x16-p14"),
    pytest.param(1, 1, 336, 336, 14, id="24x24-p14-b1-m1"),
    pytest.param(1, 3, 384, 384, 14, id="27x27-p14-border6-b1"),
    pytest.param(2, 2, 61, 45, 8, id="7x5-p8-border-both-axes"),
    pytest.param(3, 1, 20, 33, 16, id="1x2-p16-border-both-axes"),
]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=["uint8", "float32"])
@pytest.mark.parametrize("B, M, H, W, p", SHAPES)
def test_kernel_matches_reference(B, M, H, W, p, dtype):
    images, masks = make_inputs(B, M, H, W, p, dtype, seed=B * 1000 + H)
    out = run_kernel_poisoned(images, masks, CLIP_MEAN, CLIP_STD, p)
    ref = patch_mask_reference(images, masks, CLIP_MEAN, CLIP_STD, p, torch.float32)
    assert torch.equal(out, ref)
    # The masked and border pixels are really there to compare: not all kept, not all masked.
    assert (ref == 0).any() and (ref != 0).any()


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int32, torch.int64])
def test_kernel_integer_masks(mask_dtype):
    """Integer masks: any nonzero value keeps (here 0 / 1 / 7)."""
    images, masks = make_inputs(2, 3, 30, 30, 6, torch.uint8, seed=3, mask_dtype=torch.int64)
    masks = masks * torch.randint(1, 8, masks.shape, generator=torch.Generator().manual_seed(4))
    masks = masks.to(mask_dtype)
    out = run_kernel_poisoned(images, masks, SIGLIP_MEAN, SIGLIP_STD, 6)
    ref = patch_mask_reference(images, masks != 0, SIGLIP_MEAN, SIGLIP_STD, 6)
    assert torch.equal(out, ref)
    assert torch.equal(patch_mask_reference(images, masks, SIGLIP_MEAN, SIGLIP_STD, 6), ref)


def test_kernel_non_contiguous_inputs():
    """Channels-last images and a strided mask view are made contiguous by the launcher."""
    images, masks = make_inputs(2, 4, 28, 28, 7, torch.uint8, seed=5)
    images = images.to(memory_format=torch.channels_last)
    masks = masks[:, ::2]  # [2, 2, 16], not contiguous
    out = run_kernel_poisoned(images, masks, CLIP_MEAN, CLIP_STD, 7)
    assert torch.equal(out, patch_mask_reference(images, masks, CLIP_MEAN, CLIP_STD, 7))


def test_kernel_all_kept_and_all_masked():
    images, _ = make_inputs(1, 1, 32, 32, 8, torch.uint8, seed=6)
    masks = torch.tensor([[0] * 16, [1] * 16], dtype=torch.bool)[None]  # [1, 2, 16]
    out = run_kernel_poisoned(images, masks, CLIP_MEAN, CLIP_STD, 8)
    assert torch.equal(out[0], torch.zeros(3, 32, 32))
    assert torch.equal(out, patch_mask_reference(images, masks, CLIP_MEAN, CLIP_STD, 8))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3),
    M=st.integers(1, 3),
    p=st.integers(2, 16),
    gh=st.integers(1, 5),
    gw=st.integers(1, 5),
    border_h=st.integers(0, 15),
    border_w=st.integers(0, 15),
    uint8=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_matches_reference_random_shapes(B, M, p, gh, gw, border_h, border_w, uint8, seed):
    H, W = gh * p + border_h % p, gw * p + border_w % p  # p..5p+(p-1): borders of any width
    dtype = torch.uint8 if uint8 else torch.float32
    images, masks = make_inputs(B, M, H, W, p, dtype, seed=seed)
    out = run_kernel_poisoned(images, masks, CLIP_MEAN, CLIP_STD, p)
    assert torch.equal(out, patch_mask_reference(images, masks, CLIP_MEAN, CLIP_STD, p))


# ----------------------------------------------------------------- the reference (the spec)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=["uint8", "float32"])
def test_reference_semantics_by_loop(dtype):
    """An independent pixel loop: kept -> normalised, masked -> 0, border -> 0, row b * M + m."""
    B, M, H, W, p = 2, 3, 8, 11, 3  # 2 x 3 grid; 2 border rows, 2 border columns
    gh, gw = H // p, W // p
    images, masks = make_inputs(B, M, H, W, p, dtype, seed=7)
    out = patch_mask_reference(images, masks, CLIP_MEAN, CLIP_STD, p)
    assert out.shape == (B * M, 3, H, W) and out.dtype == torch.float32
    offset, denom = normalization_coefficients(CLIP_MEAN, CLIP_STD, dtype)
    pixel_max = 255.0 if dtype == torch.uint8 else 1.0
    for b in range(B):
        for m in range(M):
            for c in range(3):
                for i in range(H):
                    for j in range(W):
                        got = out[b * M + m, c, i, j]
                        inside = i < gh * p and j < gw * p
                        if not (inside and masks[b, m, (i // p) * gw + j // p]):
                            assert got.item() == 0.0 and not got.signbit()
                            continue
                        x = images[b, c, i, j]
                        exact = (x.float() - offset[c]) / denom[c]  # the defined rounding
                        assert got.item() == exact.item()
                        textbook = (x.item() / pixel_max - CLIP_MEAN[c]) / CLIP_STD[c]
                        assert math.isclose(got.item(), textbook, rel_tol=1e-6, abs_tol=1e-6)


def test_normalization_is_the_loaders_and_close_to_the_textbook_formula():
    """(x - offset) / denom is timm's prefetcher's (x - 255 mean) / (255 std) with float32
    coefficients, the loaders' ``normalize`` bit for bit, and (x / 255 - mean) / std up to float32
    rounding, for all 256 values."""
    from fastloc.data.transforms import normalize

    for mean, std in ((CLIP_MEAN, CLIP_STD), (SIGLIP_MEAN, SIGLIP_STD)):
        x = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)
        offset, denom = normalization_coefficients(mean, std, torch.uint8)
        ours = (x.float() - offset.view(3, 1, 1)) / denom.view(1, 3, 1, 1)[0]
        prefetcher = (x.float() - torch.tensor([v * 255 for v in mean]).view(3, 1, 1)) / torch.tensor(
            [v * 255 for v in std]
        ).view(3, 1, 1)  # timm.data.loader.PrefetchLoader
        assert torch.equal(ours, prefetcher) and torch.equal(normalize(x[None], mean, std)[0], ours)
        masked = patch_mask_reference(x.reshape(1, 3, 16, 16), torch.ones(1, 1, 1, dtype=torch.bool), mean, std, 16)
        assert torch.equal(masked.reshape(3, 1, 256), ours)
        mean64 = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
        std64 = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
        textbook = (x.double() / 255 - mean64) / std64
        assert (ours.double() - textbook).abs().max() < 4 * 2.0**-23 * textbook.abs().max()


def test_reference_bf16_output():
    """bf16 = the float32 result rounded once (the kernel: on a GPU, see the gpu test)."""
    images, masks = make_inputs(2, 3, 30, 32, 8, torch.uint8, seed=8)
    ref32 = patch_mask_reference(images, masks, CLIP_MEAN, CLIP_STD, 8)
    ref16 = patch_mask_reference(images, masks, CLIP_MEAN, CLIP_STD, 8, torch.bfloat16)
    assert ref16.dtype == torch.bfloat16 and ref16.shape == (6, 3, 30, 32)
    assert torch.equal(ref16, ref32.to(torch.bfloat16))
    op16 = patch_mask(images, masks, CLIP_MEAN, CLIP_STD, 8, torch.bfloat16)
    assert op16.dtype == torch.bfloat16 and torch.equal(op16, ref16)


# ----------------------------------------------------------------- the op


def test_op_on_cpu_is_the_reference():
    images, masks = make_inputs(2, 3, 40, 44, 14, torch.uint8, seed=9)
    ref = patch_mask_reference(images, masks, CLIP_MEAN, CLIP_STD, 14)
    assert torch.equal(patch_mask(images, masks, CLIP_MEAN, CLIP_STD, 14), ref)
    mean_t, std_t = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)  # tensors are accepted: their float32 values
    by_value = patch_mask_reference(images, masks, mean_t.tolist(), std_t.tolist(), 14)
    assert torch.equal(patch_mask(images, masks, mean_t, std_t, 14), by_value)
    direct = torch.ops.fastloc.patch_mask(images, masks, list(CLIP_MEAN), list(CLIP_STD), 14, torch.float32)
    assert torch.equal(direct, ref)


@pytest.mark.parametrize(
    "B, M, H, W, p, dtype, out_dtype",
    [
        (2, 3, 30, 33, 7, torch.uint8, torch.float32),
        (1, 1, 28, 28, 14, torch.float32, torch.bfloat16),
        (3, 2, 17, 9, 4, torch.uint8, torch.bfloat16),
    ],
)
def test_opcheck(B, M, H, W, p, dtype, out_dtype):
    images, masks = make_inputs(B, M, H, W, p, dtype, seed=10)
    args = (images, masks, list(CLIP_MEAN), list(CLIP_STD), p, out_dtype)
    torch.library.opcheck(torch.ops.fastloc.patch_mask.default, args)


def test_op_under_torch_compile():
    """The op inside a fullgraph-compiled function, with tensor code around it, == eager.

    The surrounding arithmetic is exact in float32 (x2, -1, max), so the comparison is bit for
    bit whatever the compiler fuses.
    """

    def teacher_input(images, random_masks):  # [B, 3, H, W], [B, 1, N]
        ones = torch.ones_like(random_masks)
        masks = torch.cat([random_masks, ~random_masks, ones], dim=1)  # [B, 3, N]
        x = patch_mask(images, masks, CLIP_MEAN, CLIP_STD, 7, torch.float32)  # [B * 3, 3, H, W]
        return x * 2.0 - 1.0, x.amax(dim=(1, 2, 3))

    images, masks = make_inputs(2, 1, 30, 33, 7, torch.uint8, seed=11)
    compiled = torch.compile(teacher_input, fullgraph=True)
    for got, want in zip(compiled(images, masks), teacher_input(images, masks), strict=True):
        assert torch.equal(got, want)


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [patch_mask_reference, patch_mask_triton, patch_mask])
def test_clear_errors(fn):
    images, masks = make_inputs(2, 3, 28, 28, 14, torch.uint8)  # N = 4
    with pytest.raises(ValueError, match=r"masks must be \[B, M, N\] = \[2, M, 4\]"):
        fn(images, masks[..., :3], CLIP_MEAN, CLIP_STD, 14)
    with pytest.raises(ValueError, match=r"masks must be \[B, M, N\]"):
        fn(images, masks[:1], CLIP_MEAN, CLIP_STD, 14)  # batch mismatch
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        fn(images[:, :1], masks, CLIP_MEAN, CLIP_STD, 14)  # one channel
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        fn(images, masks, CLIP_MEAN[:2], CLIP_STD, 14)
    with pytest.raises(ValueError, match="out_dtype"):
        fn(images, masks, CLIP_MEAN, CLIP_STD, 14, torch.int32)


def test_launcher_rejects_wrong_out_buffer():
    images, masks = make_inputs(1, 2, 28, 28, 14, torch.uint8)
    with pytest.raises(ValueError, match="out must be"):
        patch_mask_triton(images, masks, CLIP_MEAN, CLIP_STD, 14, out=torch.empty(1, 3, 28, 28))


# ----------------------------------------------------------------- GPU (bf16 included)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, M, H, W, p", [(256, 3, 224, 224, 16), (5, 3, 384, 384, 14), (1, 1, 61, 45, 8)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=["uint8", "float32"])
def test_gpu_kernel_matches_reference(B, M, H, W, p, dtype, out_dtype):
    """On CUDA: the autotuned kernel (and the op, which dispatches to it) == the reference."""
    images, masks = make_inputs(B, M, H, W, p, dtype, seed=12)
    images, masks = images.cuda(), masks.cuda()
    ref = patch_mask_reference(images, masks, CLIP_MEAN, CLIP_STD, p, out_dtype)
    out = patch_mask_triton(images, masks, CLIP_MEAN, CLIP_STD, p, out_dtype)
    assert torch.equal(out, ref)
    assert torch.equal(patch_mask(images, masks, CLIP_MEAN, CLIP_STD, p, out_dtype), ref)
    assert torch.equal(ref.cpu(), patch_mask_reference(images.cpu(), masks.cpu(), CLIP_MEAN, CLIP_STD, p, out_dtype))


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_masks_are_keep_masks(mask_dtype):
    """0/1 float masks, as the reference's sampler makes them, mask exactly as bool masks do."""
    images, masks = make_inputs(2, 3, 24, 20, 4, torch.uint8, seed=12)
    expect = patch_mask_reference(images, masks, CLIP_MEAN, CLIP_STD, 4)
    floats = masks.to(mask_dtype)
    assert torch.equal(patch_mask_reference(images, floats, CLIP_MEAN, CLIP_STD, 4), expect)
    assert torch.equal(patch_mask(images, floats, CLIP_MEAN, CLIP_STD, 4), expect)
    assert torch.equal(patch_mask_triton(images, floats, CLIP_MEAN, CLIP_STD, 4), expect)
