"""Leopart's overclustering: the torch k-means, scaler and PCA against their definitions and numpy, the
scoring core on hand-made maps, and the CLI end to end on the small VOC."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from fastloc.probe.dense.config import OverclusterConfig
from fastloc.probe.dense.data import VOID, LabelSpace, dense_backbone, eval_split, open_dense_data, resize_nearest
from fastloc.probe.dense.kmeans import (
    SPLIT_EPS,
    Scaler,
    kmeans,
    nearest,
    split_empty,
    standardize_and_project,
)
from fastloc.probe.dense.overcluster import (
    cluster_and_score,
    cluster_counts,
    gather,
    score,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blobs(per: int = 100, dim: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4 tight blobs far apart: (points [4 * per, dim], blob ids)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (4, dim)) * 20
    ids = np.repeat(np.arange(4), per)
    x = centres[ids] + rng.normal(0, 0.1, (len(ids), dim))
    return torch.from_numpy(x).float(), torch.from_numpy(ids)


# --- k-means ----------------------------------------------------------------------------------------------------


def test_kmeans_recovers_separated_blobs_and_a_seed_repeats():
    x, ids = blobs()
    result = kmeans(x, 4, iterations=20, restarts=5, generator=gen(0))
    pairs = {(int(a), int(b)) for a, b in zip(result.assignments, ids)}
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4  # a bijection clusters <-> blobs
    again = kmeans(x, 4, iterations=20, restarts=5, generator=gen(0))
    assert torch.equal(result.centroids, again.centroids) and torch.equal(result.assignments, again.assignments)
    assert result.objective == again.objective
    assert result.objective == pytest.approx(((x - result.centroids[result.assignments]) ** 2).sum().item(), rel=1e-3)


def test_restarts_never_raise_the_objective():
    x = torch.randn(600, 6, generator=gen(1))
    for seed in range(5):
        one = kmeans(x, 12, iterations=8, restarts=1, generator=gen(seed))
        many = kmeans(x, 12, iterations=8, restarts=4, generator=gen(seed))  # its first restart is `one`'s
        assert many.objective <= one.objective
        # the kept objective is that of the last assignment, before the last update: the final centroids do better
        final = ((x - many.centroids[many.assignments]) ** 2).sum().item()
        assert final <= many.objective * (1 + 1e-5)


def test_training_subset_and_the_final_assignment_of_every_point():
    x, ids = blobs(per=300)
    result = kmeans(x, 4, iterations=10, restarts=3, generator=gen(2), max_points_per_centroid=10)  # trains on 40
    assert result.assignments.shape == (1200,)
    assert torch.equal(result.assignments, nearest(x, result.centroids)[0])
    assert len({(int(a), int(b)) for a, b in zip(result.assignments, ids)}) == 4


def test_split_empty_copies_and_perturbs_the_only_splittable_cluster():
    centroids = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 4.0], [8.0, 8.0, 8.0]])
    counts = torch.tensor([0, 5, 1])  # size - 1: cluster 1 is the only one with weight
    assert split_empty(centroids, counts, gen(0)) == 1
    eps = SPLIT_EPS
    assert torch.allclose(centroids[0], torch.tensor([1 + eps, 2 * (1 - eps), 4 * (1 + eps)]))
    assert torch.allclose(centroids[1], torch.tensor([1 - eps, 2 * (1 + eps), 4 * (1 - eps)]))
    assert torch.equal(centroids[2], torch.tensor([8.0, 8.0, 8.0]))
    assert split_empty(centroids, torch.tensor([2, 5, 1]), gen(0)) == 0


def test_empty_clusters_are_reseeded_until_every_distinct_point_has_one():
    # 6 distinct points, each 10 times: k = 6 random initial points nearly always repeat one, leaving a
    # cluster empty; faiss-style splits must still end with one cluster per distinct point.
    distinct = 10 + 5 * torch.randn(6, 4, generator=gen(3))
    x = distinct.repeat_interleave(10, 0)
    splits = 0
    for seed in range(4):
        result = kmeans(x, 6, iterations=40, restarts=1, generator=gen(seed))
        assert torch.bincount(result.assignments, minlength=6).tolist() == [10] * 6
        assert result.objective <= 1e-6 * x.square().sum().item()  # 0 up to the rounding of |x|^2 - 2 x.c + |c|^2
        splits += result.splits
    assert splits > 0


def test_chunked_assignment_equals_unchunked():
    x = torch.randn(1000, 7, generator=gen(4))
    c = torch.randn(30, 7, generator=gen(5))
    index, dist = nearest(x, c)
    for chunk in (1, 7, 333):
        i, d = nearest(x, c, chunk=chunk)
        assert torch.equal(i, index)  # the distances only up to the BLAS's rounding for another shape
        assert torch.allclose(d, dist, rtol=1e-6, atol=1e-6)
    brute = torch.cdist(x.double(), c.double()).square()
    assert torch.equal(index, brute.argmin(1))
    assert torch.allclose(dist.double(), brute.min(1).values, atol=1e-4)
    whole = kmeans(x, 30, iterations=5, restarts=2, generator=gen(6))
    chunked = kmeans(x, 30, iterations=5, restarts=2, generator=gen(6), chunk=64)
    assert torch.equal(whole.assignments, chunked.assignments)


def test_kmeans_refuses_too_few_points():
    with pytest.raises(ValueError, match="k=5"):
        kmeans(torch.randn(4, 2), 5, 10, 1, gen(0))


# --- StandardScaler + PCA ---------------------------------------------------------------------------------------


def correlated(n: int = 400, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 10)) @ rng.normal(0, 1, (10, 10)) + rng.normal(0, 3, 10)
    x[:, 3] = 2.5  # a constant dimension: std 0 counts as 1
    return x.astype(np.float32)


def test_scaler_matches_population_std():
    x = correlated()
    scaler = Scaler.fit(torch.from_numpy(x), chunk=64)
    std = x.astype(np.float64).std(0, ddof=0)
    assert np.allclose(scaler.mean.numpy(), x.astype(np.float64).mean(0), atol=1e-5)
    assert np.allclose(scaler.std.numpy(), np.where(std == 0, 1.0, std), rtol=1e-6)


@pytest.mark.parametrize("via", ["eigh", "svd"])
def test_scaler_and_pca_match_numpy_up_to_sign(via):
    x = correlated()
    out, summary = standardize_and_project(torch.from_numpy(x), 4, gen(0), chunk=100)
    x64 = x.astype(np.float64)
    std = x64.std(0)
    z = (x64 - x64.mean(0)) / np.where(std == 0, 1.0, std)
    centred = z - z.mean(0)
    if via == "eigh":
        _, vectors = np.linalg.eigh(centred.T @ centred / len(z))
        components = vectors[:, ::-1][:, :4]
    else:
        components = np.linalg.svd(centred, full_matrices=False)[2][:4].T
    want = centred @ components
    signs = np.sign((out.numpy() * want).sum(0))
    assert np.allclose(out.numpy() * signs, want, atol=1e-4)
    assert summary["pca_fit_points"] == len(x) and 0 < summary["pca_variance_kept"] <= 1


# --- scoring ----------------------------------------------------------------------------------------------------


def label_map(target: list[list[int]]) -> torch.Tensor:
    """A 4 x 4 target at 8 x 8: the even pixels carry it, the odd ones a decoy that nearest must drop."""
    small = torch.tensor(target)
    big = (small.repeat_interleave(2, 0).repeat_interleave(2, 1) + 1) % 3  # decoys
    big[::2, ::2] = small
    return big[None]  # [1, 8, 8]


def test_resizes_are_nearest_and_keep_void():
    clusters = torch.tensor([[[0, 1], [2, 3]]])
    assert torch.equal(resize_nearest(clusters, 4)[0], clusters[0].repeat_interleave(2, 0).repeat_interleave(2, 1))
    target = [[0, 0, 1, 1], [0, VOID, 1, 1], [2, 2, 1, 0], [2, 2, 0, 0]]
    assert resize_nearest(label_map(target), 4)[0].tolist() == target


def test_many_to_one_scores_a_hand_case():
    # quadrants of a 2 x 2 cluster map over the 4 x 4 target: cluster 0 = 3 px of class 0 (one void),
    # 1 = 4 px of class 1, 2 = 4 px of class 2, 3 = 3 px of class 0 and 1 of class 1 -> 0, 1, 2, 0
    target = label_map([[0, 0, 1, 1], [0, VOID, 1, 1], [2, 2, 1, 0], [2, 2, 0, 0]])
    counts = cluster_counts(torch.tensor([0, 1, 2, 3]), resize_nearest(target, 4), 2, 4, 3, batch=1)
    assert counts.counts.tolist() == [[3, 0, 0], [0, 4, 0], [0, 0, 4], [3, 1, 0]]
    assert int(counts.ignored) == 1
    iou, miou = score(counts, "precision")
    assert iou.tolist() == pytest.approx([6 / 7, 4 / 5, 1.0])
    assert miou == pytest.approx((6 / 7 + 4 / 5 + 1) / 3)


def test_k_equal_to_classes_is_hungarian_not_majority():
    # cluster 2 (the bottom half) is mostly class 0, but cluster 0 holds class 0 better: one-to-one sends 2 to
    # class 2 (IoU 3/8 + 2/8 beats 5/11 + 0), where a majority vote would send it to class 0
    target = label_map([[0, 0, 1, 1], [0, VOID, 1, 1], [0, 2, 1, 0], [0, 2, 0, 0]])
    counts = cluster_counts(torch.tensor([0, 1, 2, 2]), resize_nearest(target, 4), 2, 3, 3, batch=1)
    iou, miou = score(counts)
    assert iou.tolist() == pytest.approx([3 / 8, 4 / 5, 2 / 8])
    assert miou == pytest.approx((3 / 8 + 4 / 5 + 2 / 8) / 3)


def test_counts_do_not_depend_on_the_batch():
    targets = torch.randint(-1, 3, (5, 6, 6), generator=gen(8))
    assignments = torch.randint(0, 7, (5 * 3 * 3,), generator=gen(9))
    one = cluster_counts(assignments, targets, 3, 7, 3, batch=1).checked_counts()
    assert torch.equal(one, cluster_counts(assignments, targets, 3, 7, 3, batch=5).checked_counts())
    assert int(one.sum()) == int((targets != VOID).sum())


# --- end to end -------------------------------------------------------------------------------------------------


def test_cli_end_to_end_beats_scrambled_features(voc, tmp_path):
    from fastloc.probe.__main__ import main

    cache, out, results = tmp_path / "cache", tmp_path / "runs", tmp_path / "results"
    args = ["--backbone", "tiny", "--weights", "random", "--image-size", "64", "--clusters", "30", "21"]
    args += ["--seeds", "2", "--iterations", "10", "--restarts", "2", "--mask-size", "32", "--batch-size", "4"]
    args += ["--device", "cpu", "--loader", "cpu", "--workers", "0"]
    args += ["--cache-dir", str(cache), "--out", str(out), "--results", str(results)]
    assert main(["overcluster", str(voc), *args]) == 0

    (run,) = out.iterdir()
    result = json.loads((run / "result.json").read_text())
    knobs = result["protocol"]
    assert knobs["name"] == "overcluster" and knobs["clusters"] == [30, 21] and knobs["seeds"] == 2
    assert (knobs["iterations"], knobs["restarts"], knobs["mask_size"], knobs["pca_dim"]) == (10, 2, 32, 50)
    assert knobs["images"] == 8 and knobs["drop_last"] and knobs["many_to_one"] == "precision"
    assert set(result["selected"]) == {"miou_k30", "miou_k21"}
    assert all(0 <= v <= 1 for v in result["selected"].values())
    assert len(result["per_class_iou"]["miou_k30"]) == 21
    assert len(result["per_seed"]["miou_k21"]["miou"]) == 2
    rows = (results / "dense-overcluster-voc.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("overcluster, voc, tiny")

    # the same tokens with their rows shuffled: clusters that know nothing of the labels
    cfg = OverclusterConfig(
        data=voc, backbone="tiny", weights="random", image_size=64, clusters=(30,), seeds=2, iterations=10,
        restarts=2, mask_size=32, batch_size=4, device="cpu", loader="cpu", workers=0, cache_dir=cache,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)  # run()'s seeding: the same random weights, so the cache is reused
    data = open_dense_data(cfg)
    labels = LabelSpace.of(data, False)
    backbone = dense_backbone(cfg, torch.device("cpu"))
    split = eval_split(cfg, data.val, backbone, torch.device("cpu"))
    tokens, targets = gather(split, cfg, torch.device("cpu"), labels)
    assert tokens.shape == (8 * 8 * 8, 96) and targets.shape == (8, 32, 32)
    assert gather(split, replace(cfg, batch_size=3), torch.device("cpu"), labels)[1].shape[0] == 6  # drop_last
    features, _ = standardize_and_project(tokens, cfg.pca_dim, gen(cfg.seed))
    real = [cluster_and_score(features, targets, 8, 30, 21, cfg, s).miou for s in range(2)]
    assert np.mean(real) == pytest.approx(result["selected"]["miou_k30"], abs=1e-9)
    scrambled = features[torch.randperm(len(features), generator=gen(11))]
    chance = [cluster_and_score(scrambled, targets, 8, 30, 21, cfg, s).miou for s in range(2)]
    assert result["selected"]["miou_k30"] > np.mean(chance) + 0.2, (result["selected"], chance)
