"""The COCO source on real COCO excerpts (../shared/fixtures), laid out in tmp_path.

Expected labels are computed here independently: pycocotools' own ``COCO.annToMask`` with the
painting rule written out plainly, and a direct decode of the panoptic PNGs.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.sources.coco import (
    COCO_OBJECT_CLASSES,
    COCO_STUFF_CLASSES,
    UNUSED_THING_IDS,
    CocoConfig,
    CocoSource,
)

# pycocotools' Cython masks lack numpy 2's __array__(copy=...): harmless, noisy
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ---------------------------------------------------------------------- helpers


def link(target: Path, link_path: Path) -> Path:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(target)
    return link_path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def read_json(path: Path):
    return json.loads(path.read_text())


def load_all(src: CocoSource) -> dict:
    return {item.key: src.load(item) for item in src.items()}


def coco_api(path: Path):
    from pycocotools.coco import COCO

    return COCO(str(path))


def paint_expected(things, stuff, file_name: str) -> np.ndarray:
    """The documented rule, plainly: zeros; stuff 92..182 by ascending annotation id (183 'other'
    skipped); things: crowds then non-crowds, each by descending area, ties by ascending id."""
    image = next(im for im in things.dataset["images"] if im["file_name"] == file_name)
    label = np.zeros((image["height"], image["width"]), np.int64)
    if stuff is not None:
        anns = stuff.loadAnns(stuff.getAnnIds(imgIds=[image["id"]]))
        for ann in sorted(anns, key=lambda a: a["id"]):
            if ann["category_id"] == 183:
                continue
            label[stuff.annToMask(ann) == 1] = ann["category_id"]
    anns = things.loadAnns(things.getAnnIds(imgIds=[image["id"]]))
    crowds = sorted((a for a in anns if a["iscrowd"]), key=lambda a: (-a["area"], a["id"]))
    singles = sorted((a for a in anns if not a["iscrowd"]), key=lambda a: (-a["area"], a["id"]))
    for ann in crowds + singles:
        label[things.annToMask(ann) == 1] = ann["category_id"]
    return label


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size  # (W, H)


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# ---------------------------------------------------------------------- class space


def test_coco_stuff_table(fixtures):
    assert len(COCO_STUFF_CLASSES) == 183
    assert COCO_STUFF_CLASSES[0] == "unlabeled" and COCO_STUFF_CLASSES[1] == "person"
    assert len(COCO_STUFF_CLASSES[92:]) == 91
    assert COCO_STUFF_CLASSES[92] == "banner" and COCO_STUFF_CLASSES[182] == "wood"
    assert COCO_STUFF_CLASSES[178:180] == ("water-other", "waterdrops")
    unused = {
        12: "street sign",
        26: "hat",
        29: "shoe",
        30: "eye glasses",
        45: "plate",
        66: "mirror",
        68: "window",
        69: "desk",
        71: "door",
        83: "blender",
        91: "hair brush",
    }
    assert {i: COCO_STUFF_CLASSES[i] for i in unused} == unused
    # the official JSON categories agree with the table, id by id
    things = read_json(fixtures / "coco-excerpts/instances_val2017.json_samples.json")["categories"]
    assert len(things) == 80
    assert {c["id"]: c["name"] for c in things} == {
        i: n for i, n in enumerate(COCO_STUFF_CLASSES) if 1 <= i <= 91 and i not in unused
    }
    stuff = read_json(fixtures / "coco-excerpts/stuff_val2017.json_samples.json")["categories"]
    assert {c["id"]: c["name"] for c in stuff} == {
        **{i: COCO_STUFF_CLASSES[i] for i in range(92, 183)},
        183: "other",
    }
    panoptic = read_json(fixtures / "coco-panoptic2/panoptic_coco_categories.json")
    assert all(COCO_STUFF_CLASSES[c["id"]] == c["name"] for c in panoptic if c["isthing"])


# ---------------------------------------------------------------------- json mode


@pytest.mark.parametrize("folder,split", [("coco-train16", "train"), ("coco-val4", "val")])
def test_json_things_match_pycocotools(fixtures, folder, split):
    root = fixtures / folder
    src = CocoConfig(root=root, split=split, labels="json").source()
    info = src.info()
    assert info.dataset == "coco" and info.split == split and info.source == str(root)
    assert info.classes == list(COCO_STUFF_CLASSES) and info.has_label and not info.has_txt
    assert info.label_encoding["space"] == "coco-stuff-183" and info.label_encoding["from"] == "json"
    assert info.label_encoding["stuff"] is False  # no stuff_{split}2017.json: things only
    assert "crowd regions first" in info.label_encoding["rule"]

    items = src.items()
    jpgs = sorted((root / f"{split}2017").glob("*.jpg"))
    assert [it.key for it in items] == [p.stem for p in jpgs]
    assert [it.size for it in items] == [p.stat().st_size for p in jpgs]
    items = pickle.loads(pickle.dumps(items))

    coco = coco_api(root / f"annotations/instances_{split}2017.json")
    crowd_seen = False
    for item, jpg in zip(items, jpgs):
        sample = src.load(item)
        assert sample.jpg == jpg.read_bytes() and sample.source == str(jpg)
        assert sample.meta == {"image_id": int(jpg.stem)}
        expected = paint_expected(coco, None, jpg.name)
        assert sample.label.shape == expected.shape == image_size(jpg)[::-1]
        np.testing.assert_array_equal(sample.label, expected)
        crowd_seen |= any(a["iscrowd"] for a in coco.imgToAnns[int(jpg.stem)])
    assert crowd_seen == (folder == "coco-train16")  # the one iscrowd RLE is painted


def test_json_overlap_order(fixtures):
    """On 184613 (person crowd + persons, umbrellas, cows) some pixels are claimed by several
    annotations: the smaller/individual one must win."""
    root = fixtures / "coco-train16"
    src = CocoConfig(root=root, labels="json").source()
    item = next(it for it in src.items() if it.key == "000000184613")
    label = src.load(item).label
    coco = coco_api(root / "annotations/instances_train2017.json")
    anns = coco.imgToAnns[184613]
    crowd = next(a for a in anns if a["iscrowd"])
    crowd_mask = coco.annToMask(crowd) == 1
    singles = [a for a in anns if not a["iscrowd"]]
    union = np.zeros_like(crowd_mask)
    for a in singles:
        union |= coco.annToMask(a) == 1
    # crowd pixels not covered by an instance keep the crowd's class
    assert (label[crowd_mask & ~union] == crowd["category_id"]).all()
    # the smallest instance is entirely visible
    smallest = min(singles, key=lambda a: a["area"])
    assert (label[coco.annToMask(smallest) == 1] == smallest["category_id"]).all()


def make_785_layout(fixtures: Path, tmp: Path) -> Path:
    """val2017 with image 785, its person annotation and its stuff segments (+ 'other')."""
    person = read_json(fixtures / "coco-person4/test_coco.json")
    stuff = read_json(fixtures / "coco-excerpts/stuff_val2017.json_samples.json")
    image = next(im for im in person["images"] if im["id"] == 785)  # the stuff excerpt lacks it
    root = tmp / "coco"
    link(fixtures / "coco-person4/000000000785.jpg", root / "val2017/000000000785.jpg")
    write_json(
        root / "annotations/instances_val2017.json",
        {
            "images": [image],
            "annotations": [a for a in person["annotations"] if a["image_id"] == 785],
            "categories": person["categories"],
        },
    )
    write_json(
        root / "annotations/stuff_val2017.json",
        {
            "images": [image],
            "annotations": [a for a in stuff["annotations"] if a["image_id"] == 785],
            "categories": stuff["categories"],
        },
    )
    return root


def test_json_with_stuff(fixtures, tmp_path):
    root = make_785_layout(fixtures, tmp_path)
    src = CocoConfig(root=root, split="val", labels="json").source()
    assert src.info().label_encoding["stuff"] is True
    (item,) = src.items()
    label = src.load(item).label

    things = coco_api(root / "annotations/instances_val2017.json")
    stuff = coco_api(root / "annotations/stuff_val2017.json")
    expected = paint_expected(things, stuff, "000000000785.jpg")
    np.testing.assert_array_equal(label, expected)
    assert set(np.unique(label)) == {0, 1, 120, 159}  # unlabeled, person, fog, snow
    # stuff 'other' (183) is never painted: its pixels are 0 unless the person covers them
    other = next(a for a in stuff.dataset["annotations"] if a["category_id"] == 183)
    other_mask = stuff.annToMask(other) == 1
    person_mask = things.annToMask(things.dataset["annotations"][0]) == 1
    assert (other_mask & ~person_mask).any()
    assert (label[other_mask & ~person_mask] == 0).all()
    assert (label[person_mask] == 1).all()

    # the stuff file is optional only when defaulted: given explicitly, it must exist
    (root / "annotations/stuff_val2017.json").unlink()
    assert CocoConfig(root=root, split="val", labels="json").source().info().label_encoding["stuff"] is False
    missing = root / "annotations/nope.json"
    with pytest.raises(ConversionError, match="nope.json"):
        CocoConfig(root=root, split="val", labels="json", stuff_json=missing).source().info()


def test_json_bad_data(fixtures, tmp_path):
    root = make_785_layout(fixtures, tmp_path)
    instances = root / "annotations/instances_val2017.json"
    data = read_json(instances)

    # an image in the folder but not in the JSON
    link(fixtures / "coco-val4/val2017/000000289393.jpg", root / "val2017/000000289393.jpg")
    src = CocoConfig(root=root, split="val", labels="json").source()
    items = {it.key: it for it in src.items()}
    with pytest.raises(SampleError) as e:
        src.load(items["000000289393"])
    assert e.value.path == str(root / "val2017/000000289393.jpg") and "instances_val2017.json" in e.value.reason

    # a broken RLE: SampleError naming the JSON, never a crash in the C decoder
    bad = json.loads(json.dumps(data))
    bad["annotations"][0]["segmentation"] = {"size": [425, 640], "counts": "PPYo1"}
    write_json(instances, bad)
    src = CocoConfig(root=root, split="val", labels="json").source()
    with pytest.raises(SampleError) as e:
        src.load(next(it for it in src.items() if it.key == "000000000785"))
    assert e.value.path == str(instances) and "442619" in e.value.reason

    # a category outside the class space
    bad = json.loads(json.dumps(data))
    bad["annotations"][0]["category_id"] = 250
    write_json(instances, bad)
    src = CocoConfig(root=root, split="val", labels="json").source()
    with pytest.raises(SampleError, match="250") as e:
        src.load(next(it for it in src.items() if it.key == "000000000785"))
    assert e.value.path == str(instances)

    # categories that disagree with COCO-Stuff's table
    bad = json.loads(json.dumps(data))
    bad["categories"][0]["name"] = "human"
    write_json(instances, bad)
    with pytest.raises(ConversionError, match="human"):
        CocoConfig(root=root, split="val", labels="json").source().info()


@pytest.mark.parametrize(
    "text,problem",
    [
        ('{"images": [', "not valid JSON"),
        ('[{"images": []}]', "expected a JSON object"),
        ('{"images": [], "categories": []}', "'annotations'"),
        ('{"images": {}, "annotations": [], "categories": []}', "'images'"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "person"}]}', "images[0]"),
    ],
)
def test_malformed_json(fixtures, tmp_path, text, problem):
    root = tmp_path / "coco"
    link(fixtures / "coco-val4/val2017/000000289393.jpg", root / "val2017/000000289393.jpg")
    (root / "annotations").mkdir()
    for name, labels, extra in [
        ("instances_val2017.json", "json", {}),
        ("panoptic_val2017.json", "panoptic", {}),
        ("captions_val2017.json", "none", {"captions": True}),
    ]:
        (root / "annotations" / name).write_text(text)
        (root / "annotations/panoptic_val2017").mkdir(exist_ok=True)
        src = CocoConfig(root=root, split="val", labels=labels, **extra).source()
        with pytest.raises(ConversionError) as e:
            src.items()
        assert name in str(e.value) and problem in str(e.value)


def test_missing_paths(fixtures, tmp_path):
    with pytest.raises(ConversionError, match="nowhere"):
        CocoConfig(root=tmp_path / "nowhere").source().items()
    root = tmp_path / "coco"
    root.mkdir()
    with pytest.raises(ConversionError, match="train2017"):
        CocoConfig(root=root, labels="none").source().items()
    link(fixtures / "coco-val4/val2017/000000289393.jpg", root / "val2017/000000289393.jpg")
    with pytest.raises(ConversionError, match="instances_val2017.json"):
        CocoConfig(root=root, split="val", labels="json").source().info()
    with pytest.raises(ConversionError, match="stuffthingmaps"):
        CocoConfig(root=root, split="val").source().items()
    with pytest.raises(ConversionError, match="panoptic_val2017.json"):
        CocoConfig(root=root, split="val", labels="panoptic").source().items()
    with pytest.raises(ConversionError, match="captions_val2017.json"):
        CocoConfig(root=root, split="val", labels="none", captions=True).source().items()
    (root / "train2017").mkdir()
    with pytest.raises(ConversionError, match="no .jpg"):
        CocoConfig(root=root, labels="none").source().items()


# ---------------------------------------------------------------------- stuffthingmaps


def make_stuffthingmaps(fixtures: Path, root: Path, png_dir: Path, image_dir: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    pngs = {}
    for jpg in sorted((fixtures / "coco-val4/val2017").glob("*.jpg")):
        link(jpg, image_dir / jpg.name)
        w, h = image_size(jpg)
        values = rng.integers(0, 91, (h, w)).astype(np.uint8)  # things (COCO id - 1)
        values[rng.random((h, w)) < 0.2] = 255  # unlabeled
        values[: h // 4] = rng.choice([91, 140, 181], (h // 4, w))  # a few stuff values
        save_png(png_dir / f"{jpg.stem}.png", values)
        pngs[jpg.stem] = values
    return pngs


@pytest.mark.parametrize("layout", ["official", "patchseg"])
def test_stuffthingmaps(fixtures, tmp_path, layout):
    root = tmp_path / "coco"
    if layout == "official":
        pngs = make_stuffthingmaps(fixtures, root, root / "stuffthingmaps/val2017", root / "val2017")
    else:
        pngs = make_stuffthingmaps(fixtures, root, root / "annotations/val2017", root / "images/val2017")
    src = CocoConfig(root=root, split="val").source()
    info = src.info()
    assert info.label_encoding == {
        "space": "coco-stuff-183",
        "unlabeled": 0,
        "from": "stuffthingmaps",
        "rule": "label = (png + 1) % 256",
    }
    assert info.num_classes == 183 and info.has_label and info.dataset == "coco"
    items = src.items()
    assert [it.key for it in items] == sorted(pngs)
    for item in items:
        png_dir = root / ("stuffthingmaps/val2017" if layout == "official" else "annotations/val2017")
        image_dir = root / ("val2017" if layout == "official" else "images/val2017")
        sizes = (image_dir / f"{item.key}.jpg").stat().st_size, (png_dir / f"{item.key}.png").stat().st_size
        assert item.size == sum(sizes)
        sample = src.load(item)
        expected = (pngs[item.key].astype(int) + 1) % 256
        np.testing.assert_array_equal(sample.label, expected)
        assert sample.label.max() <= 182 and (sample.label == 0).any() and (sample.label == 182).any()
        assert sample.meta == {"image_id": int(item.key)} and sample.txt is None


def test_stuffthingmaps_bad_pngs(fixtures, tmp_path):
    root = tmp_path / "coco"
    png_dir = root / "stuffthingmaps/val2017"
    make_stuffthingmaps(fixtures, root, png_dir, root / "val2017")
    stems = sorted(p.stem for p in png_dir.glob("*.png"))
    w, h = image_size(root / f"val2017/{stems[0]}.jpg")

    out_of_space = np.zeros((h, w), np.uint8)
    out_of_space[5, 5] = 200
    save_png(png_dir / f"{stems[0]}.png", out_of_space)  # 200 -> 201 >= 183
    (png_dir / f"{stems[1]}.png").write_bytes(b"")  # zero bytes
    (png_dir / f"{stems[2]}.png").unlink()  # missing
    save_png(png_dir / f"{stems[3]}.png", np.zeros((h, w, 3), np.uint8))  # RGB

    src = CocoConfig(root=root, split="val").source()
    items = {it.key: it for it in src.items()}
    reasons = {}
    for stem in stems:
        with pytest.raises(SampleError) as e:
            src.load(items[stem])
        assert e.value.path == str(png_dir / f"{stem}.png")
        reasons[stem] = e.value.reason
    assert "200" in reasons[stems[0]] and "183" in reasons[stems[0]]
    assert "empty" in reasons[stems[1]]
    assert "not found" in reasons[stems[2]]
    assert "RGB" in reasons[stems[3]]


# ---------------------------------------------------------------------- panoptic


def make_panoptic_layout(fixtures: Path, tmp: Path, edit=None) -> Path:
    sample = fixtures / "coco-panoptic2/sample_data"
    root = tmp / "coco"
    data = read_json(sample / "panoptic_examples.json")
    data["categories"] = read_json(fixtures / "coco-panoptic2/panoptic_coco_categories.json")
    if edit:
        edit(data)
    write_json(root / "annotations/panoptic_val2017.json", data)
    for jpg in sorted((sample / "input_images").glob("*.jpg")):
        link(jpg, root / "val2017" / jpg.name)
        png = f"{jpg.stem}.png"
        link(sample / "panoptic_examples" / png, root / "annotations/panoptic_val2017" / png)
    return root


def test_panoptic(fixtures, tmp_path):
    root = make_panoptic_layout(fixtures, tmp_path)
    src = CocoConfig(root=root, split="val", labels="panoptic").source()
    info = src.info()
    categories = read_json(fixtures / "coco-panoptic2/panoptic_coco_categories.json")
    ids = sorted(c["id"] for c in categories)
    assert info.dataset == "coco-panoptic" and info.num_classes == 134
    assert info.extra["category_ids"] == [0] + ids
    assert info.classes[1] == "person" and info.classes[-1] == "rug-merged"
    assert info.label_encoding["space"] == "coco-panoptic-133" and "VOID = 0" in info.label_encoding["rule"]
    index = {cid: i + 1 for i, cid in enumerate(ids)}

    data = read_json(root / "annotations/panoptic_val2017.json")
    detection = read_json(fixtures / "coco-panoptic2/sample_data/panoptic_coco_detection_format.json")
    from pycocotools import mask as mask_utils

    items = src.items()
    assert [it.key for it in items] == ["000000142238", "000000439180"]
    for item in items:
        sample = src.load(item)
        png = root / f"annotations/panoptic_val2017/{item.key}.png"
        assert item.size == (root / f"val2017/{item.key}.jpg").stat().st_size + png.stat().st_size
        assert sample.meta == {"image_id": int(item.key)}
        # independent decode of the PNG
        rgb = np.asarray(Image.open(png)).astype(np.int64)
        seg_ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        ann = next(a for a in data["annotations"] if a["image_id"] == int(item.key))
        expected = np.zeros(seg_ids.shape, np.int64)
        for seg in ann["segments_info"]:
            expected[seg_ids == seg["id"]] = index[seg["category_id"]]
        np.testing.assert_array_equal(sample.label, expected)
        assert (sample.label == 0).any() and len(np.unique(sample.label)) > 4
        # the same segments as COCO RLE
        from_rle = np.zeros(seg_ids.shape, np.int64)
        for det in detection["annotations"]:
            if det["image_id"] == int(item.key):
                from_rle[mask_utils.decode(det["segmentation"]) == 1] = index[det["category_id"]]
        np.testing.assert_array_equal(sample.label, from_rle)


def test_panoptic_bad_data(fixtures, tmp_path):
    def drop_segment(data):
        data["annotations"][0]["segments_info"].pop(3)  # image 142238

    def wrong_height(data):
        next(im for im in data["images"] if im["id"] == 439180)["height"] = 361

    root = make_panoptic_layout(fixtures, tmp_path, lambda d: (drop_segment(d), wrong_height(d)))
    src = CocoConfig(root=root, split="val", labels="panoptic").source()
    items = {it.key: it for it in src.items()}
    with pytest.raises(SampleError, match="segments_info") as e:
        src.load(items["000000142238"])
    assert e.value.path == str(root / "annotations/panoptic_val2017/000000142238.png")
    with pytest.raises(SampleError, match="361") as e:
        src.load(items["000000439180"])
    assert e.value.path == str(root / "annotations/panoptic_val2017/000000439180.png")

    # the image's annotation is found by image_id; without one the sample is unreadable
    root = make_panoptic_layout(fixtures, tmp_path / "b", lambda d: d["annotations"].pop(0))
    src = CocoConfig(root=root, split="val", labels="panoptic").source()
    items = {it.key: it for it in src.items()}
    with pytest.raises(SampleError) as e:
        src.load(items["000000142238"])
    assert e.value.path == str(root / "val2017/000000142238.jpg")
    assert src.load(items["000000439180"]).label.shape == (360, 640)


# ---------------------------------------------------------------------- captions


def test_captions(fixtures, tmp_path):
    root = tmp_path / "coco"
    for jpg in (fixtures / "coco-val4/val2017").glob("*.jpg"):
        link(jpg, root / "val2017" / jpg.name)
    link(fixtures / "coco-val4/annotations/instances_val2017.json", root / "annotations/instances_val2017.json")
    captions = fixtures / "coco-excerpts/captions_val2017.json_samples.json"
    link(captions, root / "annotations/captions_val2017.json")
    expected = "\n".join(
        a["caption"].strip()
        for a in sorted(read_json(captions)["annotations"], key=lambda a: a["id"])
        if a["image_id"] == 289393
    )
    assert expected.count("\n") == 3 and "toy animals" in expected

    src = CocoConfig(root=root, split="val", labels="none", captions=True).source()
    info = src.info()
    assert info.has_txt and not info.has_label and info.dataset == "coco"
    samples = load_all(src)
    assert samples["000000289393"].txt == expected
    assert samples["000000289393"].label is None and samples["000000289393"].meta == {"image_id": 289393}
    assert [s.txt for k, s in samples.items() if k != "000000289393"] == ["", "", ""]

    # captions beside labels
    src = CocoConfig(root=root, split="val", labels="json", captions=True).source()
    sample = load_all(src)["000000289393"]
    assert sample.txt == expected and sample.label.shape == (480, 640)


# ---------------------------------------------------------------------- CLI


def test_cli_config(tmp_path, capsys):
    import tyro

    args = ["--root", str(tmp_path), "--split", "val", "--labels", "panoptic", "--captions"]
    cfg = tyro.cli(CocoConfig, args=args)
    assert cfg == CocoConfig(root=tmp_path, split="val", labels="panoptic", captions=True)
    assert isinstance(cfg.source(), CocoSource)
    with pytest.raises(SystemExit):
        tyro.cli(CocoConfig, args=["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ["COCO 2017 root", "first that exists", "stuff_{split}2017.json", "one per line"]:
        assert phrase in text


# ---------------------------------------------------------------------- COCO-Object


def groupvit_coco_object(mask: np.ndarray) -> np.ndarray:
    """GroupViT's mapping, transcribed from convert_dataset/convert_coco_object.py (NVlabs/GroupViT
    at 13b7861): `clsID_to_trID` (lines 23-196) lists the stuffthingmaps values 0..181 that COCO uses,
    numbered 0..170 in order, and 255: 255; the loop at lines 198-202 adds 1 and sets keys > 90 to 0;
    convert_to_trainID (lines 205-209) writes `mask_copy[mask == clsID] = trID` for each key."""
    keys = [*range(11), *range(12, 25), 26, 27, *range(30, 44), *range(45, 65), 66, 69, *range(71, 82)]
    keys += [*range(83, 90), *range(91, 182)]
    cls_id_to_tr_id = {k: i for i, k in enumerate(keys)} | {255: 255}
    assert len(cls_id_to_tr_id) == 172
    assert (cls_id_to_tr_id[12], cls_id_to_tr_id[66], cls_id_to_tr_id[89], cls_id_to_tr_id[181]) == (11, 60, 79, 170)
    for k, v in cls_id_to_tr_id.items():
        cls_id_to_tr_id[k] = v + 1
        if k > 90:
            cls_id_to_tr_id[k] = 0
    mask_copy = mask.copy()
    for cls_id, tr_id in cls_id_to_tr_id.items():
        mask_copy[mask == cls_id] = tr_id
    return mask_copy


# the stuffthingmaps values COCO uses: things (COCO id - 1, 80 of 0..89), stuff 91..181, unlabeled 255
USED_VALUES = [i - 1 for i in range(1, 92) if i not in UNUSED_THING_IDS] + list(range(91, 182)) + [255]


def make_object_layout(root: Path, prepared: bool = False) -> dict[str, np.ndarray]:
    """COCO root with tiny val2017 JPEGs and stuffthingmaps holding every used value; with
    ``prepared``, the last image has only a <stem>_instanceTrainIds.png (the harness's file)."""
    maps = {}
    for n in range(3):
        stem = f"{n + 1:012d}"
        h, w = 12 + n, 16 + n
        rng = np.random.default_rng(n)
        values = rng.choice(USED_VALUES, (h, w)).astype(np.uint8)
        values.ravel()[: len(USED_VALUES)] = USED_VALUES
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (root / "val2017").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "val2017" / f"{stem}.jpg", quality=90)
        if prepared and n == 2:
            save_png(root / "stuffthingmaps/val2017" / f"{stem}_instanceTrainIds.png", groupvit_coco_object(values))
        else:
            save_png(root / "stuffthingmaps/val2017" / f"{stem}.png", values)
        maps[stem] = values
    return maps


