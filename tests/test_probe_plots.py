"""Patch-Seg pictures and the comparison of two results, on small synthetic result dicts."""

import json
import math
import re

import numpy as np
import pytest
import torch
import tyro
from PIL import Image

from fastloc.probe.compare import CompareConfig, comparable, compare, compare_table, load_result, run_compare
from fastloc.probe.plots import DPI, class_colors, plot_comparison, plot_predictions, plot_recall_by_class

NAMES = ["unlabeled", "person", None, "car", "sky", "grass"]
POSITIVES = [10, 0, 5, 7, 3, 2]  # class 1 has no positives: not valid


def make_metrics(epoch, macro_recall, recall, num_classes):
    """One epoch's metrics; class 3 is never predicted, so its precision and macro precision are NaN."""
    positives = (POSITIVES * num_classes)[:num_classes]
    recall = [r if p else None for r, p in zip(recall, positives)]
    precision = [0.5 if p else None for p in positives]
    precision[3] = None
    return {
        "epoch": epoch,
        "loss": 0.3,
        "accuracy": 0.9,
        "macro_accuracy": 0.8,
        "macro_recall": macro_recall,
        "macro_precision": None,
        "macro_precision_nansafe": 0.5,
        "macro_f1": None,
        "macro_f1_nansafe": 0.4,
        "macro_ap": 0.6,
        "valid_classes": sum(p > 0 for p in positives),
        "images": 4,
        "patches": 784,
        "mean_prevalence": 0.1,
        "per_class": {
            "recall": recall,
            "precision": precision,
            "f1": precision,
            "accuracy": [0.9] * num_classes,
            "ap": [0.6] * num_classes,
            "positives": positives,
            "predicted": [0 if c == 3 else 4 for c in range(num_classes)],
        },
        "by_size": {
            "edges": [i / 10 for i in range(11)],
            "micro_recall": [None] + [0.1 * i for i in range(1, 10)],
            "macro_recall": [None] + [macro_recall] * 9,
            "positives": [0] + [3] * 9,
        },
        "groups": {
            "things": {
                "macro_recall": macro_recall - 0.1,
                "macro_precision_nansafe": 0.5,
                "macro_ap": 0.6,
                "valid_classes": 2,
            },
            "stuff": {
                "macro_recall": macro_recall + 0.1,
                "macro_precision_nansafe": 0.5,
                "macro_ap": 0.6,
                "valid_classes": 2,
            },
        },
    }


def make_result(backbone="clip-vit-b", macro_recall=0.5, shift=0.0, reduction="union", num_classes=6):
    """A result.json dict with C classes and 2 epochs, the second one selected."""
    recall = [min(1.0, 0.2 + 0.12 * c + shift) for c in range(num_classes)]
    epochs = [
        make_metrics(1, macro_recall - 0.05, [r - 0.05 for r in recall], num_classes),
        make_metrics(2, macro_recall, recall, num_classes),
    ]
    names = (NAMES * num_classes)[:num_classes]
    return {
        "protocol": {
            "name": "patch-seg",
            "reduction": reduction,
            "image_size": 224,
            "patch_size": 16,
            "grid": 14,
            "threshold": 0.5,
            "epochs": 2,
            "batch_size": 32,
            "feature_dtype": "bfloat16",
            "world_size": 1,
        },
        "dataset": {
            "name": "coco",
            "num_classes": num_classes,
            "classes": names,
            "groups": {"things": [1, 2, 3], "stuff": [4, 5]},
        },
        "backbone": {"name": backbone},
        "head": "transformer",
        "selected_epoch": 1,
        "epochs": epochs,
        "selected": epochs[1],
        "last": epochs[1],
        "flags": [],
    }


def write(path, result):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, allow_nan=False))
    return path


