"""``python -m fastloc.bench align --preset leopart-... / neco-...``: a Leopart or NeCo update,
fastloc's against an original-style one.

Random weights, the preset's batch and precision (fp32; TF32 matrix products on a GPU, as the
trainer's runtime sets them, in every row). Each batch is B random base images (the decoded image)
with a ``MultiCrop`` draw per sample; every row sees the same images and draws, and the queue is
full from the start (the steady state of a run). The rows:

- ``fastloc (compiled)`` / ``fastloc (eager)``: ``train_step`` on the base images on the device (the
  views cut in the step);
- ``original-style step``: the reference's update (MkuuWaUjinga/leopart @ 7835701 src/leopart.py
  ``shared_step``/``spatial_loss``/``sinkhorn``/``training_step``; vpariza/NeCo @ 3932160 src/neco.py
  ``shared_step``/``update_queue``/``knn_loss``/``training_step``) on views cut beforehand: the views
  copied to the device per update, the fg mask's connected components labelled on the host per map,
  the queue test, the fg-token push through a CPU ``randperm``, Sinkhorn as the reference's loop,
  one roi_align and one loss term per crop pair with ``torch.sum(mask).item()``, NeCo's
  ``loss == 0.0`` test and the per-parameter EMA loop; eager. The same modules and loss math as
  fastloc (NeCo's ranks through ``rank_matrices``, one pair at a time);
- ``original-style host crops``: the reference's data path, LeopartTransforms per sample with PIL
  (resized crop, colour jitter in the drawn order, greyscale, PIL's Gaussian blur, ToTensor,
  Normalize) and the collate, timed per batch on one core; its rate assumes N workers that scale
  perfectly (the reference ran 10 per GPU), which favours the original.

The original-style figure is the slower of its step and its host crops on a GPU (the workers
overlap the step), and their times added on a CPU (where both share the cores). Departures that
make the original-style row faster than the reference, named so its figure is read as a bound:
attention stays fused (the reference's DINO ViT materializes it), TF32 is on, the draws and
decoding are not timed; and where fewer foreground embeddings than the push exist, the push takes
them all (the reference fails there). Measured figures and the aim: BENCHMARKS.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.ops import roi_align
from torchvision.transforms import functional as TF

from fastloc.align.config import OBJECTIVES, AlignConfig, SystemConfig
from fastloc.align.dense import DenseObjective
from fastloc.align.leopart import Leopart
from fastloc.align.leopart_ops import pair_boxes
from fastloc.align.neco_ops import neco_pair_loss, rank_matrices
from fastloc.align.prepare import Prepared, prepare
from fastloc.align.presets import PRESETS
from fastloc.align.schedule import cosine
from fastloc.align.step import train_step
from fastloc.bench.align import STEP, result_row, timed_updates
from fastloc.bench.common import MissingRow, print_table, write_results
from fastloc.data.multicrop import BLUR, FACTORS, GREY, JITTER, ORDER, SIGMA, MultiCrop, MultiCropDraw
from fastloc.runtime import Runtime, autocast

POOL = 2  # distinct batches of draws (and of host-cut views), cycled through by every row
REFERENCE_WORKERS = 10  # the reference's DataLoader workers per GPU (train_in100k_config.yml: 20 for 2 GPUs)
PEAK_FLOPS = {"bf16": 989e12, "fp32": 494e12}  # H100 SXM dense peaks (fp32 rows run TF32 matrix products)


@dataclass
class HostBatch:
    """One collated batch of the reference's data path: the views [B, 3, s, s] per view and the pair boxes."""

    views: list[torch.Tensor]
    gc: torch.Tensor  # [B, G, V, 4]
    other: torch.Tensor  # [B, V, G, 4]


@dataclass
class OriginalState:
    """What the reference keeps across updates beside the modules: its queue and flags."""

    queue: torch.Tensor | None  # [G, Q, D], or None without a queue
    entries: int  # NeCo's entries_in_queue
    use_the_queue: bool = False  # reset at each epoch's start (on_train_epoch_start)


