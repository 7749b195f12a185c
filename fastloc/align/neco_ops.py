"""NeCo's loss mathematics (NECO-AND-GRAM.md A3): rank matrices of roi-aligned cells against a
reference set, and the cross-entropy between the teacher's and the student's ranks.

Pure device-side tensor functions, faithful to vpariza/NeCo @ 3932160 src/neco.py
(``compute_knn_perm_mat``, ``compute_knn_subloss``, ``knn_loss``; tests/test_neco_ops.py compares
each with a transcription of the reference's lines), without host syncs, and returning per-image
losses whose mean is the reference's scalar. The reference set is injected: the reference draws it
with an unseeded ``randperm`` from its queue or from the batch (``reference_cells`` is the batch
draw for a given permutation). Departures: ``log`` is clamped at the dtype's smallest normal number
(the reference has no epsilon, so an entry that underflows to 0 gives NaN: pitfall A6); the
references and the teacher are detached (the reference lets gradients reach the teacher's weights
through batch references); all pairs are sorted in one batch, summed in another order (rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from fastloc.align.sorting import soft_sort_permutation
from fastloc.runtime import full_precision


def _fp32(device: torch.device):
    """Autocast off: the similarities are taken in fp32 as the reference's (no precision set)."""
    return full_precision(device)


def rank_matrices(
    queries: Tensor, references: Tensor, steepness: float, network: str = "bitonic", relaxation: str = "cauchy"
) -> Tensor:
    """``compute_knn_perm_mat`` with ``sim_dist: cosine`` (neco.py 370-386), in another layout.

    queries [B, D, h, w], references [B, D, r1, r2] (R = r1 * r2 vectors per image). For each query
    cell, the cosines to the image's R references are soft-sorted (ascending). Returns P
    [B, h * w, R, R] fp32: P[b, c, r, j] = the weight of reference r at rank j for cell c (cells
    row-major). The reference's (bs, j, r, y, x) is ``P.permute(0, 3, 2, 1).unflatten(3, (h, w))``.
    """
    if queries.ndim != 4 or references.ndim != 4 or queries.shape[:2] != references.shape[:2]:
        raise ValueError(
            f"rank_matrices: queries [B, D, h, w] and references [B, D, r1, r2] must share B and D, "
            f"got {tuple(queries.shape)} and {tuple(references.shape)}"
        )
    batch, cells = queries.shape[0], queries.shape[2] * queries.shape[3]
    with _fp32(queries.device):
        q = F.normalize(queries.float().flatten(2).transpose(1, 2), dim=-1)  # [B, hw, D]
        r = F.normalize(references.float().flatten(2), dim=1)  # [B, D, R]
        cosine = torch.bmm(q, r)  # [B, hw, R]
        perm = soft_sort_permutation(cosine.flatten(0, 1), steepness, network, relaxation)  # [B * hw, R, R]
    return perm.unflatten(0, (batch, cells))


