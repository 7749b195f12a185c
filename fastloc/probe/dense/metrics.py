"""Dense-feature evaluation metrics: segmentation counts, cluster matching and k-NN label transfer.

The metrics layer of the dense evaluations beside Patch-Seg (../shared/methods/OTHER-METHODS.md §1): Leopart's
overclustering and linear probe on Pascal VOC, and Hummingbird in-context retrieval (open-hummingbird-eval). As in
`fastloc.probe.metrics`, an update only adds to a count tensor kept on the device (no host sync inside the loop),
`reduce` sums it across ranks, and the metrics are computed once at the end from counts accumulated over the whole
split (never averaged per image). The knobs that move numbers between protocols (§4: background in the mean or
not, precision- or IoU-based many-to-one matching) are arguments here, not fixed choices.

Convention: a count matrix ``counts[p, t]`` holds the pixels predicted ``p`` (a class, or a cluster) whose ground
truth is ``t``; pixels whose ground truth is the ignore value (255 by default) are not counted anywhere.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

IGNORE_INDEX = 255  # Pascal VOC's "void" label
# Hummingbird defaults, as in vpariza/open-hummingbird-eval (hbird/hbird_eval.py @ 0fd976f): hbird_evaluation(...,
# n_neighbours=30, ...) and create_NN(n_neighbours=30) retrieve 30 neighbours (the README's examples pass 30), and
# HbirdEvaluation.cross_attention(q, k, v, beta=0.02) weights them by softmax(cosine / 0.02).
KNN_K = 30
KNN_TEMPERATURE = 0.02
NORM_EPS = 1e-12  # as torch.nn.functional.normalize: a zero feature has similarity 0 to everything


# --- Segmentation counts ----------------------------------------------------------------------------------------


def pair_index(
    pred: torch.Tensor, target: torch.Tensor, num_preds: int, num_classes: int, ignore: int = IGNORE_INDEX
) -> torch.Tensor:
    """Flat cell ``pred * num_classes + target`` of every pixel (int64, same shape).

    Two spare cells follow the P x C matrix: ``P * C`` for ignored pixels (target == ignore, whatever the
    prediction) and ``P * C + 1`` for pixels with a label out of range (pred outside [0, P) or target outside
    [0, C)), so that bad labels are counted, not silently dropped or folded into a wrong cell.
    """
    pred, target = pred.long(), target.long()
    in_range = (pred >= 0) & (pred < num_preds) & (target >= 0) & (target < num_classes)
    cells = num_preds * num_classes
    index = torch.where(in_range, pred * num_classes + target, cells + 1)
    return torch.where(target == ignore, cells, index)


def _add_ones(flat: torch.Tensor, index: torch.Tensor) -> None:
    """flat[i] += how often i occurs in index. index_add_ rather than torch.bincount: CUDA bincount reads the
    input's min and max on the host (a sync), while the accumulator here has a fixed size (as metrics.add_counts)."""
    index = index.reshape(-1)
    one = torch.ones((), dtype=flat.dtype, device=flat.device)
    flat.index_add_(0, index, one.expand(index.numel()))