def run(cfg, command: str, name: str) -> Path:
    """The dense benchmark of preset ``name`` (``cfg``: the align benchmark's options)."""
    align: AlignConfig = PRESETS[name][1]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:  # as fastloc.runtime.setup does for a training run, for every row
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batch = cfg.batch_size or align.data.batch_size // align.data.accumulation
    precision, clip = align.system.precision, align.optim.clip_grad_norm
    method = replace(align.method, weights="random")
    workers = cfg.host_workers if cfg.host_workers > 0 else min(REFERENCE_WORKERS, os.cpu_count() or 1)

    def build(compiled: bool) -> tuple[DenseObjective, Prepared]:
        torch.manual_seed(0)
        objective = OBJECTIVES[type(method)](method)
        system = SystemConfig(precision=precision, compile=compiled)
        prepared = prepare(objective, align.optim, system, Runtime(device, 0, 1, 0))
        fill_queue(objective)
        return objective, prepared

    pictures, draws = make_batches(method, batch)
    images = torch.from_numpy(pictures).permute(0, 3, 1, 2).contiguous().to(device)  # [B, 3, L, L] uint8
    params = [torch.from_numpy(method.crops.params(d)).to(device) for d in draws]  # [B, V, 16] each
    rows, missing = [], [MissingRow("fastloc end to end", "not measured for the dense presets (bench loader)")]
    objective, prepared = build(False)
    kind, flops = type(objective).__name__, objective.flops_per_image()
    host, host_times = cut_on_host(pictures, draws, method.crops, objective.image.mean, objective.image.std, cuda)
    times = _fastloc(objective, prepared, images, params, precision, clip, cfg)
    rows.append(result_row("fastloc (eager)", times, batch, device))
    state = OriginalState(objective.queue.clone() if objective.queue.shape[1] else None, objective.queue.shape[1])
    times = _original(objective, prepared, state, host, precision, clip, cfg, device)
    rows.append(result_row("original-style step", times, batch, device))
    crops = result_row(f"original-style host crops ({workers} workers)", host_times, batch, device)
    rows.append(crops | {"images_per_s": crops["images_per_s"] * workers, "peak_memory_GB": None})
    del objective, prepared, state
    if cfg.compile:
        objective, prepared = build(True)
        times = _fastloc(objective, prepared, images, params, precision, clip, cfg)
        rows.insert(0, result_row("fastloc (compiled)", times, batch, device))
        del objective, prepared
    else:
        missing.insert(0, MissingRow("fastloc (compiled)", "--no-compile"))
    peak = PEAK_FLOPS.get(precision) if cuda else None
    for row in rows:
        row["mfu"] = flops * row["images_per_s"] / peak if peak and "host crops" not in row["step"] else None
    summary = _summary(rows, workers, cuda)
    print(f"{name} ({kind}), batch {batch}, {precision}, {device}; {flops / 1e9:,.1f} GFLOP per image (every view)")
    print_table(rows, ["step", "images_per_s", "best_ms", "peak_memory_GB", "mfu"], missing)
    for line in summary:
        print(line)
    payload = {"preset": name, "objective": kind, "batch_size": batch, "precision": precision, "flops_per_image": flops}
    payload |= {"base_size": pictures.shape[1], "view_sizes": list(method.crops.view_sizes), "host_workers": workers}
    return write_results("align", cfg.out, command, payload | {"rows": rows, "summary": summary}, missing)


def make_batches(method, batch: int) -> tuple[np.ndarray, list[list[MultiCropDraw]]]:
    """``batch`` random decoded images at the base's side [B, L, L, 3] uint8, and ``POOL`` batches of
    MultiCrop draws on them (each row cycles through the same ones)."""
    recipe: MultiCrop = method.crops
    side = round(recipe.sizes[0] * method.base_scale)
    pictures = np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    draws = [[recipe.draw(np.random.default_rng([j, i]), side, side) for i in range(batch)] for j in range(POOL)]
    return pictures, draws


