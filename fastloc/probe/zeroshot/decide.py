"""The harness's rule from cosine logits to a class map (ZEROSHOT-SEG.md section 3, steps 5-6), and its
per-benchmark knobs (sections 1-2) as data.

softmax(scale * logits) over every query (all synonyms of all classes), per class the max over its synonyms,
argmax; a pixel whose top class probability is below ``prob_thd`` becomes class 0 (NACLIP naclip.py:139-153,
SCLIP clip_segmentor.py:148-170, with SCLIP's optional small-area rule). Batched, on the logits' device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch


def _query_index(query_class: torch.Tensor | Sequence[int], num_queries: int, num_classes: int | None):
    """Checked host copy of the query -> class index and the number of classes (max + 1 by default)."""
    index = torch.as_tensor(query_class)
    if index.device.type != "cpu":
        raise ValueError(
            "query_class must be on the host (as class_embeddings returns it): its values are checked there"
        )
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.dim() != 1 or len(index) != num_queries:
        raise ValueError(
            f"query_class must be {num_queries} integer class indices (one per query), got {index.dtype} "
            f"{tuple(index.shape)}"
        )
    if num_queries == 0:
        raise ValueError("no queries")
    lo, hi = int(index.min()), int(index.max())
    num_classes = hi + 1 if num_classes is None else num_classes
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"query classes must lie in [0, {num_classes}), got {lo}..{hi}")
    return index.long(), num_classes


def class_probs(
    logits: torch.Tensor,
    query_class: torch.Tensor | Sequence[int],
    logit_scale: float,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Cosine logits [B, Q, H, W] (or [Q, H, W]) -> class probabilities [B, C, H, W] (or [C, H, W]), float32:
    softmax over all Q queries of ``logit_scale * logits``, then per class the max over its queries (0 for a
    class without a query). ``query_class`` [Q]: each query's class, on the host; C = its max + 1 by default."""
    if logits.dim() not in (3, 4) or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be float [Q, H, W] or [B, Q, H, W], got {logits.dtype} {tuple(logits.shape)}")
    index, num_classes = _query_index(query_class, logits.shape[-3], num_classes)
    probs = torch.softmax(logits.float() * logit_scale, dim=-3)
    shape = (*logits.shape[:-3], num_classes, *logits.shape[-2:])
    out = probs.new_zeros(shape)  # probabilities are >= 0: as the reference's product with the one-hot class index
    index = index.to(probs.device, non_blocking=True).view(-1, 1, 1).expand_as(probs)
    return out.scatter_reduce_(-3, index, probs, "amax")


def decide(
    logits: torch.Tensor,
    query_class: torch.Tensor | Sequence[int],
    logit_scale: float,
    prob_thd: float = 0.0,
    num_classes: int | None = None,
    area_thd: float | None = None,
) -> torch.Tensor:
    """Class map [B, H, W] (or [H, W]) int64 from cosine logits [B, Q, H, W] (or [Q, H, W]): argmax of
    ``class_probs``; pixels whose top probability is below ``prob_thd`` become class 0 (0 = no threshold).
    ``area_thd`` (SCLIP's VOC21 only): per image, a class other than 0 whose argmax area is not above
    ``area_thd`` times all non-0 argmax pixels has its probabilities zeroed first (clip_segmentor.py:162-167)."""
    if not 0.0 <= prob_thd <= 1.0 or (area_thd is not None and not 0.0 <= area_thd <= 1.0):
        raise ValueError(f"prob_thd {prob_thd} and area_thd {area_thd} must lie in [0, 1]")
    probs = class_probs(logits, query_class, logit_scale, num_classes)
    if area_thd is not None:
        flat = probs.flatten(-2)  # [..., C, HW]
        area = torch.zeros_like(flat[..., 0]).scatter_add_(-1, flat.argmax(-2), torch.ones_like(flat[..., 0, :]))
        area = area[..., 1:]  # argmax pixels per class, class 0 left out
        keep = (area > area_thd * area.sum(-1, keepdim=True)).to(probs.dtype)
        probs = torch.cat([probs[..., :1, :, :], probs[..., 1:, :, :] * keep[..., None, None]], dim=-3)
    pred = probs.argmax(-3)
    return torch.where(probs.amax(-3) < prob_thd, torch.zeros_like(pred), pred)


