"""Patch-Seg evaluators against hand-computed confusion matrices and a brute-force average precision."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fastloc.probe.metrics import Evaluator, bf16_keys, group_metrics, selected_epoch

CPU = torch.device("cpu")


def hand_union_batch():
    """One image, 4 patches, 3 classes. Class 0: TP FN FP TN; class 1: valid, never predicted; class 2: no positives."""
    targets = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.float32)[None]  # [1, 4, 3]
    logits = torch.tensor([[3, -1, 1], [-1, -3, -1], [2, -2, -2], [-2, -4, -3]], dtype=torch.bfloat16)[None]
    return logits, targets


def evaluate(reduction, batches, num_classes, **kwargs):
    evaluator = Evaluator(reduction, num_classes, CPU, **kwargs)
    for logits, targets, valid, loss_sum in batches:
        evaluator.update(logits, targets, valid, torch.tensor(loss_sum))
    return evaluator, evaluator.compute()


def reference_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """average_precision_score with ties: one threshold per distinct score, AP = sum (R_k - R_k-1) P_k."""
    positives = labels.sum()
    if positives == 0:
        return math.nan
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):  # -0.0 == 0.0: one threshold
        selected = scores >= threshold
        tp = labels[selected].sum()
        recall = tp / positives
        ap += (recall - previous_recall) * tp / selected.sum()
        previous_recall = recall
    return ap


def assert_same(a, b):
    """Equal nested metrics, NaN equal to NaN."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert a == b


def test_union_hand_case():
    logits, targets = hand_union_batch()
    evaluator, m = evaluate("union", [(logits, targets, None, 1.5)], 3)
    expected = [[[1, 1], [1, 1]], [[3, 0], [1, 0]], [[3, 1], [0, 0]]]  # [[TN, FP], [FN, TP]]
    assert evaluator.confusion.tolist() == expected
    pc = m["per_class"]
    assert pc["recall"][:2] == [0.5, 0.0] and math.isnan(pc["recall"][2])
    assert pc["precision"][0] == 0.5 and math.isnan(pc["precision"][1]) and pc["precision"][2] == 0.0
    assert pc["f1"][0] == pytest.approx(0.5 / (1 + 1e-6), abs=0) and all(math.isnan(f) for f in pc["f1"][1:])
    assert pc["accuracy"] == [0.5, 0.75, 0.75]
    assert pc["positives"] == [2, 1, 0] and pc["predicted"] == [2, 0, 1]
    # Class 0 scores 3 (+), 2 (-), -1 (+), -2 (-): AP = 0.5 * 1 + 0.5 * 2/3. Class 1's positive scores highest.
    assert pc["ap"][:2] == pytest.approx([5 / 6, 1.0]) and math.isnan(pc["ap"][2])
    assert m["loss"] == 1.5 and m["images"] == 1 and m["patches"] == 4 and m["valid_classes"] == 2
    assert m["accuracy"] == pytest.approx(8 / 12)  # micro, class 2 (invalid) included
    assert m["macro_accuracy"] == pytest.approx(0.625)  # (0.5 + 0.75) / 2: class 2 excluded
    assert m["macro_recall"] == pytest.approx(0.25)
    assert math.isnan(m["macro_precision"]) and math.isnan(m["macro_f1"])  # class 1 is never predicted
    assert m["macro_precision_nansafe"] == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert m["macro_f1_nansafe"] == pytest.approx(0.25 / (1 + 1e-6))
    assert m["macro_ap"] == pytest.approx(11 / 12)
    assert m["mean_prevalence"] == pytest.approx(0.375)  # (2/4 + 1/4) / 2


