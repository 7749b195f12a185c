"""``python -m fastloc.probe zeroshot`` end to end on tiny towers (random weights): the benchmark's class
names and label rule, the knobs recorded beside the harness's, mIoU equal to mmseg's own computation on
the same predictions, an aligned export read out with its text tower, and bad input as one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastloc.data.shards import open_shards
from fastloc.models.text import class_embeddings, load_text_tower
from fastloc.probe.__main__ import main
from fastloc.probe.dense.slide import image_tensor, read_sample
from fastloc.probe.zeroshot.decide import BENCHMARKS
from fastloc.probe.zeroshot.readout import create_tower
from fastloc.probe.zeroshot.run import label_table
from fastloc.probe.zeroshot.segment import segment

# the tiny ViT's input side; three 32 px windows a side, PAMR off (it has its own tests): seconds a run
SMALL = ["--short-side", "64", "--window", "32", "16", "--pamr", "off", "--device", "cpu", "--precision", "fp32"]
TINY = ["--backbone", "tiny", "--weights", "random", "--text-weights", "random"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One text-embedding cache for the module: each class-name list is encoded once."""
    return tmp_path_factory.mktemp("zeroshot-cache")


def command(data: Path, out: Path, cache: Path, *extra) -> list[str]:
    paths = ["--out", str(out / "runs"), "--results", str(out / "results"), "--cache-dir", str(cache)]
    return ["zeroshot", str(data), *TINY, *SMALL, *paths, *map(str, extra)]


def mmseg_miou(preds: list[torch.Tensor], labels: list[np.ndarray], classes: int, reduce_zero_label: bool):
    """mmseg 1.x IoUMetric on the same predictions: intersect_and_union per image (its reduce_zero_label
    on the label as LoadAnnotations does it, 255 ignored, torch.histc), totals over the split, IoU =
    intersect / union, mIoU = nanmean (mmseg/evaluation/metrics/iou_metric.py @ v1.1.1)."""
    total_i, total_u = torch.zeros(classes, dtype=torch.float64), torch.zeros(classes, dtype=torch.float64)
    for pred, stored in zip(preds, labels):
        label = torch.from_numpy(stored.astype(np.int64))
        if reduce_zero_label:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        mask = label != 255
        pred, label = pred[mask], label[mask]
        intersect = pred[pred == label]
        area_i = torch.histc(intersect.float(), bins=classes, min=0, max=classes - 1)
        area_p = torch.histc(pred.float(), bins=classes, min=0, max=classes - 1)
        area_l = torch.histc(label.float(), bins=classes, min=0, max=classes - 1)
        total_i += area_i
        total_u += area_p + area_l - area_i
    iou = (total_i / total_u).numpy()
    return float(np.nanmean(iou)), iou


