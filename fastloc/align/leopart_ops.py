"""Leopart's loss mathematics (OTHER-METHODS.md section 1): crop-pair boxes, Sinkhorn-Knopp targets,
the attention foreground mask and the roi-aligned cross-entropy.

Pure device-side tensor functions, faithful to MkuuWaUjinga/leopart @ 7835701 (tests/test_leopart_ops.py
compares each with a transcription of the reference's lines), written without host syncs: no
``.item()``, no loop over images, no Python branch on a tensor's value, so the objective can call
them inside the compiled step. Departures, all at rounding level: the cross-entropy uses
``log_softmax`` where the reference takes ``log(softmax)``, and sums the views' terms in another order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms.functional import gaussian_blur

from fastloc.runtime import full_precision

LOSS_MASKS = ("fg", "bg", "all")

# ---------------------------------------------------------------- crop-pair boxes


def pair_boxes(boxes: Tensor, sizes: Sequence[int], n_global: int) -> tuple[Tensor, Tensor]:
    """Intersection boxes of every global crop g with every view v (src/leopart_transforms.py 127-161).

    boxes [B, V, 4]: each crop's (x1, y1, x2, y2) in one frame of the source image; sizes[v]: the side
    of crop v after resizing; the first ``n_global`` views are the global crops. Returns gc [B, G, V, 4]
    (g∩v in g's pixels) and other [B, V, G, 4] (the same box in v's pixels), as ``calculate_bboxes``
    per sample, stacked over B. Crops that do not intersect give empty or inverted boxes (the
    reference asserts they do not occur; the sampler guarantees it).
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"pair_boxes: boxes must be [B, V, 4], got {tuple(boxes.shape)}")
    views = boxes.shape[1]
    if len(sizes) != views:
        raise ValueError(f"pair_boxes: sizes has {len(sizes)} entries for {views} views")
    if not 1 <= n_global <= views:
        raise ValueError(f"pair_boxes: n_global must be in 1..{views} (the views), got {n_global}")
    boxes = boxes if boxes.is_floating_point() else boxes.float()
    side = torch.tensor(list(sizes), dtype=boxes.dtype, device=boxes.device)[:, None, None]  # [V, 1, 1]
    corner, extent = boxes[..., :2], boxes[..., 2:] - boxes[..., :2]  # [B, V, 2]
    glob = boxes[:, :n_global, None]  # [B, G, 1, 4]
    low = torch.maximum(glob[..., :2], boxes[:, None, :, :2])  # [B, G, V, 2]
    high = torch.minimum(glob[..., 2:], boxes[:, None, :, 2:])  # [B, G, V, 2]

    def scale(points: Tensor, g_first: bool) -> Tensor:
        # the reference's size * ((point - x1y1) / wh) in the frame of g (g_first) or of v
        if g_first:
            return side[:n_global] * ((points - corner[:, :n_global, None]) / extent[:, :n_global, None])
        points = points.transpose(1, 2)  # [B, V, G, 2]
        return side * ((points - corner[:, :, None]) / extent[:, :, None])

    gc = torch.cat((scale(low, True), scale(high, True)), dim=-1)  # [B, G, V, 4]
    other = torch.cat((scale(low, False), scale(high, False)), dim=-1)  # [B, V, G, 4]
    return gc, other


# ---------------------------------------------------------------- Sinkhorn-Knopp


def _world() -> int:
    """The number of ranks Sinkhorn's sums run over: 1 unless a process group is up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce(value: Tensor, world: int) -> Tensor:
    if world > 1:
        dist.all_reduce(value)
    return value


def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Balanced soft assignments [N, K] of N samples to K prototypes (src/leopart.py 391-439).

    fp32 and unstabilised as the reference: Q = exp(S / eps)^T / total, then ``iterations`` rounds of
    rows -> 1/K and columns -> 1/N, then each column (sample) normalised to sum 1. With a process
    group the total and the row sums are all-reduced and N counts every rank's rows
    (``distributed_sinkhorn``, which assumes the same N on every rank). No gradient flows back.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn: scores must be [N, K], got {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0 and iterations >= 0, got {epsilon} and {iterations}")
    world = _world()
    q = torch.exp(scores.detach().float() / epsilon).t()  # [K, N]
    q = q / _all_reduce(q.sum(), world)
    k, n = q.shape
    # the reference's r and c are tensors of 1/K and 1/(world N): the same roundings as here
    r = torch.ones(k, device=q.device) / k
    c = torch.ones(n, device=q.device) / (world * n)
    for _ in range(iterations):
        q = q * (r / _all_reduce(q.sum(dim=1), world)).unsqueeze(1)
        q = q * (c / q.sum(dim=0)).unsqueeze(0)
    return (q / q.sum(dim=0, keepdim=True)).t()


# ---------------------------------------------------------------- foreground mask

# 8-neighbourhood: skimage's label on the reference's [1, H, W] maps uses full 3-D connectivity,
# which in one plane is 8-connectivity.
_NEIGHBOURS = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])


def _count_neighbours(mask: Tensor) -> Tensor:
    """Each pixel's number of set 8-neighbours, [B, 1, H, W] float (outside the map counts as unset)."""
    kernel = _NEIGHBOURS.to(device=mask.device, dtype=mask.dtype)[None, None]
    return F.conv2d(mask, kernel, padding=1)