def fill_queue(objective: DenseObjective) -> None:
    """A full queue of random unit embeddings (the steady state: it fills in the first updates of a run)."""
    queue = objective.queue
    if queue.shape[1]:
        with torch.no_grad():
            queue.copy_(F.normalize(torch.randn(queue.shape, generator=torch.Generator().manual_seed(1)), dim=-1))
        objective._queued = queue.shape[1]
        objective.queued.fill_(queue.shape[1])


def original_rate(step: float, crops: float, overlap: bool) -> float:
    """The original-style images/s from its step's and its host crops' rates: with a GPU the workers
    overlap the step (the slower one bounds), on a CPU they share its cores (the times add up)."""
    return min(step, crops) if overlap else 1 / (1 / step + 1 / crops)


def _summary(rows: list[dict], workers: int, overlap: bool) -> list[str]:
    rate = {r["step"]: r["images_per_s"] for r in rows}
    step = rate["original-style step"]
    crops = rate[f"original-style host crops ({workers} workers)"]
    original = original_rate(step, crops, overlap)
    how = "the slower of" if overlap else "on shared cores, the times added, of"
    lines = [
        f"original-style: {how} its step ({step:,.1f} images/s) and its host crops "
        f"({crops:,.1f} images/s over {workers} workers) = {original:,.1f} images/s"
    ]
    mode = "compiled" if "fastloc (compiled)" in rate else "eager"
    fastest = rate[f"fastloc ({mode})"]
    if mode == "compiled":
        lines.append(f"compiled / eager: {fastest / rate['fastloc (eager)']:.2f}x")
    lines.append(f"{mode} / original-style: {fastest / original:.2f}x (aim on one H100: >= 4x, compiled)")
    lines.append(f"{mode} / original-style step alone: {fastest / step:.2f}x")
    return lines


# ---------------------------------------------------------------- fastloc's update


def _fastloc(
    objective: DenseObjective,
    prepared: Prepared,
    images: torch.Tensor,
    params: list[torch.Tensor],
    precision: str,
    clip: float,
    cfg,
) -> list[float]:
    """Seconds per fastloc update: the pool's draws in turn with the step's sample, ``train_step``."""
    generator = torch.Generator(images.device).manual_seed(0)
    count = iter(range(10**9))

    def update():
        sample = (params[next(count) % POOL], objective.sample(images.shape[0], generator))
        train_step(objective, prepared, images, sample, STEP, 1, clip, precision)

    return timed_updates(update, cfg, images.device)


# ---------------------------------------------------------------- the reference's data path


JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)  # ColorJitter's fn_idx


def host_views(image: Image.Image, draw: MultiCropDraw, recipe: MultiCrop, mean, std) -> list[torch.Tensor]:
    """One sample's views as LeopartTransforms.__call__ makes them (src/leopart_transforms.py 86-125),
    from the given draws: resized_crop (RandomResizedCrop's bilinear), RandomApply(ColorJitter) in
    its drawn op order, RandomGrayscale, RandomApply(GaussianBlur: PIL's, lines 11-22), ToTensor,
    Normalize."""
    views = []
    for (top, left, h, w), row, size in zip(draw.boxes, draw.params, recipe.view_sizes):
        img = TF.resized_crop(image, top, left, h, w, [size, size], T.InterpolationMode.BILINEAR)
        if row[JITTER] > 0.5:
            factors = row[FACTORS]
            for op in row[ORDER].round().astype(int):
                img = JITTER_OPS[op](img, float(factors[op]))
        if row[GREY] > 0.5:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if row[BLUR] > 0.5:
            img = img.filter(ImageFilter.GaussianBlur(radius=float(row[SIGMA])))
        views.append(TF.normalize(TF.to_tensor(img), mean, std))
    return views