def test_coco_object_classes():
    assert len(COCO_OBJECT_CLASSES) == 81 and COCO_OBJECT_CLASSES[0] == "background"
    assert COCO_OBJECT_CLASSES[1:4] == ("person", "bicycle", "car") and COCO_OBJECT_CLASSES[-1] == "toothbrush"
    assert COCO_OBJECT_CLASSES[1:] == tuple(
        n for i, n in enumerate(COCO_STUFF_CLASSES) if 1 <= i <= 91 and i not in UNUSED_THING_IDS
    )


def test_coco_object_matches_groupvit(tmp_path):
    root = tmp_path / "coco"
    maps = make_object_layout(root)
    src = CocoConfig(root=root, split="val", labels="object").source()
    info = src.info()
    assert info.dataset == "coco-object" and info.classes == list(COCO_OBJECT_CLASSES)
    assert info.label_encoding["space"] == "coco-object-81" and "ignore" not in info.label_encoding
    for item in src.items():
        sample = src.load(item)
        expected = groupvit_coco_object(maps[item.key])
        np.testing.assert_array_equal(sample.label, expected)
        assert set(np.unique(sample.label)) == set(range(81))  # every class, no ignore value
        assert sample.label_source == str(root / "stuffthingmaps/val2017" / f"{item.key}.png")


