"""``python -m fastloc.probe card``: one card of every protocol whose data is present, on tiny data and
the tiny random ViT (plus a tiny export at another resolution as the second backbone).

A first card runs the protocols with data and lists the others as "no data: PATH"; a second reuses
every result and recomputes nothing; two backbones stand side by side with their differences and
the resolution warning; card.md, card.csv and card.json agree on every number and card.png is
drawn; a changed knob reruns only its protocol; bad input is one line; the SLURM path submits one
array to a real local SLURM (skipped, saying why, where there is none)."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastloc.probe.__main__ import main

KNOBS = {  # each protocol at the tiny ViT's 64 px, in seconds
    "patch-seg-coco": "--epochs 1 --batch-size 16 --predictions 0 --head linear",
    "overcluster": "--image-size 64 --clusters 8 4 --seeds 1 --iterations 5 --restarts 1 --mask-size 32 --batch-size 4",
    "linear-leopart-voc": "--image-size 64 --epochs 1 --batch-size 8 --probe-size 32",
    "hummingbird": "--image-size 64 --memory-size 0 --neighbours 5",
    "knn": "--k 5",
    "zeroshot": "--text-weights random --short-side 64 --window 32 32 --pamr off --pictures 0",
}
RAN = ("patch-seg-coco", "overcluster", "linear-leopart-voc", "hummingbird", "knn", "zeroshot")
NO_DATA = ("patch-seg-ade20k", "linear-dinov3-ade20k")  # no shards/ade20k


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Path:
    """The folder of the session's data, export and runs (conftest keeps this file on one xdist worker)."""
    return tmp_path_factory.mktemp("card")


def make_data(root: Path) -> dict[str, str]:
    """shards/voc (VOC's layout converted) and a synthetic set with train and val (Patch-Seg and k-NN's)."""
    from dense_data import voc_shards

    from fastloc.shard.convert import convert
    from fastloc.shard.sources.synthetic import SyntheticConfig

    voc = voc_shards(root)
    for split, count in (("train", 32), ("val", 16)):
        sizes = {"min_size": 48, "max_size": 96, "shard_samples": 16}
        out = root / "synthetic-root"
        convert(
            SyntheticConfig(out=out, split=split, num_samples=count, processes=1, progress=False, fsync=False, **sizes)
        )
    return {"shards": str(voc.parent), "synthetic": str(root / "synthetic-root" / "synthetic")}


def make_export(path: Path) -> str:
    """A tiny ViT written as python -m fastloc.align export writes one, at 32 px (the card's other resolution)."""
    from safetensors.torch import save_file

    from fastloc.models.registry import backbone, create_model

    entry = backbone("tiny")
    kwargs = {**entry.kwargs, "img_size": 32}
    meta = {"backbone": "tiny", "timm_id": entry.timm_id, "timm_kwargs": kwargs, "soft_cap": None, "norm_eps": 1e-6}
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in create_model("tiny", "random", img_size=32).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"fastloc": json.dumps({**meta, "untrained": [], "step": 1})})
    return str(path)


@pytest.fixture(scope="session")
def data(shared) -> dict[str, Path]:
    return {k: Path(v) for k, v in make_data(shared / "card-data").items()}


@pytest.fixture(scope="session")
def export(shared) -> Path:
    return Path(make_export(shared / "card-export" / "encoder-best.safetensors"))


def argv(data: dict[str, Path], out: Path, *backbones, cache: Path | None = None, **knobs) -> list[str]:
    """A card's command line on the test data, every protocol at the tiny ViT's scale on CPU."""
    chosen = {**KNOBS, **knobs}
    args = ["card", *map(str, backbones), "--shards", str(data["shards"]), "--weights", "random"]
    args += ["--data", f"patch-seg-coco={data['synthetic']}", f"knn={data['synthetic']}"]
    args += ["--precision", "fp32", "--device", "cpu", "--loader", "cpu", "--workers", "0"]
    args += ["--out", str(out), "--results", str(out / "results"), "--cache-dir", str(cache or out / "cache")]
    return [*args, "--knobs", *(f"{name}={text}" for name, text in chosen.items())]


def card_json(out: Path, name: str) -> dict:
    return json.loads((out / "cards" / name / "card.json").read_text())


def statuses(card: dict) -> dict[tuple[str, str], str]:
    return {(run["protocol"], run["label"]): run["status"] for run in card["runs"]}


