"""The one thing every loader yields (DESIGN.md, "Batch")."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # [B, 3, H, W]: float normalized with the backbone's mean/std, or uint8 (normalize=False)
    labels: torch.Tensor | None = None  # [B, H, W] int64 class ids, geometry identical to images
    cls: torch.Tensor | None = None  # [B] int64 image-level class
    keys: list[str] | None = None  # sample keys (the shards' __key__), in batch order

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, images=move(self.images), labels=move(self.labels), cls=move(self.cls))
