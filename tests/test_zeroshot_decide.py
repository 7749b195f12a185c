"""The zero-shot harness's decision rule and PAMR (fastloc/probe/zeroshot/decide.py, pamr.py) against the
reference's own lines, transcribed below, on identical random inputs; the knob table against ZEROSHOT-SEG.md
sections 1-2. CPU, float32.

References: sinahmr/NACLIP @ 0cac3a651f753b11315ea799cfbfabf79da1bd76 (naclip.py, pamr.py) and
wangf3014/SCLIP @ b56bd3014b9e8a3ee3450bcfc53700a67d627b7a (clip_segmentor.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastloc.probe.zeroshot.decide import BENCHMARKS, METHODS, class_probs, decide
from fastloc.probe.zeroshot.pamr import DILATIONS, ITERATIONS, pamr

# class 0 with four synonyms (as the stuff words), class 2 with three, the others one: 10 queries, 5 classes
QUERY_CLASS = [0, 0, 0, 0, 1, 2, 2, 2, 3, 4]


# --- The reference's lines ------------------------------------------------------------------------------------


def naclip_postprocess(seg_logits, query_idx, logit_scale, prob_thd):
    """NACLIP naclip.py:139-153 (postprocess_result), the per-image loop, returning the maps and the class
    probabilities before line 153's renormalisation instead of setting them on data_samples."""
    self_query_idx = torch.tensor(query_idx)
    preds, probs = [], []
    batch_size = seg_logits.shape[0]
    for i in range(batch_size):
        seg_probs = torch.softmax(seg_logits[i] * logit_scale, dim=0)  # n_queries * w * h

        num_cls, num_queries = max(self_query_idx) + 1, len(self_query_idx)
        if num_cls != num_queries:
            seg_probs = seg_probs.unsqueeze(0)
            cls_index = nn.functional.one_hot(self_query_idx)
            cls_index = cls_index.T.view(num_cls, num_queries, 1, 1)
            seg_probs = (seg_probs * cls_index).max(1)[0]

        seg_pred = seg_probs.argmax(0, keepdim=True)
        seg_pred[seg_probs.max(0, keepdim=True)[0] < prob_thd] = 0
        preds.append(seg_pred[0])
        probs.append(seg_probs)
    return torch.stack(preds), torch.stack(probs)


def sclip_postprocess(seg_logits_in, query_idx, logit_scale, prob_thd, area_thd):
    """SCLIP clip_segmentor.py:148-170 (postprocess_result), one image at a time (its loop overwrites
    seg_logits, so it is right only at batch size 1: ZEROSHOT-SEG.md section 9)."""
    self_query_idx = torch.tensor(query_idx)
    preds = []
    for img in seg_logits_in:
        seg_logits = img[None]
        i = 0
        seg_logits = seg_logits[i] * logit_scale
        seg_logits = seg_logits.softmax(0)  # n_queries * w * h

        num_cls, num_queries = max(self_query_idx) + 1, len(self_query_idx)
        if num_cls != num_queries:
            seg_logits = seg_logits.unsqueeze(0)
            cls_index = nn.functional.one_hot(self_query_idx)
            cls_index = cls_index.T.view(num_cls, num_queries, 1, 1)
            seg_logits = (seg_logits * cls_index).max(1)[0]
            seg_pred = seg_logits.argmax(0, keepdim=True)

        if area_thd is not None:
            # Force segmentations with area < self.area_thd to 0 (background)
            predictions = nn.functional.one_hot(seg_logits.argmax(0), num_cls).to(seg_logits.dtype)
            area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)  # prone background
            area_pred = (area_pred > area_thd * area_pred.sum()).to(seg_logits.dtype)
            seg_logits[1:] *= area_pred.transpose(0, -1)

        seg_pred = seg_logits.argmax(0, keepdim=True)
        seg_pred[seg_logits.max(0, keepdim=True)[0] < prob_thd] = 0
        preds.append(seg_pred[0])
    return torch.stack(preds)


