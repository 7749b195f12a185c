"""The harness's prediction for one image (fastloc/probe/zeroshot/segment.py) against NACLIP's own lines.

sinahmr/NACLIP @ 0cac3a651f753b11315ea799cfbfabf79da1bd76, naclip.py: ``forward_feature`` (:54-69),
``forward_slide`` (:71-108), ``predict`` (:110-137) and ``postprocess_result`` (:139-153), transcribed
below on the open_clip tower of tests/test_zeroshot_readout.py (a shrunk ViT-B-16-quickgelu, random
weights; the same weights in timm through timm's converter) with random query embeddings. The image
size rule is mmcv's ``rescale_size`` / ``_scale_size`` (open-mmlab/mmcv mmcv/image/geometric.py, the
rule mmseg 1.1.1's ``Resize(scale=(2048, s), keep_ratio=True)`` applies through ``imrescale``). CPU, float32.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from test_zeroshot_decide import PAMR, QUERY_CLASS, naclip_postprocess
from test_zeroshot_readout import EMBED, reference_tokens, small_towers
from torch import nn

import fastloc.probe.zeroshot.segment as segment_module
from fastloc.probe.zeroshot.decide import BENCHMARKS, Settings
from fastloc.probe.zeroshot.segment import resize, resized_size, segment, segment_logits

# --- The reference's lines ------------------------------------------------------------------------------------


def mmcv_rescale_size(old_size, scale):
    """mmcv mmcv/image/geometric.py rescale_size (tuple scale) and _scale_size; old_size and the result are (w, h)."""
    w, h = old_size
    max_long_edge = max(scale)
    max_short_edge = min(scale)
    scale_factor = min(max_long_edge / max(h, w), max_short_edge / min(h, w))
    return int(w * float(scale_factor) + 0.5), int(h * float(scale_factor) + 0.5)


class ReferenceNACLIP:
    """NACLIP naclip.py @ 0cac3a6: the segmentor's inference path, its CLIP replaced by the open_clip tower run
    through NACLIP's own forward (test_zeroshot_readout.reference_tokens, clip/model.py with naclip.py:58-60)."""

    def __init__(self, visual, query_features, slide_stride, slide_crop, pamr_steps):
        self.visual = visual
        self.query_features = query_features
        self.num_queries = len(query_features)
        self.dtype = self.query_features.dtype
        self.slide_stride = slide_stride
        self.slide_crop = slide_crop
        self.align_corners = False
        self.pamr = PAMR(pamr_steps, dilations=(8, 16)) if pamr_steps > 0 else None  # :50

    def forward_feature(self, img):  # :54-69
        if type(img) == list:  # noqa: E721 (the reference's line)
            img = img[0]

        image_features = reference_tokens(self.visual, img, "naclip", "reduced")  # :58-60

        logits = image_features @ self.query_features.T

        patch_size = self.visual.patch_size[0]
        w, h = img[0].shape[-2] // patch_size, img[0].shape[-1] // patch_size
        out_dim = logits.shape[-1]
        logits = logits.permute(0, 2, 1).reshape(-1, out_dim, w, h)
        logits = nn.functional.interpolate(
            logits, size=img.shape[-2:], mode="bilinear", align_corners=self.align_corners
        )
        return logits

    def forward_slide(self, img, stride=112, crop_size=224):  # :71-108
        if type(img) == list:  # noqa: E721
            img = img[0].unsqueeze(0)
        if type(stride) == int:  # noqa: E721
            stride = (stride, stride)
        if type(crop_size) == int:  # noqa: E721
            crop_size = (crop_size, crop_size)

        h_stride, w_stride = stride
        h_crop, w_crop = crop_size
        batch_size, _, h_img, w_img = img.shape
        out_channels = self.num_queries
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        preds = img.new_zeros((batch_size, out_channels, h_img, w_img))
        count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y1 = h_idx * h_stride
                x1 = w_idx * w_stride
                y2 = min(y1 + h_crop, h_img)
                x2 = min(x1 + w_crop, w_img)
                y1 = max(y2 - h_crop, 0)
                x1 = max(x2 - w_crop, 0)
                crop_img = img[:, :, y1:y2, x1:x2]
                crop_seg_logit = self.forward_feature(crop_img)
                preds += nn.functional.pad(
                    crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2))
                )

                count_mat[:, :, y1:y2, x1:x2] += 1
        assert (count_mat == 0).sum() == 0

        logits = preds / count_mat
        return logits

    def predict_logits(self, inputs, img_size):
        """:110-132, batch_img_metas[0]['ori_shape'] passed as img_size; returns seg_logits before :137."""
        if self.slide_crop > 0:
            seg_logits = self.forward_slide(inputs, self.slide_stride, self.slide_crop)
        else:
            seg_logits = self.forward_feature(inputs)

        seg_logits = nn.functional.interpolate(
            seg_logits, size=img_size, mode="bilinear", align_corners=self.align_corners
        )

        if self.pamr:
            img = nn.functional.interpolate(inputs, size=img_size, mode="bilinear", align_corners=self.align_corners)
            seg_logits = self.pamr(img, seg_logits.to(img.dtype)).to(self.dtype)  # :131-132 (no OOM here)
        return seg_logits


