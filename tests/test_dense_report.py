"""Dense protocols' results: result.json and the CSV rows they write, and `python -m fastloc.probe
compare` on them (the figures by name, the protocol's knobs checked, the per-class IoU plot)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from fastloc.probe.__main__ import main
from fastloc.probe.compare import compare
from fastloc.probe.dense.config import LINEAR, OverclusterConfig
from fastloc.probe.dense.data import LabelSpace
from fastloc.probe.dense.report import write_result
from fastloc.probe.report import SEPARATOR


def written(tmp_path, name: str, figures: dict, per_class: list, knobs: dict | None = None):
    cfg = OverclusterConfig(data=tmp_path, out=tmp_path / "runs", results=tmp_path / "results", name=name)
    names = ["background", "cat", None]
    data = SimpleNamespace(
        dataset="voc",
        train=SimpleNamespace(root=tmp_path / "train"),
        val=SimpleNamespace(root=tmp_path / "val"),
        classes=names,
    )
    labels = LabelSpace(names, 255, False)
    model = torch.nn.Identity()
    model.blocks, model.num_features = [0, 0], 8
    model.patch_embed = SimpleNamespace(img_size=(64, 64), patch_size=(8, 8))
    model.pretrained_cfg, model.num_prefix_tokens = {}, 1
    protocol = {"name": "overcluster", "clusters": [30, 3], "mask_size": 100, **(knobs or {})}
    per_class_iou = {name: per_class for name in figures}
    return write_result(cfg, protocol, data, labels, model, figures, per_class_iou)


def test_result_json_and_csv_rows(tmp_path):
    run = written(tmp_path, "a", {"miou_k30": 0.5, "miou_k3": 0.25}, [0.6, 0.4, None])
    result = json.loads((run / "result.json").read_text())
    assert result["protocol"] == {"name": "overcluster", "clusters": [30, 3], "mask_size": 100}
    assert result["selected"] == {"miou_k30": 0.5, "miou_k3": 0.25}
    assert result["dataset"]["ignore"] == 255 and result["dataset"]["num_classes"] == 3
    assert result["config"]["name"] == "a"
    rows = (tmp_path / "results" / "dense-overcluster-voc.csv").read_text().splitlines()
    assert rows[0].split(SEPARATOR)[:3] == ["protocol", "dataset", "backbone"] and len(rows) == 3
    assert rows[1].split(SEPARATOR)[6:8] == ["miou_k30", "0.5"]
    assert json.loads(rows[1].split(SEPARATOR, 8)[8][1:-1].replace('""', '"')) == {
        "clusters": [30, 3],
        "mask_size": 100,
    }
    written(tmp_path, "b", {"miou_k30": 0.6}, [0.6, 0.6, None])  # the same file, the header once
    rows = (tmp_path / "results" / "dense-overcluster-voc.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[3].split(SEPARATOR)[6:8] == ["miou_k30", "0.6"]


def test_compare_reads_dense_results(tmp_path, capsys):
    a = written(tmp_path, "a", {"miou_k30": 0.5, "miou_k3": 0.25}, [0.6, 0.4, None])
    b = written(tmp_path, "b", {"miou_k30": 0.6, "miou_k3": 0.2}, [0.7, 0.5, None])
    table, png = compare(a, b)
    lines = table.splitlines()
    assert lines[0] == "a: dino-vit-s · overcluster · voc"
    k30 = next(line for line in lines if line.startswith("miou_k30")).split()
    assert k30[1:] == ["0.5000", "0.6000", "+0.1000"]
    assert next(line for line in lines if line.startswith("miou_k3 ")).split()[3] == "-0.0500"
    assert png.is_file() and png.stat().st_size > 1000
    other = written(tmp_path, "c", {"miou_k30": 0.6}, [0.7, 0.5, None], {"mask_size": 448})
    with pytest.raises(ValueError, match=r"protocol mask_size: 100 \(A\) vs 448 \(B\)"):
        compare(a, other)
    assert main(["compare", str(a), str(other)]) == 2
    assert "not comparable" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["overcluster", "linear", "hummingbird"])
def test_each_protocol_refuses_torchrun_before_touching_anything(protocol, tmp_path, monkeypatch, capsys):
    """A protocol's work is one device's: under torchrun (WORLD_SIZE > 1) it exits 2 with one line."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "train").mkdir()
    assert main([protocol, str(tmp_path), "--out", str(tmp_path / "runs"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"python -m fastloc.probe {'linear-leopart-voc' if protocol == 'linear' else protocol} runs in one" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("protocol", ["overcluster", "linear", "hummingbird"])
def test_each_protocol_gives_the_cpus_figure_on_cuda(protocol, voc, tmp_path):
    """fp32 end to end on CUDA and on the CPU: the same recipe, seeds and (CPU-drawn) random
    streams, so the figures agree up to float rounding in the features and the head's training.
    No Hungarian matching here: the GPU machine may lack scipy."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run on a GPU machine)")
    extra = {
        "overcluster": ["--clusters", "30", "--seeds", "2", "--iterations", "10", "--mask-size", "32"],
        "linear": ["--train-split", "trainaug", "--probe-size", "16", "--epochs", "3"],
        "hummingbird": ["--train-split", "trainaug", "--memory-size", "500", "--matching", "none"],
    }[protocol]
    batch = "--eval-batch-size" if protocol == "hummingbird" else "--batch-size"
    figures = []
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        argv = [protocol, str(voc), "--backbone", "tiny", "--weights", "random", "--image-size", "64", batch, "4"]
        argv += ["--precision", "fp32", "--device", device, "--loader", "cpu", "--workers", "0", *extra]
        argv += ["--out", str(out), "--results", str(out), "--cache-dir", str(out / "cache"), "--name", "run"]
        assert main(argv) == 0
        figures.append(json.loads((out / "run" / "result.json").read_text())["selected"])
    cpu, cuda = figures
    for name, value in cpu.items():
        assert cuda[name] == pytest.approx(value, abs=0.05), name


def test_each_protocol_opens_the_splits_it_needs(voc, tmp_path):
    """overcluster needs only the evaluation split; leopart-voc and hummingbird train on trainaug
    where it is there (their references), dinov3-ade20k on train; --train-split overrides."""
    from fastloc.probe.dense.config import Dinov3Ade20kConfig, HummingbirdConfig, LeopartVocConfig
    from fastloc.probe.dense.data import open_dense_data

    only_val = tmp_path / "only-val"
    only_val.mkdir()
    (only_val / "val").symlink_to(voc / "val")
    data = open_dense_data(OverclusterConfig(data=only_val))
    assert data.train is None and data.val.manifest["split"] == "val" and data.dataset == "voc"
    split = lambda cfg: open_dense_data(cfg).train.manifest["split"]  # noqa: E731
    assert split(LeopartVocConfig(data=voc)) == "trainaug" and split(HummingbirdConfig(data=voc)) == "trainaug"
    assert split(Dinov3Ade20kConfig(data=voc)) == "train"
    assert split(LeopartVocConfig(data=voc, train_split="train")) == "train"
    with pytest.raises(FileNotFoundError, match="no training split .looked for trainaug/manifest.json or train/"):
        open_dense_data(HummingbirdConfig(data=only_val))


@pytest.mark.parametrize(
    "protocol, args",
    [("overcluster", []), *(("linear", ["--protocol", name]) for name in LINEAR), ("hummingbird", [])],
)
def test_every_option_has_help_as_flowing_text(protocol, args, capsys, monkeypatch):
    """python -m fastloc.probe PROTOCOL --help: every field (its base's too) with its docstring on one line."""
    import dataclasses

    from test_bench import field_docs

    from fastloc.probe.dense.config import PROTOCOLS, linear_config

    cfg = linear_config(args) if protocol == "linear" else PROTOCOLS[protocol]
    docs = {}
    for klass in reversed(cfg.__mro__):
        if dataclasses.is_dataclass(klass):
            docs |= field_docs(klass)
    fields = [f.name for f in dataclasses.fields(cfg)]
    assert [f for f in fields if not docs.get(f, "").strip()] == [], f"{protocol}: options without help"
    monkeypatch.setenv("COLUMNS", "400")
    assert main([protocol, *args, "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for field in fields:
        option = "DATA" if field == "data" else "--" + field.replace("_", "-")  # the one positional
        assert any(option in line for line in lines), f"{protocol}: {option} not in --help"
        text = " ".join(docs[field].split())
        assert any(text in line for line in lines), f"{protocol} {option}: help broken over lines: {text!r}"
