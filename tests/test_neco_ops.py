"""NeCo's soft sort and loss, and DINOv3's Gram term, against the references' own lines on identical inputs.

The references are not installed; each ``reference_*`` function below is a transcription of the cited
lines: Felix-Petersen/diffsort @ 5c417ea (diffsort/networks.py, diffsort/functional.py), vpariza/NeCo
@ 3932160 (src/neco.py) and facebookresearch/dinov3 @ 6876159 (dinov3/loss/gram_loss.py). Where a
reference draws at random (NeCo's reference set), the draw is replaced by an injected one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from fastloc.align.gram import gram_loss
from fastloc.align.neco_ops import neco_loss, neco_pair_loss, rank_matrices, reference_cells, teacher_cells
from fastloc.align.sorting import soft_sort_permutation

# ---------------------------------------------------------------- diffsort (networks.py, functional.py)


def reference_bitonic_network(n):
    """networks.py 6-52, verbatim but for names."""
    identity_map_factor = 0.5
    num_blocks = math.ceil(np.log2(n))
    assert n <= 2**num_blocks
    network = []
    for block_idx in range(num_blocks):
        for layer_idx in range(block_idx + 1):
            m = 2 ** (block_idx - layer_idx)
            split_a, split_b = np.zeros((n, 2**num_blocks)), np.zeros((n, 2**num_blocks))
            combine_min, combine_max = np.zeros((2**num_blocks, n)), np.zeros((2**num_blocks, n))
            count = 0
            for i in range(0, 2**num_blocks, 2 * m):
                for j in range(m):
                    ix = i + j
                    a, b = ix, ix + m
                    if a >= 2**num_blocks - n and b >= 2**num_blocks - n:
                        split_a[count, a], split_b[count, b] = 1, 1
                        if (ix // 2 ** (block_idx + 1)) % 2 == 1:
                            a, b = b, a
                        combine_min[a, count], combine_max[b, count] = 1, 1
                        count += 1
                    elif a < 2**num_blocks - n and b < 2**num_blocks - n:
                        pass
                    elif a >= 2**num_blocks - n and b < 2**num_blocks - n:
                        split_a[count, a], split_b[count, a] = 1, 1
                        combine_min[a, count], combine_max[a, count] = identity_map_factor, identity_map_factor
                        count += 1
                    elif a < 2**num_blocks - n and b >= 2**num_blocks - n:
                        split_a[count, b], split_b[count, b] = 1, 1
                        combine_min[b, count], combine_max[b, count] = identity_map_factor, identity_map_factor
                        count += 1
            split_a = split_a[:count, 2**num_blocks - n :]
            split_b = split_b[:count, 2**num_blocks - n :]
            combine_min = combine_min[2**num_blocks - n :, :count]
            combine_max = combine_max[2**num_blocks - n :, :count]
            network.append((split_a, split_b, combine_min, combine_max))
    return network


def reference_odd_even_network(n):
    """networks.py 55-107, verbatim but for names (the two even-and-shifted corner blocks as a loop)."""
    network = []
    shifted = False
    even = n % 2 == 0
    for _layer in range(n):
        k = n // 2 + shifted if even else n // 2 + 1
        split_a, split_b = np.zeros((k, n)), np.zeros((k, n))
        combine_min, combine_max = np.zeros((n, k)), np.zeros((n, k))
        count = 0
        for i in range(int(shifted), n - 1, 2):
            a, b = i, i + 1
            split_a[count, a], split_b[count, b] = 1, 1
            combine_min[a, count], combine_max[b, count] = 1, 1
            count += 1
        if even and shifted:
            for a in (0, n - 1):  # lines 84-91
                split_a[count, a], split_b[count, a] = 1, 1
                combine_min[a, count], combine_max[a, count] = 0.5, 0.5
                count += 1
        elif not even:
            a = 0 if shifted else n - 1
            split_a[count, a], split_b[count, a] = 1, 1
            combine_min[a, count], combine_max[a, count] = 0.5, 0.5
            count += 1
        assert count == k
        network.append((split_a, split_b, combine_min, combine_max))
        shifted = not shifted
    return network


def reference_alpha(a, b, steepness, distribution):
    """functional.py 44-68 (logistic, gaussian, reciprocal, cauchy); NormalCDF's forward (13-16)."""
    if distribution == "logistic":
        return torch.sigmoid((b - a) * steepness)
    if distribution == "gaussian":
        return 0.5 + 0.5 * torch.erf((b - a) / (1 / steepness) / math.sqrt(2))
    v = steepness * (b - a)
    if distribution == "reciprocal":
        return 0.5 * (v / (2 + v.abs()) + 1)
    return 1 / math.pi * torch.atan(v) + 0.5  # cauchy