# --- Inputs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def towers():
    """(open_clip visual, timm ViT with CLIP's projection as its head), the same random weights, eval mode."""
    return small_towers()


def query_embeddings(seed=4):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(len(QUERY_CLASS), EMBED, generator=g), dim=-1)


def normalised_image(h, w, seed=5):
    """Smooth (regions for PAMR to follow) plus fine noise, at the original size."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, max(h // 24, 2), max(w // 24, 2), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    return smooth + 0.3 * torch.randn(3, h, w, generator=g)


def settings(window, pamr, short_side=336, prob_thd=0.0):
    return Settings("test", prob_thd, 40.0, short_side, window, pamr)


# --- The tests ------------------------------------------------------------------------------------------------


def test_resized_size_equals_mmcv_rescale_size():
    sizes = [(375, 500), (500, 375), (333, 500), (240, 355), (400, 523), (1024, 2048), (100, 5000), (336, 336)]
    sizes += [(h, w) for h in (1, 17, 281, 427, 640) for w in (3, 199, 480, 853)]
    for h, w in sizes:
        for short in (224, 336, 448, 560):
            want_w, want_h = mmcv_rescale_size((w, h), (2048, short))
            assert resized_size(h, w, short) == (want_h, want_w), (h, w, short)
    assert resized_size(100, 5000, 336) == (41, 2048)  # the long side's cap binds
    with pytest.raises(ValueError, match="must be positive"):
        resized_size(0, 10, 336)


CASES = {
    # (original size, settings): sliding windows on a non-square image whose resized 336 x 497 is not a
    # multiple of the stride (nor of the patch); the whole image (336 x 439: a 21 x 27 grid, 7 pixels dropped);
    # a short side below the crop (200 x 296: unpadded 200 x 224 windows on a 12 x 14 grid)
    "slide": ((240, 355), settings((224, 112), pamr=False)),
    "slide-pamr": ((240, 355), settings((224, 112), pamr=True)),
    "whole": ((400, 523), settings(None, pamr=False)),
    "whole-pamr": ((400, 523), settings(None, pamr=True)),
    "small-windows-pamr": ((240, 355), settings((224, 112), pamr=True, short_side=200)),
}


@pytest.mark.parametrize("biting", [False, True], ids=["no-threshold", "threshold"])
@pytest.mark.parametrize("case", list(CASES))
def test_segment_equals_naclip_predict(towers, case, biting):
    visual, vit = towers
    (h, w), setting = CASES[case]
    image, embeddings = normalised_image(h, w), query_embeddings()
    inputs = resize(image, setting.short_side)[None]  # mmseg's Resize output, as the segmentor receives it
    crop, stride = setting.window or (0, 112)  # slide_crop=0: the whole image (cfg_voc21.py)
    reference = ReferenceNACLIP(visual, embeddings, stride, crop, 10 if setting.pamr else 0)
    with torch.no_grad():
        want_logits = reference.predict_logits(inputs, (h, w))
    pred0, probs = naclip_postprocess(want_logits, QUERY_CLASS, 40, 0.0)
    prob_thd = float(probs.max(1)[0].median()) if biting else 0.0  # half the pixels fall below it
    want, _ = naclip_postprocess(want_logits, QUERY_CLASS, 40, prob_thd)
    if biting:
        assert ((want == 0) & (pred0 != 0)).any() and (want != 0).any()  # the threshold bites, not everywhere
    assert len(pred0.unique()) >= 3  # several classes in the map

    setting = replace(setting, prob_thd=prob_thd)
    logits = segment_logits(vit, image, embeddings, setting)
    assert logits.shape == (len(QUERY_CLASS), h, w) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, want_logits[0], rtol=1e-5, atol=2e-6)
    pred = segment(vit, image, embeddings, torch.tensor(QUERY_CLASS), setting)
    assert pred.shape == (h, w) and pred.dtype == torch.int64
    assert torch.equal(pred, want[0])


def test_pamr_changes_the_map(towers):
    _, vit = towers
    image, embeddings = normalised_image(240, 355), query_embeddings()
    on = segment(vit, image, embeddings, QUERY_CLASS, CASES["slide-pamr"][1])
    off = segment(vit, image, embeddings, QUERY_CLASS, CASES["slide"][1])
    assert (on != off).float().mean() > 0.01


def test_windows_of_one_size_run_as_one_batch(towers, monkeypatch):
    _, vit = towers
    batches, original = [], segment_module.dense_tokens

    def recording(model, images, *args):
        batches.append(tuple(images.shape))
        return original(model, images, *args)

    monkeypatch.setattr(segment_module, "dense_tokens", recording)
    image, embeddings = normalised_image(240, 355), query_embeddings()
    segment_logits(vit, image, embeddings, CASES["slide"][1])  # 336 x 497: 2 x 4 windows of 224
    segment_logits(vit, image, embeddings, CASES["whole"][1])  # 336 x 497: one, cut to the 21 x 31 grid
    assert batches == [(8, 3, 224, 224), (1, 3, 336, 496)]


def test_the_harness_settings_run(towers):
    """NACLIP's knobs for two benchmarks straight from the table, and the other readouts."""
    _, vit = towers
    image, embeddings = normalised_image(180, 150), query_embeddings()
    for bench in ("voc21", "ade20k"):
        pred = segment(vit, image, embeddings, QUERY_CLASS, BENCHMARKS[bench].naclip)
        assert pred.shape == (180, 150) and int(pred.min()) >= 0 and int(pred.max()) <= max(QUERY_CLASS)
    for readout in ("clip", "maskclip"):
        assert segment(vit, image, embeddings, QUERY_CLASS, CASES["slide"][1], readout).shape == (180, 150)


@pytest.mark.parametrize(
    ("image", "embeddings", "match"),
    [
        (torch.zeros(1, 3, 64, 80), torch.zeros(4, EMBED), r"image must be one normalised float image \[3, H, W\]"),
        (torch.zeros(4, 64, 80), torch.zeros(4, EMBED), r"got torch.float32 \(4, 64, 80\)"),
        (torch.zeros(3, 64, 80, dtype=torch.uint8), torch.zeros(4, EMBED), r"got torch.uint8"),
        (torch.zeros(3, 64, 80), torch.zeros(EMBED), r"embeddings must be float query embeddings \[Q, D\]"),
        (torch.zeros(3, 64, 80), torch.zeros(4, EMBED - 1), r"embeddings \(4, 95\) have width 95; the tokens have 96"),
    ],
    ids=["batch", "channels", "uint8", "embeddings-1d", "embeddings-width"],
)
def test_bad_input_is_one_clear_line(towers, image, embeddings, match):
    _, vit = towers
    with pytest.raises(ValueError, match=match) as info:
        segment(vit, image, embeddings, [0, 1, 2, 3], settings((224, 112), pamr=False))
    assert "\n" not in str(info.value)