def test_size_buckets():
    logits, targets = hand_union_batch()
    evaluator, m = evaluate("union", [(logits, targets, None, 0.0)], 3)
    size = evaluator.size_confusion  # [C, 10, 2, 2]
    assert size[1, 2].tolist() == [[3, 0], [1, 0]]  # class 1 covers 1/4 of the image: bucket 2
    assert size[0, 5].tolist() == [[1, 1], [1, 1]]  # class 0 covers 2/4: bucket 5
    assert size[2, 0].tolist() == [[3, 1], [0, 0]]  # absent: bucket 0
    assert size.sum().item() == 12 and size.sum((2, 3)).count_nonzero().item() == 3
    by = m["by_size"]
    assert by["edges"] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert by["positives"] == [0, 0, 1, 0, 0, 2, 0, 0, 0, 0]
    assert by["micro_recall"][2] == 0.0 and by["micro_recall"][5] == 0.5 and math.isnan(by["micro_recall"][0])
    assert by["macro_recall"][5] == 0.5 and math.isnan(by["macro_recall"][9])


def test_size_bucket_edges_are_exact():
    # k of 10 patches is exactly k/10: bucket k (a bf16 mean would put 7/10 in bucket 6); 10 of 10 is bucket 9.
    targets = torch.zeros(1, 10, 3)
    targets[0, :3, 0] = 1
    targets[0, :7, 1] = 1
    targets[0, :, 2] = 1
    logits = torch.full((1, 10, 3), 5.0).to(torch.bfloat16)
    evaluator, m = evaluate("union", [(logits, targets, None, 0.0)], 3)
    tp = evaluator.size_confusion[:, :, 1, 1]  # [C, 10]
    assert tp[0, 3].item() == 3 and tp[1, 7].item() == 7 and tp[2, 9].item() == 10 and tp.sum().item() == 20
    assert m["by_size"]["positives"] == [0, 0, 0, 3, 0, 0, 0, 7, 0, 10]


def test_valid_masks_images():
    logits, targets = hand_union_batch()
    _, alone = evaluate("union", [(logits, targets, None, 1.5)], 3)
    junk_logits = torch.randn(2, 4, 3).to(torch.bfloat16)
    junk_targets = torch.ones(2, 4, 3)
    both_logits, both_targets = (
        torch.cat([junk_logits[:1], logits, junk_logits[1:]]),
        torch.cat([junk_targets[:1], targets, junk_targets[1:]]),
    )
    _, masked = evaluate("union", [(both_logits, both_targets, torch.tensor([False, True, False]), 1.5)], 3)
    assert_same(masked, alone)
    _, unmasked = evaluate("union", [(both_logits, both_targets, torch.tensor([True, True, True]), 1.5)], 3)
    assert unmasked["images"] == 3 and unmasked["patches"] == 12
    _, no_mask = evaluate("union", [(both_logits, both_targets, None, 1.5)], 3)
    assert_same(no_mask, unmasked)


def test_uint8_targets_match_float():
    logits, targets = hand_union_batch()
    _, as_float = evaluate("union", [(logits, targets, None, 0.0)], 3)
    _, as_uint8 = evaluate("union", [(logits, targets.to(torch.uint8), None, 0.0)], 3)
    assert_same(as_uint8, as_float)


def test_bf16_sigmoid_rule():
    # bf16 has 8 significant bits: sigmoid(0.001) = 0.50025 rounds to exactly 0.5, sigmoid(0.01) to 0.50390625.
    assert torch.sigmoid(torch.tensor(0.001, dtype=torch.bfloat16)).item() == 0.5
    assert torch.sigmoid(torch.tensor(0.01, dtype=torch.bfloat16)).item() == 0.50390625
    logits = torch.tensor([0.001, 0.01, 0.0, -0.01])[None, :, None]  # [1, 4, 1]
    targets = torch.ones(1, 4, 1)
    evaluator, _ = evaluate("union", [(logits.to(torch.bfloat16), targets, None, 0.0)], 1)
    assert evaluator.confusion[0].tolist() == [[0, 0], [3, 1]]  # only 0.01 is positive
    evaluator, _ = evaluate("union", [(logits, targets, None, 0.0)], 1)  # float32 in, rounded to bf16 by default
    assert evaluator.confusion[0].tolist() == [[0, 0], [3, 1]]
    evaluator, _ = evaluate("union", [(logits, targets, None, 0.0)], 1, float_logits=True)
    assert evaluator.confusion[0].tolist() == [[0, 0], [2, 2]]  # float32 sigmoid(0.001) > 0.5