def reference_execute_sort(network, vectors, steepness, distribution="cauchy"):
    """functional.py 23-79, with get_sorting_network's float matrices (networks.py 110-119) in x's dtype."""
    x = vectors
    X = torch.eye(vectors.shape[1], dtype=x.dtype, device=x.device).repeat(x.shape[0], 1, 1)
    for split_a, split_b, combine_min, combine_max in network:
        split_a, split_b, combine_min, combine_max = (
            torch.from_numpy(m).float().type(x.dtype) for m in (split_a, split_b, combine_min, combine_max)
        )
        a, b = x @ split_a.T, x @ split_b.T
        alpha = reference_alpha(a, b, steepness, distribution)
        aX = X @ split_a.T
        bX = X @ split_b.T
        w_min = alpha.unsqueeze(-2) * aX + (1 - alpha).unsqueeze(-2) * bX
        w_max = (1 - alpha).unsqueeze(-2) * aX + alpha.unsqueeze(-2) * bX
        X = (w_max @ combine_max.T.unsqueeze(-3)) + (w_min @ combine_min.T.unsqueeze(-3))
        x = (alpha * a + (1 - alpha) * b) @ combine_min.T + ((1 - alpha) * a + alpha * b) @ combine_max.T
    return x, X


def reference_sorter(network_type, size, steepness, distribution="cauchy"):
    """DiffSortNet(network_type, size, steepness=...) (diffsort.py 19-53): forward returns (x, X)."""
    network = (reference_bitonic_network if network_type == "bitonic" else reference_odd_even_network)(size)
    return lambda vectors: reference_execute_sort(network, vectors, steepness, distribution)


def tied_scores(rows: int, n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Random scores on a coarse grid (many exact ties), a third of each row copied from another third."""
    g = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(rows, n, generator=g, dtype=dtype) * 8) / 8
    third = n // 3
    x[:, :third] = x[:, third : 2 * third]
    return x


def sort_both(network, n, steepness, relaxation, x):
    """Our P and diffsort's P for x, and both gradients of one random linear read-out of P."""
    weights = torch.randn(x.shape[0], n, n, generator=torch.Generator().manual_seed(n), dtype=x.dtype)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    p = soft_sort_permutation(ours, steepness, network, relaxation)
    _, p_ref = reference_sorter(network, n, steepness, relaxation)(theirs)
    (p * weights).sum().backward()
    (p_ref * weights).sum().backward()
    return p, p_ref, ours.grad, theirs.grad


@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
@pytest.mark.parametrize("n", [2, 5, 12, 49])
def test_soft_sort_is_diffsorts_permutation_matrix_with_its_gradient(network, n):
    # fp64: the two formulations agree to rounding; fp32 amplifies rounding near ties (both do,
    # each about 3e-5 from the fp64 result at n = 49), so fp32 is checked at that scale.
    x = tied_scores(40, n, seed=n)
    p, p_ref, grad, grad_ref = sort_both(network, n, 100.0, "cauchy", x)
    assert p.dtype == torch.float64
    torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-9)
    p32, p32_ref, grad32, grad32_ref = sort_both(network, n, 100.0, "cauchy", x.float())
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32, p32_ref, rtol=0, atol=2e-4)
    torch.testing.assert_close(grad32, grad32_ref, rtol=1e-3, atol=2e-3 * grad32_ref.abs().max().item())