def open_png(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0  # [H, W, 3]


def test_recall_by_class_scales_with_the_class_count(tmp_path):
    small = open_png(plot_recall_by_class(make_result(), tmp_path / "small.png"))
    coco = open_png(plot_recall_by_class(make_result(num_classes=183), tmp_path / "coco.png"))
    assert small.shape[1] == coco.shape[1] == 8 * DPI
    assert 300 <= small.shape[0] < coco.shape[0]
    assert coco.shape[0] > 183 * 0.12 * DPI  # at least ~0.12 inch per class: the labels stay readable


def test_predictions_draw_each_class_in_its_palette_colour(tmp_path):
    k, size, grid = 2, 32, 4
    images = torch.full((k, 3, size, size), 0.5)
    targets = torch.full((k, grid, grid), 3, dtype=torch.int64)
    predictions = torch.full((k, grid, grid), 5, dtype=torch.int64)
    targets[1], predictions[1, :2] = 4, 4  # class 4 in both columns of the second row
    picture = open_png(plot_predictions(images, targets, predictions, NAMES, tmp_path / "pred.png", "title"))
    height, width = picture.shape[:2]
    assert width == round(7.2 * DPI) and height > 2 * 2.4 * DPI

    def panel(class_id):
        """The bounding box of the big areas in the class's palette colour (the legend swatch is small)."""
        mask = np.abs(picture - class_colors(class_id)).max(axis=-1) < 3 / 255
        cols, rows = mask.sum(axis=0), mask.sum(axis=1)
        cols, rows = np.flatnonzero(cols > cols.max() / 3), np.flatnonzero(rows > rows.max() / 3)
        return cols.mean() / width, rows.mean() / height, len(cols) / width

    x, y, share = panel(3)  # ground truth of row 0: the middle column, the upper half
    assert 1 / 3 < x < 2 / 3 and y < 0.5 and share > 0.15
    x, y, _ = panel(5)  # prediction of row 0 (and half of row 1): the right column
    assert x > 2 / 3
    mask = np.abs(picture - class_colors(4)).max(axis=-1) < 3 / 255
    lower = mask[height // 2 :]
    middle, right = lower[:, width // 3 : 2 * width // 3].sum(), lower[:, 2 * width // 3 :].sum()
    assert middle > 1000 and right > 300  # the same colour for class 4 in both columns


def test_class_colors_are_fixed_per_id():
    colors = class_colors(np.array([[0, 1], [2, 1]]))
    assert colors.shape == (2, 2, 3)
    np.testing.assert_allclose(colors[0, 1], colors[1, 1])
    assert not np.allclose(colors[0, 1], colors[1, 0])
    np.testing.assert_allclose(class_colors(7), class_colors([7])[0])


def test_comparison_plot(tmp_path):
    a, b = make_result("clip-vit-b"), make_result("clip-vit-b-aligned", macro_recall=0.625, shift=0.1)
    both = open_png(plot_comparison(a, b, tmp_path / "both.png"))
    b["selected"]["by_size"] = None
    top_only = open_png(plot_comparison(a, b, tmp_path / "top.png", labels=("base", "aligned")))
    assert both.shape[1] == top_only.shape[1] == 9 * DPI
    assert both.shape[0] > top_only.shape[0] + 2 * DPI  # the size panel is left out without by_size


def test_load_result_names_the_path_and_the_problem(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(ValueError, match=re.escape(str(missing)) + ".*no such file"):
        load_result(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(broken)) + ".*not valid JSON"):
        load_result(broken)
    other = write(tmp_path / "other.json", {"loss": 1.0})
    with pytest.raises(ValueError, match=re.escape(str(other)) + ".*not a probe result"):
        load_result(other)
    listed = write(tmp_path / "list.json", [1, 2])
    with pytest.raises(ValueError, match=re.escape(str(listed)) + ".*not a probe result"):
        load_result(listed)
    run = tmp_path / "run"
    write(run / "result.json", make_result())
    assert load_result(run)["head"] == "transformer"  # a run directory stands for its result.json


def test_comparable_lists_protocol_differences():
    assert comparable(make_result(), make_result("other", shift=0.1)) == []
    lines = comparable(make_result(), make_result(reduction="majority", num_classes=7))
    assert any(line.startswith("reduction: union (A) vs majority (B)") for line in lines)
    assert any(line.startswith("number of classes: 6 (A) vs 7 (B)") for line in lines)
    assert any(line.startswith("valid classes: 1 only in B") for line in lines)  # class 6 exists only in B


def test_compare_table_numbers():
    a, b = make_result(macro_recall=0.5), make_result("aligned", macro_recall=0.625)
    b["selected"]["macro_precision"] = 0.7
    table = compare_table(a, b, labels=("base", "aligned"))
    rows = {m[1]: list(m.groups()[1:]) for m in re.finditer(r"^(\S.*?)\s+(\S+)\s+(\S+)\s+(\S+)$", table, re.M)}
    assert "aligned - base" in table
    assert rows["macro recall"] == ["0.5000", "0.6250", "+0.1250"]
    assert rows["macro precision"] == ["nan", "0.7000", "nan"]
    assert rows["macro recall, things"] == ["0.4000", "0.5250", "+0.1250"]
    assert rows["macro recall, size 0.0-0.1"] == ["nan", "nan", "nan"]
    assert rows["macro recall, size 0.9-1.0"][2] == "+0.1250"


def test_compare_writes_the_plot_and_refuses_other_protocols(tmp_path):
    a = write(tmp_path / "base" / "result.json", make_result())
    b = write(tmp_path / "aligned" / "result.json", make_result("aligned", macro_recall=0.6))
    table, png = compare(a, b, None)
    assert png == tmp_path / "aligned" / "compare-base-vs-aligned.png" and png.stat().st_size > 0
    assert "base - " not in table and "aligned - base" in table
    majority = write(tmp_path / "majority.json", make_result(reduction="majority"))
    with pytest.raises(ValueError, match="not comparable: reduction: union"):
        compare(a, majority, tmp_path / "x.png")
    table, png = compare(a, majority, tmp_path / "x.png", ("A", "B"), force=True)
    assert table.startswith("warning: ") and "reduction" in table.splitlines()[0]
    assert png == tmp_path / "x.png" and png.stat().st_size > 0


def test_run_compare_end_to_end(tmp_path, capsys):
    a = write(tmp_path / "a.json", make_result())
    b = write(tmp_path / "b.json", make_result(macro_recall=0.75))
    out = tmp_path / "plots"
    out.mkdir()
    cfg = tyro.cli(CompareConfig, args=[str(a), str(b), "--out", str(out), "--labels", "base", "aligned"])
    assert run_compare(cfg) == 0
    printed = capsys.readouterr().out
    png = out / "compare-a-vs-b.png"
    assert f"plot: {png}" in printed and png.stat().st_size > 0
    macro = next(line for line in printed.splitlines() if line.startswith("macro recall "))
    assert math.isclose(float(macro.split()[-1]), 0.25)