class SegCounts:
    """A P x C count matrix (P = C for class predictions, P = K for cluster maps) accumulated on the device.

    `update` takes label maps of any (equal) shape; `reduce` sums over ranks; `iou`, `miou` and `pixel_accuracy`
    need P == C and read the counts once, on the host. Beside the matrix it counts the ignored pixels and the
    pixels with an out-of-range label; the metrics refuse to run if there are any of the latter.
    """

    def __init__(
        self,
        num_classes: int,
        device: torch.device | str = "cpu",
        num_preds: int | None = None,
        ignore: int = IGNORE_INDEX,
    ) -> None:
        self.num_classes = C = num_classes
        self.num_preds = P = num_classes if num_preds is None else num_preds
        self.ignore = ignore
        self.device = torch.device(device)
        self._flat = torch.zeros(P * C + 2, dtype=torch.int64, device=self.device)  # matrix, ignored, invalid
        self.counts = self._flat[: P * C].view(P, C)  # counts[pred, target]

    @property
    def ignored(self) -> torch.Tensor:
        """0-d: pixels whose target was the ignore value."""
        return self._flat[-2]

    @property
    def invalid(self) -> torch.Tensor:
        """0-d: pixels with a prediction or target out of range (and not ignored)."""
        return self._flat[-1]

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of label maps (any shape, integer; pred and target of the same shape). No host sync."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred, target = pred.to(self.device), target.to(self.device)
        _add_ones(self._flat, pair_index(pred, target, self.num_preds, self.num_classes, self.ignore))

    def reduce(self) -> None:
        """Sum the counts over ranks (call once, before the metrics); a no-op without a process group of > 1 rank."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self._flat, op=dist.ReduceOp.SUM)

    def checked_counts(self) -> torch.Tensor:
        """The P x C matrix on the host, after checking that no pixel had an out-of-range label (one sync)."""
        flat = self._flat.cpu()
        if int(flat[-1]):
            raise ValueError(
                f"{int(flat[-1])} pixels had a label outside [0, {self.num_preds}) (pred) or [0, {self.num_classes})"
                f" (target) other than the ignore value {self.ignore}"
            )
        return flat[:-2].view(self.num_preds, self.num_classes)

    def iou(self) -> torch.Tensor:
        """Per-class IoU [C] (float64, host); NaN for a class with no ground-truth and no predicted pixel."""
        return class_iou(self.checked_counts())

    def miou(self, include_background: bool = True) -> float:
        """Mean IoU over the classes whose IoU is defined; class 0 left out with include_background=False."""
        return mean_iou(self.checked_counts(), include_background)

    def pixel_accuracy(self) -> float:
        """Correct / counted (non-ignored) pixels; NaN when nothing was counted."""
        return pixel_accuracy(self.checked_counts())


def _square(counts: torch.Tensor) -> torch.Tensor:
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"class metrics need a C x C matrix, not {tuple(counts.shape)}: match clusters first")
    return counts.detach().cpu().to(torch.float64)


def class_iou(counts: torch.Tensor) -> torch.Tensor:
    """IoU per class [C] (float64, host) from a C x C counts[pred, target]: TP / (TP + FP + FN), with TP, FP and
    FN summed over the whole split; NaN where TP + FP + FN == 0 (the class is neither present nor predicted)."""
    counts = _square(counts)
    tp = counts.diagonal()
    union = counts.sum(1) + counts.sum(0) - tp  # predicted c + truly c - both = TP + FP + FN
    return torch.where(union > 0, tp / union.clamp(min=1), torch.nan)


def mean_iou(counts: torch.Tensor, include_background: bool = True) -> float:
    """Mean of `class_iou` over the classes where it is defined (NaN if none); background is class 0.

    Pascal VOC's usual figure (Leopart, Hummingbird) counts background among its 21 classes: include_background=True.
    Note: Leopart's and open-hummingbird-eval's own code give a never-present, never-predicted class IoU 0 and keep
    it in the mean; on VOC val every class is present, so the two agree there.
    """
    iou = class_iou(counts)
    if not include_background:
        iou = iou[1:]
    return float(torch.nanmean(iou)) if not torch.isnan(iou).all() else float("nan")


def pixel_accuracy(counts: torch.Tensor) -> float:
    """Correctly labelled / counted pixels of a C x C counts matrix; NaN when it is empty."""
    counts = _square(counts)
    total = counts.sum()
    return float(counts.trace() / total) if total > 0 else float("nan")


# --- Overclustering: matching clusters to classes ---------------------------------------------------------------


def contingency(
    clusters: torch.Tensor, target: torch.Tensor, num_clusters: int, num_classes: int, ignore: int = IGNORE_INDEX
) -> torch.Tensor:
    """K x C pixel counts n[k, c] of cluster maps against ground truth (ignored pixels left out), on the host.

    For a whole split at once; to accumulate over batches (and ranks), use SegCounts(num_classes, device,
    num_preds=num_clusters) and its `checked_counts()`.
    """
    counts = SegCounts(num_classes, clusters.device, num_preds=num_clusters, ignore=ignore)
    counts.update(clusters, target)
    return counts.checked_counts()


def cluster_class_iou(contingency: torch.Tensor) -> torch.Tensor:
    """IoU of every cluster with every class [K, C] (float64, host): n_kc / (|k| + |c| - n_kc); 0 where both are
    empty."""
    n = contingency.detach().cpu().to(torch.float64)
    union = n.sum(1, keepdim=True) + n.sum(0, keepdim=True) - n
    return torch.where(union > 0, n / union.clamp(min=1), 0.0)


def many_to_one(contingency: torch.Tensor, score: Literal["precision", "iou"] = "precision") -> torch.Tensor:
    """Map each cluster to a class (several clusters may share one): int64 [K] on the contingency's device.

    score="precision" (Leopart's overclustering, K > C): the class of highest precision n_kc / |k| within the
    cluster, i.e. the majority class of its pixels. score="iou": the class of highest IoU with the cluster
    (open-hummingbird-eval's many-to-one default). Ties go to the lower class; an empty cluster maps to class 0.
    """
    if score == "precision":
        return contingency.argmax(dim=1)  # integer counts: exact, and stays on the device
    if score == "iou":
        return cluster_class_iou(contingency).argmax(dim=1).to(contingency.device)
    raise ValueError(f"unknown score {score!r}")


def hungarian(contingency: torch.Tensor) -> torch.Tensor:
    """One-to-one map of K <= C clusters to distinct classes maximising the total cluster-class IoU (Leopart's
    K = C overclustering): int64 [K] on the contingency's device. scipy's linear_sum_assignment, on the host."""
    from scipy.optimize import linear_sum_assignment  # here: the other protocols run without scipy

    K, C = contingency.shape
    if K > C:
        raise ValueError(f"one-to-one matching needs K <= C, got K={K} clusters for C={C} classes: use many_to_one")
    rows, cols = linear_sum_assignment(cluster_class_iou(contingency).numpy(), maximize=True)
    mapping = torch.empty(K, dtype=torch.int64)
    mapping[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return mapping.to(contingency.device)


def apply_mapping(clusters: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """Class maps from cluster maps (any shape): mapping[clusters], a gather on the clusters' device."""
    return mapping.to(clusters.device)[clusters.long()]


def fold_clusters(contingency: torch.Tensor, mapping: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x C counts[pred, target] of the mapped predictions, from the K x C contingency without a second pass over
    the pixels: the rows of the clusters mapped to each class are summed. Equals SegCounts over apply_mapping."""
    out = torch.zeros(num_classes, contingency.shape[1], dtype=contingency.dtype, device=contingency.device)
    return out.index_add_(0, mapping.to(contingency.device), contingency)


# --- Hummingbird: k-NN label transfer ---------------------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _inv_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1).clamp(min=NORM_EPS).reciprocal()


def cosine_topk(
    query: torch.Tensor, bank: torch.Tensor, k: int, bank_chunk: int = 32768
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest cosine similarities of each query row to the bank, descending, and their bank indices.

    query [Q, D], bank [M, D] on one device -> (values [Q, k], indices [Q, k] int64). The bank is scanned in
    chunks of `bank_chunk` rows with a running top-k merge (the top k of the union of per-chunk top-k sets is the
    global top k), so memory is O(Q * (bank_chunk + k)) and the bank is never copied whole (a chunk is cast only if
    its dtype differs). Dot products are scaled by the two inverse norms afterwards, elementwise, so the values do
    not depend on the chunking beyond the matmul's own rounding.
    """
    M = bank.shape[0]
    if not 1 <= k <= M:
        raise ValueError(f"k={k} neighbours asked of a bank of {M}")
    if bank_chunk < 1:
        raise ValueError(f"bank_chunk must be >= 1, got {bank_chunk}")
    dtype = _compute_dtype(query, bank)
    q = query.to(dtype)
    q_inv = _inv_norm(q)[:, None]  # [Q, 1]
    values = indices = None
    for start in range(0, M, bank_chunk):
        b = bank[start : start + bank_chunk].to(dtype)  # a view when the dtype already matches
        sims = (q @ b.T) * q_inv * _inv_norm(b)  # [Q, chunk] cosines
        v, i = sims.topk(min(k, b.shape[0]), dim=1)
        i = i + start
        if values is None:
            values, indices = v, i
        else:
            values, pos = torch.cat([values, v], dim=1).topk(min(k, values.shape[1] + v.shape[1]), dim=1)
            indices = torch.cat([indices, i], dim=1).gather(1, pos)
    return values, indices


def knn_transfer(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    query_chunk: int = 1024,
    bank_chunk: int = 32768,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hummingbird label transfer: each query patch takes the softmax(cosine / temperature)-weighted mean of the
    label distributions of its k nearest bank patches.

    query [Q, D]; bank [M, D]; bank_labels [M, C] float (per-patch label distributions) or [M] integer (hard labels
    in [0, num_classes), num_classes then required); all on one device. Returns (distributions [Q, C] float32, or
    float64 for float64 inputs; predictions [Q] int64 = their argmax). Queries are processed `query_chunk` at a
    time and the bank `bank_chunk` rows at a time (see cosine_topk); the weighted sum runs over the k neighbours in
    a fixed order with [chunk, C] temporaries, so the chunk sizes change nothing (ties aside) beyond the matmul's own
    rounding (see cosine_topk). The distributions are returned so that a protocol can upsample them before argmax.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    hard = not bank_labels.is_floating_point()
    if hard and (bank_labels.ndim != 1 or num_classes is None):
        raise ValueError("hard bank labels are [M] integers and need num_classes")
    if not hard and bank_labels.ndim != 2:
        raise ValueError(f"soft bank labels are [M, C], got {tuple(bank_labels.shape)}")
    if bank_labels.shape[0] != bank.shape[0]:
        raise ValueError(f"{bank_labels.shape[0]} labels for a bank of {bank.shape[0]} features")
    C = num_classes if hard else bank_labels.shape[1]
    dtype = _compute_dtype(query, bank)
    probs = torch.zeros(query.shape[0], C, dtype=dtype, device=query.device)
    for start in range(0, query.shape[0], query_chunk):
        values, indices = cosine_topk(query[start : start + query_chunk], bank, k, bank_chunk)
        weights = torch.softmax(values / temperature, dim=1)  # [q, k]
        out = probs[start : start + query_chunk]
        for j in range(indices.shape[1]):  # nearest first; one neighbour per row per step
            w, idx = weights[:, j : j + 1], indices[:, j]
            if hard:
                out.scatter_add_(1, bank_labels[idx].long()[:, None], w)  # one cell per row: no write collisions
            else:
                out.add_(w * bank_labels[idx].to(dtype))
    return probs, probs.argmax(dim=1)