@pytest.mark.parametrize("relaxation", ["logistic", "gaussian", "reciprocal"])
def test_the_other_relaxations_are_diffsorts(relaxation):
    x = tied_scores(30, 13, seed=3)
    p, p_ref, grad, grad_ref = sort_both("bitonic", 13, 20.0, relaxation, x)
    torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-9)


def test_soft_sort_is_doubly_stochastic_and_sorts_ascending():
    x = torch.randn(64, 49, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = soft_sort_permutation(x, 1e6)  # steep: close to the hard permutation
    torch.testing.assert_close(p.sum(1), torch.ones(64, 49, dtype=torch.float64))
    torch.testing.assert_close(p.sum(2), torch.ones(64, 49, dtype=torch.float64))
    torch.testing.assert_close(torch.einsum("ni,nic->nc", x, p), x.sort(dim=1).values, rtol=0, atol=1e-3)
    assert torch.equal(p.argmax(1), x.argsort(dim=1))  # P[i, c]: element i at rank c
    bf16 = soft_sort_permutation(x.bfloat16(), 100.0)
    assert bf16.dtype == torch.float32  # half precision sorts in fp32


def test_a_first_sort_under_inference_mode_does_not_break_training():
    with torch.inference_mode():  # the cached network is built here first (an odd n no other test uses)
        soft_sort_permutation(torch.randn(3, 11), 10.0, "odd_even")
    x = torch.randn(3, 11, requires_grad=True)
    soft_sort_permutation(x, 10.0, "odd_even").square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"network": "bubble"}, r"network must be one of \('bitonic', 'odd_even'\), got 'bubble'"),
        ({"relaxation": "optimal"}, r"relaxation must be one of .*got 'optimal'"),
        ({"steepness": 0.0}, "steepness must be a positive finite number, got 0.0"),
        ({"steepness": math.nan}, "steepness must be a positive finite number, got nan"),
        ({"x": torch.zeros(5)}, r"x must be \[N, n\] with n >= 1, got shape \(5,\)"),
    ],
)
def test_soft_sort_refuses_bad_options_in_one_line(kwargs, message):
    args = {"x": torch.zeros(2, 4), "steepness": 100.0} | kwargs
    with pytest.raises(ValueError, match=f"^soft_sort_permutation: {message}$"):
        soft_sort_permutation(**args)


# ---------------------------------------------------------------- NeCo (src/neco.py)


def reference_knn_perm_mat(spatial_emb_src, spatial_emb_tgt, sorter):
    """neco.py 370-386 with sim_dist 'cosine'."""
    bs, d, ps, ps2 = spatial_emb_src.shape
    assert ps == ps2
    src = spatial_emb_src.permute(0, 2, 3, 1).reshape(bs, ps * ps, d)
    tgt = spatial_emb_tgt.permute(0, 2, 3, 1).reshape(bs, ps * ps, d)
    dist = torch.einsum("bhc,bwc->bhw", F.normalize(src, dim=-1), F.normalize(tgt, dim=-1))
    dist = dist.reshape(-1, dist.shape[-1])
    _, perm_mat_teacher = sorter(dist)
    return perm_mat_teacher.reshape(bs, ps, ps, ps * ps, ps * ps).permute(0, 4, 3, 1, 2)


def reference_knn_subloss(q, p, thresholded_mask, crop_idx, n_crops):
    """neco.py 389-407 (np.sum(self.nmb_crops) = n_crops)."""
    if thresholded_mask is not None:
        mask = thresholded_mask[crop_idx::n_crops].squeeze().float().unsqueeze(1)
        if torch.sum(mask).item() != 0:
            mask = torch.repeat_interleave(mask, q.shape[2], dim=1)
            return -torch.sum(torch.sum(q * torch.log(p), dim=1) * mask) / torch.sum(mask)
        return 0.0
    return -torch.mean(torch.sum(q * torch.log(p), dim=1))