def card_texts(folder: Path) -> dict:
    """A card as written: card.json's content, card.md's and card.csv's text (kept: later cards rewrite them)."""
    texts = {"folder": str(folder), "md": (folder / "card.md").read_text(), "csv": (folder / "card.csv").read_text()}
    return {**texts, "card": json.loads((folder / "card.json").read_text())}


@pytest.fixture(scope="session")
def first_card(shared, data) -> dict:
    """A first card of the tiny ViT (every protocol with data run) in the shared runs folder."""
    assert main(argv(data, shared / "card-runs", "tiny")) == 0
    return card_texts(shared / "card-runs" / "cards" / "tiny")


@pytest.fixture(scope="session")
def first(first_card, shared) -> Path:
    return shared / "card-runs"


def test_a_first_card_runs_every_protocol_with_data_and_lists_the_others(first_card, data):
    card = first_card["card"]
    ade = data["shards"] / "ade20k"
    assert statuses(card) == {
        **{(p, "tiny"): "ran" for p in RAN},
        **{(p, "tiny"): f"no data: {ade}" for p in NO_DATA},
    }
    assert [r["protocol"] for r in card["rows"]] == [p for p in RAN for _ in range(3 if p == "patch-seg-coco" else 2)]
    knn = next(r for r in card["runs"] if r["protocol"] == "knn")
    assert knn["knobs"]["k"] == 5 and knn["config"]["data"] == str(data["synthetic"])
    assert Path(knn["result"]).is_file() and knn["args"][:2] == ["knn", str(data["synthetic"])]
    text = first_card["md"]
    assert f"| patch-seg-ade20k | tiny | no data: {ade} |  |" in text
    assert "| overcluster | miou_k8 | voc val | 64 px |" in text
    assert "warning: the protocols differ in data (" in text and "Nothing is averaged across protocols" in text


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and "cards" not in p.parts}


def test_a_second_card_reuses_every_result_and_recomputes_nothing(first, pair, data, capsys):
    """After every card of the shared folder (``pair``: nothing else writes there meanwhile)."""
    before = snapshot(first)
    assert main(argv(data, first, "tiny")) == 0
    assert snapshot(first) == before  # no result, cache or results CSV touched
    assert set(statuses(card_json(first, "tiny")).values()) == {"reused", f"no data: {data['shards'] / 'ade20k'}"}
    assert "running" not in capsys.readouterr().out


@pytest.fixture(scope="session")
def pair(first, data, export) -> dict:
    """The card of the tiny ViT and the 32 px export: the first's results reused, the export's run."""
    assert main(argv(data, first, "tiny", export)) == 0
    (folder,) = (p for p in (first / "cards").iterdir() if p.name.startswith("tiny-vs-encoder-best-"))
    return card_texts(folder)


def test_two_backbones_side_by_side_with_their_differences_and_the_resolution_warning(pair):
    card, label = pair["card"], Path(pair["folder"]).name.removeprefix("tiny-vs-")
    ran = statuses(card)
    assert all(ran[(p, "tiny")] == "reused" and ran[(p, label)] == "ran" for p in RAN)
    for row in card["rows"]:
        a, b = row["values"]["tiny"], row["values"][label]
        assert row["differences"][label] == pytest.approx(b - a)
    text = pair["md"]
    assert f"| protocol | metric | data | resolution | tiny | {label} | {label} - tiny |" in text
    assert f"warning: knn: the backbones differ in resolution (tiny: 64 px; {label}: 32 px)" in text
    assert f"warning: patch-seg-coco: the backbones differ in resolution (tiny: 64 px; {label}: 32 px)" in text
    assert "warning: overcluster" not in text  # both at --image-size 64
    differences = text.split("## Differences", 1)[1]
    assert f"- {label}: " in differences and "(export; vit_tiny_patch16_224" in differences
    assert f"knn: protocol image_size: 64 (tiny) vs 32 ({label})" in differences


def md_values(text: str, columns: list[str]) -> dict[tuple[str, str, str], str]:
    lines = [line for line in text.split("\n\n", 2)[1].splitlines()[2:]]
    out = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        for label, cell in zip(columns, cells[4 : 4 + len(columns)]):
            out[(cells[0], cells[1], label)] = cell
    return out