def neco_pair_loss(teacher: Tensor, student: Tensor, mask: Tensor | None = None) -> Tensor:
    """``compute_knn_subloss`` (neco.py 389-407) as per-image contributions.

    teacher, student [..., B, C, R, R] rank matrices (``rank_matrices``; leading dims are independent
    crop pairs); mask None or [..., B, C] (or [..., B, h, w]) with 1 = the cell counts. Returns
    [..., B]: without a mask, -mean over (cells, references) of sum over ranks of t * log s; with a
    mask, B * image b's masked sum / the pair's masked total, so the mean over B is the reference's
    scalar either way, and 0 where a pair's mask is empty (the reference's ``return 0.0``).
    """
    if teacher.shape != student.shape or teacher.ndim < 4 or teacher.shape[-1] != teacher.shape[-2]:
        raise ValueError(
            f"neco_pair_loss: teacher and student must be [..., B, C, R, R] of one shape, "
            f"got {tuple(teacher.shape)} and {tuple(student.shape)}"
        )
    tiny = torch.finfo(student.dtype).tiny  # departure: the reference's log has no epsilon
    entropy = -(teacher * torch.log(student.clamp_min(tiny))).sum(-1)  # [..., B, C, R]
    if mask is None:
        return entropy.mean((-2, -1))
    lead = teacher.shape[:-2]  # [..., B, C]
    if mask.shape[: len(lead) - 1] != lead[:-1] or mask[(0,) * (len(lead) - 1)].numel() != lead[-1]:
        raise ValueError(
            f"neco_pair_loss: mask must be [..., B, C] for rank matrices {tuple(teacher.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    weight = mask.reshape(lead).to(entropy.dtype)  # [..., B, C]
    per_image = (entropy * weight[..., None]).sum((-2, -1))  # [..., B]
    total = weight.sum((-2, -1))[..., None] * teacher.shape[-1]  # [..., 1]: the reference's sum of the repeated mask
    return teacher.shape[-4] * per_image / torch.where(total > 0, total, torch.ones_like(total))


def _rois(boxes: Tensor, patch: int) -> Tensor:
    """[B, K, 4] boxes in crop pixels -> [B * K, 5] rois (image index, box / patch), image-major."""
    batch, k = boxes.shape[:2]
    index = torch.arange(batch, device=boxes.device, dtype=torch.float32).repeat_interleave(k)[:, None]
    return torch.cat((index, boxes.reshape(-1, 4).float() / patch), dim=1)


def _without(x: Tensor, i: int, dim: int) -> Tensor:
    """x without index i along dim, by slices (a list index would copy the index to the device)."""
    return torch.cat((x.narrow(dim, 0, i), x.narrow(dim, i + 1, x.shape[dim] - i - 1)), dim=dim)


def _align(maps: Tensor, boxes: Tensor, patch: int, kernel: int) -> Tensor:
    """roi_align (kernel x kernel, aligned=True) of maps [B, D, h, w] over boxes [B, K, 4]: [K, B, D, k, k]."""
    with _fp32(maps.device):
        cells = roi_align(maps.float(), _rois(boxes, patch), kernel, aligned=True)  # [B * K, D, k, k]
    return cells.unflatten(0, boxes.shape[:2]).transpose(0, 1)


def teacher_cells(teacher_maps: Sequence[Tensor], gc_boxes: Tensor, patch: int, kernel: int = 7) -> Tensor:
    """The teacher's aligned cells (neco.py 419-425), detached: [G, V - 1, B, D, k, k].

    teacher_maps[g] [B, D, h, w]: global crop g's map; gc_boxes [B, G, V, 4]: g∩v in g's pixels.
    Entry [g, i] is g over g∩v for the i-th view v != g (ascending).
    """
    with torch.no_grad():
        return torch.stack(
            [_align(t.detach(), _without(gc_boxes[:, g], g, dim=1), patch, kernel) for g, t in enumerate(teacher_maps)]
        )


def reference_cells(aligned_teacher: Tensor, order: Tensor) -> Tensor:
    """The reference's batch draw (neco.py 459-473, no mask): all aligned cells of the batch,
    taken in ``order`` (indices into the B * k * k cells, image-major then row-major; the reference
    draws a ``randperm``) and cut back into images. aligned_teacher [..., B, D, k, k], order
    [..., B * k * k] -> [..., B, D, k, k], detached."""
    *lead, batch, dim, k1, k2 = aligned_teacher.shape
    if order.shape != (*lead, batch * k1 * k2):
        raise ValueError(
            f"reference_cells: order must be [..., B * k * k] = {(*lead, batch * k1 * k2)} for cells "
            f"{tuple(aligned_teacher.shape)}, got {tuple(order.shape)}"
        )
    cells = aligned_teacher.detach().movedim(-3, -1).flatten(-4, -2)  # [..., B * k * k, D]
    drawn = torch.gather(cells, -2, order[..., None].expand(*order.shape, dim))
    return drawn.unflatten(-2, (batch, k1, k2)).movedim(-1, -3)


def _student_cells(student_maps: Sequence[Tensor], other_boxes: Tensor, patch: int, kernel: int) -> Tensor:
    """The student map of v over v∩g for every global g != v (neco.py 446-449): [G, V - 1, B, D, k, k]
    in ``teacher_cells``' order; one roi_align per view."""
    n_global, n_views = other_boxes.shape[2], len(student_maps)
    per_view = []  # per_view[v][j]: the j-th global crop != v
    for v, s in enumerate(student_maps):
        boxes = _without(other_boxes[:, v], v, 1) if v < n_global else other_boxes[:, v]  # [B, G or G - 1, 4]
        per_view.append(_align(s, boxes, patch, kernel))
    pairs = [per_view[v][g - (g > v)] for g in range(n_global) for v in range(n_views) if v != g]
    return torch.stack(pairs).unflatten(0, (n_global, n_views - 1))


def _stack_references(references: Sequence[Sequence[Tensor]] | Tensor, like: Tensor) -> Tensor:
    """references[g][i] -> [G, V - 1, B, D, k', k'], detached, checked against the teacher's cells."""
    refs = references if isinstance(references, Tensor) else torch.stack([torch.stack(list(r)) for r in references])
    if refs.ndim != 6 or refs.shape[:4] != like.shape[:4]:
        raise ValueError(
            f"neco_loss: references must be [G, V - 1, B, D, k', k'] matching the cells {tuple(like.shape)}, "
            f"got {tuple(refs.shape)}"
        )
    return refs.detach()


def _check_pairs(teacher_maps, student_maps, gc_boxes, other_boxes, references, masks, patch, kernel) -> None:
    """One-line ValueErrors for inputs that do not describe G global crops among V views."""
    g, v = len(teacher_maps), len(student_maps)
    if not 1 <= g < v:
        raise ValueError(f"neco_loss: need 1 <= G < V (teacher maps G={g}, student maps V={v})")
    b = student_maps[0].shape[0]
    if tuple(gc_boxes.shape) != (b, g, v, 4) or tuple(other_boxes.shape) != (b, v, g, 4):
        raise ValueError(
            f"neco_loss: gc_boxes must be [B, G, V, 4] = {(b, g, v, 4)} and other_boxes [B, V, G, 4] = "
            f"{(b, v, g, 4)}, got {tuple(gc_boxes.shape)} and {tuple(other_boxes.shape)}"
        )
    if len(references) != g or any(len(r) != v - 1 for r in references):
        raise ValueError(f"neco_loss: references must hold G={g} lists of V-1={v - 1} reference sets")
    if masks is not None and (masks.ndim != 4 or tuple(masks.shape[:2]) != (b, g)):
        raise ValueError(f"neco_loss: masks must be [B, G, h, w] with B={b}, G={g}, got {tuple(masks.shape)}")
    if patch < 1 or kernel < 1:
        raise ValueError(f"neco_loss: patch and kernel must be >= 1, got patch={patch}, kernel={kernel}")


def neco_loss(
    teacher_maps: Sequence[Tensor],
    student_maps: Sequence[Tensor],
    gc_boxes: Tensor,
    other_boxes: Tensor,
    patch: int,
    references: Sequence[Sequence[Tensor]] | Tensor,
    steepness: float,
    masks: Tensor | None = None,
    kernel: int = 7,
    *,
    teacher_steepness: float | None = None,
    network: str = "bitonic",
) -> Tensor:
    """``knn_loss`` (neco.py 409-484) with the reference sets injected, per image: [B].

    teacher_maps[g] [B, D, h, w] for the G global crops; student_maps[v] [B, D, h_v, w_v] for all V
    views, globals first; gc_boxes [B, G, V, 4] (g∩v in g's pixels), other_boxes [B, V, G, 4] (v∩g in
    v's pixels); references[g][i] [B, D, k, k] for the i-th view v != g (ascending), shared by
    teacher and student (``reference_cells`` or a queue draw). masks: None (the configs' ``all``) or
    [B, G, h, w] with 1 = a cell of global crop g counts (``fg``; ``bg`` passes the complement), roi-
    aligned over g∩v and kept where >= 1 as the reference's. teacher_steepness: the teacher sorter's
    (default ``steepness``). The mean over B is mean_g sum_{v != g} pair loss / (V - 1).
    """
    _check_pairs(teacher_maps, student_maps, gc_boxes, other_boxes, references, masks, patch, kernel)
    n_global, n_views = len(teacher_maps), len(student_maps)
    teacher = teacher_cells(teacher_maps, gc_boxes, patch, kernel)  # [G, V - 1, B, D, k, k]
    student = _student_cells(student_maps, other_boxes, patch, kernel)  # the same layout
    refs = _stack_references(references, teacher)
    pairs = teacher.shape[:3]  # every (g, v != g, b) is sorted in one batch
    ranks_s = rank_matrices(student.flatten(0, 2), refs.flatten(0, 2), steepness, network).unflatten(0, pairs)
    with torch.no_grad():
        t_steep = steepness if teacher_steepness is None else teacher_steepness
        ranks_t = rank_matrices(teacher.flatten(0, 2), refs.flatten(0, 2), t_steep, network).unflatten(0, pairs)
    cell_mask = None
    if masks is not None:  # neco.py 427-432: the mask of g over g∩v, thresholded at 1
        aligned = [_align(masks[:, g : g + 1], _without(gc_boxes[:, g], g, 1), patch, kernel) for g in range(n_global)]
        cell_mask = (torch.stack(aligned) >= 1.0).flatten(3)  # [G, V - 1, B, k * k]
    losses = neco_pair_loss(ranks_t, ranks_s, cell_mask)  # [G, V - 1, B]
    return (losses.sum(1) / (n_views - 1)).mean(0)