def host_boxes(draw: MultiCropDraw, recipe: MultiCrop) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample's pair boxes from its crops in pixels (calculate_bboxes, lines 127-161; pair_boxes
    is tested equal to it): gc [G, V, 4], other [V, G, 4]."""
    boxes = torch.tensor([[x, y, x + w, y + h] for y, x, h, w in draw.boxes], dtype=torch.float32)
    gc, other = pair_boxes(boxes[None], recipe.view_sizes, recipe.counts[0])
    return gc[0], other[0]


def cut_on_host(pictures, draws, recipe: MultiCrop, mean, std, pin: bool) -> tuple[list[HostBatch], list[float]]:
    """Every pool batch through the reference's data path (per sample, then the DataLoader's collate
    and, on a GPU, its pinning), and the seconds each batch took on this core."""
    images = [Image.fromarray(p) for p in pictures]  # decoded images
    batches, times = [], []
    for batch_draws in draws:
        start = time.perf_counter()
        samples = [
            (host_views(img, d, recipe, mean, std), host_boxes(d, recipe)) for img, d in zip(images, batch_draws)
        ]
        views = [torch.stack([s[0][v] for s in samples]) for v in range(len(recipe.view_sizes))]
        gc, other = (torch.stack([s[1][k] for s in samples]) for k in range(2))
        times.append(time.perf_counter() - start)
        if pin:
            views, gc, other = [v.pin_memory() for v in views], gc.pin_memory(), other.pin_memory()
        batches.append(HostBatch(views, gc, other))
    return batches, times


# ---------------------------------------------------------------- the reference's update


def _original(
    objective: DenseObjective,
    prepared: Prepared,
    state: OriginalState,
    host: list[HostBatch],
    precision: str,
    clip: float,
    cfg,
    device: torch.device,
) -> list[float]:
    """Seconds per original-style update: the host batch copied in, the reference-form loss, the EMA
    loop, backward and AdamW with the schedules' values set per group."""
    count = iter(range(10**9))
    loss_fn = original_leopart_loss if isinstance(objective, Leopart) else original_neco_loss

    def update():
        batch = host[next(count) % POOL]
        views = [v.to(device, non_blocking=True) for v in batch.views]
        gc, other = batch.gc.to(device, non_blocking=True), batch.other.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = loss_fn(objective, prepared.model, state, views, gc, other)
        if not torch.is_tensor(loss) or (not isinstance(objective, Leopart) and loss == 0.0):
            return  # NeCo's training_step returns None for a zero loss: no update (Leopart's, with no pair kept, fails)
        with torch.no_grad():  # training_step's EMA loop, before Lightning's backward and step
            m = cosine(objective.cfg.momentum, objective.cfg.momentum_end, STEP.step, STEP.total)
            for param_q, param_k in zip(objective.trainable.parameters(), objective.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(prepared.params, clip)
        for group in prepared.optimizer.param_groups:  # optimizer_step's schedules
            group["lr"] = STEP.lr * group["lr_scale"]
            if group["decayed"]:
                group["weight_decay"] = STEP.weight_decay
        prepared.optimizer.step()
        prepared.optimizer.zero_grad(set_to_none=True)

    return timed_updates(update, cfg, device)


def _forward(objective: DenseObjective, model, views: list[torch.Tensor]) -> tuple[Any, list, torch.Tensor | None]:
    """shared_step's forward passes: the teacher on the globals (with the last attention for a fg or
    bg mask), the student on every view; the hard mask from the attention (process_attentions)."""
    cfg, (G, L) = objective.cfg, objective.groups
    grid = cfg.crops.sizes[0] // objective.image.patch_size
    objective.normalize_prototypes()
    with torch.no_grad():
        teacher = objective.teacher(torch.cat(views[:G]))
    student = model(torch.cat(views[:G]), torch.cat(views[G:]) if L else None)
    attn_hard = None
    if cfg.loss_mask != "all":
        attn_hard = process_attentions(teacher[3].reshape(-1, 1, grid, grid), grid, threshold=0.6, blur_sigma=0.6)
        if cfg.loss_mask == "bg":
            attn_hard = torch.abs(attn_hard - 1)
    return teacher, student, attn_hard


def label(array: np.ndarray) -> np.ndarray:
    """The reference's skimage ``label`` (default connectivity: full) as scipy's with a full
    structure: the same components (C code both)."""
    from scipy.ndimage import label as scipy_label

    return scipy_label(array, structure=np.ones((3,) * array.ndim))[0]


def process_attentions(
    attentions: torch.Tensor, spatial_res: int, threshold: float = 0.5, blur_sigma: float = 0.6
) -> torch.Tensor:
    """experiments/utils.py 458-490 with NeCo's ``mask.squeeze()`` (its experiments/utils.py 569)."""
    attentions = T.GaussianBlur(7, sigma=(blur_sigma))(attentions)
    attentions = attentions.reshape(attentions.size(0), 1, spatial_res**2)
    val, idx = torch.sort(attentions)
    val /= torch.sum(val, dim=-1, keepdim=True)
    cumval = torch.cumsum(val, dim=-1)
    th_attn = cumval > (1 - threshold)
    idx2 = torch.argsort(idx)
    th_attn[:, 0] = torch.gather(th_attn[:, 0], dim=1, index=idx2[:, 0])
    th_attn = th_attn.reshape(attentions.size(0), 1, spatial_res, spatial_res).float()
    for j, th_att in enumerate(th_attn):
        labelled = label(th_att.cpu().numpy())
        for k in range(1, np.max(labelled) + 1):
            mask = labelled == k
            if np.sum(mask) <= 2:
                th_attn[j, 0][mask.squeeze()] = 0
    return th_attn.detach()


def sinkhorn(Q: torch.Tensor, nmb_iters: int) -> torch.Tensor:
    """src/leopart.py 391-413 (one GPU): r and c made on the host and copied, as ``.cuda()`` does."""
    with torch.no_grad():
        sum_Q = torch.sum(Q)
        Q /= sum_Q
        K, B = Q.shape
        u = torch.zeros(K).to(Q.device)  # made and copied as the reference does, then replaced
        r = torch.ones(K).to(Q.device) / K
        c = torch.ones(B).to(Q.device) / B
        for _ in range(nmb_iters):
            u = torch.sum(Q, dim=1)
            Q *= (r / u).unsqueeze(1)
            Q *= (c / torch.sum(Q, dim=0)).unsqueeze(0)
        return (Q / torch.sum(Q, dim=0, keepdim=True)).t().float()


def queue_test(state: OriginalState, i: int) -> bool:
    """Whether the queue joins the assignments: a host sync until it has passed once in the epoch."""
    if state.use_the_queue or not torch.all(state.queue[i, -1, :] == 0):
        state.use_the_queue = True
    return state.use_the_queue


def push(state: OriginalState, i: int, emb_gc: torch.Tensor, attn_hard, bs: int, res: int, crop_id: int) -> None:
    """The queue's push (src/leopart.py 311-322, NeCo's update_queue 497-507): the fg tokens by a
    boolean index, a CPU randperm of them. Fewer fg tokens than the push: all of them pushed."""
    if attn_hard is not None:
        flat_mask = attn_hard.permute(0, 2, 3, 1).flatten().bool()
        gc_fg_mask = flat_mask[bs * res**2 * crop_id : bs * res**2 * (crop_id + 1)]
        emb_gc = emb_gc[gc_fg_mask]
    num_vectors_to_store = min(bs * 10, state.queue.shape[1], emb_gc.size(0))
    if num_vectors_to_store == 0:
        return
    state.entries = min(state.entries + num_vectors_to_store, state.queue.shape[1])
    idx = torch.randperm(emb_gc.size(0))[:num_vectors_to_store]
    state.queue[i, num_vectors_to_store:] = state.queue[i, :-num_vectors_to_store].clone()
    state.queue[i, :num_vectors_to_store] = emb_gc[idx]


def original_leopart_loss(objective, model, state, views, gc, other) -> torch.Tensor:
    """shared_step and spatial_loss (src/leopart.py 234-370) with crops_for_assign = the globals."""
    cfg, (G, L), patch = objective.cfg, objective.groups, objective.image.patch_size
    (_, t_emb, t_scores, _), student, attn_hard = _forward(objective, model, views)
    bs, V, res, kernel = views[0].shape[0], G + L, cfg.crops.sizes[0] // patch, cfg.roi_kernel
    gc_teacher_output, gc_teacher_emb = t_scores.flatten(0, 1), t_emb.flatten(0, 1)
    gc_student_output = student[0][2].flatten(0, 1)
    lc_student_output = student[1][2].flatten(0, 1) if L else None
    bboxes = {"gc": gc, "all": other}
    loss = 0
    for i, crop_id in enumerate(range(G)):
        with torch.no_grad():
            out = gc_teacher_output[bs * res**2 * crop_id : bs * res**2 * (crop_id + 1)]
            num_spatial_vectors_for_pred = out.size(0)
            if state.queue is not None:
                if queue_test(state, i):
                    weight = torch.flatten(objective.trainable.net.prototypes.weight, 1)
                    out = torch.cat((torch.mm(state.queue[i], weight.t()), out))
                emb_gc = gc_teacher_emb[bs * res**2 * crop_id : bs * res**2 * (crop_id + 1)]
                push(state, i, emb_gc, attn_hard, bs, res, crop_id)
            q = torch.exp(out / cfg.epsilon).t()
            q = sinkhorn(q, cfg.sinkhorn_iterations)[-num_spatial_vectors_for_pred:]
        q_reshaped = q.reshape(bs, res, res, -1).permute(0, 3, 1, 2)
        boxes = torch.unbind(bboxes["gc"][:, crop_id] / patch)
        aligned_soft_clusters = roi_align(q_reshaped, boxes, kernel, aligned=True)
        if attn_hard is not None:
            aligned_mask = roi_align(attn_hard[bs * crop_id : bs * (crop_id + 1)], boxes, kernel, aligned=True)
            thresholded_mask = aligned_mask >= 1.0
        subloss = 0
        for v in np.delete(np.arange(V), crop_id):
            if v < G:
                out, spatial_res = gc_student_output[bs * res**2 * v : bs * res**2 * (v + 1)], res
            else:
                spatial_res = cfg.crops.sizes[-1] // patch
                out = lc_student_output[bs * spatial_res**2 * (v - G) : bs * spatial_res**2 * (v - G + 1)]
            aligned_out = roi_align(
                out.reshape(bs, spatial_res, spatial_res, -1).permute(0, 3, 1, 2),
                torch.unbind(bboxes["all"][:, v, crop_id].unsqueeze(1) / patch),
                kernel,
                aligned=True,
            )
            aligned_p = F.softmax(aligned_out / cfg.temperature, dim=1)
            aligned_q = aligned_soft_clusters[v::V]
            if attn_hard is not None:
                mask = thresholded_mask[v::V].squeeze().float()
                if torch.sum(mask).item() != 0:
                    subloss -= torch.sum(torch.sum(aligned_q * torch.log(aligned_p), dim=1) * mask) / torch.sum(mask)
            else:
                subloss -= torch.mean(torch.sum(aligned_q * torch.log(aligned_p), dim=1))
        loss += subloss / (V - 1)
    return _gram(objective, views, student, loss / G)


def original_neco_loss(objective, model, state, views, gc, other) -> torch.Tensor:
    """shared_step, update_queue and knn_loss (src/neco.py 315-507); the ranks of one pair at a time
    through ``rank_matrices`` and ``neco_pair_loss`` (the same math as fastloc's). Batch references
    come from all the batch's aligned cells (fastloc's departure from the reference's masked draw)."""
    cfg, (G, L), patch, device = objective.cfg, objective.groups, objective.image.patch_size, views[0].device
    (_, t_emb, _, _), student, attn_hard = _forward(objective, model, views)
    bs, V, res, kernel = views[0].shape[0], G + L, cfg.crops.sizes[0] // patch, cfg.roi_kernel
    gc_teacher_emb, gc_student_emb = t_emb.flatten(0, 1), student[0][1].flatten(0, 1)
    lc_student_emb = student[1][1].flatten(0, 1) if L else None
    if state.queue is not None:  # update_queue, before the loss
        with torch.no_grad():
            for i in range(G):
                queue_test(state, i)
                push(state, i, gc_teacher_emb[bs * res**2 * i : bs * res**2 * (i + 1)], attn_hard, bs, res, i)
    loss = 0
    for i, crop_id in enumerate(range(G)):
        emb_gc = gc_teacher_emb[bs * res**2 * crop_id : bs * res**2 * (crop_id + 1)]
        emb_gc_reshaped = emb_gc.reshape(bs, res, res, -1).permute(0, 3, 1, 2)
        boxes = torch.unbind(gc[:, crop_id] / patch)
        aligned_emb_gc = roi_align(emb_gc_reshaped, boxes, kernel, aligned=True)
        thresholded_mask = None
        if attn_hard is not None:
            aligned_mask = roi_align(attn_hard[bs * crop_id : bs * (crop_id + 1)], boxes, kernel, aligned=True)
            thresholded_mask = aligned_mask >= 1.0
        subloss = 0
        for v in np.delete(np.arange(V), crop_id):
            if v < G:
                out, spatial_res = gc_student_emb[bs * res**2 * v : bs * res**2 * (v + 1)], res
            else:
                spatial_res = cfg.crops.sizes[-1] // patch
                out = lc_student_emb[bs * spatial_res**2 * (v - G) : bs * spatial_res**2 * (v - G + 1)]
            aligned_out = roi_align(
                out.reshape(bs, spatial_res, spatial_res, -1).permute(0, 3, 1, 2),
                torch.unbind(other[:, v, crop_id].unsqueeze(1) / patch),
                kernel,
                aligned=True,
            )
            aligned_emb_gc_sel = aligned_emb_gc[v::V]
            bsl, d, ps1, ps2 = aligned_emb_gc_sel.shape
            num_elements = bsl * ps1 * ps2
            if cfg.references == "queue" and state.queue is not None and state.entries > 0:
                idces = torch.randperm(state.queue[i].shape[0], device=device)[:num_elements]
                idces = torch.remainder(idces, state.entries)
                tgt_emb_gc_sel = state.queue[i][idces].reshape(bsl, ps1, ps2, d).permute(0, 3, 1, 2)
            else:
                cells = aligned_emb_gc_sel.permute(0, 2, 3, 1).flatten(0, 2)
                idces = torch.randperm(cells.shape[0], device=device)
                tgt_emb_gc_sel = cells[idces].reshape(bsl, ps1, ps2, d).permute(0, 3, 1, 2)
            aligned_p = rank_matrices(aligned_out, tgt_emb_gc_sel, cfg.steepness)
            with torch.no_grad():
                aligned_q = rank_matrices(aligned_emb_gc_sel, tgt_emb_gc_sel, cfg.teacher_steepness)
            mask = None
            if thresholded_mask is not None:  # compute_knn_subloss (neco.py 389-407)
                mask = thresholded_mask[v::V].squeeze(1).float()
                if torch.sum(mask).item() == 0:
                    continue
            subloss += neco_pair_loss(aligned_q, aligned_p, mask).mean()
        loss += subloss / (V - 1)
    return _gram(objective, views, student, loss / G)


def _gram(objective: DenseObjective, views, student, loss):
    """The Gram anchor where the preset sets one (not a reference's term: fastloc's, as fastloc adds it)."""
    if not objective.cfg.gram_weight:
        return loss
    G = objective.groups[0]
    gram = objective.gram(torch.cat(views[:G]), student[0][0], views[0].shape[0]).mean()
    return loss + objective.cfg.gram_weight * gram
