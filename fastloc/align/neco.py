"""NeCo (ICLR 2025; NECO-AND-GRAM.md part A; vpariza/NeCo @ 3932160, src/neco.py): for each global
crop and each other view, the student's patch embeddings over their intersection (roi_align 7 x 7)
must rank a reference set of 49 teacher embeddings as the EMA teacher's do; the ranks are
diffsort's relaxed bitonic sort (steepness 100), the loss a cross-entropy over ranks.

Leopart's crops, head, EMA teacher, masks and queue (``dense.py``) without its prototypes. The
reference set comes from the queue (the DINOv2 configs' ``is_queue_usable``) or from the batch's
aligned teacher cells, drawn with the step's sample so a seed reproduces it. Named departures:
a queue reference is drawn with replacement among the reference's count of entries (the reference:
``randperm`` of the whole queue modulo that count); batch references under a fg/bg loss mask are drawn from
all the batch's aligned cells (the reference's masked draw slices the wrong cells, neco.py:463).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fastloc.align.dense import DenseConfig, DenseObjective
from fastloc.align.neco_ops import neco_loss, reference_cells, teacher_cells
from fastloc.cli import flowing_help, require


@flowing_help
@dataclass(frozen=True, kw_only=True)
class NecoConfig(DenseConfig):
    """NeCo's knobs; the defaults are its DINOv2 configs' (experiments/configs/models/base)."""

    loss_mask: Literal["fg", "all", "bg"] = "all"
    """Cells the loss averages over (NeCo: all)."""

    steepness: float = 100.0
    """Steepness of the student's relaxed sorting network."""

    teacher_steepness: float = 100.0
    """Steepness of the teacher's relaxed sorting network."""

    references: Literal["queue", "batch"] = "queue"
    """Where the 49 reference embeddings per image come from: the queue of teacher embeddings
    (is_queue_usable, the DINOv2 configs) or the batch's aligned teacher cells (the other configs)."""

    def validate(self) -> None:
        super().validate()
        require(self.steepness > 0, "--method.steepness", self.steepness, "must be above 0")
        require(self.teacher_steepness > 0, "--method.teacher-steepness", self.teacher_steepness, "must be above 0")
        if self.references == "queue":
            require(
                self.queue_length > 0,
                "--method.queue-length",
                self.queue_length,
                "must be above 0 for references from the queue",
            )


class Neco(DenseObjective):
    def __init__(self, cfg: NecoConfig):
        super().__init__(cfg)

    def dense_losses(self, t_emb, t_scores, s_maps, gc_boxes, other_boxes, masks, drawn, batch):
        cfg, G, V = self.cfg, self.groups[0], len(s_maps)
        grid = cfg.crops.sizes[0] // self.image.patch_size
        P = grid * grid
        if self.training and self.queue.shape[1]:  # the reference pushes before the loss (neco.py:361-364)
            for g, emb in enumerate(t_emb.chunk(G)):
                self.push(emb, drawn[:, g, :P], None if masks is None else masks[g], g)
        k = cfg.roi_kernel
        t_maps = [emb.transpose(1, 2).reshape(batch, -1, grid, grid) for emb in t_emb.chunk(G)]
        u = drawn[:, :, P:].reshape(batch, G, V - 1, k * k).permute(1, 2, 0, 3)  # [G, V - 1, B, k * k]
        # the reference counts each push once per global crop (neco.py:505, inside the crop loop):
        # while the queue fills, it draws among G x the rows pushed, the rows past them still zero
        entries = min(G * self._queued, self.queue.shape[1])
        if cfg.references == "queue" and entries:
            index = (u * entries).long().clamp(max=entries - 1)
            rows = torch.stack([self.queue[g][index[g]] for g in range(G)])  # [G, V - 1, B, k * k, D]
            references = rows.unflatten(3, (k, k)).permute(0, 1, 2, 5, 3, 4)
        else:
            cells = teacher_cells(t_maps, gc_boxes, self.image.patch_size, k)  # [G, V - 1, B, D, k, k]
            references = reference_cells(cells, u.flatten(2).argsort(dim=-1))
        return neco_loss(
            t_maps,
            s_maps,
            gc_boxes,
            other_boxes,
            self.image.patch_size,
            references,
            cfg.steepness,
            None if masks is None else torch.cat(masks, dim=1),
            k,
            teacher_steepness=cfg.teacher_steepness,
        )