def test_coco_object_convert_verify_inspect(tmp_path, capsys):
    from test_source_voc import cli, png_values, read_back, verify_and_inspect

    from fastloc.shard.manifest import read_manifest

    root, out = tmp_path / "coco", tmp_path / "out"
    maps = make_object_layout(root, prepared=True)
    stems = sorted(maps)
    bad = root / "stuffthingmaps/val2017" / f"{stems[1]}.png"
    save_png(bad, np.full_like(maps[stems[1]], 11))  # COCO id 12 (street sign) is not used: no class
    args = ["coco", "--root", root, "--split", "val", "--labels", "object", "--out", out]
    code, _stdout, stderr = cli(capsys, *args, "--no-progress", "--processes", 1, "--no-fsync")
    assert code == 0, stderr
    split_dir = out / "coco-object" / "val"
    manifest = read_manifest(split_dir)
    assert manifest["classes"] == list(COCO_OBJECT_CLASSES) and manifest["label"]["dtype"] == "uint8"
    skipped = {e["path"]: e["reason"] for e in manifest["report"]["skipped_samples"]}
    assert skipped == {
        str(bad): "label values 11 are not COCO-Stuff ids of the stuffthingmaps "
        + ("(0..181 but the 11 unused thing ids, and 255)")
    }
    samples = read_back(split_dir)
    assert sorted(samples) == [stems[0], stems[2]]  # the last from its _instanceTrainIds.png
    for key, sample in samples.items():
        np.testing.assert_array_equal(png_values(sample["seg.png"]), groupvit_coco_object(maps[key]))

    verify_and_inspect(capsys, split_dir, tmp_path / "sheet.png")