def reference_knn_loss(gc_teacher_emb, gc_student_emb, lc_student_emb, bboxes, bs, gc_spatial_res,
                       lc_spatial_res, nmb_crops, patch_size, student_sorter, teacher_sorter, draw,
                       attn_hard=None, kernel=7):  # fmt: skip
    """neco.py 409-484 with self's fields as arguments (crops_for_assign = range(nmb_crops[0])). The
    reference set's random draw (454-473) is ``draw(i, position of v among the views != crop_id,
    aligned_emb_gc_sel)``."""
    n_crops = int(np.sum(nmb_crops))
    loss = 0
    for i, crop_id in enumerate(range(nmb_crops[0])):
        emb_gc = gc_teacher_emb[bs * gc_spatial_res**2 * crop_id : bs * gc_spatial_res**2 * (crop_id + 1)]
        emb_gc_reshaped = emb_gc.reshape(bs, gc_spatial_res, gc_spatial_res, -1).permute(0, 3, 1, 2)
        downsampled_current_crop_boxes = torch.unbind(bboxes["gc"][:, crop_id] / patch_size)
        aligned_emb_gc = roi_align(emb_gc_reshaped, downsampled_current_crop_boxes, kernel, aligned=True)
        thresholded_mask = None
        if attn_hard is not None:
            gc_hard_mask = attn_hard[bs * crop_id : bs * (crop_id + 1)]
            aligned_mask = roi_align(gc_hard_mask, downsampled_current_crop_boxes, kernel, aligned=True)
            thresholded_mask = aligned_mask >= 1.0
        subloss = 0
        for k, v in enumerate(np.delete(np.arange(n_crops), crop_id)):
            if v < nmb_crops[0]:
                out = gc_student_emb[bs * gc_spatial_res**2 * v : bs * gc_spatial_res**2 * (v + 1)]
                spatial_res = gc_spatial_res
            else:
                lc_index = v - nmb_crops[0]
                out = lc_student_emb[bs * lc_spatial_res**2 * lc_index : bs * lc_spatial_res**2 * (lc_index + 1)]
                spatial_res = lc_spatial_res
            aligned_out = roi_align(
                out.reshape(bs, spatial_res, spatial_res, -1).permute(0, 3, 1, 2),
                torch.unbind(bboxes["all"][:, v, crop_id].unsqueeze(1) / patch_size),
                kernel,
                aligned=True,
            )
            aligned_emb_gc_sel = aligned_emb_gc[v::n_crops]
            tgt_emb_gc_sel = draw(i, k, aligned_emb_gc_sel)
            aligned_p = reference_knn_perm_mat(aligned_out, tgt_emb_gc_sel, sorter=student_sorter)
            with torch.no_grad():
                aligned_q = reference_knn_perm_mat(aligned_emb_gc_sel, tgt_emb_gc_sel, sorter=teacher_sorter)
            subloss += reference_knn_subloss(aligned_q, aligned_p, thresholded_mask, v, n_crops)
        loss += subloss / (n_crops - 1)
    loss /= nmb_crops[0]
    return loss


def reference_batch_draw(order):
    """neco.py 459-473 (the else branch, no mask) with the randperm replaced by order[i][k]."""

    def draw(i, k, aligned_emb_gc_sel):
        bsl, d, ps1, ps2 = aligned_emb_gc_sel.shape
        filtered_emg_gc = aligned_emb_gc_sel.permute(0, 2, 3, 1).flatten(0, 2)
        repeats = round((bsl * ps1 * ps2) / filtered_emg_gc.shape[0]) + 1
        tgt_emb_gc_sel = filtered_emg_gc.repeat(repeats, 1)[: bsl * ps1 * ps2]
        idces = order[i][k]
        return tgt_emb_gc_sel[idces].reshape(bsl, ps1, ps2, d).permute(0, 3, 1, 2)

    return draw


B, D, PATCH, GLOBAL, LOCAL, N_LOCAL = 2, 8, 8, 4, 2, 2  # maps 4 x 4 (32 px) and 2 x 2 (16 px), 4 views


def random_boxes(shape, side, g):
    """Boxes (x1, y1, x2, y2) inside a side x side crop, each at least a third of the side wide."""
    low = torch.rand(*shape, 2, generator=g) * side * 0.6
    high = low + side / 3 + torch.rand(*shape, 2, generator=g) * (side - low - side / 3)
    return torch.cat((low, high), dim=-1)


