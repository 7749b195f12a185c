"""The README's main job: ``python -m fastloc.demo``, its quick run end to end (every stage, every
output file, finite numbers), stage reuse, determinism; and the gates' logic."""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fastloc.demo.__main__ import main
from fastloc.demo.summary import gates, table

REPO = Path(__file__).resolve().parents[1]
ROLES = ["floor", "baseline", "maskembed", "leopart", "neco", "ceiling"]
PROTOCOLS = ["probe", "overcluster", "hummingbird", "knn"]  # probe: Patch-Seg
STAGES = ["data", "pretrain-image", "pretrain-patch", "align", "align-leopart", "align-neco"]
STAGES += [f"{p}-{r}" for r in ROLES for p in PROTOCOLS]
READOUTS = ["clip", "maskclip", "naclip"]
LANGUAGE = ["contrastive", "align-clip", *(f"zeroshot-{r}-{x}" for r in ("clip", "clip-maskembed") for x in READOUTS)]
STAGES += LANGUAGE
PATCH_SEG = ("recall_best_epoch", "precision", "f1", "ap_last", "recall_last", "ap_texture", "ap_shape")
DENSE = ("overcluster_miou_k38", "overcluster_miou_k8")
DENSE += ("hummingbird_miou", "hummingbird_pixel_accuracy", "knn_top1", "knn_top5")


def readme_main_job() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1]
    first = re.findall(r"```bash\n(.*?)\n```", section, re.DOTALL)[0]
    return shlex.split(first.split("&&")[-1])


def run(args: list[str], cwd: Path) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr
    return done.stdout


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The README's command with --quick, from a fresh folder (default paths under it)."""
    command = readme_main_job()
    assert command == ["python", "-m", "fastloc.demo"]
    cwd = tmp_path_factory.mktemp("demo")
    return cwd, run([*command[1:], "--quick"], cwd)