class LocalAffinity(nn.Module):
    """NACLIP pamr.py:10-50."""

    def __init__(self, dilations=(1,)):
        super().__init__()
        self.dilations = dilations
        weight = self._init_aff()
        self.register_buffer("kernel", weight)

    def _init_aff(self):
        # initialising the shift kernel
        weight = torch.zeros(8, 1, 3, 3)

        for i in range(weight.size(0)):
            weight[i, 0, 1, 1] = 1

        weight[0, 0, 0, 0] = -1
        weight[1, 0, 0, 1] = -1
        weight[2, 0, 0, 2] = -1

        weight[3, 0, 1, 0] = -1
        weight[4, 0, 1, 2] = -1

        weight[5, 0, 2, 0] = -1
        weight[6, 0, 2, 1] = -1
        weight[7, 0, 2, 2] = -1
        return weight

    def forward(self, x):
        B, K, H, W = x.size()
        x = x.view(B * K, 1, H, W)

        x_aff = torch.empty((K * B, len(self.dilations) * self.kernel.size(0), H, W), device=x.device)
        for i, d in enumerate(self.dilations):
            x_pad = F.pad(x, [d] * 4, mode="replicate")
            x_aff[:, self.kernel.size(0) * i : (i + 1) * self.kernel.size(0), :, :] = F.conv2d(
                x_pad, self.kernel, dilation=d
            )
        return x_aff.view(B, K, -1, H, W)


class LocalAffinityCopy(LocalAffinity):
    """NACLIP pamr.py:53-70."""

    def _init_aff(self):
        weight = torch.zeros(8, 1, 3, 3)

        weight[0, 0, 0, 0] = 1
        weight[1, 0, 0, 1] = 1
        weight[2, 0, 0, 2] = 1

        weight[3, 0, 1, 0] = 1
        weight[4, 0, 1, 2] = 1

        weight[5, 0, 2, 0] = 1
        weight[6, 0, 2, 1] = 1
        weight[7, 0, 2, 2] = 1
        return weight


class LocalStDev(LocalAffinity):
    """NACLIP pamr.py:73-97."""

    def _init_aff(self):
        weight = torch.zeros(9, 1, 3, 3)
        weight.zero_()

        weight[0, 0, 0, 0] = 1
        weight[1, 0, 0, 1] = 1
        weight[2, 0, 0, 2] = 1

        weight[3, 0, 1, 0] = 1
        weight[4, 0, 1, 1] = 1
        weight[5, 0, 1, 2] = 1

        weight[6, 0, 2, 0] = 1
        weight[7, 0, 2, 1] = 1
        weight[8, 0, 2, 2] = 1
        return weight

    def forward(self, x):
        # returns (B,K,P,H,W), where P is the number of locations
        x = super().forward(x)
        return x.std(2, keepdim=True)


class LocalAffinityAbs(LocalAffinity):
    """NACLIP pamr.py:100-103."""

    def forward(self, x):
        x = super().forward(x)
        return torch.abs(x)


class PAMR(nn.Module):
    """NACLIP pamr.py:107-135."""

    def __init__(self, num_iter=1, dilations=(1,)):
        super().__init__()

        self.num_iter = num_iter
        self.aff_x = LocalAffinityAbs(dilations)
        self.aff_m = LocalAffinityCopy(dilations)
        self.aff_std = LocalStDev(dilations)

    def forward(self, x, mask):
        mask = F.interpolate(mask, size=x.size()[-2:], mode="bilinear", align_corners=True)

        x_std = self.aff_std(x)

        x = -self.aff_x(x) / (1e-8 + 0.1 * x_std)
        x = x.mean(1, keepdim=True)
        x = F.softmax(x, 2)

        for _ in range(self.num_iter):
            m = self.aff_m(mask)  # [BxCxPxHxW]
            mask = (m * x).sum(2)

        return mask


def naclip_pamr(inputs, seg_logits, num_iter=10, dilations=(8, 16)):
    """NACLIP naclip.py:50 (the module) and :129-132 (the call on the input image resized to the logits' size)."""
    img_size = seg_logits.shape[-2:]
    img = nn.functional.interpolate(inputs, size=img_size, mode="bilinear", align_corners=False)
    return PAMR(num_iter, dilations=dilations)(img, seg_logits.to(img.dtype))


# --- Inputs ---------------------------------------------------------------------------------------------------


