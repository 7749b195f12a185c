"""Leopart's and NeCo's objective glue against the references' own lines on identical inputs.

fastloc/align/leopart.py, neco.py and dense.py join the loss mathematics (compared piece by piece in
test_leopart_ops.py and test_neco_ops.py) with a queue of teacher embeddings, an EMA teacher, the
class-token attention and the per-update schedules; this file compares that glue. Each ``reference_*``
function transcribes the lines it cites from MkuuWaUjinga/leopart @ 7835701 or vpariza/NeCo @ 3932160
with ``self``'s fields as a namespace; where a reference draws at random (the queue push's
``randperm``, NeCo's queue draw) the draw is replaced by fastloc's on the same uniforms.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_leopart_ops import crop_boxes, reference_calculate_bboxes, reference_sinkhorn
from test_neco_ops import reference_knn_loss, reference_sorter
from torchvision.ops import roi_align

from fastloc.align.dense import Teacher, cls_attention, references_pos_embed
from fastloc.align.leopart import Leopart, LeopartConfig
from fastloc.align.leopart_ops import pair_boxes
from fastloc.align.neco import Neco, NecoConfig
from fastloc.align.prepare import adamw, learning_rate, weight_decay
from fastloc.align.presets import DENSE_OPTIM
from fastloc.align.schedule import cosine
from fastloc.data.multicrop import MultiCrop
from fastloc.models.registry import create_model

# The tiny preset's geometry (presets.py _TINY_DENSE): 32 px global crops (4 x 4 patches of 8 px), 16 px
# local ones (2 x 2), 2 + 4 views, 3 x 3 roi cells. B = 2 pushes min(10 B, 40) = 20 rows a step: 2
# steps fill the 40-row queue.
TINY = {"backbone": "tiny", "weights": "random", "crops": MultiCrop(sizes=(32, 16)), "roi_kernel": 3}
TINY |= {"head_hidden": 64, "head_dim": 32, "queue_length": 40}
B, G, L, PATCH, GRID, LGRID, KERNEL, QUEUE = 2, 2, 4, 8, 4, 2, 3, 40
P, D, PROTOTYPES, PUSH = GRID * GRID, 32, 16, min(10 * B, QUEUE)
SIZES = (32,) * G + (16,) * L


# ---------------------------------------------------------------- Leopart (src/leopart.py)


def reference_spatial_loss(
    ref, gc_teacher_output, gc_student_output, lc_student_output, gc_teacher_emb, bboxes, bs, gc_spatial_res,
    attn_hard=None,
):  # fmt: skip
    """src/leopart.py 289-370 (Leopart.spatial_loss), the queue included (305-322), ``self`` as ``ref``:
    get_assignments is ``sinkhorn`` (one process), self.softmax is the softmax over dim 1, and the
    push's ``torch.randperm(emb_gc.size(0))`` (line 320) is ``ref.randperm(i, emb_gc.size(0))``."""
    lc_spatial_res = np.sqrt(lc_student_output.size(0) / (ref.nmb_crops[-1] * bs))
    assert lc_spatial_res.is_integer(), "spatial crops should have same x and y dim"
    lc_spatial_res = int(lc_spatial_res)
    loss = 0
    for i, crop_id in enumerate(ref.crops_for_assign):
        with torch.no_grad():
            out = gc_teacher_output[bs * gc_spatial_res**2 * crop_id : bs * gc_spatial_res**2 * (crop_id + 1)]
            num_spatial_vectors_for_pred = out.size(0)
            if ref.queue is not None:
                if ref.use_the_queue or not torch.all(ref.queue[i, -1, :] == 0):
                    ref.use_the_queue = True
                    out = torch.cat((torch.mm(ref.queue[i], torch.flatten(ref.prototypes, 1).t()), out))
                emb_gc = gc_teacher_emb[bs * gc_spatial_res**2 * crop_id : bs * gc_spatial_res**2 * (crop_id + 1)]
                if attn_hard is not None:
                    flat_mask = attn_hard.permute(0, 2, 3, 1).flatten().bool()
                    gc_fg_mask = flat_mask[bs * gc_spatial_res**2 * crop_id : bs * gc_spatial_res**2 * (crop_id + 1)]
                    emb_gc = emb_gc[gc_fg_mask]
                num_vectors_to_store = min(bs * 10, ref.queue_length // ref.gpus)
                idx = ref.randperm(i, emb_gc.size(0))[:num_vectors_to_store]
                ref.queue[i, num_vectors_to_store:] = ref.queue[i, :-num_vectors_to_store].clone()
                ref.queue[i, :num_vectors_to_store] = emb_gc[idx]
            q = torch.exp(out / ref.epsilon).t()
            q = reference_sinkhorn(q, ref.sinkhorn_iterations)[-num_spatial_vectors_for_pred:]
        q_reshaped = q.reshape(bs, gc_spatial_res, gc_spatial_res, -1).permute(0, 3, 1, 2)
        downsampled_current_crop_boxes = torch.unbind(bboxes["gc"][:, crop_id] / ref.patch_size)
        aligned_soft_clusters = roi_align(
            q_reshaped, downsampled_current_crop_boxes, ref.roi_align_kernel_size, aligned=True
        )
        if attn_hard is not None:
            gc_hard_mask = attn_hard[bs * crop_id : bs * (crop_id + 1)]
            aligned_mask = roi_align(
                gc_hard_mask, downsampled_current_crop_boxes, ref.roi_align_kernel_size, aligned=True
            )
            thresholded_mask = aligned_mask >= 1.0
        subloss = 0
        for v in np.delete(np.arange(np.sum(ref.nmb_crops)), crop_id):
            if v in ref.crops_for_assign:
                out = gc_student_output[bs * gc_spatial_res**2 * v : bs * gc_spatial_res**2 * (v + 1)]
                spatial_res = gc_spatial_res
            else:
                lc_index = v - ref.nmb_crops[0]
                out = lc_student_output[bs * lc_spatial_res**2 * lc_index : bs * lc_spatial_res**2 * (lc_index + 1)]
                spatial_res = lc_spatial_res
            aligned_out = roi_align(
                out.reshape(bs, spatial_res, spatial_res, -1).permute(0, 3, 1, 2),
                torch.unbind(bboxes["all"][:, v, crop_id].unsqueeze(1) / ref.patch_size),
                ref.roi_align_kernel_size,
                aligned=True,
            )
            aligned_p = F.softmax(aligned_out / ref.temperature, dim=1)
            aligned_q = aligned_soft_clusters[v :: np.sum(ref.nmb_crops)]
            if attn_hard is not None:
                mask = thresholded_mask[v :: np.sum(ref.nmb_crops)].squeeze().float()
                if torch.sum(mask).item() != 0:
                    subloss -= torch.sum(torch.sum(aligned_q * torch.log(aligned_p), dim=1) * mask) / torch.sum(mask)
            else:
                subloss -= torch.mean(torch.sum(aligned_q * torch.log(aligned_p), dim=1))
        loss += subloss / (np.sum(ref.nmb_crops) - 1)
    loss /= len(ref.crops_for_assign)
    return loss


def reference_state(queue_length: int = QUEUE) -> SimpleNamespace:
    """Leopart's / NeCo's fields as on_train_epoch_start leaves them (leopart.py 156-167, neco.py 185-196;
    NeCo's entries_in_queue from its __init__, line 110), with the tiny preset's settings."""
    return SimpleNamespace(
        queue=torch.zeros(2, queue_length, D) if queue_length else None,
        use_the_queue=False,
        entries_in_queue=0,
        queue_length=queue_length,
        gpus=1,
        crops_for_assign=[0, 1],
        nmb_crops=[G, L],
        patch_size=PATCH,
        epsilon=0.05,
        sinkhorn_iterations=3,
        roi_align_kernel_size=KERNEL,
        temperature=0.1,
        prototypes=None,
        randperm=None,
    )


def priority_order(drawn: torch.Tensor, masks: list[torch.Tensor] | None):
    """The push's pick as a permutation of the rows it picks from: fastloc queues the rows of the
    highest priorities (the step's uniforms, foreground first), so a uniformly random permutation of
    the (foreground) rows is the descending order of their priorities."""

    def randperm(i: int, n: int) -> torch.Tensor:
        priority = drawn[:, i, :P].reshape(B * P)
        if masks is not None:
            priority = priority[masks[i].reshape(B * P).bool()]
        assert priority.numel() == n
        return priority.argsort(descending=True)

    return randperm


def flat_rows(maps: list[torch.Tensor]) -> torch.Tensor:
    """fastloc's maps [B, C, h, w] per view -> the references' rows (view, image, y, x) of C."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]) for m in maps])


def step_inputs(seed: int, objective, masked: bool, channels: int):
    """One step's inputs of ``dense_losses`` on B = 2 images: the teacher's global-crop embeddings
    (and scores by the teacher's prototypes, Leopart), the student's maps (leaves requiring grad),
    the pair boxes (fastloc's, and the reference's from calculate_bboxes on the same crops), masks and
    the step's uniforms."""
    g = torch.Generator().manual_seed(seed)
    t_emb = F.normalize(torch.randn(G * B, P, D, generator=g), dim=-1)
    t_scores = None
    if objective.teacher.net.prototypes is not None:
        with torch.no_grad():
            t_scores = objective.teacher.net.prototypes(t_emb)
    sides = [GRID] * G + [LGRID] * L
    s_maps = [(2 * torch.rand(B, channels, s, s, generator=g) - 1).requires_grad_() for s in sides]
    rng = np.random.default_rng(seed)
    boxes = torch.stack([crop_boxes(rng, SIZES, G) for _ in range(B)])  # [B, V, 4]
    gc, other = pair_boxes(boxes, SIZES, G)
    per_sample = [reference_calculate_bboxes(boxes[b], (32, 16), (G, L)) for b in range(B)]
    bboxes = {"gc": torch.stack([p[0] for p in per_sample]), "all": torch.stack([p[1] for p in per_sample])}
    masks = None
    if masked:  # mostly foreground (a push needs >= 20 foreground rows of 32), a full middle block
        masks = []
        for _ in range(G):
            m = (torch.rand(B, 1, GRID, GRID, generator=g) < 0.8).float()
            m[:, :, 1:3, 1:3] = 1
            m[0, 0, 0, :] = 0  # some background in every crop
            masks.append(m)
        assert all(m.sum() >= PUSH for m in masks)
    drawn = objective.sample(B, g)
    return t_emb, t_scores, s_maps, gc, other, bboxes, masks, drawn


def leopart(**overrides) -> Leopart:
    torch.manual_seed(0)
    objective = Leopart(LeopartConfig(**(TINY | {"prototypes": PROTOTYPES} | overrides)))
    objective.normalize_prototypes()  # as losses() does before every step
    return objective


@pytest.mark.parametrize("masked", [False, True], ids=["all", "fg"])
def test_leopart_loss_with_the_queue_is_spatial_loss_step_by_step(masked):
    """Three steps on a 40-row queue: empty (not used), half full (not used: the reference tests the
    last row), full (the student's prototype scores of the queue join Sinkhorn). Each step's loss and
    student gradients equal spatial_loss's, and the queue after the push is the reference's."""
    objective = leopart(loss_mask="fg" if masked else "all")
    ref = reference_state()
    ref.prototypes = objective.trainable.net.prototypes.weight.detach().clone()
    assert not torch.allclose(ref.prototypes, objective.teacher.net.prototypes.weight)  # the queue's scorer matters
    used = []
    for step in range(3):
        t_emb, t_scores, s_maps, gc, other, bboxes, masks, drawn = step_inputs(step, objective, masked, PROTOTYPES)
        ours = objective.dense_losses(t_emb, t_scores, s_maps, gc, other, masks, drawn, B)
        assert ours.shape == (B,)
        our_grads = torch.autograd.grad(ours.mean(), s_maps)

        ref.randperm = priority_order(drawn, masks)
        attn_hard = None if masks is None else torch.cat(masks)
        gc_s, lc_s = flat_rows(s_maps[:G]), flat_rows(s_maps[G:])
        before = ref.queue.clone()
        theirs = reference_spatial_loss(
            ref, t_scores.reshape(-1, PROTOTYPES), gc_s, lc_s, t_emb.reshape(-1, D), bboxes, B, GRID, attn_hard
        )
        their_grads = torch.autograd.grad(theirs, s_maps)
        used.append(ref.use_the_queue)

        torch.testing.assert_close(ours.mean(), theirs, rtol=1e-5, atol=0, msg=f"step {step}")
        for v, (mine, want) in enumerate(zip(our_grads, their_grads)):
            assert want.abs().sum() > 0
            torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-7, msg=f"step {step}, view {v}")
        assert torch.equal(objective.queue, ref.queue), f"step {step}: the queue after the push"
        if step == 2:  # the queue changes the loss: a test that ignored it would fail above
            plain = reference_state(queue_length=0)
            plain.prototypes = ref.prototypes
            no_queue = reference_spatial_loss(
                plain, t_scores.reshape(-1, PROTOTYPES), gc_s, lc_s, t_emb.reshape(-1, D), bboxes, B, GRID, attn_hard
            )
            assert not torch.isclose(no_queue, theirs, rtol=1e-3)
        assert not torch.equal(before, ref.queue)
    assert used == [False, False, True]
    assert objective._queued == QUEUE and int(objective.queued) == QUEUE


# ---------------------------------------------------------------- NeCo (src/neco.py)


def reference_update_queue(ref, gc_teacher_emb, bs, gc_spatial_res, attn_hard=None):
    """src/neco.py 487-508 (NeCo.update_queue), ``self`` as ``ref``; lc_spatial_res (only asserted
    there) left out; the push's ``torch.randperm(emb_gc.size(0))`` (506) is ``ref.randperm(i, ...)``."""
    for i, crop_id in enumerate(ref.crops_for_assign):
        with torch.no_grad():
            if ref.queue is not None:
                if ref.use_the_queue or not torch.all(ref.queue[i, -1, :] == 0):
                    ref.use_the_queue = True
                emb_gc = gc_teacher_emb[bs * gc_spatial_res**2 * crop_id : bs * gc_spatial_res**2 * (crop_id + 1)]
                if attn_hard is not None:
                    flat_mask = attn_hard.permute(0, 2, 3, 1).flatten().bool()
                    gc_fg_mask = flat_mask[bs * gc_spatial_res**2 * crop_id : bs * gc_spatial_res**2 * (crop_id + 1)]
                    emb_gc = emb_gc[gc_fg_mask]
                num_vectors_to_store = min(bs * 10, ref.queue_length // ref.gpus)
                ref.entries_in_queue = min((ref.entries_in_queue + num_vectors_to_store), ref.queue_length)
                idx = ref.randperm(i, emb_gc.size(0))[:num_vectors_to_store]
                ref.queue[i, num_vectors_to_store:] = ref.queue[i, :-num_vectors_to_store].clone()
                ref.queue[i, :num_vectors_to_store] = emb_gc[idx]


def reference_queue_draw(ref, indices: torch.Tensor):
    """src/neco.py 454-458 (knn_loss's queue branch): the rows ``idces`` of crop i's queue as the
    reference set of the k-th other view, with lines 456-457 (``randperm(queue rows)[:num_elements]``
    modulo the entries) replaced by ``indices[i, k]`` [bsl * ps1 * ps2]."""

    def draw(i, k, aligned_emb_gc_sel):
        bsl, d, ps1, ps2 = aligned_emb_gc_sel.shape
        num_elements = bsl * ps1 * ps2
        assert ref.is_queue_usable and ref.entries_in_queue > 0
        idces = indices[i, k]
        assert idces.numel() == num_elements
        return ref.queue[i][idces].reshape(bsl, ps1, ps2, d).permute(0, 3, 1, 2)

    return draw


def neco(**overrides) -> Neco:
    torch.manual_seed(0)
    return Neco(NecoConfig(**(TINY | {"references": "queue"} | overrides)))


def queue_indices(drawn: torch.Tensor, filled: int) -> torch.Tensor:
    """fastloc's queue draw, index = floor(u * entries), from the uniforms after the P push
    priorities: [G, V - 1, B * k * k] (image-major, then the k x k cell), the reference's idces layout."""
    u = drawn[:, :, P:].reshape(B, G, G + L - 1, KERNEL * KERNEL).permute(1, 2, 0, 3)
    return (u * filled).long().clamp(max=filled - 1).flatten(2)


@pytest.mark.parametrize("masked", [False, True], ids=["all", "fg"])
def test_neco_loss_with_queue_references_is_knn_loss_after_update_queue(masked):
    """Three steps on a 40-row queue, pushed before the loss as shared_step does (neco.py 361-366): the
    queue after each push is update_queue's, and the loss and student gradients are knn_loss's with
    the queue branch fed fastloc's indices (drawn among entries_in_queue rows, counted as the reference)."""
    objective = neco(loss_mask="fg" if masked else "all")
    ref = reference_state()
    ref.is_queue_usable = True
    sorter = reference_sorter("bitonic", KERNEL * KERNEL, 100.0)
    for step in range(2 if masked else 3):  # the reference's sorts are slow: masked stops once full
        t_emb, _, s_maps, gc, other, bboxes, masks, drawn = step_inputs(10 + step, objective, masked, D)
        ours = objective.dense_losses(t_emb, None, s_maps, gc, other, masks, drawn, B)
        assert ours.shape == (B,)
        our_grads = torch.autograd.grad(ours.mean(), s_maps)

        ref.randperm = priority_order(drawn, masks)
        attn_hard = None if masks is None else torch.cat(masks)
        reference_update_queue(ref, t_emb.reshape(-1, D), B, GRID, attn_hard)
        assert torch.equal(objective.queue, ref.queue), f"step {step}: the queue after the push"
        draw = reference_queue_draw(ref, queue_indices(drawn, ref.entries_in_queue))  # the reference's count
        gc_s, lc_s = flat_rows(s_maps[:G]), flat_rows(s_maps[G:])
        theirs = reference_knn_loss(
            t_emb.reshape(-1, D), gc_s, lc_s, bboxes, B, GRID, LGRID, [G, L], PATCH, sorter, sorter, draw, attn_hard,
            kernel=KERNEL,
        )  # fmt: skip
        their_grads = torch.autograd.grad(theirs, s_maps)
        torch.testing.assert_close(ours.mean(), theirs, rtol=2e-5, atol=0, msg=f"step {step}")
        for v, (mine, want) in enumerate(zip(our_grads, their_grads)):
            assert want.abs().sum() > 0, f"step {step}, view {v}: no gradient to compare"
            scale = want.abs().max().item()
            torch.testing.assert_close(mine, want, rtol=1e-3, atol=1e-4 * scale, msg=f"step {step}, view {v}")
        if step == 0 and not masked:  # the comparison sees the draw: indices among the 20 filled rows differ
            wide = reference_queue_draw(ref, queue_indices(drawn, PUSH))
            args = (t_emb.reshape(-1, D), gc_s, lc_s, bboxes, B, GRID, LGRID, [G, L], PATCH, sorter, sorter, wide)
            assert not torch.isclose(reference_knn_loss(*args, attn_hard, kernel=KERNEL), theirs, rtol=1e-3)


def test_neco_counts_queue_entries_as_the_reference_once_per_crop():
    """update_queue adds num_vectors_to_store to entries_in_queue once per global crop (neco.py 505,
    inside the crop loop), so after one push of 20 rows per crop the reference draws modulo 40 (rows
    20-39 still zero); fastloc draws among the same G x pushed rows (``Neco.dense_losses``)."""
    objective = neco()
    ref = reference_state()
    t_emb, _, s_maps, gc, other, _, _, drawn = step_inputs(20, objective, False, D)
    objective.dense_losses(t_emb, None, s_maps, gc, other, None, drawn, B)
    ref.randperm = priority_order(drawn, None)
    reference_update_queue(ref, t_emb.reshape(-1, D), B, GRID)
    assert torch.equal(objective.queue, ref.queue)  # the rows agree, and the count the draw uses
    assert min(2 * objective._queued, objective.queue.shape[1]) == ref.entries_in_queue == 40


# ---------------------------------------------------------------- the class-token attention (src/vit.py)


def reference_attention(attn, x):
    """src/vit.py 63-75 (Attention.forward) on a timm Attention's weights: (output, attn [N, H, T, T])."""
    B_, N, C = x.shape
    qkv = attn.qkv(x).reshape(B_, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = (q @ k.transpose(-2, -1)) * attn.scale
    a = a.softmax(dim=-1)
    a = attn.attn_drop(a)
    x = (a @ v).transpose(1, 2).reshape(B_, N, C)
    x = attn.proj(x)
    x = attn.proj_drop(x)
    return x, a


def reference_last_attention(model, views):
    """src/vit.py 260-272 (forward_backbone, last_self_attention=True) with src/vit.py 90-96's
    Block.forward(return_attention=True) on the last block, on timm's tokens (prepare_tokens as timm's
    patch_embed, _pos_embed, norm_pre); then src/leopart.py 276-277's average over the heads.
    Returns (tokens after the final norm [N, T, C], attn_smooth [N, P])."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(views)))
    for blk in model.blocks[:-1]:
        x = blk(x)
    blk = model.blocks[-1]
    y, attn = reference_attention(blk.attn, blk.norm1(x))
    x = x + blk.drop_path1(y)
    x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
    x = model.norm(x)
    teacher_gc_attn = attn[:, :, 0, 1:]
    attn_smooth = sum(teacher_gc_attn[:, i] * 1 / teacher_gc_attn.size(1) for i in range(teacher_gc_attn.size(1)))
    return x, attn_smooth


def test_class_token_attention_is_the_references_and_the_teacher_runs_one_pass():
    objective = leopart(loss_mask="fg")
    teacher: Teacher = objective.teacher
    model = teacher.net.backbone
    blk = model.blocks[-1]
    assert isinstance(blk.attn.q_norm, torch.nn.Identity) and isinstance(blk.ls1, torch.nn.Identity)
    with torch.no_grad():  # sharpen the random attention, else every map is near uniform and proves little
        blk.attn.qkv.weight.mul_(25)
    views = torch.randn(G * B, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens, smooth = reference_last_attention(model, views)
        x = model.norm_pre(model._pos_embed(model.patch_embed(views)))
        for b in model.blocks[:-1]:
            x = b(x)
        ours = cls_attention(blk.attn, blk.norm1(x), 1)
        torch.testing.assert_close(reference_attention(blk.attn, blk.norm1(x))[0], blk.attn(blk.norm1(x)))
        t_tokens, t_emb, t_scores, t_attn = teacher(views)
        f_tokens, f_emb, f_scores = teacher.net(views)  # forward_features, then the head
    assert ours.shape == (G * B, P) and t_attn.shape == (G * B, P)
    assert smooth.max() > 5 / (P + 1)  # far from uniform
    torch.testing.assert_close(ours, smooth, rtol=1e-5, atol=1e-7)
    assert torch.equal(t_attn, ours)
    # the one pass returns forward_features' tokens and the head's outputs, to the bit
    assert torch.equal(t_tokens, f_tokens) and torch.equal(t_emb, f_emb) and torch.equal(t_scores, f_scores)
    torch.testing.assert_close(t_tokens, tokens[:, 1:], rtol=1e-5, atol=1e-6)


def reference_prepare_tokens(model, x):
    """src/vit.py 247-258 (prepare_tokens) with 183-203 (interpolate_pos_encoding, DINO's: bicubic by
    scale factor (grid + 0.1) / sqrt(N), no antialias; NeCo's src/models/vit.py 175-195 is the same
    and its vit_v2.py 204-232 differs only by an fp32 cast) on a timm ViT's weights."""
    B_, _, w, h = x.shape
    x = model.patch_embed(x).flatten(1, 2)  # timm's patch_embed gives [B, h, w, C] under dynamic_img_size
    cls_tokens = model.cls_token.expand(B_, -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    npatch = x.shape[1] - 1
    N = model.pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return x + model.pos_embed
    class_pos_embed = model.pos_embed[:, 0]
    patch_pos_embed = model.pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // model.patch_embed.patch_size[0]
    h0 = h // model.patch_embed.patch_size[1]
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return x + torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def vit_s16_like():
    """A 1-block ViT with ViT-S/16's token grid (224 px, 14 x 14 patches), as the dense objectives build it."""
    torch.manual_seed(0)
    return create_model("tiny", "random", img_size=224, patch_size=16, depth=1, dynamic_img_size=True)


def test_global_crops_at_the_models_size_get_the_references_tokens():
    model = references_pos_embed(vit_s16_like())
    views = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model._pos_embed(model.patch_embed(views)), reference_prepare_tokens(model, views))


def test_local_crops_resample_the_position_embedding_as_the_references():
    """For a 96 px local crop (6 x 6 patches) the references resample the 14 x 14 position embedding
    with scale_factor=(6.1 / 14), bicubic, no antialias (src/vit.py 183-203); timm's dynamic_img_size
    would take F.interpolate(size=(6, 6), bicubic, antialias=True): the dense objectives install the
    references' (``references_pos_embed``)."""
    model = references_pos_embed(vit_s16_like())
    views = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model._pos_embed(model.patch_embed(views)), reference_prepare_tokens(model, views)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- schedules (experiments/utils.py, torch)


def reference_cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int):
    """experiments/utils.py 450-455 (leopart; NeCo's 530-535 are the same lines)."""
    iters = np.arange(epochs * niter_per_ep)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


EPOCHS, ITERS = 3, 5  # 15 updates


def ulps(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> int:
    """The largest distance in units in the last place between two arrays of one float dtype."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    itype = {torch.float64: torch.int64, torch.float32: torch.int32}[a.dtype]
    ia, ib = a.view(itype).long(), b.view(itype).long()
    low = torch.iinfo(itype).min
    ia, ib = (torch.where(i < 0, low - i, i) for i in (ia, ib))  # a monotonic integer line
    return int((ia - ib).abs().max())


def test_cosine_schedules_are_cosine_scheduler_at_every_update():
    total = EPOCHS * ITERS
    optim = DENSE_OPTIM  # weight decay 0.04 -> 0.5 as train_in100k_config.yml
    cfg = LeopartConfig(**TINY)  # momentum 0.9995 -> 1
    cases = {  # fastloc's value at update t of total, the reference's schedule
        "cosine": (lambda t: cosine(0.3, 0.7, t, total), (0.3, 0.7)),
        "weight decay": (lambda t: weight_decay(optim, t, total), (0.04, 0.5)),
        "momentum": (lambda t: cosine(cfg.momentum, cfg.momentum_end, t, total), (0.9995, 1.0)),
    }
    for name, (fn, ends) in cases.items():
        got = np.array([fn(t) for t in range(total)])
        want = reference_cosine_scheduler(*ends, EPOCHS, ITERS)
        # math.cos and numpy's cos may round differently: at most 1 ulp apart (equal on this machine)
        assert ulps(got, want) <= 1, name
    assert (optim.weight_decay, optim.weight_decay_end, cfg.momentum, cfg.momentum_end) == (0.04, 0.5, 0.9995, 1.0)


def test_learning_rate_is_cosine_annealing_lr_stepped_per_update():
    """Both groups' base lrs (backbone 1e-5, head 1e-4, train_in100k_config.yml's lr_backbone and
    lr_heads; final_lr 0) follow CosineAnnealingLR(T_max = updates, eta_min 0) stepped after every
    optimizer step (Lightning's interval 'step'), as configure_optimizers (leopart.py 201-203) sets it."""
    total = EPOCHS * ITERS
    optim = replace(DENSE_OPTIM, epochs=EPOCHS)
    assert (optim.lr, optim.head_lr, optim.min_lr_ratio, optim.warmup_updates) == (1e-5, 1e-4, 0.0, 0)
    groups = adamw(leopart(), optim).param_groups
    assert [g["decayed"] for g in groups] == [True, False, True, False]  # optimizer_step's groups 0 and 2
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(4)]
    bases = (optim.lr, optim.lr, optim.head_lr, optim.head_lr)  # exclude_from_wt_decay's order
    reference = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, bases)])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=total, eta_min=0.0)
    for update in range(total):
        want = [g["lr"] for g in reference.param_groups]
        got = [learning_rate(optim, update, total) * g["lr_scale"] for g in groups]  # as train_step sets them
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=0, err_msg=f"update {update}")
        reference.step()
        scheduler.step()
    assert math.isclose(learning_rate(optim, total - 1, total), optim.lr * (1 - math.cos(math.pi / total)) / 2)


