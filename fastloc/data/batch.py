"""The one thing every loader yields (DESIGN.md, "Batch")."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Batch:
    """Every batch has the loader's ``batch_size`` samples, on every rank (fixed shapes for a
    compiled step, lockstep ranks for DDP). ``valid`` says which slots hold the sample the epoch
    order put there: False for a replacement of a sample that could not be used and for the
    repeats that fill an evaluation epoch's last batches. Train on all; count only valid ones."""

    images: torch.Tensor  # [B, 3, H, W]: float normalized with the backbone's mean/std, or uint8 (normalize=False)
    labels: torch.Tensor | None = None  # [B, H, W] int64 class ids, geometry identical to images
    cls: torch.Tensor | None = None  # [B] int64 image-level class
    keys: list[str] | None = None  # sample keys (the shards' __key__), in batch order
    # on the host: each sample's captions (the lines of its txt), in batch order (LoaderConfig.captions)
    captions: tuple[tuple[str, ...], ...] | None = None
    valid: torch.Tensor | None = None  # [B] bool; None: all valid
    index: torch.Tensor | None = None  # [B] int64 on the host: the sample (its place in the split) in each slot
    views: tuple[torch.Tensor, ...] | None = None  # a multi-view recipe's further views, each [B, 3, h, w]
    # [B, V, 4] float32 on the host: each view's (top, left, bottom, right) in source pixels
    boxes: torch.Tensor | None = None
    # [B, ...] float32 on the loader's device: the recipe's per-sample draws as numbers
    # (``Recipe.params``), for a consumer that cuts views on the device (multi-crop)
    params: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        views = None if self.views is None else tuple(move(v) for v in self.views)
        return replace(
            self,
            images=move(self.images),
            labels=move(self.labels),
            cls=move(self.cls),
            valid=move(self.valid),
            views=views,
            params=move(self.params),
        )