@pytest.mark.parametrize("benchmark, method", [("voc21", "naclip"), ("voc20", "clearclip")])
def test_a_benchmark_scores_as_mmseg_does(voc, tmp_path, cache, benchmark, method):
    """VOC21 (background by threshold, 255 ignored) with SCLIP's class names and NACLIP's knobs; VOC20
    (reduce_zero_label) with ClearCLIP's: the mIoU and every class IoU equal mmseg's IoUMetric on the
    same predictions, made here image by image with the same settings."""
    argv = command(voc, tmp_path, cache, "--benchmark", benchmark, "--method", method, "--pictures", 2)
    assert main(argv) == 0
    (run,) = (tmp_path / "runs").iterdir()
    result = json.loads((run / "result.json").read_text())
    protocol, bench = result["protocol"], BENCHMARKS[benchmark]
    assert (protocol["benchmark"], protocol["method"], protocol["readout"]) == (benchmark, method, "naclip")
    overridden = (
        ["pamr", "short_side", "window"] if method == "naclip" else ["short_side", "window"]
    )  # ClearCLIP: no PAMR
    assert protocol["overridden"] == overridden
    assert protocol["harness_settings"]["short_side"] == bench.settings(method).short_side
    assert protocol["class_names"] == bench.settings(method).class_names
    classes = 21 if benchmark == "voc21" else 20
    assert len(result["per_class_iou"]["miou"]) == classes == result["dataset"]["num_classes"]
    rows = (tmp_path / "results" / "dense-zeroshot-voc.csv").read_text().splitlines()
    rows = list(csv.DictReader(rows, skipinitialspace=True))
    assert [r["figure"] for r in rows] == ["miou", "pixel_accuracy"]
    assert (run / "predictions.png").stat().st_size > 10_000

    # the same predictions, made here, scored by mmseg's code
    val = open_shards(voc / "val")
    settings = BENCHMARKS[benchmark].settings(method)
    settings = type(settings)(**{**settings.__dict__, "short_side": 64, "window": (32, 16), "pamr": False})
    torch.manual_seed(0)  # as the run: everything seeded from --seed 0, then the text tower, then the image tower
    text, tokenizer = load_text_tower("tiny", "random")
    lines = (Path(__file__).parents[1] / "fastloc/probe/zeroshot/classes").joinpath(
        "clearclip" if method == "clearclip" else "sclip", f"cls_{benchmark}.txt"
    )
    names = lines.read_text().splitlines()  # the run's cache, keyed by the tower's weights: a hit is this tower's
    embeddings, query_class = class_embeddings(text, tokenizer, names, cache_dir=cache / "text")
    model = create_tower("tiny", "random").eval()
    preds, labels = [], []
    for g in range(val.num_samples):
        image, label = read_sample(val, g)
        x = image_tensor(image, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])[0]
        preds.append(segment(model, x, embeddings, query_class, settings, "naclip", classes))
        labels.append(label)
    miou, iou = mmseg_miou(preds, labels, classes, bench.reduce_zero_label)
    assert result["selected"]["miou"] == pytest.approx(miou, abs=1e-12)
    ours = np.array([np.nan if v is None else v for v in result["per_class_iou"]["miou"]])
    np.testing.assert_allclose(ours, iou, rtol=0, atol=1e-12)
    assert result["pixels_void"] > 0  # 255 borders (and, for VOC20, background) were left out


def test_coco_stuff_ids_map_to_mmsegs_171_classes():
    """fastloc's 183-id COCO-Stuff space (0 unlabeled, COCO ids 1..182) -> mmseg's 171 used ids in order;
    an unused id or any value beyond the stored classes is out of range (C), not silently ignored."""
    from fastloc.shard.sources.coco import COCO_STUFF_CLASSES, UNUSED_THING_IDS

    manifest = {
        "classes": list(COCO_STUFF_CLASSES),
        "label": {"dtype": "uint8"},
        "source": {"unused_thing_ids": list(UNUSED_THING_IDS)},
    }
    table, classes = label_table(BENCHMARKS["coco_stuff164k"], manifest)
    assert classes == 171
    assert table[0] == -1 and table[1] == 0 and table[13] == 11 and table[92] == 80 and table[182] == 170
    assert all(table[i] == 171 for i in UNUSED_THING_IDS)  # never in the label maps: out of range if they are
    assert table[-1] == 171
    names = [
        line.split(", ")[0]
        for line in (Path(__file__).parents[1] / "fastloc/probe/zeroshot/classes/sclip")
        .joinpath("cls_coco_stuff.txt")
        .read_text()
        .splitlines()
    ]
    assert len(names) == 171


