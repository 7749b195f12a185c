"""Dense-feature metrics (fastloc.probe.dense.metrics) against hand-computed answers."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastloc.probe.dense.metrics import (
    IGNORE_INDEX,
    KNN_K,
    KNN_TEMPERATURE,
    SegCounts,
    apply_mapping,
    class_iou,
    cluster_class_iou,
    contingency,
    cosine_topk,
    fold_clusters,
    hungarian,
    knn_transfer,
    many_to_one,
    mean_iou,
    pixel_accuracy,
)

X = IGNORE_INDEX


# --- Segmentation counts ----------------------------------------------------------------------------------------


def hand_maps():
    """3 classes, 8 pixels, 2 ignored (whose predictions, 2 and 1, must count nowhere)."""
    target = torch.tensor([[0, 0, 1, 1], [2, 2, X, X]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    return pred, target


def test_iou_with_ignore_pixels_hand_case():
    pred, target = hand_maps()
    counts = SegCounts(3)
    counts.update(pred, target)
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 (a 0 predicted 1)          -> 1/3
    # class 1: TP 2, FP 1 (the 0 predicted 1; the ignored 1 is not an FP)    -> 2/3
    # class 2: TP 1, FP 0 (the ignored 2 is not an FP), FN 1                 -> 1/2
    assert counts.iou().tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert counts.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert counts.miou(include_background=False) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert counts.pixel_accuracy() == pytest.approx(4 / 6)
    assert int(counts.ignored) == 2 and int(counts.invalid) == 0
    want = torch.tensor([[1, 0, 1], [1, 2, 0], [0, 0, 1]])  # counts[pred, target]
    assert torch.equal(counts.counts, want)
    assert torch.equal(contingency(pred, target, 3, 3), want)


def test_a_class_absent_everywhere_is_left_out_of_the_mean():
    pred, target = hand_maps()
    counts = SegCounts(5)  # classes 3 and 4: never present, never predicted
    counts.update(pred, target)
    iou = counts.iou()
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(iou[3]) and math.isnan(iou[4])
    assert counts.miou() == pytest.approx(0.5)
    assert counts.miou(include_background=False) == pytest.approx(7 / 12)
    # Predicted but never present is an IoU of 0, and it counts: one 0 predicted as 3.
    counts.update(torch.tensor([3]), torch.tensor([0]))  # class 0 now: TP 1, FP 1, FN 2 -> 1/4
    assert counts.iou()[3] == 0 and math.isnan(counts.iou()[4])
    assert counts.miou() == pytest.approx((1 / 4 + 2 / 3 + 1 / 2 + 0) / 4)
    assert counts.miou(include_background=False) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_background_alone_and_empty_counts():
    counts = SegCounts(2)
    counts.update(torch.zeros(3, 3, dtype=torch.uint8), torch.zeros(3, 3, dtype=torch.uint8))
    assert counts.miou() == 1.0
    assert math.isnan(counts.miou(include_background=False))  # no foreground class anywhere
    empty = SegCounts(2)
    empty.update(torch.zeros(4, dtype=torch.long), torch.full((4,), X))
    assert math.isnan(empty.miou()) and math.isnan(empty.pixel_accuracy()) and int(empty.ignored) == 4
    assert math.isnan(mean_iou(torch.zeros(1, 1, dtype=torch.long), include_background=False))


def test_batches_accumulate_like_one_batch():
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, 5, 7), (3, 11), (4, 2, 3, 3)]  # any shapes, all different
    C = 4
    batches = []
    for shape in shapes:
        target = torch.randint(0, C, shape, generator=generator)
        target[torch.rand(shape, generator=generator) < 0.2] = X
        batches.append((torch.randint(0, C, shape, generator=generator), target))
    several = SegCounts(C)
    for pred, target in batches:
        several.update(pred, target)
    one = SegCounts(C)
    one.update(torch.cat([p.flatten() for p, _ in batches]), torch.cat([t.flatten() for _, t in batches]))
    assert torch.equal(several.counts, one.counts) and int(several.ignored) == int(one.ignored)
    brute = torch.zeros(C, C, dtype=torch.long)  # a loop over pixels
    for pred, target in batches:
        for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
            if t != X:
                brute[p, t] += 1
    assert torch.equal(several.counts, brute)
    assert several.miou() == one.miou() == mean_iou(brute)
    assert several.pixel_accuracy() == pixel_accuracy(brute)


def test_out_of_range_labels_are_counted_and_refused():
    counts = SegCounts(3)
    counts.update(torch.tensor([0, 3, 1, -1, 9]), torch.tensor([5, 0, 1, 1, X]))  # 3 bad pixels, 1 ignored
    assert int(counts.invalid) == 3 and int(counts.ignored) == 1 and int(counts.counts.sum()) == 1
    with pytest.raises(ValueError, match="3 pixels"):
        counts.miou()
    with pytest.raises(ValueError, match="shape"):
        counts.update(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="C x C"):
        class_iou(torch.zeros(4, 3))


def test_reduce_without_process_group_is_a_no_op():
    assert not dist.is_initialized()
    pred, target = hand_maps()
    counts = SegCounts(3)
    counts.update(pred, target)
    before = counts.counts.clone()
    counts.reduce()
    assert torch.equal(counts.counts, before)


def rank_maps(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    target = torch.randint(0, 5, (3, 6, 6), generator=generator)
    target[:, 0] = X
    return torch.randint(0, 5, (3, 6, 6), generator=generator), target


def reduce_worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        counts = SegCounts(5)
        counts.update(*rank_maps(rank))
        counts.reduce()
        want = SegCounts(5)
        for r in range(world):
            want.update(*rank_maps(r))
        assert torch.equal(counts._flat, want._flat)
    finally:
        dist.destroy_process_group()


def test_reduce_sums_over_ranks(tmp_path):
    # fork, not spawn: the children need not import torch again (seconds); they run only tiny single-thread ops.
    mp.start_processes(reduce_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True, start_method="fork")


# --- Overclustering: matching -----------------------------------------------------------------------------------


def test_many_to_one_hand_case():
    n = torch.tensor(
        [
            [5, 1, 0],  # majority 0
            [2, 0, 7],  # majority 2
            [0, 3, 3],  # a tie: the lower class
            [0, 0, 0],  # empty: class 0
            [3, 2, 0],  # majority 0 (precision 3/5), but IoU prefers the small class 1 (see below)
        ]
    )
    assert many_to_one(n).tolist() == [0, 2, 1, 0, 0]
    # class sizes 10, 6, 10; cluster 4 (size 5): IoU with 0 = 3 / (5 + 10 - 3) = 1/4, with 1 = 2 / (5 + 6 - 2) = 2/9
    assert cluster_class_iou(n)[4].tolist() == pytest.approx([1 / 4, 2 / 9, 0])
    n[4] = torch.tensor([2, 2, 0])  # precision tie -> 0; IoU: 2 / 11 against 2 / 8 -> 1
    assert many_to_one(n)[4] == 0 and many_to_one(n, score="iou")[4] == 1
    with pytest.raises(ValueError, match="score"):
        many_to_one(n, score="recall")


def test_hungarian_where_greedy_is_wrong():
    n = torch.tensor([[3, 2, 0], [2, 0, 0], [0, 0, 5]])  # clusters (rows) x classes
    # cluster sizes 5, 2, 5; class sizes 5, 2, 5
    iou = cluster_class_iou(n)
    assert iou.flatten().tolist() == pytest.approx([3 / 7, 2 / 5, 0, 2 / 5, 0, 0, 0, 0, 1])
    # Greedy takes the largest IoU first, (0, 0) = 3/7, which leaves cluster 1 only class 1 (IoU 0): 3/7 + 0 + 1.
    # The best one-to-one assignment swaps them: 2/5 + 2/5 + 1 = 1.8 > 10/7.
    mapping = hungarian(n)
    assert mapping.tolist() == [1, 0, 2]
    assert sum(iou[k, c] for k, c in enumerate(mapping.tolist())) == pytest.approx(1.8)
    folded = fold_clusters(n, mapping, 3)
    assert torch.equal(folded, torch.tensor([[2, 0, 0], [3, 2, 0], [0, 0, 5]]))
    assert mean_iou(folded) == pytest.approx(1.8 / 3)  # per class: 2/5, 2/5, 1
    assert hungarian(n[:2]).tolist() == [1, 0]  # K < C: every cluster gets its own class
    with pytest.raises(ValueError, match="K <= C"):
        hungarian(torch.ones(4, 3, dtype=torch.long))


def test_fold_equals_counting_the_mapped_maps():
    generator = torch.Generator().manual_seed(1)
    K, C = 9, 4
    clusters = torch.randint(0, K, (6, 10, 10), generator=generator)
    target = (clusters * 7 + torch.randint(0, 2, clusters.shape, generator=generator)) % C  # correlated
    target[torch.rand(clusters.shape, generator=generator) < 0.1] = X
    n = contingency(clusters, target, K, C)
    assert n.shape == (K, C) and int(n.sum()) == int((target != X).sum())
    for mapping in (many_to_one(n), many_to_one(n, score="iou"), hungarian(n[:C])):
        mapped = SegCounts(C)
        keep = clusters < mapping.numel()  # hungarian(n[:C]) maps the first C clusters only
        mapped.update(apply_mapping(clusters[keep], mapping), target[keep])
        assert torch.equal(fold_clusters(n[: mapping.numel()], mapping, C), mapped.counts)
    assert apply_mapping(torch.tensor([[2, 0], [1, 1]]), torch.tensor([5, 6, 7])).tolist() == [[7, 5], [6, 6]]


# --- Hummingbird: k-NN label transfer ---------------------------------------------------------------------------


def test_defaults_are_open_hummingbird_evals():
    assert (KNN_K, KNN_TEMPERATURE) == (30, 0.02)


def test_knn_on_two_obvious_clusters():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 0.05], [0.05, 1.0], [10.0, 0.5], [0.2, 3.0]])  # cosine: the scale does not matter
    probs, pred = knn_transfer(query, bank, labels, k=2, num_classes=2)
    assert pred.tolist() == [0, 1, 0, 1]
    assert probs.flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])  # both neighbours agree
    soft = F.one_hot(labels, 2).float()
    assert torch.equal(knn_transfer(query, bank, soft, k=2)[0], probs)


def test_knn_soft_labels_hand_case():
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    query = torch.tensor([[2.0, 0.0]])  # cosines 1, 0.6, 0, -1: the two nearest are bank 0 and 1
    values, indices = cosine_topk(query, bank, 2)
    assert indices.tolist() == [[0, 1]] and values[0].tolist() == pytest.approx([1.0, 0.6])
    probs, pred = knn_transfer(query, bank, labels, k=2, temperature=0.5)
    w1 = math.exp(0.6 / 0.5) / (math.exp(1 / 0.5) + math.exp(0.6 / 0.5))  # softmax of cosine / temperature
    assert probs[0].tolist() == pytest.approx([1 - w1, w1 / 2, w1 / 2])
    assert pred.tolist() == [0]


def test_knn_temperature():
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # labels 0 and 1
    query = torch.tensor([[1.0, 0.0]])  # cosines 1 and 0.6
    share = []
    for temperature in (0.02, 0.1, 1.0, 100.0):
        probs, pred = knn_transfer(query, bank, torch.tensor([0, 1]), k=2, temperature=temperature, num_classes=2)
        assert probs[0, 1].item() == pytest.approx(1 / (1 + math.exp(0.4 / temperature)), rel=1e-5, abs=1e-12)
        assert probs.sum().item() == pytest.approx(1.0) and pred.item() == 0
        share.append(probs[0, 1].item())
    assert share == sorted(share) and share[0] < 1e-8 and share[-1] > 0.498  # sharp -> the nearest; flat -> uniform


def grid_features(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """Multiples of 1/256 in [-2, 2]: dot products and squared norms are exact in float32, in any summation order,
    so only the chunking could make two runs differ."""
    return torch.randint(-512, 513, (n, d), generator=generator).float() / 256


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_knn_chunked_equals_unchunked(hard):
    generator = torch.Generator().manual_seed(2)
    Q, M, D, C, k = 37, 120, 8, 5, 7
    query, bank = grid_features(Q, D, generator), grid_features(M, D, generator)
    if hard:
        labels = torch.randint(0, C, (M,), generator=generator)
    else:
        labels = torch.softmax(torch.randn(M, C, generator=generator), dim=1)
    sims = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T
    top = sims.topk(k + 1, dim=1).values
    assert (top[:, :-1] > top[:, 1:]).all(), "the test needs no ties among the k + 1 nearest"
    whole, whole_pred = knn_transfer(
        query, bank, labels, k=k, temperature=0.1, num_classes=C, query_chunk=Q, bank_chunk=M
    )
    for query_chunk, bank_chunk in [(1, 1), (7, 3), (13, 5), (Q, 6), (5, 64), (Q - 1, M - 1)]:  # several below k
        probs, pred = knn_transfer(
            query, bank, labels, k=k, temperature=0.1, num_classes=C, query_chunk=query_chunk, bank_chunk=bank_chunk
        )
        assert torch.equal(probs, whole) and torch.equal(pred, whole_pred), (query_chunk, bank_chunk)
    # ... and the whole computation is the plain formula: top-k cosines, softmax(cos / T), weighted label mean.
    values, indices = sims.topk(k, dim=1)
    onehot = F.one_hot(labels, C).float() if hard else labels
    want = (torch.softmax(values / 0.1, dim=1)[..., None] * onehot[indices]).sum(1)
    torch.testing.assert_close(whole, want)
    assert torch.equal(whole_pred, want.argmax(1))


def test_knn_random_features_match_the_plain_formula():
    generator = torch.Generator().manual_seed(3)
    query, bank = torch.randn(50, 16, generator=generator), torch.randn(300, 16, generator=generator) * 3
    labels = torch.randint(0, 4, (300,), generator=generator)
    probs, pred = knn_transfer(query, bank, labels, num_classes=4, query_chunk=8, bank_chunk=29)  # k 30 > chunk
    values, indices = (F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T).topk(KNN_K, dim=1)
    want = (torch.softmax(values / KNN_TEMPERATURE, dim=1)[..., None] * F.one_hot(labels, 4)[indices]).sum(1)
    torch.testing.assert_close(probs, want)
    assert torch.equal(pred, want.argmax(1))
    torch.testing.assert_close(probs.sum(1), torch.ones(50))


def test_knn_refuses_bad_arguments():
    bank, query = torch.randn(5, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="neighbours"):
        knn_transfer(query, bank, torch.zeros(5, dtype=torch.long), k=6, num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        knn_transfer(query, bank, torch.zeros(5, dtype=torch.long), k=2)
    with pytest.raises(ValueError, match="temperature"):
        knn_transfer(query, bank, torch.ones(5, 2), k=2, temperature=0)
    with pytest.raises(ValueError, match="labels for a bank"):
        knn_transfer(query, bank, torch.ones(4, 2), k=2)


@pytest.mark.gpu
def test_updates_and_transfer_do_not_sync_on_cuda():
    device = torch.device("cuda")
    pred = torch.randint(0, 21, (4, 100, 100), device=device)
    target = torch.randint(0, 22, (4, 100, 100), device=device)
    target[target == 21] = X
    query, bank = torch.randn(300, 64, device=device), torch.randn(1000, 64, device=device)
    hard, soft = torch.randint(0, 21, (1000,), device=device), torch.rand(1000, 21, device=device)
    counts = SegCounts(21, device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        counts.update(pred, target)
        probs, _ = knn_transfer(query, bank, hard, k=30, num_classes=21, query_chunk=128, bank_chunk=100)
        knn_transfer(query, bank, soft, k=30, query_chunk=128, bank_chunk=100)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = SegCounts(21)
    cpu.update(pred.cpu(), target.cpu())
    assert torch.equal(counts.counts.cpu(), cpu.counts)
    want, _ = knn_transfer(query.cpu(), bank.cpu(), hard.cpu(), k=30, num_classes=21)
    torch.testing.assert_close(probs.cpu(), want, rtol=1e-4, atol=1e-5)
