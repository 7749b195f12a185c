"""fastloc.align.leopart_ops against MkuuWaUjinga/leopart @ 7835701's own lines on identical inputs.

The reference is not installed: each ``reference_*`` function below transcribes the lines it cites
(src/leopart_transforms.py, src/leopart.py, experiments/utils.py), with only the changes its
docstring names (CPU branches, the queue left out, scipy's label for skimage's).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import GaussianBlur

from fastloc.align.leopart_ops import (
    aligned_cross_entropy,
    drop_small_components,
    foreground_mask,
    loss_mask,
    pair_boxes,
    sinkhorn,
)

SIZES = (224, 224, 96, 96, 96, 96)  # 2 global + 4 local crops, the reference's multi-crop

# ---------------------------------------------------------------- transcriptions


def reference_calculate_bboxes(crop_bboxes, size_crops, nmb_crops):
    """src/leopart_transforms.py 127-161 (LeopartTransforms.calculate_bboxes), self.* as arguments."""
    gc_bboxes = crop_bboxes[: nmb_crops[0]]
    left_top = torch.max(gc_bboxes[:, None, :2], crop_bboxes[:, :2])
    right_bottom = torch.min(gc_bboxes[:, None, 2:], crop_bboxes[:, 2:])
    assert torch.all((right_bottom - left_top) > 0)
    ws_hs = torch.stack((crop_bboxes[:, 2] - crop_bboxes[:, 0], crop_bboxes[:, 3] - crop_bboxes[:, 1])).T[:, None]
    crops_sizes = torch.repeat_interleave(torch.Tensor([size_crops[0]]), nmb_crops[0] * 2).reshape(nmb_crops[0], 2)
    if len(size_crops) == 2:
        lc_crops_sizes = torch.repeat_interleave(torch.Tensor([size_crops[1]]), nmb_crops[1] * 2).reshape(
            nmb_crops[1], 2
        )
        crops_sizes = torch.cat((crops_sizes, lc_crops_sizes))[:, None]
    x1s_y1s = crop_bboxes[:, None, :2]
    left_top_scaled_gc = crops_sizes[:2] * ((left_top - x1s_y1s[:2]) / ws_hs[:2])
    right_bottom_scaled_gc = crops_sizes[:2] * ((right_bottom - x1s_y1s[:2]) / ws_hs[:2])
    left_top_otc_points_per_gc = torch.stack([left_top[i] for i in range(nmb_crops[0])], dim=1)
    right_bottom_otc_points_per_gc = torch.stack([right_bottom[i] for i in range(nmb_crops[0])], dim=1)
    left_top_scaled_otc = crops_sizes * ((left_top_otc_points_per_gc - x1s_y1s) / ws_hs)
    right_bottom_scaled_otc = crops_sizes * ((right_bottom_otc_points_per_gc - x1s_y1s) / ws_hs)
    gc_bboxes = torch.cat((left_top_scaled_gc, right_bottom_scaled_gc), dim=2)
    otc_bboxes = torch.cat((left_top_scaled_otc, right_bottom_scaled_otc), dim=2)
    return gc_bboxes, otc_bboxes


def reference_sinkhorn(Q, nmb_iters):
    """src/leopart.py 391-413 (Leopart.sinkhorn), the gpus == 0 branch."""
    with torch.no_grad():
        sum_Q = torch.sum(Q)
        Q /= sum_Q
        K, B = Q.shape
        u = torch.zeros(K)
        r = torch.ones(K) / K
        c = torch.ones(B) / B
        for _ in range(nmb_iters):
            u = torch.sum(Q, dim=1)
            Q *= (r / u).unsqueeze(1)
            Q *= (c / torch.sum(Q, dim=0)).unsqueeze(0)
        return (Q / torch.sum(Q, dim=0, keepdim=True)).t().float()


def reference_distributed_sinkhorn(Q, nmb_iters, gpus):
    """src/leopart.py 415-439 (Leopart.distributed_sinkhorn), the CPU branch, self.gpus as ``gpus``."""
    with torch.no_grad():
        sum_Q = torch.sum(Q)
        dist.all_reduce(sum_Q)
        Q /= sum_Q
        u = torch.zeros(Q.shape[0])
        r = torch.ones(Q.shape[0]) / Q.shape[0]
        c = torch.ones(Q.shape[1]) / (gpus * Q.shape[1])
        curr_sum = torch.sum(Q, dim=1)
        dist.all_reduce(curr_sum)
        for _ in range(nmb_iters):
            u = curr_sum
            Q *= (r / u).unsqueeze(1)
            Q *= (c / torch.sum(Q, dim=0)).unsqueeze(0)
            curr_sum = torch.sum(Q, dim=1)
            dist.all_reduce(curr_sum)
        return (Q / torch.sum(Q, dim=0, keepdim=True)).t().float()


def reference_label(array):
    """skimage.measure.label's default (connectivity = array.ndim: full) as scipy's label."""
    return scipy.ndimage.label(array, structure=np.ones((3,) * array.ndim))[0]


def reference_process_attentions(attentions, spatial_res, threshold=0.5, blur_sigma=0.6, clean=True):
    """experiments/utils.py 458-490 (process_attentions) with NeCo's fix of line 489
    (vpariza/NeCo @ 3932160 experiments/utils.py 569: ``mask.squeeze()``); ``clean`` False stops
    before the component removal."""
    attentions = GaussianBlur(7, sigma=(blur_sigma))(attentions)
    attentions = attentions.reshape(attentions.size(0), 1, spatial_res**2)
    val, idx = torch.sort(attentions)
    val /= torch.sum(val, dim=-1, keepdim=True)
    cumval = torch.cumsum(val, dim=-1)
    th_attn = cumval > (1 - threshold)
    idx2 = torch.argsort(idx)
    th_attn[:, 0] = torch.gather(th_attn[:, 0], dim=1, index=idx2[:, 0])
    th_attn = th_attn.reshape(attentions.size(0), 1, spatial_res, spatial_res).float()
    if not clean:
        return th_attn
    for j, th_att in enumerate(th_attn):
        labelled = reference_label(th_att.cpu().numpy())
        for k in range(1, np.max(labelled) + 1):
            mask = labelled == k
            if np.sum(mask) <= 2:
                th_attn[j, 0][mask.squeeze()] = 0
    return th_attn.detach()


def reference_spatial_loss(
    gc_teacher_output, gc_student_output, lc_student_output, bboxes, bs, gc_spatial_res, attn_hard, nmb_crops, patch
):
    """src/leopart.py 289-370 (Leopart.spatial_loss) without the queue (lines 305-322); crops_for_assign
    [0, 1], epsilon 0.05, 3 iterations, temperature 0.1, roi_align kernel 7, softmax over dim 1."""
    epsilon, temperature, kernel, crops_for_assign = 0.05, 0.1, 7, [0, 1]
    lc_spatial_res = np.sqrt(lc_student_output.size(0) / (nmb_crops[-1] * bs))
    assert lc_spatial_res.is_integer()
    lc_spatial_res = int(lc_spatial_res)
    loss = 0
    for crop_id in crops_for_assign:
        with torch.no_grad():
            out = gc_teacher_output[bs * gc_spatial_res**2 * crop_id : bs * gc_spatial_res**2 * (crop_id + 1)]
            num_spatial_vectors_for_pred = out.size(0)
            q = torch.exp(out / epsilon).t()
            q = reference_sinkhorn(q, 3)[-num_spatial_vectors_for_pred:]
        q_reshaped = q.reshape(bs, gc_spatial_res, gc_spatial_res, -1).permute(0, 3, 1, 2)
        downsampled_current_crop_boxes = torch.unbind(bboxes["gc"][:, crop_id] / patch)
        aligned_soft_clusters = roi_align(q_reshaped, downsampled_current_crop_boxes, kernel, aligned=True)
        if attn_hard is not None:
            gc_hard_mask = attn_hard[bs * crop_id : bs * (crop_id + 1)]
            aligned_mask = roi_align(gc_hard_mask, downsampled_current_crop_boxes, kernel, aligned=True)
            thresholded_mask = aligned_mask >= 1.0
        subloss = 0
        for v in np.delete(np.arange(np.sum(nmb_crops)), crop_id):
            if v in crops_for_assign:
                out = gc_student_output[bs * gc_spatial_res**2 * v : bs * gc_spatial_res**2 * (v + 1)]
                spatial_res = gc_spatial_res
            else:
                lc_index = v - nmb_crops[0]
                out = lc_student_output[bs * lc_spatial_res**2 * lc_index : bs * lc_spatial_res**2 * (lc_index + 1)]
                spatial_res = lc_spatial_res
            aligned_out = roi_align(
                out.reshape(bs, spatial_res, spatial_res, -1).permute(0, 3, 1, 2),
                torch.unbind(bboxes["all"][:, v, crop_id].unsqueeze(1) / patch),
                kernel,
                aligned=True,
            )
            aligned_p = F.softmax(aligned_out / temperature, dim=1)
            aligned_q = aligned_soft_clusters[v :: np.sum(nmb_crops)]
            if attn_hard is not None:
                mask = thresholded_mask[v :: np.sum(nmb_crops)].squeeze().float()
                if torch.sum(mask).item() != 0:
                    subloss -= torch.sum(torch.sum(aligned_q * torch.log(aligned_p), dim=1) * mask) / torch.sum(mask)
            else:
                subloss -= torch.mean(torch.sum(aligned_q * torch.log(aligned_p), dim=1))
        loss += subloss / (np.sum(nmb_crops) - 1)
    loss /= len(crops_for_assign)
    return loss


# ---------------------------------------------------------------- inputs


def crop_boxes(rng: np.random.Generator, sizes: tuple[int, ...], n_global: int, image: int = 300) -> torch.Tensor:
    """Random integer (x1, y1, x2, y2) crops of an image x image picture, globals larger, each view
    resampled until it overlaps every global crop (as LeopartTransforms' loop does)."""
    boxes = torch.zeros(len(sizes), 4)
    for i in range(len(sizes)):
        low, high = (image // 2, image) if i < n_global else (image // 6, image // 2)
        while True:
            w, h = rng.integers(low, high + 1, size=2)
            x, y = rng.integers(0, image - w + 1), rng.integers(0, image - h + 1)
            boxes[i] = torch.tensor([x, y, x + w, y + h], dtype=torch.float32)
            glob = boxes[: min(i, n_global)]
            if (torch.minimum(glob[:, 2:], boxes[i, 2:]) - torch.maximum(glob[:, :2], boxes[i, :2]) > 0).all():
                break
    return boxes


def batch_boxes(seed: int, batch: int, sizes: tuple[int, ...], n_global: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack([crop_boxes(rng, sizes, n_global) for _ in range(batch)])  # [B, V, 4]


# ---------------------------------------------------------------- pair_boxes


@pytest.mark.parametrize("batch", [1, 4])
def test_pair_boxes_are_calculate_bboxes_per_sample(batch):
    boxes = batch_boxes(batch, batch, SIZES, 2)
    gc, other = pair_boxes(boxes, SIZES, 2)
    assert gc.shape == (batch, 2, 6, 4) and other.shape == (batch, 6, 2, 4)
    for b in range(batch):
        want_gc, want_other = reference_calculate_bboxes(boxes[b], (224, 96), (2, 4))
        torch.testing.assert_close(gc[b], want_gc, rtol=0, atol=0)
        torch.testing.assert_close(other[b], want_other, rtol=0, atol=0)
    # only ratios matter: boxes normalised to [0, 1] give the same pixel boxes up to rounding
    gc_n, other_n = pair_boxes(boxes / 300, SIZES, 2)
    torch.testing.assert_close(gc_n, gc, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(other_n, other, rtol=1e-5, atol=1e-3)
    # integer boxes are accepted as they are
    torch.testing.assert_close(pair_boxes(boxes.long(), SIZES, 2)[0], gc, rtol=0, atol=0)


def test_pair_boxes_refuses_bad_shapes_in_one_line():
    boxes = torch.zeros(2, 6, 4)
    with pytest.raises(ValueError, match=r"^pair_boxes: boxes must be \[B, V, 4\]"):
        pair_boxes(boxes[..., :3], SIZES, 2)
    with pytest.raises(ValueError, match=r"^pair_boxes: sizes has 5 entries for 6 views"):
        pair_boxes(boxes, SIZES[:5], 2)
    with pytest.raises(ValueError, match=r"^pair_boxes: n_global must be in 1\.\.6"):
        pair_boxes(boxes, SIZES, 0)


# ---------------------------------------------------------------- sinkhorn


def cosine_scores(seed: int, n: int, k: int = 10, dim: int = 16) -> torch.Tensor:
    """Scores as Leopart's: cosines of L2-normalised embeddings and prototypes, [n, k]."""
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    protos = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    return emb @ protos.t()


def test_sinkhorn_is_the_references_on_one_process():
    scores = cosine_scores(0, 96)
    got = sinkhorn(scores)
    want = reference_sinkhorn(torch.exp(scores / 0.05).t(), 3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(96))  # each sample's assignment sums to 1
    # bf16 scores are cast to fp32 first; other settings follow the reference's arguments
    torch.testing.assert_close(
        sinkhorn(scores.bfloat16()), reference_sinkhorn(torch.exp(scores.bfloat16().float() / 0.05).t(), 3)
    )
    torch.testing.assert_close(
        sinkhorn(scores, epsilon=0.1, iterations=5),
        reference_sinkhorn(torch.exp(scores / 0.1).t(), 5),
        rtol=1e-6,
        atol=0,
    )
    assert sinkhorn(scores.requires_grad_()).grad_fn is None


def sinkhorn_worker(rank: int, world: int, scores: torch.Tensor, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        scores = scores.chunk(world)[rank]  # each rank half the rows
        got = sinkhorn(scores)
        want = reference_distributed_sinkhorn(torch.exp(scores / 0.05).t(), 3, world)
        torch.save({"got": got, "want": want}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_sinkhorn_over_two_ranks_is_the_one_rank_result(tmp_path):
    # fork, not spawn: the children need not import torch again (seconds). They make no matmul (a
    # BLAS thread pool inherited through fork can hang), so the scores are made here.
    out, scores = str(tmp_path / "result"), cosine_scores(1, 96)
    args = (2, scores, str(tmp_path / "rendezvous"), out)
    mp.start_processes(sinkhorn_worker, args=args, nprocs=2, join=True, start_method="fork")
    parts = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for part in parts:
        torch.testing.assert_close(part["got"], part["want"], rtol=1e-6, atol=0)  # distributed_sinkhorn's lines
    whole = sinkhorn(scores)
    torch.testing.assert_close(torch.cat([p["got"] for p in parts]), whole, rtol=1e-5, atol=1e-7)


def test_sinkhorn_refuses_bad_input():
    with pytest.raises(ValueError, match=r"^sinkhorn: scores must be \[N, K\]"):
        sinkhorn(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"^sinkhorn: epsilon must be > 0"):
        sinkhorn(torch.zeros(2, 3), epsilon=0)


# ---------------------------------------------------------------- foreground mask

# Hand-made {0, 1} maps: isolated pixels, an edge pair, diagonal pairs, a diagonal triple, an L of 3,
# blocks, and pixels on the border and in the corners.
HAND = [
    """
    1.......
    ........
    ..1.....
    ...1....
    ......11
    .1......
    .1....1.
    .....1.1
    """,
    """
    11..1..1
    1.......
    ....1...
    ...1.1..
    ........
    .111..1.
    .......1
    1.....1.
    """,
    """
    ........
    .11.....
    .11..1..
    ......1.
    ...1...1
    ........
    1.1.1.1.
    .1...1..
    """,
]


def hand_maps() -> torch.Tensor:
    rows = [[[c == "1" for c in line.strip()] for line in text.strip().splitlines()] for text in HAND]
    return torch.tensor(rows, dtype=torch.float32)[:, None]  # [3, 1, 8, 8]


def reference_cleanup(maps: torch.Tensor) -> torch.Tensor:
    """The component loop of experiments/utils.py 484-489 (with NeCo's .squeeze()) on {0, 1} maps."""
    maps = maps.clone()
    for j, th_att in enumerate(maps):
        labelled = reference_label(th_att.numpy())
        for k in range(1, np.max(labelled) + 1):
            mask = labelled == k
            if np.sum(mask) <= 2:
                maps[j, 0][mask.squeeze()] = 0
    return maps


def test_small_components_are_dropped_as_the_references_labelling():
    maps = hand_maps()
    got = drop_small_components(maps)
    assert torch.equal(got, reference_cleanup(maps))
    # the hand cases: isolated pixels, edge and diagonal pairs go; chains, L's and blocks of >= 3 stay
    assert (got[0, 0] == 1).nonzero().tolist() == [[6, 6], [7, 5], [7, 7]]
    assert got.sum(dim=(1, 2, 3)).tolist() == [3, 12, 13]
    g = torch.Generator().manual_seed(0)
    for density in (0.15, 0.3, 0.5):
        random_maps = (torch.rand(40, 1, 9, 11, generator=g) < density).float()
        assert torch.equal(drop_small_components(random_maps), reference_cleanup(random_maps)), density


def spiky_attention(seed: int, batch: int, grid: int) -> torch.Tensor:
    """Attention-like maps: a smooth blob plus sparse spikes of random height, so the thresholded
    maps hold 1- and 2-pixel components and larger ones; softmax-normalised like attention."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centre = torch.rand(batch, 2, generator=g) * grid
    blob = -(((ys - centre[:, :1, None]) ** 2 + (xs - centre[:, 1:, None]) ** 2) / (grid**2 / 8))  # [B, g, g]
    spikes = (torch.rand(batch, grid, grid, generator=g) < 0.08) * torch.rand(batch, grid, grid, generator=g) * 4
    noise = 0.3 * torch.randn(batch, grid, grid, generator=g)
    return torch.softmax((blob + spikes + noise).flatten(1), dim=1)  # [B, grid * grid]


@pytest.mark.parametrize("grid", [4, 14])
def test_foreground_mask_is_process_attentions(grid):
    attention = torch.cat([spiky_attention(grid, 48, grid), torch.rand(16, grid * grid)])
    maps = attention.reshape(-1, 1, grid, grid)
    got = foreground_mask(attention, grid)
    assert got.shape == (64, 1, grid, grid) and got.dtype == torch.float32
    assert torch.equal(got, reference_process_attentions(maps.clone(), grid, threshold=0.6, blur_sigma=0.6))
    before = reference_process_attentions(maps.clone(), grid, threshold=0.6, clean=False)
    if grid == 14:  # the cleanup is exercised: some maps lose 1- or 2-pixel components
        assert (before != got).flatten(1).any(1).sum() >= 5
    # other settings pass through as the reference's arguments
    other = foreground_mask(attention, grid, threshold=0.4, sigma=1.0)
    assert torch.equal(other, reference_process_attentions(maps.clone(), grid, threshold=0.4, blur_sigma=1.0))
    # under autocast the blur still runs in fp32 (the trainer may call this inside its autocast region)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(foreground_mask(attention, grid), got)


def test_foreground_mask_refuses_bad_input():
    with pytest.raises(ValueError, match=r"^foreground_mask: attention must be \[B, 196\] for grid 14"):
        foreground_mask(torch.rand(2, 195), 14)
    with pytest.raises(ValueError, match=r"^foreground_mask: grid must be >= 4"):
        foreground_mask(torch.rand(2, 9), 3)
    with pytest.raises(ValueError, match=r"^foreground_mask: threshold must be in \(0, 1\]"):
        foreground_mask(torch.rand(2, 16), 4, threshold=1.5)


def test_loss_mask_modes():
    fg = (torch.rand(2, 1, 4, 4) < 0.5).float()
    assert loss_mask(fg, "fg") is fg
    assert torch.equal(loss_mask(fg, "bg"), torch.abs(fg - 1))  # src/leopart.py 281
    assert loss_mask(fg, "all") is None
    with pytest.raises(ValueError, match=r"^loss_mask: mode must be one of fg, bg, all, got 'none'"):
        loss_mask(fg, "none")


# ---------------------------------------------------------------- the aligned cross-entropy

PATCH, K, GLOBAL, LOCAL = 16, 5, 4, 2  # global crops 64 px (4 x 4 patches), local 32 px (2 x 2)
SMALL = (64, 64, 32, 32, 32, 32)


def loss_inputs(seed: int, batch: int):
    """Flat token rows as the reference holds them (crop-major, then image, then y, then x) and the
    same numbers as fastloc's maps."""
    g = torch.Generator().manual_seed(seed)
    teacher = cosine_scores(seed, 2 * batch * GLOBAL**2, K)  # [G * B * 16, K]
    student_gc = (2 * torch.rand(2 * batch * GLOBAL**2, K, generator=g) - 1).requires_grad_()
    student_lc = (2 * torch.rand(4 * batch * LOCAL**2, K, generator=g) - 1).requires_grad_()
    boxes = batch_boxes(seed, batch, SMALL, 2)
    per_sample = [reference_calculate_bboxes(boxes[b], (64, 32), (2, 4)) for b in range(batch)]
    bboxes = {"gc": torch.stack([p[0] for p in per_sample]), "all": torch.stack([p[1] for p in per_sample])}

    def maps(rows: torch.Tensor, side: int) -> list[torch.Tensor]:
        return list(rows.reshape(-1, batch, side, side, K).permute(0, 1, 4, 2, 3).unbind(0))

    targets = [sinkhorn(t).reshape(batch, GLOBAL, GLOBAL, K).permute(0, 3, 1, 2) for t in teacher.chunk(2)]
    scores = maps(student_gc, GLOBAL) + maps(student_lc, LOCAL)
    return teacher, student_gc, student_lc, bboxes, targets, scores


def fg_masks(seed: int, batch: int) -> torch.Tensor:
    """attn_hard [G * B, 1, 4, 4]: global crop 0 mostly foreground, global crop 1 all background,
    so every pair of crop 1 has no kept cell."""
    g = torch.Generator().manual_seed(seed + 100)
    first = (torch.rand(batch, 1, GLOBAL, GLOBAL, generator=g) < 0.85).float()
    first[:, :, 1:3, 1:3] = 1  # a fully foreground middle: some cells pass the >= 1.0 test
    return torch.cat([first, torch.zeros(batch, 1, GLOBAL, GLOBAL)])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_aligned_cross_entropy_is_spatial_loss(batch, masked):
    teacher, student_gc, student_lc, bboxes, targets, scores = loss_inputs(batch, batch)
    attn_hard = fg_masks(batch, batch) if masked else None
    want = reference_spatial_loss(
        teacher, student_gc, student_lc, bboxes, batch, GLOBAL, attn_hard, nmb_crops=(2, 4), patch=PATCH
    )
    want.backward()
    want_grads = student_gc.grad.clone(), student_lc.grad.clone()
    student_gc.grad = student_lc.grad = None

    masks = None if attn_hard is None else list(attn_hard.chunk(2))
    got = aligned_cross_entropy(targets, scores, bboxes["gc"], bboxes["all"], PATCH, masks=masks)
    assert got.shape == (batch,)
    torch.testing.assert_close(got.mean(), want, rtol=1e-5, atol=1e-6)
    got.mean().backward()
    torch.testing.assert_close(student_gc.grad, want_grads[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(student_lc.grad, want_grads[1], rtol=1e-4, atol=1e-7)
    assert student_lc.grad.abs().sum() > 0
    if masked:
        # crop 1's mask is all background: its pairs give 0, so the loss is half crop 0's alone ...
        gc, other = bboxes["gc"][:, :1], bboxes["all"][:, :, :1]
        alone = aligned_cross_entropy(targets[:1], scores, gc, other, PATCH, masks=masks[:1])
        assert got.mean() > 0 and torch.isclose(alone.mean(), 2 * got.mean())
        # ... and the fg mask is not all-pass: unmasked differs
        unmasked = aligned_cross_entropy(targets, scores, bboxes["gc"], bboxes["all"], PATCH)
        assert not torch.isclose(unmasked.mean(), got.mean())


@pytest.mark.parametrize("masked", [False, True])
def test_aligned_cross_entropy_splits_per_image(masked):
    """Unmasked: image b's contribution is its own loss. Masked: with only image b's mask set, image
    b holds B times its own loss (the pair's count is b's alone) and the others 0."""
    batch, b = 3, 1
    _, _, _, bboxes, targets, scores = loss_inputs(8, batch)
    masks = None
    if masked:
        fg = fg_masks(8, batch)[:batch]
        fg[torch.arange(batch) != b] = 0
        masks = [fg, fg.flip(-1)]
    got = aligned_cross_entropy(targets, scores, bboxes["gc"], bboxes["all"], PATCH, masks=masks)
    one = [t[b : b + 1] for t in targets], [s[b : b + 1] for s in scores]
    own = aligned_cross_entropy(
        *one, bboxes["gc"][b : b + 1], bboxes["all"][b : b + 1], PATCH, masks=masks and [m[b : b + 1] for m in masks]
    )
    if not masked:
        for i in range(batch):
            single = [t[i : i + 1] for t in targets], [s[i : i + 1] for s in scores]
            alone = aligned_cross_entropy(*single, bboxes["gc"][i : i + 1], bboxes["all"][i : i + 1], PATCH)
            torch.testing.assert_close(got[i], alone[0], rtol=1e-6, atol=0)
    else:
        assert own[0] > 0
        torch.testing.assert_close(got[b], batch * own[0], rtol=1e-6, atol=0)
        assert torch.equal(got[torch.arange(batch) != b], torch.zeros(batch - 1))


def test_aligned_cross_entropy_with_no_kept_cell_anywhere_is_zero():
    _, _, _, bboxes, targets, scores = loss_inputs(5, 2)
    empty = [torch.zeros(2, 1, GLOBAL, GLOBAL)] * 2
    got = aligned_cross_entropy(targets, scores, bboxes["gc"], bboxes["all"], PATCH, masks=empty)
    assert torch.equal(got, torch.zeros(2))
    got.sum().backward()  # a zero loss still has a graph, as the trainer expects


def test_bf16_scores_and_autocast_leave_the_math_in_fp32():
    _, _, _, bboxes, targets, scores = loss_inputs(6, 2)
    want = aligned_cross_entropy(targets, [s.bfloat16().float() for s in scores], bboxes["gc"], bboxes["all"], PATCH)
    got = aligned_cross_entropy(targets, [s.bfloat16() for s in scores], bboxes["gc"], bboxes["all"], PATCH)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    teacher = cosine_scores(0, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # inside the trainer's autocast region: the same
        inside = aligned_cross_entropy(targets, scores, bboxes["gc"], bboxes["all"], PATCH)
        assignments = sinkhorn(teacher)
    torch.testing.assert_close(inside, aligned_cross_entropy(targets, scores, bboxes["gc"], bboxes["all"], PATCH))
    torch.testing.assert_close(assignments, reference_sinkhorn(torch.exp(teacher / 0.05).t(), 3), rtol=1e-6, atol=0)


def test_aligned_cross_entropy_refuses_mismatched_shapes():
    _, _, _, bboxes, targets, scores = loss_inputs(7, 2)
    with pytest.raises(ValueError, match=r"^aligned_cross_entropy: gc_boxes must be \[B, 2, 5, 4\]"):
        aligned_cross_entropy(targets, scores[:5], bboxes["gc"], bboxes["all"], PATCH)
    with pytest.raises(ValueError, match=r"^aligned_cross_entropy: other_boxes must be \[2, 6, 2, 4\]"):
        aligned_cross_entropy(targets, scores, bboxes["gc"], bboxes["all"][:, :5], PATCH)
    with pytest.raises(ValueError, match=r"^aligned_cross_entropy: masks has 1 maps for 2 targets"):
        aligned_cross_entropy(targets, scores, bboxes["gc"], bboxes["all"], PATCH, masks=[torch.zeros(2, 1, 4, 4)])
    with pytest.raises(ValueError, match=r"^aligned_cross_entropy: scores\[2\] must be \[2, 5, h, w\]"):
        bad = scores[:2] + [scores[2][:, :4]] + scores[3:]
        aligned_cross_entropy(targets, bad, bboxes["gc"], bboxes["all"], PATCH)