def test_an_aligned_export_reads_out_with_its_text_tower(align_run, align_shards, tmp_path, cache):
    """An export names its backbone, so the paired text tower is found; --head FILE puts a projection on
    it; the synthetic set's own class names (the manifest benchmark) are the queries."""
    from fastloc.align.__main__ import main as align

    export = tmp_path / "enc.safetensors"
    assert align(["export", str(align_run), "--out", str(export)]) == 0
    head = tmp_path / "head.safetensors"
    save_file({"head.weight": torch.randn(96, 96) / 10, "head.bias": torch.zeros(96)}, str(head))
    argv = command(align_shards, tmp_path, cache, "--max-images", 3, "--pictures", 0, "--head", head)
    argv[argv.index("tiny")] = str(export)
    argv.remove("--weights"), argv.remove("random")
    assert main(argv) == 0
    (run,) = (tmp_path / "runs").iterdir()
    result = json.loads((run / "result.json").read_text())
    assert result["protocol"]["benchmark"] == "manifest" and result["protocol"]["text_tower"] == "tiny"
    assert result["protocol"]["projection"] == str(head) and result["protocol"]["images"] == 3
    assert result["protocol"]["class_names"] == "the shard set's manifest"
    assert not (run / "predictions.png").exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--benchmark", "context60"], "60 class lines, but voc under the context60 benchmark has 21 classes"),
        (["--class-names", "NAMES"], "3 class lines, but voc under the voc21 benchmark has 21 classes"),
        (["--backbone", "in1k-vit-s"], "in1k-vit-s: no text tower is paired with it"),
        (["--benchmark", "voc99"], "--benchmark"),
        (["--window", "16", "32"], "--window"),
    ],
    ids=["wrong-benchmark", "class-file", "no-text-tower", "unknown-benchmark", "window"],
)
def test_bad_input_is_one_line_and_writes_nothing(voc, tmp_path, cache, capsys, extra, words):
    names = tmp_path / "names.txt"
    names.write_text("background\ncat\ndog\n")
    extra = [str(names) if e == "NAMES" else e for e in extra]
    assert main(command(voc, tmp_path / "out", cache, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert any(w in err[0] for w in words.split("|")), err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "benchmark, dataset",
    [
        ("voc21", "voc"),
        ("voc20", "voc"),
        ("context60", "context"),
        ("context59", "context"),
        ("coco_object", "coco-object"),
        ("coco_stuff164k", "coco"),
        ("city_scapes", "cityscapes"),
        ("ade20k", "ade20k"),
    ],
)
def test_each_benchmark_fits_its_converters_label_set(benchmark, dataset):
    """Each harness class-name file (every method's) has one line per class of the label set its converter
    writes, under the benchmark's rule (reduce_zero_label, COCO-Stuff's 171); the default benchmark of the
    dataset is the 0-keeping one. Spot checks that the lines name the same classes."""
    from fastloc.probe.zeroshot.config import DEFAULT_BENCHMARK
    from fastloc.probe.zeroshot.config import ZeroShotConfig as Config
    from fastloc.probe.zeroshot.run import checked_lines, class_lines
    from fastloc.shard.sources import cityscapes, coco, context, voc

    stored = {
        "voc": voc.VOC_CLASSES,
        "context": context.CONTEXT_CLASSES,
        "coco-object": coco.COCO_OBJECT_CLASSES,
        "coco": coco.COCO_STUFF_CLASSES,
        "cityscapes": cityscapes.CITYSCAPES_CLASSES,
        "ade20k": ["other"] + [f"ade class {i}" for i in range(1, 151)],
    }[dataset]
    manifest = {"classes": list(stored), "label": {"dtype": "uint8", "ignore": 255}}
    manifest["source"] = {"unused_thing_ids": list(coco.UNUSED_THING_IDS)}
    bench = BENCHMARKS[benchmark]
    table, classes = label_table(bench, manifest)
    for method in ("naclip", "sclip", "clearclip"):
        cfg = Config(data=Path("."), method=method)
        lines, source = class_lines(cfg, bench, stored)
        checked_lines(lines, classes, source, bench, dataset)  # raises on a mismatch
        if dataset in ("voc", "context", "cityscapes"):  # the first synonym is the stored name, spelling aside
            kept = [name for value, name in enumerate(stored) if 0 <= table[value] < classes]
            firsts = [line.split(", ")[0].replace(" ", "").lower() for line in lines]
            same = sum(a == b.replace(" ", "").lower() for a, b in zip(firsts, kept))
            assert same >= classes // 2, (firsts, kept)
    assert DEFAULT_BENCHMARK[dataset] in (benchmark, benchmark.replace("59", "60").replace("voc20", "voc21"))


def test_a_blank_line_inside_a_class_file_is_refused_and_trailing_ones_end_it():
    """A blank line inside would shift every later class by one: refused; blank lines at the end are not classes."""
    from fastloc.probe.zeroshot.run import ClassNamesError, checked_lines

    bench = BENCHMARKS["voc21"]
    assert checked_lines(["sky", "cat", "dog", "", ""], 3, "f.txt", bench, "voc") == ["sky", "cat", "dog"]
    with pytest.raises(ClassNamesError, match="f.txt: line 2 is empty"):
        checked_lines(["sky", "", "dog"], 3, "f.txt", bench, "voc")