def test_the_markdown_csv_and_json_agree_on_every_number_and_the_figure_is_drawn(pair):
    folder, card = Path(pair["folder"]), pair["card"]
    columns = [b["label"] for b in card["backbones"]]
    md = md_values(pair["md"], columns)
    rows = list(csv.DictReader(pair["csv"].splitlines()))
    assert len(rows) == len(card["rows"]) == len(md) / 2 == 13
    for row, expected in zip(rows, card["rows"]):
        assert (row["protocol"], row["metric"]) == (expected["protocol"], expected["metric"])
        for label in columns:
            value = expected["values"][label]
            assert float(row[label]) == value and math.isfinite(value)
            assert md[(row["protocol"], row["metric"], label)] == f"{value:.4f}"
        assert float(row[f"{columns[1]} - {columns[0]}"]) == expected["differences"][columns[1]]
    with Image.open(folder / "card.png") as png:
        assert png.size[0] > 1000 and png.size[1] > 500 and len(set(png.convert("L").getdata())) > 10


def test_a_changed_knob_reruns_its_protocol_only(data, first, tmp_path, capsys):
    """k-NN's k 5 -> 3 in a fresh runs folder (the features cached): the result of k 5 is not k 3's."""
    args = [*argv(data, tmp_path, "tiny", cache=first / "cache"), "--protocols", "knn"]
    assert main(args) == 0
    assert main([*args, "--knobs", "knn=--k 3"]) == 0
    (run,) = card_json(tmp_path, "tiny")["runs"]
    assert run["status"] == "ran" and run["knobs"]["k"] == 3
    assert (
        "knn for tiny: running (the result there was made with other settings (k 5, now 3))" in capsys.readouterr().out
    )


def test_bad_input_is_one_line_naming_what_and_where(data, tmp_path, capsys):
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    cases = [
        ("no-such-vit", {}, "unknown backbone 'no-such-vit'"),
        (garbage, {}, f"BACKBONE {garbage}: not a readable safetensors file"),
        (tmp_path / "gone.safetensors", {}, f"BACKBONE {tmp_path / 'gone.safetensors'}: no such file"),
        ("tiny", {"knn": "--k 500"}, "knn for tiny: --k must be at most"),
        ("tiny", {"nope": "--k 1"}, "--knobs names a protocol"),
        ("tiny", {"knn": "--k '5"}, "--knobs knn=--k '5: not shell words"),
    ]
    args = argv(data, tmp_path / "runs", "tiny")
    shards, knn = args.index("--shards") + 1, args.index(f"knn={data['synthetic']}")
    for at, value, message in ((shards, tmp_path / "no-shards", "--shards"), (knn, f"knn={tmp_path / 'no'}", "--data")):
        changed = [*args[:at], str(value), *args[at + 1 :]]
        cases.append(("tiny", {"args": changed}, f"{message} {value}: no such folder"))
    cases.append(("tiny", {"args": [*args, "--launch.partition", "x"]}, "--launch.* options say where"))
    for backbone, knobs, message in cases:
        command = knobs.pop("args", None) or argv(data, tmp_path / "runs", backbone, **knobs)
        assert main(command) == 2, backbone
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs" / "cards").exists()


def test_a_protocol_that_fails_is_its_line_in_the_card_and_the_exit_status(data, tmp_path, capsys):
    """Patch-Seg refuses VOC's void pixels when it opens its run: the card is written, the run's line
    says why, and the command exits 1."""
    voc = data["shards"] / "voc"
    args = argv(data, tmp_path, "tiny")
    args[args.index(f"patch-seg-coco={data['synthetic']}")] = f"patch-seg-coco={voc}"
    assert main([*args, "--protocols", "patch-seg-coco"]) == 1
    (run,) = card_json(tmp_path, "tiny")["runs"]
    assert run["status"].startswith("failed: ") and "void pixels" in run["status"] and "result" not in run
    assert "no protocol has a result" in (tmp_path / "cards" / "tiny" / "card.md").read_text()
    assert "Traceback" not in capsys.readouterr().err


def test_zero_shot_of_a_backbone_without_a_text_tower_is_not_applicable(data, tmp_path):
    assert main([*argv(data, tmp_path, "dino-vit-s"), "--protocols", "zeroshot"]) == 0
    (run,) = card_json(tmp_path, "dino-vit-s")["runs"]
    assert run["status"] == "not applicable: no text tower is paired with dino-vit-s"