def test_majority_hand_case():
    targets = torch.tensor([[0, 0, 1, 2, 2]])  # [1, 5]; class 3 never a target
    logits = torch.tensor(
        [[2, 2, 0, -1], [0, 1, 0, -1], [0, 1, 0, -1], [0, 1, 0, -1], [0, 0, 1, -1]], dtype=torch.bfloat16
    )[None]  # the first patch ties classes 0 and 1: argmax takes 0
    evaluator, m = evaluate("majority", [(logits, targets, None, 2.0)], 4)
    assert evaluator.confusion.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    pc = m["per_class"]
    assert pc["recall"][:3] == [0.5, 1.0, 0.5] and math.isnan(pc["recall"][3])
    assert pc["precision"][:3] == pytest.approx([1, 1 / 3, 1]) and math.isnan(pc["precision"][3])
    assert pc["accuracy"] == pytest.approx([0.8, 0.6, 0.8, 1.0])  # TN = total - row - column + TP
    assert pc["f1"][:3] == pytest.approx([1 / 1.5, (2 / 3) / (4 / 3), 1 / 1.5])
    assert pc["positives"] == [2, 1, 2, 0] and pc["predicted"] == [1, 3, 1, 0]
    assert m["accuracy"] == pytest.approx(3 / 5)  # trace / total
    assert m["valid_classes"] == 3 and m["patches"] == 5 and m["images"] == 1 and m["loss"] == 2.0
    assert m["macro_recall"] == pytest.approx(2 / 3)
    assert m["macro_precision"] == pytest.approx(7 / 9) == m["macro_precision_nansafe"]
    assert m["macro_accuracy"] == pytest.approx(2.2 / 3)
    assert m["mean_prevalence"] == pytest.approx(1 / 3)
    assert m["by_size"] is None
    # AP over the softmax probabilities rounded to bf16.
    scores = torch.softmax(logits.float(), -1).to(torch.bfloat16).float()[0].numpy()  # [5, 4]
    labels = np.eye(4, dtype=bool)[targets[0].numpy()]  # [5, 4]
    reference = [reference_ap(scores[:, c], labels[:, c]) for c in range(4)]
    assert pc["ap"][:3] == pytest.approx(reference[:3]) and math.isnan(pc["ap"][3])


def test_majority_valid_mask_ignores_out_of_range_junk():
    targets = torch.tensor([[0, 1], [99, -5]])  # the second image is padding with junk labels
    logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]]).to(torch.bfloat16)
    evaluator, m = evaluate("majority", [(logits, targets, torch.tensor([True, False]), 0.0)], 2)
    assert evaluator.confusion.tolist() == [[1, 0], [0, 1]] and m["images"] == 1 and m["macro_ap"] == 1.0


def test_global_union():
    targets = torch.tensor([[1, 0], [1, 1], [0, 0]], dtype=torch.float32)[:, None]  # [3, 1, 2]
    logits = torch.tensor([[2, -2], [-1, 3], [1, -1]], dtype=torch.bfloat16)[:, None]
    evaluator, m = evaluate("global-union", [(logits, targets, None, 0.3)], 2)
    assert evaluator.confusion.tolist() == [[[0, 1], [1, 1]], [[2, 0], [0, 1]]]
    assert m["patches"] == 3 and m["images"] == 3 and m["by_size"] is None
    assert m["macro_recall"] == pytest.approx(0.75) and m["macro_precision"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["loss"] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        Evaluator("global-union", 2, CPU).update(torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), None, torch.tensor(0.0))


def test_bf16_keys_are_monotone():
    values = torch.tensor([-math.inf, -3e38, -2.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 2.0, 3e38, math.inf])
    keys = bf16_keys(values.to(torch.bfloat16))
    assert (keys[1:] >= keys[:-1]).all() and keys[4] == keys[5]
    assert keys.unique().numel() == len(values) - 1 and keys.min() >= 0 and keys.max() < 1 << 16