def test_coco_object_bad_inputs(tmp_path):
    root = tmp_path / "coco"
    maps = make_object_layout(root, prepared=True)
    stems = sorted(maps)
    folder = root / "stuffthingmaps/val2017"
    prepared = folder / f"{stems[2]}_instanceTrainIds.png"
    save_png(prepared, np.full_like(maps[stems[2]], 81))
    src = CocoConfig(root=root, split="val", labels="object").source()
    items = {it.key: it for it in src.items()}
    with pytest.raises(SampleError) as e:
        src.load(items[stems[2]])
    assert e.value.path == str(prepared) and e.value.reason == "label values 81 are not COCO-Object classes (0-80)"
    (folder / f"{stems[0]}.png").unlink()
    with pytest.raises(SampleError, match="label PNG not found"):
        src.load(CocoConfig(root=root, split="val", labels="object").source().items()[0])
    # the size check is the writer's: the label map must be the image's size
    save_png(folder / f"{stems[1]}.png", maps[stems[1]][:-1])
    from fastloc.shard.encode import encode_label

    label = src.load(items[stems[1]]).label
    with pytest.raises(SampleError, match="label map is 17x12 but the image is 17x13"):
        encode_label(str(folder / f"{stems[1]}.png"), label, 81, (17, 13))
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    with pytest.raises(ConversionError, match="--labels object reads the COCO-Stuff label PNGs"):
        CocoConfig(root=root, split="val", labels="object").source().items()
