"""Patch-Seg evaluation: counts kept on the device during validation, metrics computed once at the end.

As in big_vision's evaluators, `Evaluator.update` only adds to count tensors (no host syncs inside the
validation loop), `all_reduce` sums them across ranks and `compute` turns them into the metrics of
../shared/methods/PATCHSEG.md §8 on the host. Beyond the original we keep per-class histograms of the bf16
scores, for threshold-free average precision, and (union) counts stratified by how much of an image a class covers.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

Reduction = Literal["union", "majority", "global-union"]

SIZE_BINS = 10  # equal bins of the covered fraction on [0, 1]
KEYS = 1 << 16  # one histogram bin per bf16 bit pattern
F1_EPS = 1e-6  # the original's F1 denominator guard


def bf16_keys(scores: torch.Tensor) -> torch.Tensor:
    """Monotone int64 keys in [0, 65536) for bf16 scores: a < b iff key(a) < key(b); -0 and +0 share a key."""
    scores = torch.where(scores == 0, 0, scores)  # -0 -> +0, so the two zeros form one threshold
    bits = scores.view(torch.int16).long()  # sign bit set <=> negative int16
    # Non-negative floats order like their bits; negative ones in reverse (larger magnitude = smaller value).
    return torch.where(bits >= 0, bits + KEYS // 2, -1 - bits)


def add_counts(counts: torch.Tensor, index: torch.Tensor, keep: torch.Tensor) -> None:
    """counts[i] += how often i occurs in index where keep: a bincount into a fixed-size accumulator.

    `counts` is flat with one spare slot at the end that receives the dropped items, so masking needs no
    boolean indexing. index_add_ rather than torch.bincount: CUDA bincount reads the input's max on the host
    (a sync) to size its output, while the accumulator here has a fixed size.
    """
    index = torch.where(keep, index, counts.numel() - 1).reshape(-1)
    one = torch.ones((), dtype=counts.dtype, device=counts.device)
    counts.index_add_(0, index, one.expand(index.numel()))


def majority_prediction(logits: torch.Tensor) -> torch.Tensor:
    """[..., C] logits -> [...] int64: the class the original predicts for majority, the argmax of
    the softmax in the logits' own dtype (patchseg/loss.py 100-102), ties to the lowest class. In
    bf16 the softmax rounds, so near-equal small logits tie where the logits' argmax would not;
    fp32 logits (``float_logits``) all but remove such ties. The original runs it on the CPU; a
    GPU's bf16 softmax may round a rare value one bit differently."""
    return logits.softmax(dim=-1).argmax(dim=-1)