def test_the_quick_demo_runs_every_stage_and_writes_every_output(quick):
    cwd, out = quick
    run_dir = cwd / "runs" / "demo" / "seed0-quick"
    for stage in STAGES:
        assert f"[{stage}] running" in out
        record = json.loads((run_dir / f"stage-{stage}.json").read_text())
        assert record["inputs"] and record["outputs"]
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = summary["rows"]
    assert list(rows) == ROLES
    for row in rows.values():
        for key in PATCH_SEG + DENSE:
            assert finite(row[key]), (key, row)
    assert [g["gate"][:2] for g in summary["gates"]][:2] == ["1.", "2."]
    for role in rows:
        result = json.loads((run_dir / "probes" / role / "result.json").read_text())
        assert result["protocol"]["reduction"] == "union" and result["head"] == "transformer"
        assert result["dataset"]["num_classes"] == 8
        for protocol in PROTOCOLS[1:]:
            dense = json.loads((run_dir / "probes" / f"{protocol}-{role}" / "result.json").read_text())
            assert dense["protocol"]["name"] == protocol and dense["dataset"]["num_classes"] == 8
            assert dense["protocol"]["image_size"] == 64 and dense["config"]["seed"] == 0
    overcluster = json.loads((run_dir / "probes" / "overcluster-baseline" / "result.json").read_text())["protocol"]
    assert overcluster["clusters"] == [38, 8] and overcluster["mask_size"] == 64
    assert overcluster["images"] == 60  # one batch of 60 of the 96 val images (drop_last)
    hummingbird = json.loads((run_dir / "probes" / "hummingbird-neco" / "result.json").read_text())["protocol"]
    assert hummingbird["train_images_used"] == 64 and hummingbird["bank_size"] == 64 * 64  # --quick's bank: every patch
    knn = json.loads((run_dir / "probes" / "knn-leopart" / "result.json").read_text())
    assert knn["images"] == {"bank": 320, "queries": 96, "bank_unusable": 0, "queries_unusable": 0}
    for name in ("baseline-vs-maskembed.png", "contact-sheet.png"):
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG" and image.width > 400
    weights = json.loads((run_dir / "stage-pretrain-image.json").read_text())["outputs"]["weights"]
    for role, stage, which in (
        ("maskembed", "align", "best"),
        ("leopart", "align-leopart", "last"),
        ("neco", "align-neco", "last"),
    ):
        export = Path(json.loads((run_dir / f"stage-{stage}.json").read_text())["outputs"]["export"])
        assert export.name == f"encoder-{which}.safetensors" and (cwd / export).is_file()
        assert export.parent.name.startswith(f"{stage}-")  # the run directory, named by the inputs' digest
        config = json.loads((cwd / export.parent / "config.json").read_text())["config"]
        assert config["method"]["weights"] == weights and config["optim"]["epochs"] == 1  # from the baseline
        for protocol in PROTOCOLS:
            record = json.loads((run_dir / f"stage-{protocol}-{role}.json").read_text())
            assert record["inputs"]["backbone"] == [str(export), "pretrained"]
    assert config["method"]["crops"]["sizes"] == [32, 16] and config["method"]["base_scale"] == 2.0  # neco-tiny's
    for heading in ("AP shape", "oc K=38", "oc K=8", "Hb mIoU", "k-NN top1", "1. ceiling beats floor (macro AP)"):
        assert heading in out, heading
    assert "summary: runs/demo/seed0-quick/summary.json" in out
    # its card (python -m fastloc.probe card's files) of the roles' own results, printed as written
    card = (run_dir / "card" / "card.md").read_text()
    assert card in out and "card: runs/demo/seed0-quick/card/card.md" in out
    header = next(line for line in card.splitlines() if line.startswith("|"))
    assert all(f" {role} " in header for role in ROLES)  # a column per role
    card_json = json.loads((run_dir / "card" / "card.json").read_text())
    assert {r["protocol"] for r in card_json["runs"]} == {"patch-seg", *PROTOCOLS[1:]}
    # the language miniature: the baseline and the tiny text tower trained on the captions, then zero-shot
    # segmentation by class name before (clip) and after MaskEmbed (clip-maskembed), each readout
    contrastive = json.loads((run_dir / "stage-contrastive.json").read_text())
    assert contrastive["inputs"]["image_weights"] == weights and contrastive["inputs"]["contrastive"]["epochs"] == 1
    text_weights = contrastive["outputs"]["text_weights"]
    clip_export = json.loads((run_dir / "stage-align-clip.json").read_text())["outputs"]["export"]
    assert (
        json.loads((cwd / Path(clip_export).parent / "config.json").read_text())["config"]["method"]["weights"]
        == (contrastive["outputs"]["weights"])
    )
    assert list(summary["zeroshot"]) == ["clip", "clip-maskembed"]
    for role, backbone in (("clip", "tiny"), ("clip-maskembed", clip_export)):
        assert list(summary["zeroshot"][role]) == READOUTS
        for readout in READOUTS:
            result = json.loads((run_dir / "probes" / f"zeroshot-{role}-{readout}" / "result.json").read_text())
            protocol = result["protocol"]
            assert (protocol["benchmark"], protocol["readout"], protocol["images"]) == ("manifest", readout, 24)
            assert protocol["settings"]["short_side"] == 96 and protocol["settings"]["window"] == [64, 32]
            assert protocol["settings"]["pamr"] is False and protocol["text_weights"] == text_weights
            assert result["config"]["backbone"] == backbone and result["dataset"]["num_classes"] == 8
            assert summary["zeroshot"][role][readout] == result["selected"] and finite(result["selected"]["miou"])
    assert "zero-shot segmentation by class name" in out


