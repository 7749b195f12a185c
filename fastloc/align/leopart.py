"""Leopart (CVPR 2022; OTHER-METHODS.md section 1; MkuuWaUjinga/leopart @ 7835701, src/leopart.py):
the student predicts, on every other view, the EMA teacher's Sinkhorn-balanced prototype
assignments of each global crop, over their intersection (roi_align 7 x 7), with a cross-entropy
at temperature 0.1 averaged over the foreground cells.

Sinkhorn-Knopp runs in fp32 on the device and is global across ranks (all-reduces, no host sync);
the queue of teacher embeddings (per rank, as the reference) joins the assignments once full,
scored by the student's prototypes as the reference scores them (src/leopart.py:308).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastloc.align.dense import DenseConfig, DenseObjective
from fastloc.align.leopart_ops import aligned_cross_entropy, sinkhorn
from fastloc.cli import flowing_help, require
from fastloc.runtime import full_precision


@flowing_help
@dataclass(frozen=True, kw_only=True)
class LeopartConfig(DenseConfig):
    """Leopart's knobs; the defaults are the reference's (train_in100k_config.yml)."""

    prototypes: int = 300
    """Prototypes K (rows L2-normalized before every step in both networks)."""

    temperature: float = 0.1
    """Temperature of the student's softmax over the prototypes."""

    epsilon: float = 0.05
    """Sinkhorn-Knopp's entropic regularization."""

    sinkhorn_iterations: int = 3
    """Sinkhorn-Knopp iterations."""

    def validate(self) -> None:
        super().validate()
        require(self.prototypes >= 2, "--method.prototypes", self.prototypes, "must be at least 2")
        require(self.temperature > 0, "--method.temperature", self.temperature, "must be above 0")
        require(self.epsilon > 0, "--method.epsilon", self.epsilon, "must be above 0")
        it = self.sinkhorn_iterations
        require(it >= 1, "--method.sinkhorn-iterations", it, "must be at least 1")


class Leopart(DenseObjective):
    def __init__(self, cfg: LeopartConfig):
        super().__init__(cfg, prototypes=cfg.prototypes)

    def dense_losses(self, t_emb, t_scores, s_maps, gc_boxes, other_boxes, masks, drawn, batch):
        cfg, G = self.cfg, self.groups[0]
        grid = cfg.crops.sizes[0] // self.image.patch_size
        P = grid * grid
        use_queue = self.queue.shape[1] > 0 and self._queued >= self.queue.shape[1]  # full: the reference's test
        targets = []
        for g, (emb, scores) in enumerate(zip(t_emb.chunk(G), t_scores.chunk(G))):
            out = scores.reshape(batch * P, -1)
            if use_queue:
                out = torch.cat([self.queue_scores(g), out.float()])
            if self.training and self.queue.shape[1]:
                self.push(emb, drawn[:, g, :P], None if masks is None else masks[g], g)
            q = sinkhorn(out, cfg.epsilon, cfg.sinkhorn_iterations)[-batch * P :]
            targets.append(q.reshape(batch, grid, grid, -1).permute(0, 3, 1, 2))
        return aligned_cross_entropy(
            targets, s_maps, gc_boxes, other_boxes, self.image.patch_size, cfg.temperature, masks, cfg.roi_kernel
        )

    def queue_scores(self, crop: int) -> torch.Tensor:
        """The queued teacher embeddings of global crop ``crop`` scored by the student's prototypes, fp32."""
        weight = self.trainable.net.prototypes.weight.detach().float()
        with full_precision(self.queue.device):
            return self.queue[crop].float() @ weight.t()
