"""SegCLIP's zero-shot rule (OTHER-METHODS.md section 2; ArrowLuo/SegCLIP @ df09ba2,
seg_segmentation/evaluation/vit_seg.py ``ViTSegInference.encode_decode``), per window of one image.

Each pixel takes the group its bilinearly resized soft assignment ranks first. Group-class logits
are scale * cos(group, class); the image embedding's top-5 classes filter them (others -inf) and
the class probabilities are softmax(filtered) * softmax(all). With background, a pixel is
background where its group's largest probability is below the dataset's threshold, capped at the
largest probability of any group (so the best group always stays foreground, as the reference's
``min(bg_thresh, max)``). The scores [C(+1), H, W] are what mmseg's sliding inference averages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# main_seg_zeroshot's per-dataset thresholds (GroupViT's own protocol: 0.95 / 0.35 / 0.95)
BG_THRESH = {"voc": 0.80, "context": 0.25, "coco-object": 0.65}
TOP_K = 5


@torch.no_grad()
def group_readout(trainable: nn.Module, images: torch.Tensor):
    """A SegCLIP trainable's evaluation pass on normalised ``images`` [B, 3, H, W]: the image
    embedding [B, E], the group embeddings [B, M, E] and the soft assignments [B, M, h, w]."""
    image, groups, soft = trainable.readout(images)
    grid = trainable.vit.patch_embed.grid_size
    return image, groups, soft.unflatten(2, tuple(grid))


def resize_assignment(soft: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Soft assignments [M, h, w] -> [H, W, M], bilinear (align_corners False), as ``resize_attn_map``."""
    return F.interpolate(soft.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)


def segclip_scores(
    image: torch.Tensor,
    groups: torch.Tensor,
    soft: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: float | torch.Tensor,
    size: tuple[int, int],
    bg_thresh: float | None,
    top_k: int = TOP_K,
) -> torch.Tensor:
    """One window's class scores [C (+1 background first when ``bg_thresh`` is not None), H, W]
    from its image embedding [E], group embeddings [M, E], soft assignments [M, h, w] and the
    L2-normalised class embeddings [C, E]."""
    assignment = resize_assignment(soft, size)  # [H, W, M]
    onehot = F.one_hot(assignment.argmax(-1), groups.shape[0]).float()  # [H, W, M]
    scale = torch.as_tensor(logit_scale, dtype=torch.float32).exp().clamp(max=100.0)
    texts = texts.float()
    logits = F.normalize(groups.float(), dim=-1) @ texts.T * scale  # [M, C]
    prior = logits.softmax(-1)
    whole = (F.normalize(image.float(), dim=-1) @ texts.T * scale).softmax(-1)  # [C]
    keep = torch.zeros_like(whole, dtype=torch.bool)
    keep[whole.topk(min(top_k, texts.shape[0])).indices] = True
    probs = logits.masked_fill(~keep, float("-inf")).softmax(-1) * prior  # [M, C]
    pixel = onehot @ probs  # [H, W, C]
    fg = pixel.permute(2, 0, 1)
    if bg_thresh is None:
        return fg
    thresh = min(bg_thresh, float(probs.max()))
    background = (pixel.max(-1).values < thresh).float().unsqueeze(0)
    return torch.cat([background, fg], dim=0)