def test_a_second_run_reuses_every_stage_and_a_fresh_one_repeats_the_figures(quick):
    cwd, _ = quick
    again = run(["-m", "fastloc.demo", "--quick"], cwd)
    for stage in STAGES:
        assert f"[{stage}] done before: reusing" in again
    summary = json.loads((cwd / "runs" / "demo" / "seed0-quick" / "summary.json").read_text())
    rows, zeroshot = summary["rows"], summary["zeroshot"]
    # the models again elsewhere (same data) with one objective: --objectives picks the rows, the figures repeat
    fresh = run(["-m", "fastloc.demo", "--quick", "--out", "elsewhere", "--objectives", "neco", "--no-language"], cwd)
    for stage in ("data", "pretrain-image", "pretrain-patch", "align-neco", "knn-neco", "probe-ceiling"):
        assert f"[{stage}] running" in fresh, stage
    assert "[align]" not in fresh and "[align-leopart]" not in fresh and "maskembed" not in fresh
    assert "[contrastive]" not in fresh and "zero-shot" not in fresh  # --no-language
    again = json.loads((cwd / "elsewhere" / "seed0-quick" / "summary.json").read_text())["rows"]
    assert list(again) == ["floor", "baseline", "neco", "ceiling"]
    assert again == {role: rows[role] for role in again}
    # another MaskEmbed run redoes what stands on it, and nothing else
    changed = run(["-m", "fastloc.demo", "--quick", "--align-epochs", "2"], cwd)
    redone = ["align", *(f"{p}-maskembed" for p in PROTOCOLS), "align-clip"]
    redone += [f"zeroshot-clip-maskembed-{x}" for x in READOUTS]
    for stage in STAGES:
        assert f"[{stage}] {'running' if stage in redone else 'done before: reusing'}" in changed, stage
    summary = json.loads((cwd / "runs" / "demo" / "seed0-quick" / "summary.json").read_text())
    after = summary["rows"]
    assert after["maskembed"] != rows["maskembed"] and {**after, "maskembed": rows["maskembed"]} == rows
    assert summary["zeroshot"]["clip"] == zeroshot["clip"]  # before MaskEmbed: reused


def test_the_gates_compare_each_objective_with_the_baseline_only_when_the_floor_is_beaten():
    figures = {"floor": 0.2, "ceiling": 0.4, "baseline": 0.3, "maskembed": 0.35, "leopart": 0.25, "neco": 0.31}
    rows = {k: {"ap_last": v} for k, v in figures.items()}
    verdict = gates(rows)
    assert [ok for _, ok, _ in verdict] == [True, True, True, False, True]
    assert [g for g, _, _ in verdict][2:] == [
        f"{n}. {r} beats baseline (macro AP)" for n, r in enumerate(ROLES[2:5], 3)
    ]
    rows["baseline"]["ap_last"] = 0.19
    assert [ok for _, ok, _ in gates(rows)] == [True, False]
    rows["ceiling"]["ap_last"] = 0.22  # within the margin: the probe cannot tell locality apart here
    assert gates(rows)[0][1] is False


def test_the_table_names_every_row_in_order_and_every_figure_it_has():
    row = {"recall_best_epoch": 0.5, "precision": float("nan"), "ap_last": 0.3, "ap_shape": 0.2, "recall_by_size": None}
    dense = {"overcluster_miou_k8": 0.11, "overcluster_miou_k38": 0.12, "hummingbird_miou": 0.13, "knn_top1": 0.14}
    rows = {k: dict(row, **dense) for k in reversed(ROLES)}
    rows["floor"]["ap_last"] = float("nan")
    lines = table(rows).splitlines()
    heads = "AP | AP shape | rec. orig. | oc K=38 | oc K=8 | Hb mIoU | k-NN top1"
    assert lines[0].split() == heads.replace("|", "").split()
    assert [line.split()[0] for line in lines[2:8]] == ROLES
    assert lines[2].split()[1:] == ["nan", "0.2000", "0.5000", "0.1200", "0.1100", "0.1300", "0.1400"]
    # rows of a run with fewer objectives: only theirs, still in order
    lines = table({k: rows[k] for k in ("ceiling", "neco", "floor", "baseline")}).splitlines()
    assert [line.split()[0] for line in lines[2:6]] == ["floor", "baseline", "neco", "ceiling"]


@pytest.mark.parametrize(
    "argv, flag",
    [(["--objectives", "neco", "neco"], "--objectives"), (["--objectives", "dino"], "--objectives"),
     (["--leopart-epochs", "0"], "--leopart-epochs"), (["--neco-epochs", "-1"], "--neco-epochs"),
     (["--contrastive-epochs", "0"], "--contrastive-epochs")],
)  # fmt: skip
def test_bad_objectives_are_refused_in_one_line_before_any_stage(tmp_path, monkeypatch, capsys, argv, flag):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
