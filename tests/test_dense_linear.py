"""The linear probes (python -m fastloc.probe linear): the head's algebra, the sliding windows, the
label mapping, dinov3's schedule, and both protocols end to end on the tiny VOC."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fastloc.probe.dense.config import LINEAR, Dinov3Ade20kConfig, LeopartVocConfig
from fastloc.probe.dense.data import VOID, DenseRun, LabelSpace, dense_backbone, open_dense_data
from fastloc.probe.dense.dinov3_ade20k import onecycle_lr, update_lr
from fastloc.probe.dense.leopart_voc import Head as ConvHead
from fastloc.probe.dense.linear import protocol_module, upsample
from fastloc.probe.dense.slide import short_side_size, slide_logits, window_boxes
from fastloc.probe.run import seed_everything


def test_conv_and_bilinear_upsampling_commute():
    """Leopart upsamples the features to 100 x 100, then applies the 1x1 conv; fastloc convolves
    the grid and upsamples the logits: equal, as bilinear weights sum to 1."""
    torch.manual_seed(0)
    head = ConvHead(24, 5).double()
    features = torch.randn(2, 24, 7, 7, dtype=torch.float64)
    for size in (100, 64, 7, 3):
        first = head(upsample(features, size))
        last = upsample(head(features), size)
        torch.testing.assert_close(first, last, rtol=0, atol=1e-12)


def mmseg_windows(h_img, w_img, h_crop, w_crop, h_stride, w_stride):
    """mmseg's slide_inference loop (and dinov3's), transcribed."""
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    out = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            out.append((y1, y2, x1, x2))
    return out


@pytest.mark.parametrize(
    "h, w, crop, stride",
    [
        (512, 683, 512, 341),
        (683, 512, 512, 341),
        (512, 512, 512, 341),
        (512, 2048, 512, 341),
        (40, 100, 64, 43),
        (64, 130, 64, 43),
        (70, 70, 64, 1),
        (30, 20, 64, 43),
    ],
)
def test_window_boxes_follow_mmseg_and_cover_every_pixel(h, w, crop, stride):
    boxes = window_boxes(h, w, crop, stride)
    assert boxes == mmseg_windows(h, w, crop, crop, stride, stride)
    count = torch.zeros(h, w, dtype=torch.int64)
    for y1, y2, x1, x2 in boxes:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1, x2 - x1) == (min(crop, h), min(crop, w))
        count[y1:y2, x1:x2] += 1
    assert int(count.min()) >= 1


def test_window_boxes_of_a_known_image():
    """A 512 x 683 image (ADE20k's short side 512), crop 512, stride 341: two windows, the second
    pulled back to end at the right edge."""
    assert window_boxes(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert short_side_size(300, 400, 512) == (512, 683)
    assert short_side_size(400, 300, 512) == (683, 512)


@pytest.mark.parametrize("h, w", [(64, 130), (97, 64), (40, 50), (64, 64), (20, 50), (16, 16)])
def test_slide_of_a_per_pixel_model_equals_the_whole_image(h, w):
    """A 1x1 conv sees each pixel alone, so averaging it over overlapping (or zero-padded) windows
    must give what it gives on the whole image."""
    torch.manual_seed(1)
    model = torch.nn.Conv2d(3, 6, 1)
    image = torch.randn(1, 3, h, w)
    with torch.no_grad():
        slid = slide_logits(image, model, crop=32, stride=21)
        whole = model(image)
    assert slid.shape == (1, 6, h, w)
    torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-5)


def test_dinov3_labels_reduce_zero(voc):
    """dinov3-ade20k scores label 0 as void and shifts the classes down (reduce_zero_label), and
    feeds the backbone the crop; leopart-voc keeps class 0 (VOC's background)."""
    cfg = Dinov3Ade20kConfig(data=voc, crop_size=64, stride=43)
    assert cfg.zero_is_ignore and cfg.image_size == 64
    assert (cfg.lr, cfg.iterations, cfg.batch_size) == (1e-3, 40_000, 16)
    data = open_dense_data(cfg)
    labels = LabelSpace.of(data, cfg.zero_is_ignore)
    assert labels.num_classes == 20
    stored = torch.tensor([[0, 1, 2], [3, 20, 255]], dtype=torch.uint8)
    assert labels.map(stored).tolist() == [[VOID, 0, 1], [2, 19, VOID]]
    leopart = LeopartVocConfig(data=voc)
    assert (leopart.lr, leopart.epochs, leopart.batch_size, leopart.image_size) == (0.01, 25, 120, 448)
    voc_labels = LabelSpace.of(data, leopart.zero_is_ignore)
    assert voc_labels.num_classes == 21
    assert voc_labels.map(stored).tolist() == [[0, 1, 2], [3, 20, VOID]]


def test_dinov3_schedule():
    """WarmupOneCycleLR as configured for ADE20k: from max_lr * 1e-6, linear warmup damped by
    (1 - step / total), then a cosine to 0; the first two updates share step 0's lr."""
    total, warmup, peak = 40_000, 1500, 1e-3
    assert onecycle_lr(0, total, warmup, peak) == pytest.approx(peak * 1e-6)
    k = (1 - 750 / warmup) * (1 - 1e-6)
    assert onecycle_lr(750, total, warmup, peak) == pytest.approx(peak * (1 - k) * (1 - 750 / total))
    assert onecycle_lr(warmup, total, warmup, peak) == pytest.approx(peak * (1 + math.cos(math.pi * 1501 / total)) / 2)
    assert onecycle_lr(total - 1, total, warmup, peak) == pytest.approx(0.0, abs=1e-18)
    assert update_lr(0, total, warmup, peak) == update_lr(1, total, warmup, peak) == onecycle_lr(0, total, warmup, peak)
    assert update_lr(5, total, warmup, peak) == onecycle_lr(4, total, warmup, peak)


def run_cli(voc, tmp_path, protocol: str, knobs: dict) -> tuple[dict, object, object]:
    """python -m fastloc.probe linear in-process; (result.json, the protocol's config, the run directory)."""
    from fastloc.probe.__main__ import main

    fields = {
        "train_split": "trainaug",
        "backbone": "tiny",
        "weights": "random",
        "device": "cpu",
        "loader": "cpu",
        "workers": 0,
        "cache_dir": tmp_path / "cache",
        "out": tmp_path / "runs",
        "results": tmp_path / "results",
        **knobs,
    }
    args = ["linear", str(voc), "--protocol", protocol]
    for name, value in fields.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    assert main(args) == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    result = json.loads((runs[0] / "result.json").read_text())
    csv = (tmp_path / "results" / f"dense-linear-{protocol}-voc.csv").read_text()
    assert csv.count("\n") == 3  # header, miou, pixel_accuracy
    return result, LINEAR[protocol](data=voc, **fields), runs[0]


def trained_and_untrained(cfg, result: dict, run) -> tuple[float, float]:
    """mIoU of the saved head and of the head the run started from (same seed, same order)."""
    device = torch.device("cpu")
    data = open_dense_data(cfg)
    labels = LabelSpace.of(data, cfg.zero_is_ignore)
    seed_everything(cfg.seed)
    backbone = dense_backbone(cfg, device)
    assert backbone.digest == result["protocol"]["backbone_digest"]
    protocol = protocol_module(cfg)
    untrained = protocol.Head(backbone.dim, labels.num_classes)
    trained = protocol.Head(backbone.dim, labels.num_classes)
    trained.load_state_dict(load_file(str(run / "head.safetensors")))
    evaluate = protocol.evaluator(cfg, DenseRun(device, data, labels, backbone))
    scores = [evaluate(head).miou() for head in (trained, untrained)]
    return scores[0], scores[1]


def test_leopart_voc_end_to_end(voc, tmp_path):
    knobs = {"image_size": 64, "probe_size": 16, "epochs": 3, "batch_size": 4, "lr": 0.1}
    result, cfg, run = run_cli(voc, tmp_path, "leopart-voc", knobs)
    protocol = result["protocol"]
    assert protocol["name"] == "linear-leopart-voc"
    assert (protocol["image_size"], protocol["probe_size"], protocol["epochs"], protocol["batch_size"]) == (
        64,
        16,
        3,
        4,
    )
    assert protocol["optimizer"] == {"name": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
    assert protocol["schedule"]["step_size"] == 2 and protocol["selection"] == "last epoch"
    assert protocol["updates_per_epoch"] == 4 and protocol["eval_samples"] == 8
    assert len(result["train_loss"]) == 3 and len(result["per_class_iou"]["miou"]) == 21
    trained, untrained = trained_and_untrained(cfg, result, run)
    assert trained == pytest.approx(result["selected"]["miou"])
    assert trained > untrained, (trained, untrained)


def test_dinov3_ade20k_end_to_end(voc, tmp_path):
    knobs = {"crop_size": 64, "stride": 43, "short_side": 64, "iterations": 24, "batch_size": 4}
    result, cfg, run = run_cli(voc, tmp_path, "dinov3-ade20k", knobs)
    protocol = result["protocol"]
    assert protocol["name"] == "linear-dinov3-ade20k"
    assert (protocol["crop_size"], protocol["iterations"], protocol["batch_size"]) == (64, 24, 4)
    assert protocol["evaluation"]["stride"] == 43 and protocol["evaluation"]["short_side"] == 64
    assert protocol["optimizer"]["name"] == "AdamW" and protocol["optimizer"]["lr"] == 1e-3
    assert protocol["schedule"]["total_iter"] == 24 and protocol["schedule"]["warmup_iters"] == 1
    assert result["dataset"]["zero_is_ignore"] and result["dataset"]["num_classes"] == 20
    assert len(result["train_loss"]) == 1 and set(result["selected"]) == {"miou", "pixel_accuracy"}
    trained, untrained = trained_and_untrained(cfg, result, run)
    assert trained == pytest.approx(result["selected"]["miou"])
    assert trained > untrained, (trained, untrained)
