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
from collections.abc import Callable
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
from fastloc.probe.zeroshot.decide import Settings, decide
from fastloc.probe.zeroshot.pamr import pamr
from fastloc.probe.zeroshot.segment import resize

# SegCLIP's per-dataset thresholds, by the harness's benchmark names (GroupViT's own: 0.95 / 0.35 / 0.95)
BG_THRESH = {"voc21": 0.80, "context60": 0.25, "coco_object": 0.65}
TOP_K = 5


def bg_threshold(bench) -> float | None:
    """SegCLIP's background threshold on a harness benchmark: its own value where class 0 is
    background (``BG_THRESH``), else None (no background)."""
    return BG_THRESH[bench.name] if bench.background == "threshold" else None


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


def group_cosines(groups: torch.Tensor, soft: torch.Tensor, queries: torch.Tensor, size: tuple[int, int]):
    """The harness's input from SegCLIP's groups: each pixel's cosines [Q, H, W] with the unit query
    embeddings [Q, E] are those of the group its resized soft assignment [M, h, w] ranks first."""
    assignment = resize_assignment(soft, size)  # [H, W, M]
    onehot = F.one_hot(assignment.argmax(-1), groups.shape[0]).float()
    cosine = F.normalize(groups.float(), dim=-1) @ queries.float().T  # [M, Q]
    return (onehot @ cosine).permute(2, 0, 1)


Score = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]


@torch.no_grad()
def window_scores(trainable: nn.Module, image: torch.Tensor, score: Score, window: tuple[int, int] | None):
    """Scores [K, h, w] of ``image`` [3, h, w] (normalised, already resized): read whole (``window``
    None) or in mmseg's (crop, stride) windows, each window's ``score(image embedding [E], groups
    [M, E], soft assignments [M, gh, gw], window size)`` averaged where windows overlap (mmseg's
    slide_inference). Trailing pixels past the patch grid are dropped before the tower, as its
    strided convolution drops them."""
    p, side = trainable.vit.patch_embed.patch_size[0], trainable.vit.patch_embed.img_size
    h, w = image.shape[-2:]
    boxes = [(0, h, 0, w)] if window is None else window_boxes(h, w, *window)
    total, count = None, image.new_zeros((1, h, w), dtype=torch.float32)
    for y1, y2, x1, x2 in boxes:
        crop = image[:, y1 : y1 + (y2 - y1) // p * p, x1 : x1 + (x2 - x1) // p * p]
        if tuple(crop.shape[-2:]) != tuple(side) and not trainable.vit.dynamic_img_size:
            raise ValueError(
                f"SegCLIP's tower reads windows of its training size {side[0]}, not {tuple(crop.shape[-2:])}: "
                f"--window {side[0]} STRIDE, an image of at least that short side"
            )
        whole, groups, soft = group_readout(trainable, crop[None])
        out = score(whole[0], groups[0], soft[0], (y2 - y1, x2 - x1))
        total = image.new_zeros((out.shape[0], h, w), dtype=torch.float32) if total is None else total
        total[:, y1:y2, x1:x2] += out
        count[:, y1:y2, x1:x2] += 1
    return total / count


def _original_size(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if scores.shape[-2:] == size:
        return scores
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def segment_segclip(
    trainable: nn.Module,
    image: torch.Tensor,
    texts: torch.Tensor,
    bg_thresh: float | None,
    short_side: int = 224,
    window: tuple[int, int] | None = (224, 224),
) -> torch.Tensor:
    """SegCLIP's rule: the class map [H, W] int64 of ``image`` [3, H, W] (normalised, original size):
    resized to the short side (SegCLIP's 224), ``segclip_scores`` per window (crop 224, stride 224)
    with the run's learnt logit scale, resized back bilinearly, argmax; with ``bg_thresh`` class 0
    is background and class c + 1 is ``texts[c]`` (unit class embeddings [C, E])."""
    scale, texts = trainable.text.logit_scale, texts.to(image.device)

    def score(whole, groups, soft, size):
        return segclip_scores(whole, groups, soft, texts, scale, size, bg_thresh)

    scores = window_scores(trainable, resize(image, short_side), score, window)
    return _original_size(scores, tuple(image.shape[-2:])).argmax(0)


@torch.no_grad()
def segment_harness(
    trainable: nn.Module,
    image: torch.Tensor,
    queries: torch.Tensor,
    query_class: torch.Tensor,
    settings: Settings,
    num_classes: int,
) -> torch.Tensor:
    """The harness's rule on SegCLIP's groups: ``group_cosines`` per window at the settings' short
    side and windows, resized back, PAMR where the settings say, then decide.py's rule (the
    settings' logit scale and background threshold over every query)."""
    resized, queries = resize(image, settings.short_side), queries.to(image.device)

    def score(whole, groups, soft, size):
        return group_cosines(groups, soft, queries, size)

    logits = _original_size(window_scores(trainable, resized, score, settings.window), tuple(image.shape[-2:]))
    if settings.pamr:
        logits = pamr(resized.float(), logits)
    return decide(logits, query_class, settings.logit_scale, settings.prob_thd, num_classes, settings.area_thd)


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


def is_parts(path: Path | str) -> bool:
    """A file written by ``save_parts``."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        return META in (f.metadata() or {})


def class_texts(embeddings: torch.Tensor, query_class: torch.Tensor, background: bool) -> torch.Tensor:
    """SegCLIP's class embeddings [C, E] from the harness's queries: a class's queries (its synonyms)
    averaged and normalised again; with ``background`` class 0 (the background words) left out, as
    SegCLIP scores no background text."""
    classes = int(query_class.max()) + 1
    sums = torch.zeros(classes, embeddings.shape[1]).index_add_(0, query_class, embeddings.float())
    texts = F.normalize(sums, dim=-1)
    return texts[1:] if background else texts


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