def drop_small_components(mask: Tensor) -> Tensor:
    """Clear the 8-connected components of at most 2 pixels of a {0, 1} map [B, 1, H, W] (float).

    A set pixel lies in such a component iff it has no set neighbour, or exactly one that itself has
    exactly one: two convolutions instead of the reference's labelling loop (experiments/utils.py 484-489).
    """
    mask = mask.float()
    count = _count_neighbours(mask) * mask  # [B, 1, H, W]
    single = (count == 1).float()
    partner_single = _count_neighbours(single)  # with one neighbour: 1 iff that neighbour has one too
    small = (count == 0) | ((count == 1) & (partner_single == 1))
    return torch.where(small, torch.zeros_like(mask), mask)


def foreground_mask(attention: Tensor, grid: int, threshold: float = 0.6, sigma: float = 0.6) -> Tensor:
    """The teacher's foreground mask [B, 1, grid, grid] in {0., 1.} (experiments/utils.py 458-490).

    attention [B, grid * grid]: last-block CLS -> patch attention averaged over heads. Gaussian blur
    (kernel 7), the smallest token set holding ``threshold`` of the mass, then components of <= 2
    pixels dropped.
    """
    if attention.ndim != 2 or attention.shape[1] != grid * grid:
        raise ValueError(
            f"foreground_mask: attention must be [B, {grid * grid}] for grid {grid}, got {tuple(attention.shape)}"
        )
    if grid < 4:
        raise ValueError(f"foreground_mask: grid must be >= 4 (the blur's reflect padding is 3), got {grid}")
    if not 0 < threshold <= 1 or sigma <= 0:
        raise ValueError(f"foreground_mask: threshold must be in (0, 1] and sigma > 0, got {threshold} and {sigma}")
    maps = attention.detach().float().reshape(-1, 1, grid, grid)
    # fp32 as the reference: autocast would run the blur's convolution in bf16 and move the threshold
    with full_precision(maps.device):
        blurred = gaussian_blur(maps, [7, 7], [sigma, sigma]).flatten(1)  # [B, P]
        values, order = torch.sort(blurred)
        values = values / values.sum(dim=-1, keepdim=True)
        kept = torch.cumsum(values, dim=-1) > (1 - threshold)  # in sorted order
        kept = torch.zeros_like(kept).scatter(-1, order, kept)  # back in token order (the reference's argsort gather)
        return drop_small_components(kept.float().reshape(-1, 1, grid, grid))


def loss_mask(fg: Tensor, mode: str) -> Tensor | None:
    """The cells the loss averages over: ``fg`` the mask, ``bg`` its inverse (src/leopart.py 280-281),
    ``all`` None (every cell)."""
    if mode == "fg":
        return fg
    if mode == "bg":
        return 1 - fg
    if mode == "all":
        return None
    raise ValueError(f"loss_mask: mode must be one of {', '.join(LOSS_MASKS)}, got {mode!r}")


# ---------------------------------------------------------------- the aligned cross-entropy


def _rois(boxes: Tensor) -> Tensor:
    """[B, R, 4] boxes -> roi_align's [B * R, 5] (image index, x1, y1, x2, y2), image-major as the
    reference's list of per-image boxes."""
    batch, count = boxes.shape[:2]
    index = torch.arange(batch, device=boxes.device, dtype=boxes.dtype).repeat_interleave(count)
    return torch.cat((index[:, None], boxes.reshape(-1, 4)), dim=1)