def cosine_logits(batch, queries, h, w, seed=0):
    """Cosine-like logits, smooth enough for PAMR to matter and spread enough for the threshold to bite."""
    g = torch.Generator().manual_seed(seed)
    coarse = 0.2 + 0.06 * torch.randn(batch, queries, max(h // 4, 1), max(w // 4, 1), generator=g)
    fine = 0.01 * torch.randn(batch, queries, h, w, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) + fine


def normalised_image(batch, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=g)


# --- decide ---------------------------------------------------------------------------------------------------


def test_decide_equals_naclip_postprocess_with_synonyms_and_a_biting_threshold():
    logits = cosine_logits(3, len(QUERY_CLASS), 23, 31)
    ref_pred0, ref_probs = naclip_postprocess(logits, QUERY_CLASS, 40, 0.0)
    top = ref_probs.max(1)[0]
    prob_thd = float(top.median())  # half the pixels fall below it
    ref_pred, _ = naclip_postprocess(logits, QUERY_CLASS, 40, prob_thd)
    assert ((ref_pred == 0) & (ref_pred0 != 0)).any() and (ref_pred != 0).any()  # the threshold bites, not all
    assert len(set(ref_pred0.unique().tolist())) >= 4  # several classes predicted

    probs = class_probs(logits, torch.tensor(QUERY_CLASS), 40)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-7)
    assert torch.equal(decide(logits, torch.tensor(QUERY_CLASS), 40, prob_thd), ref_pred)
    assert torch.equal(decide(logits, QUERY_CLASS, 40), ref_pred0)
    # one image [Q, H, W] -> [H, W]
    assert torch.equal(decide(logits[1], QUERY_CLASS, 40, prob_thd), ref_pred[1])


def test_decide_without_synonyms_equals_naclip_which_skips_the_class_max():
    logits = cosine_logits(2, 6, 17, 19, seed=3)
    ref, _ = naclip_postprocess(logits, list(range(6)), 40, 0.3)
    assert torch.equal(decide(logits, torch.arange(6), 40, 0.3), ref)


@pytest.mark.parametrize("area_thd", [None, 0.2])
def test_decide_equals_sclip_postprocess_with_its_area_rule(area_thd):
    logits = cosine_logits(3, len(QUERY_CLASS), 21, 26, seed=5)
    logits[:, 8] -= 0.05  # class 3 rarely wins: its area falls under the rule
    ref = sclip_postprocess(logits, QUERY_CLASS, 65, 0.1, area_thd)
    assert torch.equal(decide(logits, QUERY_CLASS, 65, 0.1, area_thd=area_thd), ref)
    if area_thd is not None:  # the rule bites: it changes the map
        assert not torch.equal(ref, sclip_postprocess(logits, QUERY_CLASS, 65, 0.1, None))


def test_decide_counts_classes_from_num_classes_when_given():
    logits = cosine_logits(1, 3, 8, 8)
    probs = class_probs(logits, [0, 2, 2], 40, num_classes=4)
    assert probs.shape == (1, 4, 8, 8) and probs[:, [1, 3]].eq(0).all()


@pytest.mark.parametrize(
    ("logits_shape", "query_class", "num_classes", "match"),
    [
        ((4, 5, 5), [0, 1, -1, 2], None, r"query classes must lie in \[0, 3\), got -1\.\.2"),
        ((4, 5, 5), [0, 1, 2, 3], 3, r"query classes must lie in \[0, 3\), got 0\.\.3"),
        ((4, 5, 5), [0, 1, 2], None, r"query_class must be 4 integer class indices"),
        ((2, 4, 5, 5), [0.0, 1.0, 1.0, 2.0], None, r"query_class must be 4 integer class indices"),
        ((4, 5), [0, 1, 2, 3], None, r"logits must be float \[Q, H, W\] or \[B, Q, H, W\]"),
    ],
)
def test_decide_refuses_bad_input_in_one_line(logits_shape, query_class, num_classes, match):
    with pytest.raises(ValueError, match=match) as info:
        decide(torch.zeros(logits_shape), query_class, 40, 0.1, num_classes=num_classes)
    assert "\n" not in str(info.value)


# --- PAMR -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_size", "logits_size"), [((24, 30), (24, 30)), ((20, 28), (37, 45))], ids=["same-size", "resized"]
)
def test_pamr_equals_naclip_module(image_size, logits_size):
    assert (ITERATIONS, DILATIONS) == (10, (8, 16))  # NACLIP's pamr_steps, pamr_stride (naclip.py:21)
    image = normalised_image(2, *image_size)
    logits = cosine_logits(2, len(QUERY_CLASS), *logits_size, seed=7)
    ref = naclip_pamr(image, logits)
    out = pamr(image, logits)
    assert out.shape == logits.shape and out.dtype == logits.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert (out - logits).abs().max() > 1e-3  # it refines
    torch.testing.assert_close(pamr(image[1], logits[1]), ref[1], rtol=1e-5, atol=1e-6)  # one image
    small = naclip_pamr(image, logits, num_iter=2, dilations=(1, 3))
    torch.testing.assert_close(pamr(image, logits, 2, (1, 3)), small, rtol=1e-5, atol=1e-6)