def neco_inputs(seed):
    """Teacher maps, student maps (requiring grad), boxes, references and fg masks for B = 2, D = 8."""
    g = torch.Generator().manual_seed(seed)
    views = 2 + N_LOCAL
    sides = [GLOBAL] * 2 + [LOCAL] * N_LOCAL
    teacher = [F.normalize(torch.randn(B, D, GLOBAL, GLOBAL, generator=g), dim=1) for _ in range(2)]
    student = [F.normalize(torch.randn(B, D, s, s, generator=g), dim=1).requires_grad_() for s in sides]
    gc = random_boxes((B, 2, views), GLOBAL * PATCH, g)
    other = torch.stack([random_boxes((B, 2), s * PATCH, g) for s in sides], dim=1)  # [B, V, G, 4]
    references = F.normalize(torch.randn(2, views - 1, B, D, 7, 7, generator=g), dim=3)
    masks = (torch.rand(B, 2, GLOBAL, GLOBAL, generator=g) < 0.6).float()
    return teacher, student, gc, other, references, masks


def reference_layout(teacher, student, gc, other, masks):
    """Our inputs in knn_loss's: flat (crop, b, y, x) rows of D, and attn_hard [G * B, 1, h, w]."""
    flat = lambda maps: torch.cat([m.permute(0, 2, 3, 1).reshape(-1, D) for m in maps])  # noqa: E731
    attn_hard = None if masks is None else masks.transpose(0, 1).reshape(2 * B, 1, GLOBAL, GLOBAL)
    return flat(teacher), flat(student[:2]), flat(student[2:]), {"gc": gc, "all": other}, attn_hard


def both_losses(seed, steepness=100.0, teacher_steepness=None, masked=False, batch_draw=False):
    """neco_loss and the transcription on the same inputs: (ours [B], theirs scalar, our grads, their grads)."""
    teacher, student, gc, other, references, masks = neco_inputs(seed)
    masks = masks if masked else None
    if batch_draw:
        g = torch.Generator().manual_seed(seed + 1)
        order = torch.stack(
            [torch.stack([torch.randperm(B * 49, generator=g) for _ in range(1 + N_LOCAL)]) for _ in range(2)]
        )
        references = reference_cells(teacher_cells(teacher, gc, PATCH), order)
        draw = reference_batch_draw(order)
    else:
        draw = lambda i, k, _: references[i][k]  # noqa: E731  the queue branch's draw, injected
    ours = neco_loss(teacher, student, gc, other, PATCH, references, steepness, masks,
                     teacher_steepness=teacher_steepness)  # fmt: skip
    our_grads = torch.autograd.grad(ours.mean(), student)
    student_sorter = reference_sorter("bitonic", 49, steepness)
    teacher_sorter = student_sorter if teacher_steepness is None else reference_sorter("bitonic", 49, teacher_steepness)
    gc_t, gc_s, lc_s, bboxes, attn_hard = reference_layout(teacher, student, gc, other, masks)
    theirs = reference_knn_loss(gc_t, gc_s, lc_s, bboxes, B, GLOBAL, LOCAL, [2, N_LOCAL], PATCH,
                                student_sorter, teacher_sorter, draw, attn_hard)  # fmt: skip
    their_grads = torch.autograd.grad(theirs, student)
    return ours, theirs, our_grads, their_grads


@pytest.mark.parametrize(
    "case",
    [
        {},
        {"teacher_steepness": 10.0},
        {"masked": True},
        {"batch_draw": True},
    ],
    ids=["injected", "teacher-steepness", "fg-mask", "batch-draw"],
)
def test_neco_loss_is_knn_loss_per_image_with_its_student_gradients(case):
    ours, theirs, our_grads, their_grads = both_losses(seed=0, **case)
    assert ours.shape == (B,) and torch.isfinite(theirs)
    torch.testing.assert_close(ours.mean(), theirs, rtol=2e-5, atol=0)
    for view, (mine, ref) in enumerate(zip(our_grads, their_grads)):
        assert ref.abs().sum() > 0, f"view {view}: no gradient to compare"
        torch.testing.assert_close(mine, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item(), msg=f"view {view}")