def _pair_loss(ce: Tensor, keep: Tensor | None) -> Tensor:
    """One (g, v) pair's per-image contributions [B] whose mean is the reference's pair term.

    Unmasked: each image's mean over cells. Masked: B * the image's masked sum / the pair's count of
    kept cells over the batch, 0 when no cell is kept (the reference skips the pair).
    """
    if keep is None:
        return ce.flatten(1).mean(dim=1)
    total = torch.where(keep, ce, torch.zeros_like(ce)).flatten(1).sum(dim=1)  # [B]
    count = keep.sum().clamp(min=1)
    return total * ce.shape[0] / count


def _check_maps(what: str, maps: Sequence[Tensor], batch: int, k: int) -> None:
    for i, m in enumerate(maps):
        if m.ndim != 4 or m.shape[0] != batch or m.shape[1] != k:
            raise ValueError(f"aligned_cross_entropy: {what}[{i}] must be [{batch}, {k}, h, w], got {tuple(m.shape)}")


def aligned_cross_entropy(
    targets: Sequence[Tensor],
    scores: Sequence[Tensor],
    gc_boxes: Tensor,
    other_boxes: Tensor,
    patch: int,
    temperature: float = 0.1,
    masks: Sequence[Tensor] | None = None,
    kernel: int = 7,
) -> Tensor:
    """Leopart's spatial loss as per-image contributions [B] whose mean is the reference's loss
    (src/leopart.py 289-370, the queue aside).

    targets[g] [B, K, h_g, w_g]: global crop g's Sinkhorn assignments; scores[v] [B, K, h_v, w_v]: the
    student's prototype scores of view v (globals first); gc_boxes [B, G, V, 4] and other_boxes
    [B, V, G, 4] from ``pair_boxes`` in crop pixels; masks[g] [B, 1, h_g, w_g] or None (every cell).
    For each g and v != g both sides are roi-aligned (kernel x kernel, aligned=True, boxes / patch)
    over the pair's intersection; per cell -sum_k q log softmax(s / temperature); masked pairs average
    over the cells whose aligned mask is >= 1.0, as the reference. L_g = sum_v / (V - 1), mean over g.
    """
    views, globals_ = len(scores), len(targets)
    if not 1 <= globals_ < views:
        raise ValueError(f"aligned_cross_entropy: needs 1 <= G < V, got {globals_} targets and {views} score maps")
    if gc_boxes.ndim != 4 or gc_boxes.shape[1:] != (globals_, views, 4):
        raise ValueError(
            f"aligned_cross_entropy: gc_boxes must be [B, {globals_}, {views}, 4], got {tuple(gc_boxes.shape)}"
        )
    batch = gc_boxes.shape[0]
    if other_boxes.shape != (batch, views, globals_, 4):
        raise ValueError(
            f"aligned_cross_entropy: other_boxes must be [{batch}, {views}, {globals_}, 4], "
            f"got {tuple(other_boxes.shape)}"
        )
    if masks is not None and len(masks) != globals_:
        raise ValueError(f"aligned_cross_entropy: masks has {len(masks)} maps for {globals_} targets")
    k = targets[0].shape[1]
    _check_maps("targets", targets, batch, k)
    _check_maps("scores", scores, batch, k)

    gc = gc_boxes.float() / patch  # boxes in patch units, as the reference (src/leopart.py 330, 354)
    other = other_boxes.float() / patch
    # each view's scores over its intersection with every global crop: [B, G, K, kernel, kernel]
    aligned_scores = [
        roi_align(s.float(), _rois(other[:, v]), kernel, aligned=True).unflatten(0, (batch, globals_))
        for v, s in enumerate(scores)
    ]
    loss = gc.new_zeros(batch)
    for g in range(globals_):
        rois = _rois(gc[:, g])  # [B * V, 5]
        q = roi_align(targets[g].detach().float(), rois, kernel, aligned=True).unflatten(0, (batch, views))
        keep = None
        if masks is not None:
            aligned_mask = roi_align(masks[g].detach().float(), rois, kernel, aligned=True)  # [B * V, 1, k, k]
            keep = (aligned_mask >= 1.0).unflatten(0, (batch, views))[:, :, 0]  # [B, V, k, k]
        for v in range(views):
            if v == g:
                continue
            log_p = F.log_softmax(aligned_scores[v][:, g] / temperature, dim=1)  # [B, K, k, k]
            ce = -(q[:, v] * log_p).sum(dim=1)  # [B, k, k]
            loss = loss + _pair_loss(ce, None if keep is None else keep[:, v])
    return loss / (views - 1) / globals_
