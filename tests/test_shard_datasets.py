"""Real dataset excerpts, end to end: convert, read the shards back, compare with the source.

Each label map in the shards must equal the one computed independently from the source files
(pycocotools for COCO JSON, the PNG itself for panoptic, SceneParsing and the full ADE20k).
The independent computations are the ones of the source tests (imported from them), so the
rule is written down once for the tests, apart from the package's own code.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from test_source_coco import coco_api, make_panoptic_layout, paint_expected
from test_source_imagenet import make_folders, make_tars, wnid_of

from fastloc.shard.convert import convert
from fastloc.shard.sources.ade20k import Ade20kConfig
from fastloc.shard.sources.coco import CocoConfig
from fastloc.shard.sources.imagenet import ImagenetConfig
from fastloc.shard.verify import verify

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FAST = dict(processes=2, shard_samples=3, progress=False)


def read_back(manifest: dict, out: Path) -> dict[str, dict]:
    """key -> sample dict, read with the webdataset library from the manifest's tars."""
    split = out / manifest["dataset"] / manifest["split"]
    tars = [str(split / s["tar"]) for s in manifest["shards"]]
    samples = {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}
    assert len(samples) == manifest["num_samples"]
    assert verify(split).ok
    return samples


def label_of(sample: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["seg.png"])))


def source_of(sample: dict) -> Path:
    return Path(json.loads(sample["json"])["source"])


def test_coco_json_labels_equal_pycocotools(fixtures, tmp_path):
    root = fixtures / "coco-train16"
    manifest = convert(CocoConfig(root=root, split="train", labels="json", out=tmp_path, **FAST))
    assert manifest["num_samples"] == 16 and manifest["num_classes"] == 183
    assert manifest["report"]["skipped"] == 0
    things = coco_api(root / "annotations/instances_train2017.json")
    for key, sample in read_back(manifest, tmp_path).items():
        np.testing.assert_array_equal(label_of(sample), paint_expected(things, None, f"{key}.jpg"))
        if json.loads(sample["json"])["reencoded"] is None:
            assert sample["jpg"] == (root / f"train2017/{key}.jpg").read_bytes()


def test_coco_panoptic_labels_equal_the_png(fixtures, tmp_path):
    root = make_panoptic_layout(fixtures, tmp_path / "src")
    manifest = convert(CocoConfig(root=root, split="val", labels="panoptic", out=tmp_path, **FAST))
    data = json.loads((root / "annotations/panoptic_val2017.json").read_text())
    index = {cid: i + 1 for i, cid in enumerate(sorted(c["id"] for c in data["categories"]))}
    assert manifest["source"]["category_ids"][1:] == sorted(index)
    for key, sample in read_back(manifest, tmp_path).items():
        rgb = np.asarray(Image.open(root / f"annotations/panoptic_val2017/{key}.png")).astype(np.int64)
        segment = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        expected = np.zeros(segment.shape, np.int64)
        ann = next(a for a in data["annotations"] if a["file_name"].startswith(key))
        for seg in ann["segments_info"]:
            expected[segment == seg["id"]] = index[seg["category_id"]]
        np.testing.assert_array_equal(label_of(sample), expected)


def test_ade20k_sceneparsing_labels_equal_the_png(fixtures, tmp_path):
    root = fixtures / "ade20k-sceneparsing3"
    manifest = convert(Ade20kConfig(root=root, split="val", out=tmp_path, **FAST))
    assert manifest["num_classes"] == 151 and manifest["label"]["dtype"] == "uint8"
    samples = read_back(manifest, tmp_path)
    assert len(samples) == 3
    for key, sample in samples.items():
        expected = np.asarray(Image.open(root / f"annotations/validation/{key}.png"))
        np.testing.assert_array_equal(label_of(sample), expected)


def test_ade20k_full_uint16_labels_equal_the_seg_png(fixtures, tmp_path):
    root = fixtures / "ade20k-full3/ADE20K_2021_17_01"
    manifest = convert(Ade20kConfig(root=root, split="train", out=tmp_path, **FAST))
    assert manifest["num_classes"] == 3689 and manifest["label"]["dtype"] == "uint16"
    for key, sample in read_back(manifest, tmp_path).items():
        seg = source_of(sample).with_name(f"{key}_seg.png")
        rgb = np.asarray(Image.open(seg)).astype(np.int64)
        expected = rgb[..., 0] // 10 * 256 + rgb[..., 1]
        label = label_of(sample)
        assert label.dtype == np.uint16 and label.max() > 255
        np.testing.assert_array_equal(label, expected)
        named = {manifest["classes"][c] for c in np.unique(label) if c}
        assert None not in named


def test_ade20k_full_uint16_labels_through_dali(fixtures, tmp_path):
    from nvidia.dali import fn, pipeline_def, types

    root = fixtures / "ade20k-full3/ADE20K_2021_17_01"
    manifest = convert(Ade20kConfig(root=root, split="train", out=tmp_path, **FAST))
    split = tmp_path / "ade20k-full/train"
    tars = [str(split / s["tar"]) for s in manifest["shards"]]
    expected = {k: label_of(s) for k, s in read_back(manifest, tmp_path).items()}

    @pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def pipe():
        seg, meta = fn.readers.webdataset(
            paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["seg.png", "json"]
        )
        return fn.decoders.image(seg, device="cpu", output_type=types.ANY_DATA, dtype=types.UINT16), meta

    p = pipe()
    p.build()
    labels, metas = p.run()
    for i in range(3):
        key = json.loads(bytes(np.array(metas.at(i))))["key"]
        np.testing.assert_array_equal(np.array(labels.at(i))[..., 0], expected[key])


@pytest.mark.parametrize("layout", ["folders", "tars"])
def test_imagenet_class_indices_and_untouched_bytes(fixtures, tmp_path, layout):
    files = sorted((fixtures / "imagenet-sample").glob("*.JPEG"))
    make = make_folders if layout == "folders" else make_tars
    src = make(files, tmp_path / "src")
    manifest = convert(ImagenetConfig(src=src, layout=layout, out=tmp_path, **FAST))
    wnids = sorted({wnid_of(f) for f in files})
    assert manifest["classes"] == wnids and manifest["keys"] == ["jpg", "cls", "json"]
    by_stem = {f.stem: f for f in files}
    samples = read_back(manifest, tmp_path)
    assert sorted(samples) == sorted(by_stem)
    for key, sample in samples.items():
        assert sample["jpg"] == by_stem[key].read_bytes()  # every one is a baseline JPEG
        assert wnids[int(sample["cls"])] == wnid_of(by_stem[key])
    assert manifest["report"]["reencoded"] == 0