class Evaluator:
    """Confusion counts, bf16 score histograms and size strata for one evaluation pass (one epoch's validation).

    `update` takes logits [B, N, C] (N = 1 for global-union). With `float_logits=False` (the original's setting)
    they are rounded to bf16 first and the prediction rule runs in bf16; with `float_logits=True` it runs in
    float32, and AP is then over the bf16-rounded scores (exact only up to that rounding).
    """

    def __init__(
        self, reduction: Reduction, num_classes: int, device: torch.device | str, float_logits: bool = False
    ) -> None:
        if reduction not in ("union", "majority", "global-union"):
            raise ValueError(f"unknown reduction {reduction!r}")
        self.reduction = reduction
        self.num_classes = C = num_classes
        self.device = torch.device(device)
        self.logit_dtype = torch.float32 if float_logits else torch.bfloat16
        shape = (C, C) if reduction == "majority" else (C, 2, 2)
        # Flat accumulators, each with a spare last slot for masked-out items (see add_counts).
        self._confusion = self._zeros(math.prod(shape), torch.int64)
        self.confusion = self._confusion[:-1].view(shape)  # union [C, 2, 2] [[TN, FP], [FN, TP]]; majority [C, C]
        # int32 keeps [C, 2, 65536] small (90 MB for 172 classes); one bin never nears 2**31 on a val split.
        self._hist = self._zeros(C * 2 * KEYS, torch.int32)
        self.hist = self._hist[:-1].view(C, 2, KEYS)  # [C, is_positive, key]
        self._size = self._zeros(C * SIZE_BINS * 4, torch.int64) if reduction == "union" else None
        self.size_confusion = None if self._size is None else self._size[:-1].view(C, SIZE_BINS, 2, 2)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.images = torch.zeros((), dtype=torch.int64, device=self.device)
        self._classes = torch.arange(C, device=self.device)  # [C]

    def _zeros(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(size + 1, dtype=dtype, device=self.device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every count tensor (flat, spare slot included): what all_reduce sums."""
        state = {"confusion": self._confusion, "hist": self._hist, "loss_sum": self.loss_sum, "images": self.images}
        if self._size is not None:
            state["size_confusion"] = self._size
        return state

    @torch.no_grad()
    def update(
        self, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None, loss_sum: torch.Tensor
    ) -> None:
        """Add one batch. logits [B, N, C]; targets multi-hot [B, N, C] (union, global-union) or int64 [B, N]
        (majority); valid [B] bool or None (all); loss_sum: 0-d, the summed loss of the valid images. No host sync.
        """
        B, N, C = logits.shape
        if self.num_classes != C or (self.reduction == "global-union" and N != 1):
            raise ValueError(
                f"logits {tuple(logits.shape)} do not fit {self.reduction} with {self.num_classes} classes"
            )
        logits = logits.detach().to(self.device, self.logit_dtype)
        targets = targets.to(self.device)
        keep = (
            torch.ones(B, dtype=torch.bool, device=self.device) if valid is None else valid.to(self.device, torch.bool)
        )
        self.loss_sum += torch.as_tensor(loss_sum, device=self.device).detach().to(torch.float64)
        self.images += keep.sum()
        if self.reduction == "majority":
            self._update_majority(logits, targets, keep)
        else:
            self._update_union(logits, targets, keep)

    def _update_union(self, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> None:
        B, N, C = logits.shape
        cls = self._classes
        keep = keep[:, None, None].expand(B, N, C)  # [B, N, C]
        # The original's rule: sigmoid in the logits' own dtype, strictly > 0.5. In bf16 the sigmoid rounds,
        # so a logit of 0.001 gives exactly 0.5 and is not positive although it is > 0.
        pred = (torch.sigmoid(logits) > 0.5).long()  # [B, N, C]
        target = (targets > 0.5).long()  # [B, N, C], float or uint8 multi-hot
        add_counts(self._confusion, cls * 4 + 2 * target + pred, keep)
        self._add_histogram(logits.to(torch.bfloat16), target, keep)
        if self._size is not None:
            # Integer arithmetic, so a fraction of exactly k/10 lands in bucket k (no float rounding).
            bucket = (target.sum(1) * SIZE_BINS // N).clamp(max=SIZE_BINS - 1)  # [B, C]; absent classes -> 0
            add_counts(self._size, ((cls * SIZE_BINS + bucket[:, None, :]) * 2 + target) * 2 + pred, keep)

    def _update_majority(self, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> None:
        B, N, C = logits.shape
        target = targets.long()  # [B, N]
        pred = majority_prediction(logits)  # [B, N]
        add_counts(self._confusion, target * C + pred, keep[:, None].expand(B, N))
        scores = torch.softmax(logits.float(), dim=-1).to(torch.bfloat16)  # [B, N, C]
        positive = (target[..., None] == self._classes).long()  # [B, N, C]
        self._add_histogram(scores, positive, keep[:, None, None].expand(B, N, C))

    def _add_histogram(self, scores: torch.Tensor, positive: torch.Tensor, keep: torch.Tensor) -> None:
        # scores bf16 [B, N, C], positive int [B, N, C] -> hist[c, positive, key(score)] += 1
        add_counts(self._hist, (self._classes * 2 + positive) * KEYS + bf16_keys(scores), keep)

    def all_reduce(self) -> None:
        """Sum every count over ranks; a no-op without an initialised process group of more than one rank."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for tensor in self.state_tensors().values():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def compute(self) -> dict:
        """Host metrics (plain Python values; per-class values as lists; NaN where undefined).

        Macro figures are unweighted means over the valid classes (with positives). As in the original,
        macro_precision and macro_f1 are NaN when a valid class is never predicted; the *_nansafe variants count
        such a class's precision and F1 as 0 instead.
        """
        confusion = self.confusion.cpu().numpy().astype(np.int64)
        if self.reduction == "majority":
            tn, fp, fn, tp, micro = _majority_cells(confusion)
            patches = int(confusion.sum())
        else:
            tn, fp, fn, tp = (confusion[:, i, j] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
            micro = _ratio(tp.sum() + tn.sum(), confusion.sum())
            patches = int(confusion[0].sum()) if self.num_classes else 0
        per_class = _per_class(tn, fp, fn, tp)
        per_class["ap"] = average_precision(self.hist.cpu().numpy()).tolist()
        images = int(self.images.item())
        return {
            "loss": _ratio(self.loss_sum.item(), images),
            "accuracy": micro,
            **_macros(per_class, tn + fp + fn + tp),
            "images": images,
            "patches": patches,
            "per_class": per_class,
            "by_size": None if self.size_confusion is None else _by_size(self.size_confusion.cpu().numpy()),
        }


def _ratio(a, b):
    """a / b elementwise, NaN where b == 0, without warnings; Python float for scalars."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    out = np.divide(a, b, out=np.full(np.broadcast(a, b).shape, np.nan), where=b != 0)
    return float(out) if out.ndim == 0 else out


def _mean(values: np.ndarray, mask: np.ndarray) -> float:
    """Plain mean of values[mask] (NaN propagates); NaN for an empty selection."""
    return float(values[mask].mean()) if mask.any() else math.nan


def _majority_cells(confusion: np.ndarray):
    """[C, C] (rows = target) -> one-vs-rest TN, FP, FN, TP per class [C], and micro accuracy trace / total."""
    tp = np.diag(confusion)
    row, col, total = confusion.sum(1), confusion.sum(0), confusion.sum()
    return total - row - col + tp, col - tp, row - tp, tp, _ratio(tp.sum(), total)


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    return 2 * precision * recall / (precision + recall + F1_EPS)  # NaN if either is NaN


def _per_class(tn, fp, fn, tp) -> dict:
    recall, precision = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    return {
        "recall": recall.tolist(),
        "precision": precision.tolist(),
        "f1": _f1(precision, recall).tolist(),
        "accuracy": _ratio(tp + tn, tn + fp + fn + tp).tolist(),
        "positives": (tp + fn).astype(int).tolist(),
        "predicted": (tp + fp).astype(int).tolist(),
    }


def _macros(per_class: dict, totals: np.ndarray) -> dict:
    """Unweighted means over the valid classes (those with positives)."""
    pc = {k: np.asarray(v, dtype=np.float64) for k, v in per_class.items()}
    valid = pc["positives"] > 0
    precision_nansafe = np.where(pc["predicted"] > 0, pc["precision"], 0.0)  # never predicted counts as 0
    return {
        "macro_accuracy": _mean(pc["accuracy"], valid),
        "macro_recall": _mean(pc["recall"], valid),
        "macro_precision": _mean(pc["precision"], valid),
        "macro_f1": _mean(pc["f1"], valid),
        "macro_precision_nansafe": _mean(precision_nansafe, valid),
        "macro_f1_nansafe": _mean(_f1(precision_nansafe, pc["recall"]), valid),
        "macro_ap": _mean(pc["ap"], valid),
        "valid_classes": int(valid.sum()),
        "mean_prevalence": _mean(_ratio(pc["positives"], totals), valid),
    }


def average_precision(hist: np.ndarray) -> np.ndarray:
    """Per-class AP [C] from hist [C, 2, 65536] (class, is_positive, monotone score key); NaN without positives.

    As scikit-learn's average_precision_score: all scores at one value form one threshold, and
    AP = sum_k (R_k - R_{k-1}) P_k over thresholds in descending order. The original's logits are bf16, so one
    bin per bf16 value makes this exact for them.
    """
    ap = np.full(hist.shape[0], np.nan)
    for c, (negatives, positives) in enumerate(hist.astype(np.int64)):
        present = np.flatnonzero(negatives + positives)[::-1]  # occupied thresholds, highest score first
        pos, neg = positives[present], negatives[present]
        if pos.sum() == 0:
            continue
        tp = np.cumsum(pos)
        precision = tp / (tp + np.cumsum(neg))  # each occupied threshold holds >= 1 item, so no 0 / 0
        ap[c] = float((pos * precision).sum() / tp[-1])  # recall steps by pos / P at each threshold
    return ap


def _by_size(size_confusion: np.ndarray) -> dict:
    """size_confusion [C, 10, 2, 2] -> recall per coverage bucket, micro and macro over classes."""
    tp = size_confusion[:, :, 1, 1].astype(np.int64)  # [C, 10]
    positives = tp + size_confusion[:, :, 1, 0]  # [C, 10]
    recall = _ratio(tp, positives)  # [C, 10]
    has = positives > 0
    return {
        "edges": [i / SIZE_BINS for i in range(SIZE_BINS + 1)],
        "micro_recall": _ratio(tp.sum(0), positives.sum(0)).tolist(),
        "macro_recall": [_mean(recall[:, b], has[:, b]) for b in range(SIZE_BINS)],
        "positives": positives.sum(0).astype(int).tolist(),
        "class_recall": recall.T.tolist(),  # [10][C], for splits such as things vs stuff
    }


def group_metrics(metrics: dict, groups: dict[str, list[int]]) -> dict[str, dict]:
    """For each named group of class ids (COCO things/stuff, synthetic texture/shape): macro recall, NaN-safe
    macro precision, macro AP and the number of valid classes in the group, from metrics['per_class']."""
    pc = {k: np.asarray(v, dtype=np.float64) for k, v in metrics["per_class"].items()}
    precision_nansafe = np.where(pc["predicted"] > 0, pc["precision"], 0.0)
    out = {}
    for name, ids in groups.items():
        ids = np.asarray(ids, dtype=np.int64)
        valid = pc["positives"][ids] > 0
        out[name] = {
            "macro_recall": _mean(pc["recall"][ids], valid),
            "macro_precision_nansafe": _mean(precision_nansafe[ids], valid),
            "macro_ap": _mean(pc["ap"][ids], valid),
            "valid_classes": int(valid.sum()),
        }
    return out


def selected_epoch(history: list[dict]) -> int:
    """Index of the epoch with the highest macro_recall; strict >, so a tie keeps the earlier epoch (the original's
    selection)."""
    if not history:
        raise ValueError("no epochs to select from")
    best = 0
    for i, metrics in enumerate(history):
        if metrics["macro_recall"] > history[best]["macro_recall"]:
            best = i
    return best
