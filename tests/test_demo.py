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

from fastloc.demo.summary import gates, table

REPO = Path(__file__).resolve().parents[1]
STAGES = ["data", "pretrain-image", "pretrain-patch", "align"] + [
    f"probe-{r}" for r in ("floor", "baseline", "aligned", "ceiling")
]


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
    assert set(rows) == {"floor", "baseline", "aligned", "ceiling"}
    for row in rows.values():
        for key in ("recall_best_epoch", "precision", "f1", "ap_last", "recall_last", "ap_texture", "ap_shape"):
            assert finite(row[key]), (key, row)
    assert [g["gate"][:2] for g in summary["gates"]][:2] == ["1.", "2."]
    for role in rows:
        result = json.loads((run_dir / "probes" / role / "result.json").read_text())
        assert result["protocol"]["reduction"] == "union" and result["head"] == "transformer"
        assert result["dataset"]["num_classes"] == 8
    for name in ("baseline-vs-aligned.png", "contact-sheet.png"):
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG" and image.width > 400
    assert len(list(run_dir.glob("align-*/encoder-best.safetensors"))) == 1
    assert "recall (orig.)" in out and "1. ceiling beats floor (macro AP)" in out
    assert "summary: runs/demo/seed0-quick/summary.json" in out


def test_a_second_run_reuses_every_stage_and_a_fresh_one_repeats_the_figures(quick):
    cwd, _ = quick
    again = run(["-m", "fastloc.demo", "--quick"], cwd)
    for stage in STAGES:
        assert f"[{stage}] done before: reusing" in again
    rows = json.loads((cwd / "runs" / "demo" / "seed0-quick" / "summary.json").read_text())["rows"]
    fresh = run(["-m", "fastloc.demo", "--quick", "--out", "elsewhere"], cwd)  # same data, models again
    assert "[pretrain-image] running" in fresh and "[data] running" in fresh
    assert json.loads((cwd / "elsewhere" / "seed0-quick" / "summary.json").read_text())["rows"] == rows
    # another pre-training redoes everything that stands on it, and nothing else
    changed = run(["-m", "fastloc.demo", "--quick", "--pretrain-epochs", "2"], cwd)
    for stage in ("pretrain-image", "pretrain-patch", "align", "probe-baseline", "probe-aligned", "probe-ceiling"):
        assert f"[{stage}] running" in changed, stage
    assert "[probe-floor] done before: reusing" in changed and "[data] done before: reusing" in changed


def test_the_gates_compare_aligned_and_baseline_only_when_the_floor_is_beaten():
    rows = {k: {"ap_last": v} for k, v in {"floor": 0.2, "ceiling": 0.4, "baseline": 0.3, "aligned": 0.35}.items()}
    assert [ok for _, ok, _ in gates(rows)] == [True, True, True]
    rows["baseline"]["ap_last"] = 0.19
    assert [ok for _, ok, _ in gates(rows)] == [True, False]
    rows["ceiling"]["ap_last"] = 0.22  # within the margin: the probe cannot tell locality apart here
    assert gates(rows)[0][1] is False


def test_the_table_names_every_row_and_prints_nan():
    row = {"recall_best_epoch": 0.5, "precision": float("nan"), "f1": 0.1, "ap_last": 0.3, "recall_last": 0.4}
    text = table({k: dict(row, recall_by_size=None) for k in ("floor", "baseline", "aligned", "ceiling")})
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[2:6]] == ["floor", "baseline", "aligned", "ceiling"]
    assert "nan" in lines[2] and "0.3000" in lines[2]
