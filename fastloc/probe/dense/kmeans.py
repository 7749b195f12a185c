"""StandardScaler, PCA and k-means in torch, with the semantics of the sklearn + faiss calls Leopart's
overclustering makes (``StandardScaler``, ``faiss.PCAMatrix``, ``faiss.Kmeans(d, k, niter, nredo)``).

Torch rather than faiss (not a dependency) or sklearn: the same code runs on the CPU in the tests and
on the GPU for VOC val's ~1.1M tokens. All randomness comes from the ``torch.Generator`` passed in,
so a seed gives one clustering; faiss's own random streams cannot be reproduced, so a seed here is
not faiss's clustering for that seed, only one of the same kind. Distances are computed in chunks
(memory O(chunk x k)) and in full float32: TF32 is switched off for these matmuls, as faiss's sgemm
is exact float32. faiss's k-means keeps the redo whose last Lloyd assignment (before that iteration's
centroid update) has the lowest objective; ``KMeansResult.objective`` is that number.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24  # distance-matrix entries per chunk (64 MiB of float32)
SPLIT_EPS = 1 / 1024  # faiss's relative perturbation of a split centroid
PCA_MAX_POINTS_PER_DIM = 1000  # faiss PCAMatrix::max_points_per_d: PCA trains on at most d_in x 1000 points


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """float32 matmuls in full precision inside (setup() enables TF32 on CUDA, which would round inputs)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def chunk_rows(k: int, chunk: int | None) -> int:
    return chunk if chunk else max(1, CHUNK_ELEMENTS // max(k, 1))


def subsample(n: int, limit: int, generator: torch.Generator, device: torch.device) -> torch.Tensor | None:
    """Indices of a random subset of ``limit`` of ``n`` rows (faiss's subsampling), None when n <= limit."""
    if limit <= 0 or n <= limit:
        return None
    return torch.randperm(n, generator=generator, device=generator.device)[:limit].to(device)


# --- StandardScaler + PCA ---------------------------------------------------------------------------------------


@dataclass
class Scaler:
    """sklearn's StandardScaler: per-dimension mean and population std (ddof 0); a zero std counts as 1."""

    mean: torch.Tensor  # [D] float32
    std: torch.Tensor  # [D] float32

    @classmethod
    def fit(cls, x: torch.Tensor, chunk: int = 1 << 16) -> Scaler:
        """Two passes in float64 over row chunks (no float64 copy of x)."""
        n = x.shape[0]
        total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        for start in range(0, n, chunk):
            total += x[start : start + chunk].double().sum(0)
        mean = total / n
        squares = torch.zeros_like(total)
        for start in range(0, n, chunk):
            squares += (x[start : start + chunk].double() - mean).square().sum(0)
        std = (squares / n).sqrt()
        std = torch.where(std > 10 * torch.finfo(torch.float64).eps, std, torch.ones_like(std))  # sklearn's rule
        return cls(mean.float(), std.float())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass
class PCA:
    """faiss's PCAMatrix without whitening: y = (x - mean) @ components, the top eigenvectors of the covariance."""

    mean: torch.Tensor  # [D] float32
    components: torch.Tensor  # [D, d] float32, columns by decreasing eigenvalue
    eigenvalues: torch.Tensor  # [d] float64, of the covariance (divided by n)
    total_variance: float  # the covariance's trace

    @classmethod
    def fit(
        cls, x: torch.Tensor, dim: int, generator: torch.Generator, max_points_per_dim: int = PCA_MAX_POINTS_PER_DIM
    ) -> PCA:
        """Fit on x [N, D] (a random subset of D x max_points_per_dim rows when there are more, as faiss)."""
        n, d_in = x.shape
        if not 1 <= dim <= d_in:
            raise ValueError(f"PCA to {dim} dimensions of {d_in}-dimensional features")
        index = subsample(n, d_in * max_points_per_dim, generator, x.device)
        sample = (x if index is None else x[index]).double()
        mean = sample.mean(0)
        centred = sample - mean
        cov = centred.T @ centred / sample.shape[0]  # [D, D]
        values, vectors = torch.linalg.eigh(cov)  # ascending
        order = torch.arange(d_in - 1, d_in - 1 - dim, -1, device=x.device)
        return cls(mean.float(), vectors[:, order].float().contiguous(), values[order], float(cov.trace()))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        with ieee_fp32():
            return (x - self.mean) @ self.components


def standardize_and_project(
    x: torch.Tensor, dim: int, generator: torch.Generator, chunk: int = 1 << 16
) -> tuple[torch.Tensor, dict[str, float]]:
    """Leopart's ``normalize_and_transform``: StandardScaler then PCA to ``dim``, both fitted on x [N, D];
    returns ([N, dim] float32, a summary). Applied in row chunks: no scaled [N, D] copy is kept."""
    scaler = Scaler.fit(x, chunk)
    index = subsample(x.shape[0], x.shape[1] * PCA_MAX_POINTS_PER_DIM, generator, x.device)
    pca = PCA.fit(scaler.apply(x if index is None else x[index]), dim, generator, max_points_per_dim=0)
    out = torch.cat([pca.apply(scaler.apply(x[start : start + chunk])) for start in range(0, x.shape[0], chunk)])
    kept = float(pca.eigenvalues.sum()) / max(pca.total_variance, 1e-30)
    return out, {"pca_fit_points": x.shape[0] if index is None else len(index), "pca_variance_kept": kept}


# --- k-means ----------------------------------------------------------------------------------------------------


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [k, d] float32
    assignments: torch.Tensor  # [N] int64: every input point's nearest centroid
    objective: float  # faiss's: the kept redo's sum of squared distances of its last assignment (training set)
    splits: int  # empty clusters re-seeded in the kept redo


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's nearest centroid and squared distance ([N] int64, [N] float32), ``chunk`` rows at a time
    (default: CHUNK_ELEMENTS // k). ||x||^2 - 2 x.c + ||c||^2 by matmul as faiss; ||x||^2 is the same for every
    centroid, so the argmin is taken over ||c||^2 - 2 x.c (one fused addmm) and ||x||^2 added to the minimum
    only; clamped at 0 as faiss. Ties go to the lower index."""
    rows = chunk_rows(centroids.shape[0], chunk)
    c_norm = centroids.square().sum(1)  # [k]
    index, dist = [], []
    with ieee_fp32():
        for start in range(0, x.shape[0], rows):
            xb = x[start : start + rows]
            best, arg = torch.addmm(c_norm, xb, centroids.T, alpha=-2).min(1)  # [chunk, k] -> [chunk]
            index.append(arg)
            dist.append((best + xb.square().sum(1)).clamp(min=0))
    return torch.cat(index), torch.cat(dist)


def centroid_sums(
    x: torch.Tensor, assign: torch.Tensor, k: int, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums [k, d] and counts [k] (int64). On CUDA the sums are a one-hot matmul (chunked), which is
    deterministic where a float index_add_ (atomics) is not; on the CPU index_add_ is deterministic and faster."""
    counts = torch.zeros(k, dtype=torch.int64, device=x.device).index_add_(0, assign, torch.ones_like(assign))
    if not x.is_cuda:
        return torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assign, x), counts
    rows = chunk_rows(k, chunk)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    with ieee_fp32():
        for start in range(0, x.shape[0], rows):
            sums += F.one_hot(assign[start : start + rows], k).to(x.dtype).T @ x[start : start + rows]
    return sums, counts


def split_empty(centroids: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> int:
    """faiss's ``split_clusters``, in place: each empty cluster (in index order) takes a copy of a cluster chosen
    with probability proportional to its size - 1, the two copies perturbed symmetrically by the relative
    SPLIT_EPS (even dimensions x(1 + eps) / x(1 - eps), odd the other way round), the size halved between them.
    Returns the number of splits (one host sync to find the empty clusters)."""
    sizes = counts.to(torch.float64).cpu()
    empty = torch.nonzero(sizes == 0).flatten().tolist()
    if not empty:
        return 0
    sign = torch.ones(centroids.shape[1], dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1
    for ci in empty:
        weights = (sizes - 1).clamp(min=0).to(generator.device)
        cj = int(torch.multinomial(weights, 1, generator=generator))
        centroids[ci] = centroids[cj] * (1 + SPLIT_EPS * sign)
        centroids[cj] = centroids[cj] * (1 - SPLIT_EPS * sign)
        sizes[ci] = sizes[cj] / 2
        sizes[cj] -= sizes[ci]
    return len(empty)


def lloyd(
    x: torch.Tensor, centroids: torch.Tensor, iterations: int, generator: torch.Generator, chunk: int | None = None
) -> tuple[torch.Tensor, float, int]:
    """faiss's iterations: assign, objective, recompute the means, re-seed empty clusters. Returns (centroids
    after the last update, the last assignment's objective, the number of splits)."""
    k = centroids.shape[0]
    objective, splits = float("inf"), 0
    for _ in range(iterations):
        assign, dist = nearest(x, centroids, chunk)
        sums, counts = centroid_sums(x, assign, k, chunk)
        centroids = sums / counts.clamp(min=1)[:, None].to(x.dtype)  # an empty cluster's centroid is 0, as faiss
        splits += split_empty(centroids, counts, generator)
        objective = dist.double().sum()
    return centroids, float(objective), splits


def kmeans(
    x: torch.Tensor,
    k: int,
    iterations: int,
    restarts: int,
    generator: torch.Generator,
    max_points_per_centroid: int = 256,
    chunk: int | None = None,
) -> KMeansResult:
    """faiss.Kmeans(d, k, niter=iterations, nredo=restarts).train(x), then every point's nearest centroid.

    x [N, d] float32 on any device. Training set: a random subset of k x max_points_per_centroid rows when
    there are more (0: all rows), drawn once; each restart starts from k distinct random training points and
    runs ``iterations`` Lloyd iterations; the restart with the lowest objective is kept."""
    x = x.float()
    n = x.shape[0]
    if k < 1 or iterations < 1 or restarts < 1:
        raise ValueError(f"k-means needs k, iterations and restarts >= 1 (got {k}, {iterations}, {restarts})")
    if n < k:
        raise ValueError(f"k-means with k={k} clusters of only {n} points")
    index = subsample(n, k * max_points_per_centroid, generator, x.device)
    train = x if index is None else x[index]
    if n == k:  # faiss: the points are the centroids
        best, best_objective, best_splits = x.clone(), 0.0, 0
    else:
        best, best_objective, best_splits = None, float("inf"), 0
        for _ in range(restarts):
            init = train[torch.randperm(train.shape[0], generator=generator, device=generator.device)[:k].to(x.device)]
            centroids, objective, splits = lloyd(train, init, iterations, generator, chunk)
            if best is None or objective < best_objective:
                best, best_objective, best_splits = centroids, objective, splits
    assignments, _ = nearest(x, best, chunk)
    return KMeansResult(best, assignments, best_objective, best_splits)