# ---------------------------------------------------------------- the EMA teacher and the heads


@pytest.mark.parametrize("student", ["near", "fresh"])
def test_ema_update_is_the_references_mul_add_to_its_rounding(student):
    """training_step's ``param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)`` (leopart.py
    382-383, neco.py 521-523) with m = momentum_schedule[global_step], against fastloc's
    torch._foreach_lerp_(teacher, student, 1 - m): not bit-identical (about 70 % of the values are).
    near, a student within 1 % of its teacher (training): at most 1 ulp of the result apart. fresh,
    the objective as built (equal backbones, unrelated heads, where the sum can cancel): at most 2 ulps
    of the larger product m t or (1 - m) s apart, the reference's own rounding error (both are that
    close to the exact value); in ulps of a cancelled result that is up to tens."""
    objective = leopart()
    teacher = dict(objective.teacher.named_parameters())
    if student == "near":
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in objective.trainable.named_parameters():
                p.copy_(teacher[name] * (1 + 0.01 * torch.randn(p.shape, generator=g)))
    total = EPOCHS * ITERS
    schedule = reference_cosine_scheduler(0.9995, 1.0, EPOCHS, ITERS)
    equal = count = 0
    for step in (0, 7, total - 1):
        m = schedule[step]
        before = {name: p.detach().clone() for name, p in teacher.items()}
        expected = {}
        for name, param_q in objective.trainable.named_parameters():
            param_k = before[name].clone()
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
            expected[name] = param_k
        objective.before_update(step, total)
        for name, param_q in objective.trainable.named_parameters():
            got, want = teacher[name].detach(), expected[name]
            if student == "near":
                assert ulps(got, want) <= 1, f"step {step}: {name}"
            else:
                t, s = before[name].double(), param_q.detach().double()
                larger = torch.maximum((m * t).abs(), ((1 - m) * s).abs()).float()
                bound = 2 * torch.from_numpy(np.spacing(larger.numpy()))
                assert ((got - want).abs() <= bound).all(), f"step {step}: {name}"
            equal += int((got == want).sum())
            count += got.numel()
            teacher[name].data.copy_(want)  # the next step starts from the reference's teacher
    assert equal / count > 0.6  # mostly to the bit