def test_rank_matrices_are_compute_knn_perm_mat_in_our_layout():
    g = torch.Generator().manual_seed(1)
    queries, refs = torch.randn(B, D, 7, 7, generator=g), torch.randn(B, D, 7, 7, generator=g)
    refs[:, :, 0] = refs[:, :, 1]  # ties among the references
    ours = rank_matrices(queries, refs, 100.0)  # [B, 49 cells, 49 references, 49 ranks]
    theirs = reference_knn_perm_mat(queries, refs, reference_sorter("bitonic", 49, 100.0))  # [B, j, r, y, x]
    assert ours.shape == (B, 49, 49, 49)
    torch.testing.assert_close(ours.permute(0, 3, 2, 1).unflatten(3, (7, 7)), theirs, rtol=0, atol=2e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the similarities stay fp32 under autocast
        assert torch.equal(rank_matrices(queries, refs, 100.0), ours)


def test_pair_loss_is_knn_subloss_with_and_without_mask():
    g = torch.Generator().manual_seed(2)
    q = soft_sort_permutation(torch.randn(B * 49, 49, generator=g), 100.0).unflatten(0, (B, 49))
    p = soft_sort_permutation(torch.randn(B * 49, 49, generator=g), 100.0).unflatten(0, (B, 49))
    as_theirs = lambda t: t.permute(0, 3, 2, 1).unflatten(3, (7, 7))  # noqa: E731
    plain = neco_pair_loss(q, p)
    torch.testing.assert_close(plain.mean(), reference_knn_subloss(as_theirs(q), as_theirs(p), None, 0, 1))
    mask = torch.rand(B, 7, 7, generator=g) < 0.3
    mask[1] = False  # an image with no cell: a zero share, the batch still normalises by the total
    thresholded = mask[:, None]  # [B, 1, 7, 7] as roi_align's output sliced at crop_idx::n_crops
    masked = neco_pair_loss(q, p, mask)
    assert masked[1] == 0
    torch.testing.assert_close(masked.mean(), reference_knn_subloss(as_theirs(q), as_theirs(p), thresholded, 0, 1))
    empty = neco_pair_loss(q, p, torch.zeros(B, 49))
    assert torch.equal(empty, torch.zeros(B))  # the reference returns 0.0


def test_pair_loss_clamps_the_log_where_the_reference_is_nan():
    g = torch.Generator().manual_seed(3)
    q = soft_sort_permutation(torch.randn(B * 49, 49, generator=g), 100.0).unflatten(0, (B, 49))
    p = soft_sort_permutation(torch.randn(B * 49, 49, generator=g), 100.0).unflatten(0, (B, 49))
    p[1, 0, 0, :2] = 0.0  # underflowed entries of image 1 (bf16 does this)
    q[1, 0, 0, 0] = 0.0  # and 0 * log 0: NaN in the reference
    as_theirs = lambda t: t.permute(0, 3, 2, 1).unflatten(3, (7, 7))  # noqa: E731
    reference = [reference_knn_subloss(as_theirs(q[b : b + 1]), as_theirs(p[b : b + 1]), None, 0, 1) for b in range(B)]
    assert torch.isfinite(reference[0]) and torch.isnan(reference[1])
    ours = neco_pair_loss(q, p)
    torch.testing.assert_close(ours[0], reference[0])  # equal where the reference is finite
    tiny = torch.finfo(torch.float32).tiny  # and the clamped log elsewhere
    torch.testing.assert_close(ours[1], -(q[1] * torch.log(p[1].clamp_min(tiny))).sum(-1).mean())


def test_reference_cells_are_the_batch_draw():
    g = torch.Generator().manual_seed(4)
    aligned = torch.randn(B, D, 7, 7, generator=g)
    order = torch.randperm(B * 49, generator=g)
    expected = reference_batch_draw([[order]])(0, 0, aligned)
    assert torch.equal(reference_cells(aligned, order), expected)
    stacked = reference_cells(aligned.expand(3, -1, -1, -1, -1), order.expand(3, -1))  # leading dims
    assert torch.equal(stacked, expected.expand(3, -1, -1, -1, -1))


def test_an_empty_fg_mask_gives_a_zero_share_not_nan():
    teacher, student, gc, other, references, _ = neco_inputs(5)
    masks = torch.zeros(B, 2, GLOBAL, GLOBAL)
    loss = neco_loss(teacher, student, gc, other, PATCH, references, 100.0, masks)
    assert torch.equal(loss, torch.zeros(B))


def test_neco_loss_refuses_inputs_that_are_not_crop_pairs():
    teacher, student, gc, other, references, masks = neco_inputs(6)
    cases = [
        ((teacher, student[:3], gc, other), r"gc_boxes must be \[B, G, V, 4\] = \(2, 2, 3, 4\)"),
        ((teacher * 2, student, gc, other), r"need 1 <= G < V \(teacher maps G=4, student maps V=4\)"),
        ((teacher, student, gc[:, :, :3], other), r"gc_boxes must be \[B, G, V, 4\] = \(2, 2, 4, 4\)"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=f"^neco_loss: {message}"):
            neco_loss(*args, PATCH, references, 100.0)
    with pytest.raises(ValueError, match=r"^neco_loss: references must hold G=2 lists of V-1=3 reference sets$"):
        neco_loss(teacher, student, gc, other, PATCH, references[:, :2], 100.0)
    with pytest.raises(ValueError, match=r"^neco_loss: masks must be \[B, G, h, w\] with B=2, G=2, got \(2, 4, 4\)$"):
        neco_loss(teacher, student, gc, other, PATCH, references, 100.0, masks[:, 0])
    with pytest.raises(ValueError, match=r"^reference_cells: order must be \[\.\.\., B \* k \* k\]"):
        reference_cells(references[0, 0], torch.arange(7))


# ---------------------------------------------------------------- DINOv3 Gram (dinov3/loss/gram_loss.py)


def reference_gram_loss(output_feats, target_feats, remove_neg, apply_norm=True, img_level=True):
    """gram_loss.py 34-84 (GramLoss.forward; remove_only_teacher_neg False)."""
    if img_level:
        assert len(target_feats.shape) == 3 and len(output_feats.shape) == 3
    output_feats = output_feats.float()
    target_feats = target_feats.float()
    if apply_norm:
        target_feats = F.normalize(target_feats, dim=-1)
    target_sim = torch.matmul(target_feats, target_feats.transpose(-1, -2))
    if apply_norm:
        output_feats = F.normalize(output_feats, dim=-1)
    student_sim = torch.matmul(output_feats, output_feats.transpose(-1, -2))
    if remove_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[student_sim < 0] = 0.0
    return torch.nn.MSELoss()(student_sim, target_sim)


@pytest.mark.parametrize("remove_negative", [False, True])
def test_gram_loss_is_dinov3s_per_image_with_its_gradient(remove_negative):
    g = torch.Generator().manual_seed(7)
    student = torch.randn(3, 20, 16, generator=g)
    anchor = torch.randn(3, 20, 16, generator=g)
    ours_in, theirs_in = student.clone().requires_grad_(), student.clone().requires_grad_()
    ours = gram_loss(ours_in, anchor, remove_negative)
    theirs = reference_gram_loss(theirs_in, anchor, remove_negative)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours.mean(), theirs, rtol=1e-6, atol=0)
    for b in range(3):  # each image's value is GramLoss on that image alone
        torch.testing.assert_close(ours[b], reference_gram_loss(student[b : b + 1], anchor[b : b + 1], remove_negative))
    ours.mean().backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-5, atol=1e-8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 under autocast, as the reference's casts
        torch.testing.assert_close(gram_loss(student, anchor, remove_negative), ours.detach(), rtol=1e-6, atol=0)


def test_gram_loss_refuses_mismatched_tokens():
    with pytest.raises(ValueError, match=r"^gram_loss: student and anchor must be \[B, P, D\] of one shape"):
        gram_loss(torch.zeros(2, 5, 4), torch.zeros(2, 6, 4))
    with pytest.raises(ValueError, match=r"^gram_loss: student and anchor must be \[B, P, D\]"):
        gram_loss(torch.zeros(5, 4), torch.zeros(5, 4))