def test_pamr_then_decide_equals_naclip_predict_tail():
    """naclip.py:127-153 from the logits at the input size: resize to the original size, PAMR, decide."""
    image = normalised_image(1, 18, 26, seed=11)
    logits = cosine_logits(1, len(QUERY_CLASS), 18, 26, seed=12)
    seg_logits = F.interpolate(logits, size=(29, 41), mode="bilinear", align_corners=False)
    ref, _ = naclip_postprocess(naclip_pamr(image, seg_logits), QUERY_CLASS, 40, 0.1)
    assert torch.equal(decide(pamr(image, seg_logits), QUERY_CLASS, 40, 0.1), ref)


def test_pamr_refuses_bad_input_in_one_line():
    for image, logits in [
        (torch.zeros(2, 3, 8, 8), torch.zeros(1, 4, 8, 8)),
        (torch.zeros(3, 8, 8), torch.zeros(1, 4, 8, 8)),
    ]:
        with pytest.raises(ValueError, match="must be") as info:
            pamr(image, logits)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="dilations"):
        pamr(torch.zeros(3, 8, 8), torch.zeros(4, 8, 8), dilations=(0,))


# --- The knob table -------------------------------------------------------------------------------------------


def test_knob_table_spot_checks_against_zeroshot_seg_sections_1_2():
    assert list(BENCHMARKS) == [
        "voc21", "context60", "coco_object", "voc20", "city_scapes", "context59", "ade20k", "coco_stuff164k"
    ]  # fmt: skip
    voc21 = BENCHMARKS["voc21"]
    assert voc21.background == "threshold" and not voc21.reduce_zero_label
    assert (voc21.naclip.prob_thd, voc21.sclip.prob_thd, voc21.clearclip.prob_thd) == (0.1, 0.1, 0.5)
    assert (voc21.naclip.logit_scale, voc21.sclip.logit_scale, voc21.clearclip.logit_scale) == (40, 65, 50)
    assert voc21.naclip.window is None and voc21.sclip.window == (224, 112) and voc21.clearclip.window == (448, 224)
    assert voc21.sclip.area_thd == 0.1 and voc21.naclip.area_thd is None
    assert voc21.clearclip.class_names == "ClearCLIP configs/cls_voc21.txt"
    assert BENCHMARKS["voc20"].naclip.window is None and BENCHMARKS["voc20"].reduce_zero_label
    assert (BENCHMARKS["context60"].clearclip.prob_thd, BENCHMARKS["coco_object"].clearclip.prob_thd) == (0.15, 0.4)
    city = BENCHMARKS["city_scapes"]
    assert (city.naclip.short_side, city.sclip.short_side, city.clearclip.short_side) == (560, 560, 448)
    assert city.clearclip.window == (224, 224)
    assert (
        BENCHMARKS["coco_stuff164k"].sclip.short_side == 448 and BENCHMARKS["coco_stuff164k"].naclip.short_side == 336
    )
    assert BENCHMARKS["ade20k"].reduce_zero_label and BENCHMARKS["context59"].reduce_zero_label
    for bench in BENCHMARKS.values():
        assert bench.naclip.pamr and not bench.sclip.pamr and not bench.clearclip.pamr
        assert bench.naclip.logit_scale == 40  # NACLIP's default, never overridden
        assert (bench.background == "threshold") == (bench.naclip.prob_thd > 0)
        assert all(bench.settings(m).class_names.endswith(bench.classes) for m in METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        voc21.settings("maskclip")