def test_prototypes_are_normalized_in_both_networks_before_every_step():
    """shared_step (leopart.py 237-245): both prototype matrices' rows L2-normalized before the forward."""
    objective = leopart()
    nets = (objective.trainable.net, objective.teacher.net)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for net in nets:
            net.prototypes.weight.copy_(3 * torch.randn(net.prototypes.weight.shape, generator=g))
    want = [F.normalize(net.prototypes.weight.data.clone(), dim=1, p=2) for net in nets]
    seen: list[torch.Tensor] = []
    hooks = [
        net.prototypes.register_forward_pre_hook(lambda module, args: seen.append(module.weight.detach().clone()))
        for net in nets
    ]
    images, sample = objective.example(B)
    objective.losses(images, sample)
    for hook in hooks:
        hook.remove()
    assert len(seen) >= 3  # the teacher's and the student's two groups of views
    for weight in seen:
        torch.testing.assert_close(weight.norm(dim=1), torch.ones(PROTOTYPES))
    for net, w in zip(nets, want):
        assert torch.equal(net.prototypes.weight, w)


def test_teacher_starts_from_the_students_backbone_with_its_own_head():
    """finetune_with_leopart.py 166-176: the backbone weights are loaded into both networks, the heads
    and prototypes keep their own initialization (two model_func calls, leopart.py 143-154)."""
    objective = leopart()
    student, teacher = objective.trainable.net, objective.teacher.net
    s_backbone, t_backbone = student.backbone.state_dict(), teacher.backbone.state_dict()
    assert s_backbone.keys() == t_backbone.keys()
    assert all(torch.equal(s_backbone[k], t_backbone[k]) for k in s_backbone)
    for part in ("head", "prototypes"):
        s_part, t_part = getattr(student, part).state_dict(), getattr(teacher, part).state_dict()
        for k in s_part:
            if k.endswith("weight"):  # biases start at zero in both
                assert not torch.allclose(s_part[k], t_part[k]), f"{part}.{k}"
                assert math.isclose(float(s_part[k].std()), float(t_part[k].std()), rel_tol=0.2)  # same init law
