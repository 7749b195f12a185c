"""Label pooling: Triton kernels (interpreted on CPU) == reference == original per-patch loop."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fastloc.kernels.label_pool import (
    LABEL_DTYPES,
    OUT_DTYPES,
    REDUCTIONS,
    label_pool,
    label_pool_loop,
    label_pool_reference,
    label_pool_triton,
)


def blocky_labels(shape, num_classes, dtype, seed, noise=0.02):
    """Label maps shaped like segmentations: constant regions, sparse noise, unlabeled (0) areas."""
    g = torch.Generator().manual_seed(seed)
    b, h, w = shape
    cell = int(torch.randint(1, 12, (1,), generator=g))
    ch, cw = -(-h // cell), -(-w // cell)

    def up(x):  # [B, ch, cw] -> [B, H, W], nearest
        return x.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :h, :w]

    lab = up(torch.randint(0, num_classes, (b, ch, cw), generator=g))
    speckle = torch.rand(b, h, w, generator=g) < noise
    lab = torch.where(speckle, torch.randint(0, num_classes, (b, h, w), generator=g), lab)
    lab[up(torch.rand(b, ch, cw, generator=g) < 0.3)] = 0  # whole unlabeled regions
    return lab.to(dtype)


def poisoned_empty(monkeypatch):
    """Make torch.empty return tensors full of -7 (never a valid output) for one call."""
    real = torch.empty

    def empty(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.fill_(-7 if out.dtype != torch.bool else True)

    monkeypatch.setattr(torch, "empty", empty)


# B, H, W, p, C, dtype: batch 1, grids 14x14 / 16x16 / 24x24 / 27x27 (6 px border), odd C,
# non-square maps with a border on both axes.
CASES = [
    (1, 224, 224, 16, 183, torch.uint8),  # 14 x 14
    (2, 224, 224, 14, 151, torch.int16),  # 16 x 16
    (1, 336, 336, 14, 37, torch.int32),  # 24 x 24
    (1, 384, 384, 14, 183, torch.int64),  # 27 x 27, 6 px border
    (2, 384, 384, 14, 2, torch.uint8),  # 27 x 27, two classes: many majority ties
    (3, 50, 37, 8, 37, torch.int64),  # 6 x 4, borders 2 and 5
    (1, 37, 53, 5, 151, torch.int16),  # 7 x 10, borders 2 and 3
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("b, h, w, p, c, dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernel_equals_reference(b, h, w, p, c, dtype, reduction, monkeypatch):
    labels = blocky_labels((b, h, w), c, dtype, seed=h * w + c, noise=0.05 if c > 2 else 0.5)
    want = label_pool_reference(labels, p, c, reduction)
    # union / global-union start from zeros by design (the kernels scatter ones); majority's
    # output comes from torch.empty, so poison it to prove every element is written.
    poisoned_empty(monkeypatch)
    got = label_pool_triton(labels, p, c, reduction)
    monkeypatch.undo()
    assert got.dtype == want.dtype and torch.equal(got, want)
    n = (h // p) * (w // p)
    assert got.shape == {"union": (b, n, c), "majority": (b, n), "global-union": (b, c)}[reduction]


# Triton's interpreter cannot run every dtype (triton 3.8's has no bf16 at all:
# "'InterpreterBuilder' object has no attribute 'get_bf16'"), and which ones it can changes
# between releases. So bf16 is tested on a GPU only, whatever the installed triton; the other
# output dtypes under the interpreter as well.
GPU_ONLY_OUT_DTYPES = (torch.bfloat16,)
INTERPRETER_OUT_DTYPES = tuple(d for d in OUT_DTYPES if d not in GPU_ONLY_OUT_DTYPES)


def check_out_dtype(out_dtype, reduction, device):
    labels = blocky_labels((2, 40, 37), 37, torch.uint8, seed=1).to(device)
    want = label_pool_reference(labels, 8, 37, reduction, out_dtype)
    got = label_pool_triton(labels, 8, 37, reduction, out_dtype)
    assert want.dtype == got.dtype == out_dtype and torch.equal(got, want)
    assert want.sum() > 0  # ones to compare, not an all-zero output


@pytest.mark.parametrize("out_dtype", INTERPRETER_OUT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["union", "global-union"])
def test_kernel_out_dtypes(out_dtype, reduction):
    check_out_dtype(out_dtype, reduction, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["union", "global-union"])
def test_gpu_kernel_out_dtypes(out_dtype, reduction):
    """Every output dtype, bf16 included, with the compiled kernel."""
    check_out_dtype(out_dtype, reduction, "cuda")


def test_every_out_dtype_is_tested_somewhere():
    assert set(INTERPRETER_OUT_DTYPES) | set(GPU_ONLY_OUT_DTYPES) == set(OUT_DTYPES)
    assert torch.float32 in INTERPRETER_OUT_DTYPES and torch.bfloat16 in OUT_DTYPES


@pytest.mark.parametrize("dtype", LABEL_DTYPES)
@pytest.mark.parametrize("seed", range(3))
def test_reference_equals_loop(dtype, seed):
    c = [2, 37, 183][seed]
    labels = blocky_labels((2, 45, 38), c, dtype, seed=seed, noise=[0.5, 0.05, 0.0][seed])
    for reduction in REDUCTIONS:
        assert torch.equal(label_pool_reference(labels, 7, c, reduction), label_pool_loop(labels, 7, c, reduction))


def test_union_class_zero_rule_matches_the_original_wording():
    """'0 only when every pixel is 0' == Patch-Seg's 'more than one distinct label -> y0 = 0'.

    Every 2x2 patch over the classes {0, 1, 2} (81 patches), one patch per label map.
    """
    patches = torch.cartesian_prod(*[torch.arange(3)] * 4).reshape(81, 2, 2)
    ref = label_pool_reference(patches, 2, 3, "union")[:, 0]  # [81, C]
    loop = label_pool_loop(patches, 2, 3, "union")[:, 0]
    assert torch.equal(ref, loop)
    all_zero = (patches == 0).flatten(1).all(1)
    assert torch.equal(ref[:, 0].bool(), all_zero)
    assert torch.equal(label_pool_triton(patches, 2, 3, "union")[:, 0], ref)


def test_small_examples_by_hand():
    # Two 2x2 patches side by side plus a 1 px border (class 3) on the right and bottom.
    labels = torch.tensor([[[0, 0, 0, 1, 3], [0, 0, 2, 2, 3], [3, 3, 3, 3, 3]]], dtype=torch.uint8)
    union = torch.tensor([[[1, 0, 0, 0], [0, 1, 1, 0]]], dtype=torch.float32)  # [B, N, C]
    majority = torch.tensor([[0, 2]])  # patch 2 holds 0, 1, 2, 2: majority 2
    global_union = torch.tensor([[1, 1, 1, 0]], dtype=torch.float32)  # border 3 dropped
    for fn in (label_pool_reference, label_pool_loop, label_pool_triton):
        assert torch.equal(fn(labels, 2, 4, "union"), union)
        assert torch.equal(fn(labels, 2, 4, "majority"), majority)
        assert torch.equal(fn(labels, 2, 4, "global-union"), global_union)


def test_majority_ties_go_to_the_smallest_id():
    assert int(torch.tensor([1, 5, 5, 2], dtype=torch.int32).argmax()) == 1  # first maximum
    # Patches with a two-way tie (3 vs 1, 0 vs 2), a four-way tie, and one with a clear winner.
    labels = torch.tensor([[[3, 3, 0, 2, 3, 2, 4, 4], [1, 1, 0, 2, 1, 0, 4, 2]]])
    want = torch.tensor([[1, 0, 0, 4]])
    for fn in (label_pool_reference, label_pool_loop, label_pool_triton):
        assert torch.equal(fn(labels, 2, 5, "majority"), want)
    # Ties across the kernel's class blocks (64 classes each on CPU), in other lanes of the
    # block (130 vs 5) and in the same lane (69 vs 5): the smallest id wins.
    labels = torch.tensor([[[130, 5, 69, 5], [130, 5, 69, 5]]])
    assert torch.equal(label_pool_triton(labels, 2, 151, "majority"), torch.tensor([[5, 5]]))


def test_global_union_counts_class_zero_whenever_present():
    labels = torch.full((1, 4, 4), 7)
    labels[0, 1, 1] = 0
    for fn in (label_pool_reference, label_pool_loop, label_pool_triton):
        assert fn(labels, 2, 8, "global-union")[0, 0] == 1
        assert fn(labels, 2, 8, "union")[0, :, 0].sum() == 0  # no patch is wholly unlabeled


def ade20k_labels(fixtures, size):
    """The SceneParsing validation label maps: largest centre crop, NEAREST resize -> [3, S, S]."""
    maps = []
    for path in sorted((fixtures / "ade20k-sceneparsing3/annotations/validation").glob("*.png")):
        image = Image.open(path)
        m = min(image.size)
        left, top = (image.width - m) // 2, (image.height - m) // 2
        image = image.crop((left, top, left + m, top + m)).resize((size, size), Image.NEAREST)
        maps.append(torch.from_numpy(np.array(image)))
    assert len(maps) == 3
    return torch.stack(maps)  # [3, S, S] uint8


@pytest.mark.parametrize("size, p", [(224, 16), (384, 14)])
def test_ade20k(fixtures, size, p):
    labels = ade20k_labels(fixtures, size)
    assert labels.dtype == torch.uint8 and labels.max() < 151
    for reduction in REDUCTIONS:
        want = label_pool_loop(labels, p, 151, reduction)
        assert torch.equal(label_pool_reference(labels, p, 151, reduction), want)
        assert torch.equal(label_pool_triton(labels, p, 151, reduction), want)
    union = label_pool_reference(labels, p, 151, "union")
    assert union[..., 1:].sum() > 0 and union.sum(-1).max() > 1  # real, mixed patches


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2),
    p=st.integers(2, 16),
    h_extra=st.integers(0, 49),
    w_extra=st.integers(0, 49),
    c=st.integers(2, 40),
    dtype=st.sampled_from(LABEL_DTYPES),
    seed=st.integers(0, 2**16),
    noise=st.sampled_from([0.0, 0.05, 0.5]),
)
def test_random_shapes(b, p, h_extra, w_extra, c, dtype, seed, noise):
    h, w = p + h_extra % (3 * p + 2), p + w_extra % (3 * p + 2)  # p .. 4p + 1
    labels = blocky_labels((b, h, w), c, dtype, seed, noise)
    for reduction in REDUCTIONS:
        want = label_pool_reference(labels, p, c, reduction)
        assert torch.equal(label_pool_triton(labels, p, c, reduction), want)
        assert torch.equal(label_pool_loop(labels, p, c, reduction), want)


@pytest.mark.parametrize("dtype, bad", [(torch.int16, -1), (torch.uint8, 37), (torch.int64, 1000)])
def test_out_of_range_labels_raise(dtype, bad):
    labels = torch.zeros(1, 8, 8, dtype=dtype)
    labels[0, 3, 4] = bad
    calls = [
        lambda: label_pool_reference(labels, 4, 37, "union"),
        lambda: label_pool_loop(labels, 4, 37, "majority"),
        lambda: label_pool(labels, 4, 37, "global-union"),  # the op's CPU path: always
        lambda: label_pool_triton(labels, 4, 37, "union", check=True),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=rf"\[0, 37\).*{bad}"):
            call()


@pytest.mark.parametrize("reduction", ["union", "global-union"])
def test_unchecked_out_of_range_labels_match_no_class(reduction):
    """GPU path with check=False: out-of-range pixels act as a class beyond C (no crash)."""
    labels = blocky_labels((2, 24, 20), 9, torch.int16, seed=5)
    labels[0, :6, :6], labels[1, 3:9, 10:13] = -3, 9  # a whole patch out of range, a partial one
    ghost = torch.where((labels < 0) | (labels >= 9), 9, labels)  # one extra class, C = 10
    want = label_pool_reference(ghost, 4, 10, reduction)[..., :9]
    assert torch.equal(label_pool_triton(labels, 4, 9, reduction), want)


def test_bad_arguments_raise():
    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="reduction"):
        label_pool(labels, 4, 3, "mode")
    with pytest.raises(ValueError, match="patch size"):
        label_pool_reference(labels, 9, 3)
    with pytest.raises(ValueError, match="labels"):
        label_pool_triton(labels.float(), 4, 3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(reduction):
    labels = blocky_labels((2, 20, 17), 11, torch.uint8, seed=3)
    for out_dtype in (torch.float32, torch.bool):
        torch.library.opcheck(torch.ops.fastloc.label_pool.default, (labels, 4, 11, reduction, out_dtype, False))


def test_compiled_equals_eager():
    def pool(labels):
        return (
            label_pool(labels, 7, 37, "union") * 2,
            label_pool(labels, 7, 37, "majority") + 1,
            label_pool(labels, 7, 37, "global-union", torch.bool),
        )

    labels = blocky_labels((2, 30, 23), 37, torch.int64, seed=4)
    compiled = torch.compile(pool, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(labels), pool(labels), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_kernel_equals_reference(reduction):
    for b, h, w, p, c, dtype in CASES + [(256, 224, 224, 16, 183, torch.uint8)]:
        labels = blocky_labels((b, h, w), c, dtype, seed=c, noise=0.05).cuda()
        for out_dtype in (torch.float32, torch.bfloat16, torch.bool):
            want = label_pool_reference(labels, p, c, reduction, out_dtype)
            assert torch.equal(label_pool_triton(labels, p, c, reduction, out_dtype), want)
            assert torch.equal(label_pool(labels, p, c, reduction, out_dtype), want)
    with pytest.raises(ValueError, match="num_classes"):
        label_pool(torch.full((1, 8, 8), 9, device="cuda"), 4, 5, reduction, check=True)
