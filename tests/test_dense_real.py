"""The dense protocols on real samples: the three ADE20k SceneParsing validation images of the
shared fixtures (real photographs, 151 label ids with 0 = other), converted by python -m
fastloc.shard ade20k. With only a validation split there, it serves as the training split too:
these runs check that real label maps, sizes and void flow through each protocol, not a figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastloc.probe.__main__ import main
from fastloc.probe.dense.config import Dinov3Ade20kConfig
from fastloc.probe.dense.data import LabelSpace, open_dense_data


@pytest.fixture(scope="module")
def ade(fixtures, tmp_path_factory) -> Path:
    from fastloc.shard.convert import convert
    from fastloc.shard.sources.ade20k import Ade20kConfig

    out = tmp_path_factory.mktemp("ade-real")
    root = fixtures / "ade20k-sceneparsing3"
    convert(Ade20kConfig(root=root, split="val", out=out, processes=1, progress=False, fsync=False))
    return out / "ade20k"


def common(ade: Path, tmp: Path) -> list[str]:
    args = [str(ade), "--train-split", "val", "--backbone", "tiny", "--weights", "random"]
    args += ["--device", "cpu", "--loader", "cpu", "--workers", "0", "--precision", "fp32"]
    return args + ["--out", str(tmp / "runs"), "--results", str(tmp / "r"), "--cache-dir", str(tmp / "c")]


def result(tmp: Path) -> dict:
    (run,) = (tmp / "runs").iterdir()
    return json.loads((run / "result.json").read_text())


def test_dinov3_ade20k_scores_real_images_at_their_resolution(ade, fixtures, tmp_path):
    """150 classes (0 void), the slide over each real image at its own size, every labelled pixel
    counted once: the confusion counts add up to the fixture's non-zero label pixels."""
    argv = ["linear", *common(ade, tmp_path), "--protocol", "dinov3-ade20k", "--iterations", "4"]
    assert main([*argv, "--batch-size", "2", "--crop-size", "64", "--stride", "43", "--short-side", "80"]) == 0
    out = result(tmp_path)
    assert out["protocol"]["name"] == "linear-dinov3-ade20k" and out["dataset"]["num_classes"] == 150
    assert out["dataset"]["zero_is_ignore"] is True and 0 <= out["selected"]["miou"] <= 1
    cfg = Dinov3Ade20kConfig(data=ade, train_split="val")
    labels = LabelSpace.of(open_dense_data(cfg), cfg.zero_is_ignore)
    assert labels.num_classes == 150 and labels.names[0] == out["dataset"]["classes"][0]
    pngs = sorted((fixtures / "ade20k-sceneparsing3" / "annotations" / "validation").glob("*.png"))
    labelled = sum(int((np.asarray(Image.open(p)) > 0).sum()) for p in pngs)
    assert out["pixels_counted"] == labelled


@pytest.mark.parametrize("protocol", ["overcluster", "hummingbird"])
def test_overcluster_and_hummingbird_run_on_real_images(protocol, ade, tmp_path):
    extra = {
        "overcluster": ["--clusters", "20", "--seeds", "1", "--iterations", "5", "--batch-size", "3"],
        "hummingbird": ["--memory-size", "0", "--bank-void", "ignore", "--no-augment"],
    }[protocol]
    argv = [protocol, *common(ade, tmp_path), "--image-size", "64", "--zero-is-ignore", *extra]
    assert main(argv) == 0
    out = result(tmp_path)
    assert out["dataset"]["num_classes"] == 150 and out["dataset"]["zero_is_ignore"] is True
    assert all(0 <= v <= 1 for v in out["selected"].values())