@pytest.mark.parametrize("float_logits", [False, True])
def test_average_precision_matches_brute_force(float_logits):
    rng = np.random.default_rng(0)
    B, N, C = 4, 30, 5
    raw = torch.tensor(rng.normal(size=(B, N, C)) * 2, dtype=torch.float32)
    if not float_logits:
        raw = raw.round(decimals=1)  # many ties
        raw[0, :5] = -0.0  # -0 and +0 tie
        raw[1, :5] = 0.0
    logits = raw if float_logits else raw.to(torch.bfloat16)
    targets = torch.tensor(rng.random((B, N, C)) < 0.3, dtype=torch.float32)
    targets[..., 4] = 0  # a class without positives
    targets[0, :5, :4], targets[1, :5, :4] = 1, 0  # -0 positive, +0 negative: split ties would change AP
    batches = [(logits[:3], targets[:3], None, 0.0), (logits[3:], targets[3:], None, 0.0)]
    _, m = evaluate("union", batches, C, float_logits=float_logits)
    scores = logits.to(torch.bfloat16).float().reshape(-1, C).numpy()  # AP is over bf16-rounded scores
    labels = targets.reshape(-1, C).numpy().astype(bool)
    reference = [reference_ap(scores[:, c], labels[:, c]) for c in range(C)]
    assert m["per_class"]["ap"][:4] == pytest.approx(reference[:4], abs=1e-12)
    assert math.isnan(m["per_class"]["ap"][4]) and math.isnan(reference[4])
    assert m["macro_ap"] == pytest.approx(np.mean(reference[:4]), abs=1e-12)
    assert float_logits or len(set(scores[:, 0].tolist())) < len(scores) // 2  # the bf16 case has many ties


def test_all_reduce_without_process_group_is_a_no_op():
    assert not dist.is_initialized()
    logits, targets = hand_union_batch()
    evaluator, before = evaluate("union", [(logits, targets, None, 1.5)], 3)
    state = {k: v.clone() for k, v in evaluator.state_tensors().items()}
    evaluator.all_reduce()
    assert all(torch.equal(state[k], v) for k, v in evaluator.state_tensors().items())
    assert_same(evaluator.compute(), before)


def test_group_metrics():
    logits, targets = hand_union_batch()
    _, m = evaluate("union", [(logits, targets, None, 0.0)], 3)
    groups = group_metrics(m, {"things": [0, 2], "stuff": [1], "empty": [2]})
    assert groups["things"] == pytest.approx(
        {"macro_recall": 0.5, "macro_precision_nansafe": 0.5, "macro_ap": 5 / 6, "valid_classes": 1}
    )
    assert groups["stuff"] == {"macro_recall": 0.0, "macro_precision_nansafe": 0.0, "macro_ap": 1.0, "valid_classes": 1}
    assert groups["empty"]["valid_classes"] == 0 and math.isnan(groups["empty"]["macro_recall"])


def test_selected_epoch_keeps_the_earlier_tie():
    history = [{"macro_recall": r} for r in (0.1, 0.3, 0.3, 0.2)]
    assert selected_epoch(history) == 1
    assert selected_epoch([{"macro_recall": 0.2}, {"macro_recall": 0.25}]) == 1
    assert selected_epoch([{"macro_recall": 0.5}]) == 0
    with pytest.raises(ValueError):
        selected_epoch([])


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["union", "majority", "global-union"])
def test_update_does_not_sync_on_cuda(reduction):
    device = torch.device("cuda")
    B, N, C = 4, 1 if reduction == "global-union" else 16, 7
    logits = torch.randn(B, N, C, device=device).to(torch.bfloat16)
    if reduction == "majority":
        targets = torch.randint(0, C, (B, N), device=device)
    else:
        targets = (torch.rand(B, N, C, device=device) < 0.3).to(torch.uint8)
    valid = torch.tensor([True, True, False, True], device=device)
    loss_sum = torch.tensor(1.0, device=device)
    evaluator = Evaluator(reduction, C, device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        evaluator.update(logits, targets, valid, loss_sum)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert evaluator.compute()["images"] == 3