def test_a_card_of_results_already_there(first_card, tmp_path):
    """card_of_results (the demo's card): columns of result files, a protocol a column lacks is "not run"."""
    from fastloc.probe.card.run import card_of_results

    runs = {run["protocol"]: run["result"] for run in first_card["card"]["runs"] if "result" in run}
    path = card_of_results(
        tmp_path / "card", {"a": {"knn": runs["knn"]}, "b": {"knn": runs["knn"], "zeroshot": runs["zeroshot"]}}
    )
    card = json.loads((tmp_path / "card" / "card.json").read_text())
    assert statuses(card) == {
        ("knn", "a"): "reused",
        ("knn", "b"): "reused",
        ("zeroshot", "a"): "not run",
        ("zeroshot", "b"): "reused",
    }
    knn = [row for row in card["rows"] if row["protocol"] == "knn"]
    assert [row["differences"]["b"] for row in knn] == [0.0, 0.0] and "| zeroshot | miou |" in path.read_text()
    assert (tmp_path / "card" / "card.png").stat().st_size > 0


def test_the_slurm_dry_run_prints_the_array_and_runs_nothing(data, tmp_path, capsys):
    """--launch.dry-run needs no SLURM: the script, each member's command line, the card saying what is to run."""
    launch = ["--slurm", "--launch.dry-run", "--launch.gpus-per-node", "0", "--launch.cpus-per-task", "1"]
    assert main([*argv(data, tmp_path, "tiny"), "--protocols", "knn", "overcluster", "zeroshot", *launch]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-2%3" in out
    assert f"would run in the array: python -m fastloc.probe knn {data['synthetic']}" in out
    assert "would run in the array: python -m fastloc.probe zeroshot " in out  # zero-shot is a launcher job too
    assert set(statuses(card_json(tmp_path, "tiny")).values()) == {"to run (dry run)"}
    assert not any(p.name.startswith(("knn-", "overcluster-", "zeroshot-")) for p in tmp_path.iterdir())


@pytest.fixture(scope="session")
def sinfo() -> None:
    """Before the cluster fixture (same scope, asked first): no SLURM, no cluster, nothing installed."""
    if shutil.which("sinfo") is None:
        pytest.skip("no SLURM here (sinfo not found)")


@pytest.fixture
def on_slurm(sinfo, slurm, monkeypatch):
    """The test cluster (tests/slurm_cluster.py), sbatch and sacct pointed at it; skipped where SLURM is absent."""
    import os

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    return slurm


def test_on_slurm_the_missing_protocols_are_one_array(on_slurm, data, tmp_path, monkeypatch, capsys):
    """Three protocols' jobs (zero-shot's too) in one array on the local cluster. The first card is
    stopped (Ctrl-C) while it waits; the next waits for the same jobs instead of submitting them
    again; a third reuses them all."""
    from types import SimpleNamespace

    from fastloc.probe.card import run as card_run

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    launch = ["--slurm", "--launch.gpus-per-node", "0", "--launch.cpus-per-task", "1", "--launch.time-min", "10"]
    args = [*argv(data, tmp_path, "tiny"), "--protocols", "knn", "overcluster", "zeroshot", *launch]
    with monkeypatch.context() as patched:
        patched.setattr(card_run, "time", SimpleNamespace(sleep=interrupt))
        assert main(args) == 130
    submitted = re.findall(r"\[card\] submitted (\S+): (\S+) for tiny", capsys.readouterr().out)
    assert [protocol for _, protocol in submitted] == ["overcluster", "knn", "zeroshot"]
    assert len({job.split("_")[0] for job, _ in submitted}) == 1  # one array
    assert main(args) == 0
    waited = re.findall(r"\[card\] waiting for (\S+): (\S+) for tiny", capsys.readouterr().out)
    assert waited == submitted
    runs = card_json(tmp_path, "tiny")["runs"]
    assert [(r["status"], r["protocol"]) for r in runs] == [(f"ran as job {j}", p) for j, p in submitted]
    assert all(Path(r["result"]).is_file() and (Path(r["run_dir"]) / "attempts.jsonl").is_file() for r in runs)
    assert main(args) == 0  # nothing left to submit
    assert {r["status"] for r in card_json(tmp_path, "tiny")["runs"]} == {"reused"}