# --- The knobs per benchmark and method (ZEROSHOT-SEG.md sections 1-2; the repos' configs/cfg_*.py and the
# segmentors' defaults: NACLIP naclip.py:20-22 @ 0cac3a6, SCLIP clip_segmentor.py:19-21 @ b56bd30, ClearCLIP
# clearclip_segmentor.py:22-23 @ ad68a40). Other sessions build the datasets; this is only the table.

METHODS = ("naclip", "sclip", "clearclip")


@dataclass(frozen=True)
class Settings:
    """One method's inference knobs on one benchmark."""

    class_names: str  # the class-name file, "<repo> configs/cls_*.txt" (one class a line, synonyms split on ", ")
    prob_thd: float  # background threshold (0: none)
    logit_scale: float  # softmax(logit_scale * cosine)
    short_side: int  # mmseg Resize(scale=(2048, short_side), keep_ratio=True)
    window: tuple[int, int] | None  # sliding (crop, stride); None: the whole image at once
    pamr: bool  # PAMR, 10 iterations, dilations (8, 16)
    area_thd: float | None = None  # SCLIP's small-area rule (VOC21 only: SCLIP configs/cfg_voc21.py:8)


@dataclass(frozen=True)
class Benchmark:
    """One of the harness's eight benchmarks and its settings per method."""

    name: str  # as the repos' configs/cfg_<name>.py
    classes: str  # configs/cls_*.txt: SCLIP's, byte-identical in NACLIP; ClearCLIP's own for voc21, voc20, coco_object
    background: str  # "threshold": class 0 is background words and prob_thd sends pixels to it; "none"
    reduce_zero_label: bool  # label 0 -> 255 (ignored), the others shifted down by 1
    naclip: Settings
    sclip: Settings
    clearclip: Settings

    def settings(self, method: str) -> Settings:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
        return getattr(self, method)


def _benchmark(name, classes, background, reduce_zero_label, prob_thd=(0.0, 0.0, 0.0), sclip_scale=40.0, **over):
    """Defaults: NACLIP short side 336, window 224/112, scale 40, PAMR; SCLIP 336, 224/112, no PAMR; ClearCLIP
    448, 448/224, scale 50, no PAMR. prob_thd per (NACLIP, SCLIP, ClearCLIP); over: {method: {field: value}}."""
    names = "ClearCLIP" if name in ("voc21", "voc20", "coco_object") else "SCLIP"  # ClearCLIP's plain names
    rows = {
        "naclip": Settings(f"SCLIP configs/{classes}", prob_thd[0], 40.0, 336, (224, 112), True),
        "sclip": Settings(f"SCLIP configs/{classes}", prob_thd[1], sclip_scale, 336, (224, 112), False),
        "clearclip": Settings(f"{names} configs/{classes}", prob_thd[2], 50.0, 448, (448, 224), False),
    }
    rows = {method: replace(row, **over.get(method, {})) for method, row in rows.items()}
    return Benchmark(name, classes, background, reduce_zero_label, **rows)


# in the order of NACLIP's test_all.sh and the headline tables
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        _benchmark(
            "voc21",
            "cls_voc21.txt",
            "threshold",
            False,
            prob_thd=(0.1, 0.1, 0.5),
            sclip_scale=65.0,
            naclip={"window": None},
            sclip={"area_thd": 0.1},
        ),
        _benchmark("context60", "cls_context60.txt", "threshold", False, prob_thd=(0.1, 0.1, 0.15), sclip_scale=50.0),
        _benchmark(
            "coco_object", "cls_coco_object.txt", "threshold", False, prob_thd=(0.1, 0.1, 0.4), sclip_scale=50.0
        ),
        _benchmark("voc20", "cls_voc20.txt", "none", True, naclip={"window": None}),
        _benchmark(
            "city_scapes",
            "cls_city_scapes.txt",
            "none",
            False,
            naclip={"short_side": 560},
            sclip={"short_side": 560},
            clearclip={"window": (224, 224)},
        ),
        _benchmark("context59", "cls_context59.txt", "none", True),
        _benchmark("ade20k", "cls_ade20k.txt", "none", True),
        _benchmark("coco_stuff164k", "cls_coco_stuff.txt", "none", False, sclip={"short_side": 448}),
    )
}
