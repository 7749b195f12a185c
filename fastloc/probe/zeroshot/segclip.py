"""SegCLIP's zero-shot rule (OTHER-METHODS.md section 2; ArrowLuo/SegCLIP @ df09ba2,
seg_segmentation/evaluation/vit_seg.py ``ViTSegInference.encode_decode``), per window of one image.

Each pixel takes the group its bilinearly resized soft assignment ranks first. Group-class logits
are scale * cos(group, class); the image embedding's top-5 classes filter them (others -inf) and
the class probabilities are softmax(filtered) * softmax(all). With background, a pixel is
background where its group's largest probability is below the dataset's threshold, capped at the
largest probability of any group (so the best group always stays foreground, as the reference's
``min(bg_thresh, max)``). The scores [C(+1), H, W] are what mmseg's sliding inference averages
(``window_scores``); ``segment_segclip`` is the whole image's class map. A run's trained towers come
back with ``load_run``, or from its export with ``load_parts`` (the encoder file and the parts file
``save_parts`` wrote beside it). The text tower trains too: class embeddings are the run's, not CLIP's.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from fastloc.align.checkpoint import BEST, Checkpointer, CheckpointError, from_plain, load, load_objective, plain
from fastloc.align.export import method_config
from fastloc.align.segclip import Segclip, SegclipConfig
from fastloc.files import write_atomically
from fastloc.models.exported import exported_metadata
from fastloc.probe.dense.slide import window_boxes
from fastloc.probe.zeroshot.segment import resize

# SegCLIP's per-dataset thresholds, by the harness's benchmark names (GroupViT's own: 0.95 / 0.35 / 0.95)
BG_THRESH = {"voc21": 0.80, "context60": 0.25, "coco_object": 0.65}
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


@torch.no_grad()
def window_scores(
    trainable: nn.Module,
    image: torch.Tensor,
    texts: torch.Tensor,
    window: tuple[int, int] | None,
    bg_thresh: float | None,
) -> torch.Tensor:
    """Scores [C (+1), h, w] of ``image`` [3, h, w] (normalised, already resized): read whole
    (``window`` None) or in mmseg's (crop, stride) windows, each window's ``segclip_scores`` at its
    size, averaged where windows overlap (mmseg's slide_inference). Trailing pixels past the patch
    grid are dropped before the tower, as its strided convolution drops them."""
    p = trainable.vit.patch_embed.patch_size[0]
    h, w = image.shape[-2:]
    boxes = [(0, h, 0, w)] if window is None else window_boxes(h, w, *window)
    total, count = None, image.new_zeros((1, h, w), dtype=torch.float32)
    for y1, y2, x1, x2 in boxes:
        crop = image[:, y1 : y1 + (y2 - y1) // p * p, x1 : x1 + (x2 - x1) // p * p]
        whole, groups, soft = group_readout(trainable, crop[None])
        scale = trainable.text.logit_scale
        out = segclip_scores(whole[0], groups[0], soft[0], texts.to(image.device), scale, (y2 - y1, x2 - x1), bg_thresh)
        total = image.new_zeros((out.shape[0], h, w), dtype=torch.float32) if total is None else total
        total[:, y1:y2, x1:x2] += out
        count[:, y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def segment_segclip(
    trainable: nn.Module,
    image: torch.Tensor,
    texts: torch.Tensor,
    bg_thresh: float | None,
    short_side: int = 224,
    window: tuple[int, int] | None = (224, 224),
) -> torch.Tensor:
    """Class map [H, W] int64 of ``image`` [3, H, W] (normalised, original size): resized to the
    short side (SegCLIP's 224), ``window_scores`` (crop 224, stride 224), resized back bilinearly,
    argmax; with ``bg_thresh`` class 0 is background and class c + 1 is ``texts[c]``."""
    scores = window_scores(trainable, resize(image, short_side), texts, window, bg_thresh)
    if scores.shape[-2:] != image.shape[-2:]:
        scores = F.interpolate(scores[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
    return scores.argmax(0)


def load_run(run_dir: Path, which: Literal["best", "last"] = "best") -> Segclip:
    """A SegCLIP run's objective from its config and checkpoint, in eval mode (both towers random
    before the checkpoint's weights are loaded: nothing is downloaded)."""
    cfg = method_config(run_dir)
    if not isinstance(cfg, SegclipConfig):
        raise CheckpointError(f"{run_dir}: not a SegCLIP run (its method is {type(cfg).__name__})")
    path = Path(run_dir) / BEST if which == "best" else next(iter(Checkpointer(Path(run_dir)).steps()), None)
    if path is None or not path.is_file():
        raise CheckpointError(f"{run_dir}: no {which} checkpoint")
    objective = Segclip(replace(cfg, weights="random", text_weights="random"))
    load_objective(objective, load(path)["objective"])
    return objective.eval()


META = "segclip_parts"  # the metadata key of a parts file (an encoder export's is "fastloc")
PARTS = ("group.", "proj.", "text.")  # the trainable's keys the rule reads beyond the encoder


def save_parts(objective: Segclip, path: Path, source: dict) -> Path:
    """The group module, projection and text tower of ``objective`` with its method config and
    ``source`` (the run, checkpoint, step) in the metadata."""
    state = objective.trainable.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(PARTS)}
    meta = {"method": plain(objective.cfg), **source}
    write_atomically(path, save(tensors, metadata={META: json.dumps(meta)}))
    return path


def load_parts(encoder: Path, parts: Path) -> Segclip:
    """The SegCLIP objective (eval, no MAE branch) of an exported encoder and its parts file."""
    with safe_open(str(parts), "pt") as f:
        meta = json.loads((f.metadata() or {}).get(META, "null") or "null")
    if meta is None:
        raise CheckpointError(f"{parts}: not a SegCLIP parts file (python -m fastloc.align export of a SegCLIP run)")
    cfg = from_plain(SegclipConfig, meta["method"])
    if exported_metadata(encoder)["backbone"] != cfg.backbone:
        raise CheckpointError(f"{encoder} is not the encoder of {parts} (backbone {cfg.backbone})")
    objective = Segclip(replace(cfg, weights="random", text_weights="random", mae_weight=0.0))
    state = {f"vit.{k}": v for k, v in load_file(str(encoder)).items()} | load_file(str(parts))
    objective.trainable.load_state_dict(state, strict=True)
    return objective.eval()
