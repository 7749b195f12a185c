"""SegCLIP's zero-shot rule against the reference's ``ViTSegInference.encode_decode`` on the same
model outputs: with and without background, a threshold above and below the best group's
probability (the reference caps it there), more classes than the top-5 filter keeps; and the
trainable's readout is the embedding it trains.

Below ``# --- transcription`` is a copy of ArrowLuo/SegCLIP @ df09ba2,
seg_segmentation/evaluation/vit_seg.py (``resize_attn_map``, ``ViTSegInference.get_attn_maps`` and
``encode_decode``). Stripped: einops (``rearrange`` as permute/reshape), mmseg's EncoderDecoder base
and mmcv's Config (a plain module and dict), the logger.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastloc.align.segclip import Segclip, SegclipConfig
from fastloc.probe.zeroshot.segclip import BG_THRESH, group_readout, segclip_scores

# --- transcription


def resize_attn_map(attentions, h, w, align_corners=False):
    scale = (h * w // attentions.shape[2]) ** 0.5
    if h > w:
        w_featmap = w // int(np.round(scale))
        h_featmap = attentions.shape[2] // w_featmap
    else:
        h_featmap = h // int(np.round(scale))
        w_featmap = attentions.shape[2] // h_featmap
    assert attentions.shape[2] == h_featmap * w_featmap
    bs = attentions.shape[0]
    nh = attentions.shape[1]  # number of head
    groups = attentions.shape[3]  # number of group token
    # rearrange 'bs nh (h w) c -> (bs nh) c h w'
    attentions = attentions.reshape(bs * nh, h_featmap, w_featmap, groups).permute(0, 3, 1, 2)
    attentions = F.interpolate(attentions, size=(h, w), mode="bilinear", align_corners=align_corners)
    # rearrange '(bs nh) c h w -> bs nh h w c'
    return attentions.permute(0, 2, 3, 1).reshape(bs, nh, h, w, groups)


class ViTSegInference(nn.Module):
    def __init__(self, model, text_embedding, with_bg, test_cfg=None):
        super().__init__()
        test_cfg = test_cfg or dict(mode="whole", bg_thresh=0.95)
        self.test_cfg = test_cfg
        self.model = model
        self.register_buffer("text_embedding", text_embedding)
        self.with_bg = with_bg
        self.bg_thresh = test_cfg["bg_thresh"]
        self.num_classes = len(text_embedding) + 1 if self.with_bg else len(text_embedding)
        self.align_corners = False

    def get_attn_maps(self, img, return_onehot=False, rescale=False):
        results = {}
        results["attn_dicts"] = []
        image_features, patch_features, mid_states = self.model.clip.encode_image(img, return_hidden=True)  # noqa: RUF059
        attns_list = mid_states["attns"]
        for att_ in attns_list:
            results["attn_dicts"].append({"soft": att_["soft_attn"].unsqueeze(1)})
        attn_maps = []
        with torch.no_grad():
            prev_attn_masks = None
            for idx, attn_dict in enumerate(results["attn_dicts"]):  # noqa: B007
                attn_masks = attn_dict["soft"]
                attn_masks = attn_masks.permute(0, 1, 3, 2)  # rearrange 'b h g n -> b h n g'
                if prev_attn_masks is None:
                    prev_attn_masks = attn_masks
                else:
                    prev_attn_masks = prev_attn_masks @ attn_masks
                attn_maps.append(resize_attn_map(prev_attn_masks, *img.shape[-2:]))
        for i in range(len(attn_maps)):
            attn_map = attn_maps[i]
            assert attn_map.shape[1] == 1
            attn_map = attn_map.squeeze(1)
            if rescale:
                attn_map = attn_map.permute(0, 3, 1, 2)  # 'b h w g -> b g h w'
                attn_map = F.interpolate(
                    attn_map, size=img.shape[2:], mode="bilinear", align_corners=self.align_corners
                )
                attn_map = attn_map.permute(0, 2, 3, 1)  # 'b g h w -> b h w g'
            if return_onehot:
                attn_map = F.one_hot(attn_map.argmax(dim=-1), num_classes=attn_map.shape[-1]).to(dtype=attn_map.dtype)
            attn_maps[i] = attn_map
        return attn_maps

    def encode_decode(self, img, img_metas):
        assert img.shape[0] == 1, "batch size must be 1"
        attn_map = self.get_attn_maps(img, rescale=True)[-1]
        attn_map = attn_map[0]
        img_outs = {}
        image_features, patch_features, mid_states = self.model.clip.encode_image(img, return_hidden=True)  # noqa: RUF059
        img_outs["image_feat"] = patch_features[:, 1:, :].contiguous()
        img_outs["image_x"] = image_features
        grouped_img_tokens = img_outs["image_feat"].squeeze(0)
        img_avg_feat = img_outs["image_x"]
        grouped_img_tokens = F.normalize(grouped_img_tokens, dim=-1)
        img_avg_feat = F.normalize(img_avg_feat, dim=-1)
        onehot_attn_map = F.one_hot(attn_map.argmax(dim=-1), num_classes=attn_map.shape[-1]).to(dtype=attn_map.dtype)
        num_fg_classes = self.text_embedding.shape[0]
        class_offset = 1 if self.with_bg else 0
        text_tokens = self.text_embedding
        num_classes = num_fg_classes + class_offset
        logit_scale = torch.clamp(self.model.clip.logit_scale.exp(), max=100)
        group_affinity_mat = (grouped_img_tokens @ text_tokens.T) * logit_scale
        pre_group_affinity_mat = F.softmax(group_affinity_mat, dim=-1)
        avg_affinity_mat = (img_avg_feat @ text_tokens.T) * logit_scale
        avg_affinity_mat = F.softmax(avg_affinity_mat, dim=-1)
        affinity_mask = torch.zeros_like(avg_affinity_mat)
        avg_affinity_topk = avg_affinity_mat.topk(dim=-1, k=min(5, num_fg_classes))
        affinity_mask.scatter_add_(
            dim=-1, index=avg_affinity_topk.indices, src=torch.ones_like(avg_affinity_topk.values)
        )
        group_affinity_mat.masked_fill_(~affinity_mask.bool(), float("-inf"))
        group_affinity_mat = F.softmax(group_affinity_mat, dim=-1)
        group_affinity_mat *= pre_group_affinity_mat
        pred_logits = torch.zeros(num_classes, *attn_map.shape[:2], device=img.device, dtype=img.dtype)
        # rearrange 'h w c -> c h w'
        pred_logits[class_offset:] = (onehot_attn_map @ group_affinity_mat).permute(2, 0, 1)
        if self.with_bg:
            bg_thresh = min(self.bg_thresh, group_affinity_mat.max().item())
            pred_logits[0, (onehot_attn_map @ group_affinity_mat).max(dim=-1).values < bg_thresh] = 1
        return pred_logits.unsqueeze(0)


# --- end of the transcription


def stub(image, groups, soft, logit_scale):
    """The reference's model as encode_decode reads it: encode_image -> (image_features,
    patch_features with the class row first, mid_states with the soft assignments)."""
    hidden = torch.cat([image[None, None], groups[None]], dim=1)
    out = (image[None], hidden, {"attns": [{"soft_attn": soft.flatten(1)[None]}]})
    return SimpleNamespace(clip=SimpleNamespace(encode_image=lambda img, return_hidden: out, logit_scale=logit_scale))


@pytest.fixture(scope="module")
def readout():
    """A tiny SegCLIP's outputs on one 64 px window, its group embeddings sharpened so that several
    classes and groups win pixels."""
    torch.manual_seed(0)
    objective = Segclip(SegclipConfig(backbone="tiny", weights="random")).eval()
    images = torch.randn(1, 3, 64, 64)
    image, groups, soft = group_readout(objective.trainable, images)
    assert image.shape == (1, 96) and groups.shape == (1, 8, 96) and soft.shape == (1, 8, 8, 8)
    noise, order, mae_noise = objective.sample(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        embedding = objective.trainable(
            images, torch.zeros(1, 32).long(), noise, torch.zeros(1, 64).long(), order, mae_noise
        )[0]
    torch.testing.assert_close(image, embedding)  # the readout's image embedding is the trained one
    return image[0], groups[0], soft[0], objective.trainable.text.logit_scale.detach()


@pytest.mark.parametrize("classes", [3, 9])
@pytest.mark.parametrize("bg_thresh", [None, BG_THRESH["voc21"], BG_THRESH["context60"], 0.02])
def test_the_rule_equals_the_references_encode_decode(readout, classes, bg_thresh):
    image, groups, soft, scale = readout
    texts = F.normalize(torch.randn(classes, 96, generator=torch.Generator().manual_seed(classes)), dim=-1)
    texts = texts + 0.5 * F.normalize(groups[torch.arange(classes) % 8], dim=-1)  # classes near groups
    texts = F.normalize(texts, dim=-1)
    ref = ViTSegInference(stub(image, groups, soft, scale), texts, with_bg=bg_thresh is not None)
    ref.bg_thresh = 0.95 if bg_thresh is None else bg_thresh
    expected = ref.encode_decode(torch.zeros(1, 3, 64, 64), None)[0]
    got = segclip_scores(image, groups, soft, texts, scale, (64, 64), bg_thresh)
    assert got.shape == expected.shape == ((classes + (bg_thresh is not None)), 64, 64)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    winners = got.argmax(0).unique()
    if bg_thresh == BG_THRESH["voc21"]:  # capped at the best group's probability: both kinds of pixel
        assert 0 in winners.tolist() and len(winners) > 1
    if bg_thresh == 0.02:
        assert 0 not in winners.tolist()  # below every group's probability: no background
    if classes == 9:
        assert len(got[1 if bg_thresh is not None else 0 :].flatten(1).amax(1).nonzero()) <= 5  # top-5 filter


def test_windows_are_averaged_where_they_overlap():
    """mmseg's slide inference: two 64 px windows over an 80 px wide image (stride 48) overlap in
    columns 16-63, where the scores are their mean; elsewhere each window's own."""
    from fastloc.probe.zeroshot.segclip import window_scores

    torch.manual_seed(1)
    trainable = Segclip(SegclipConfig(backbone="tiny", weights="random")).eval().trainable
    image, texts = torch.randn(3, 64, 80), F.normalize(torch.randn(4, 96), dim=-1)
    scale = trainable.text.logit_scale
    own = []
    for x in (0, 16):
        whole, groups, soft = group_readout(trainable, image[None, :, :, x : x + 64])
        own.append(segclip_scores(whole[0], groups[0], soft[0], texts, scale, (64, 64), 0.8))
    got = window_scores(
        trainable, image, lambda w, g, a, size: segclip_scores(w, g, a, texts, scale, size, 0.8), (64, 48)
    )
    assert got.shape == (5, 64, 80)
    torch.testing.assert_close(got[..., :16], own[0][..., :16])
    torch.testing.assert_close(got[..., 64:], own[1][..., 48:])
    torch.testing.assert_close(got[..., 16:64], (own[0][..., 16:] + own[1][..., :48]) / 2)


def test_the_thresholds_name_the_harness_benchmarks():
    from fastloc.probe.zeroshot.decide import BENCHMARKS

    assert BG_THRESH == {"voc21": 0.80, "context60": 0.25, "coco_object": 0.65}
    assert all(BENCHMARKS[name].background == "threshold" for name in BG_THRESH)  # the with-background ones
