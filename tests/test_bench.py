"""The benchmark CLI and the benchmarks, run end to end on tiny sizes (timings never checked)."""

import ast
import dataclasses
import errno
import inspect
import itertools
import json
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro

from fastloc.bench.__main__ import BENCHMARKS, _subcommands, main
from fastloc.bench.common import MissingRow, print_table, write_results


def test_shard_benchmark_writes_table_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "shard.json"
    args = ["--images", "24", "--synthetic", "8", "--repeats", "2", "--processes", "2"]
    assert main(["shard", *args, "--out", str(out), "--workdir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    methods = ("fastloc pass-through", "--no-fsync", "PIL decode+re-encode", "cp -r", "cp -r; sync")
    for method in (*methods, "fastloc generate+encode"):
        assert method in printed
    assert "of cp's rate" in printed and "from 1 to 2 processes" in printed
    assert "missing:" not in printed
    record = json.loads(out.read_text())
    assert record["benchmark"] == "shard" and "fastloc.bench shard" in record["command"]
    assert record["device"]["cores"] >= 1 and record["versions"]["fastloc"]
    assert record["missing"] == []  # every row runs on any machine
    rows = {(r["workload"], r["method"], r["processes"]): r for r in record["rows"]}
    jpeg = "jpeg-folder"
    assert set(rows) == {
        (jpeg, "fastloc pass-through", 1),
        (jpeg, "fastloc pass-through", 2),
        (jpeg, "fastloc pass-through --no-fsync", 1),
        (jpeg, "fastloc pass-through --no-fsync", 2),
        (jpeg, "PIL decode+re-encode", 1),
        (jpeg, "cp -r", 1),
        (jpeg, "cp -r; sync", 1),
        ("synthetic", "fastloc generate+encode", 1),
        ("synthetic", "fastloc generate+encode", 2),
    }
    for row in rows.values():
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
        assert row["images_per_s"] == row["images"] / min(row["times_s"])
    assert [p.name for p in tmp_path.iterdir()] == ["shard.json"]  # scratch removed


def test_kernels_benchmark_on_cpu_reports_reference_paths_and_missing_triton_rows(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    args = ["--batch", "2", "--size", "64", "--loop-batch", "1", "--repeats", "3", "--device", "cpu"]
    assert main(["kernels", *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "copy bandwidth" in printed
    record = json.loads(out.read_text())
    assert record["benchmark"] == "kernels" and record["copy_bandwidth_GBps"] > 0
    impls = {(r["op"], r["impl"]) for r in record["rows"]}
    assert impls == {
        ("patch_mask", "eager reference"),
        ("patch_mask", "torch.compile(reference)"),
        ("label_pool", "eager reference"),
        ("label_pool", "torch.compile(reference)"),
        ("label_pool", "per-patch torch.unique loop (original)"),
    }
    for row in record["rows"]:
        assert row["GB_per_s"] == pytest.approx(row["bytes"] / (row["best_ms"] / 1e3) / 1e9)
        assert row["times_s"] and all(t > 0 for t in row["times_s"])
    # CPU: the Triton rows are absent from the table, and said to be, with the reason
    assert [m["row"] for m in record["missing"]] == ["patch_mask / triton", "label_pool / triton"]
    for m in record["missing"]:
        assert "CUDA" in m["reason"]
        assert f"missing: {m['row']}: {m['reason']}" in printed
    table = printed.split("missing:")[0]
    assert "triton" not in table


def test_missing_rows_are_printed_and_recorded(tmp_path, capsys):
    rows = [{"op": "a", "impl": "eager", "best_ms": 1.5}]
    missing = [MissingRow("a / fast", "needs a CUDA device; torch sees none"), MissingRow("b / *", "no data")]
    print_table(rows, ["op", "impl", "best_ms"], missing)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["op", "impl", "best_ms"] and printed[2].split() == ["a", "eager", "1.50"]
    assert printed[3:] == ["missing: a / fast: needs a CUDA device; torch sees none", "missing: b / *: no data"]
    path = write_results("demo", tmp_path / "demo.json", "cmd", {"rows": rows}, missing)
    record = json.loads(path.read_text())
    assert record["missing"] == [
        {"row": "a / fast", "reason": "needs a CUDA device; torch sees none"},
        {"row": "b / *", "reason": "no data"},
    ]
    assert record["rows"] == rows and record["command"] == "cmd"
    record = json.loads(write_results("demo", tmp_path / "none.json", "cmd", {"rows": rows}).read_text())
    assert record["missing"] == []


# ----------------------------------------------------------------------------- the CLI


def field_docs(cls) -> dict[str, str]:
    """Field name -> the docstring under it in the class source (what tyro shows as help)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value.value, str):
            docs[node.target.id] = after.value.value
    return docs


def test_help_lists_every_benchmark_in_plain_text(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["--help"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "usage: python -m fastloc.bench" in captured.out
    for name, (cfg, _) in BENCHMARKS.items():
        summary = " ".join(cfg.__doc__.split("\n\nArgs:")[0].split())  # flowing_help appends the fields
        assert any(name in line and summary in line for line in captured.out.splitlines()), name
    for markup in ("``", ":class:", ":func:", ".. "):
        assert markup not in captured.out


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_option_has_help_as_flowing_text(name, capsys, monkeypatch):
    """Each field's docstring is its --help text, on one line at a wide terminal (no hard breaks)."""
    cfg = BENCHMARKS[name][0]
    docs = field_docs(cfg)
    fields = [f.name for f in dataclasses.fields(cfg)]
    assert [f for f in fields if not docs.get(f, "").strip()] == [], f"{name}: options without help"
    monkeypatch.setenv("COLUMNS", "400")
    assert main([name, "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for field in fields:
        option = "--" + field.replace("_", "-")
        assert any(option in line for line in lines), f"{name}: {option} not in --help"
        text = " ".join(docs[field].split())
        assert any(text in line for line in lines), f"{name} {option}: help broken over lines: {text!r}"


def test_unknown_benchmark_is_a_clear_error(capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'nope'" in err and all(name in err for name in BENCHMARKS)
    assert main(["kernel", "--batch", "2"]) == 2
    assert "did you mean kernels?" in capsys.readouterr().err


def test_command_line_exit_codes():
    """The real entry point: help on stdout with status 0, an unknown name on stderr with 2."""
    run = [sys.executable, "-m", "fastloc.bench"]
    result = subprocess.run([*run, "nope"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2 and "unknown benchmark" in result.stderr and result.stdout == ""
    assert "Traceback" not in result.stderr
    result = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and "kernels" in result.stdout


def test_bench_without_a_name_lists_the_benchmarks(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in BENCHMARKS)


def test_bad_option_values_are_refused(capsys):
    assert main(["kernels", "--reduction", "mode"]) == 2
    assert "mode" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad values

UNWRITABLE = "/dev/null/x.json"  # its folder is a device file: never writable, not even by root
BAD_OPTIONS = [
    (["shard", "--images", "0"], "--images"),
    (["shard", "--synthetic", "-1"], "--synthetic"),
    (["shard", "--processes", "-1"], "--processes"),
    (["shard", "--repeats", "0"], "--repeats"),
    (["shard", "--jpeg-source", "/nowhere"], "--jpeg-source"),
    (["shard", "--jpeg-source", "{empty}"], "--jpeg-source"),  # a folder without JPEGs
    (["shard", "--workdir", "/dev/null"], "--workdir"),
    (["shard", "--out", UNWRITABLE], "--out"),
    (["kernels", "--batch", "0"], "--batch"),
    (["kernels", "--size", "-1"], "--size"),
    (["kernels", "--masks", "0"], "--masks"),
    (["kernels", "--mask-patch", "0"], "--mask-patch"),
    (["kernels", "--mask-patch", "32", "--size", "16"], "--mask-patch"),
    (["kernels", "--pool-patch", "300"], "--pool-patch"),
    (["kernels", "--classes", "0"], "--classes"),
    (["kernels", "--classes", "257"], "--classes"),
    (["kernels", "--loop-batch", "0"], "--loop-batch"),
    (["kernels", "--repeats", "0"], "--repeats"),
    (["kernels", "--device", "tpu"], "--device"),
    (["kernels", "--device", "cuda:99"], "--device"),
    (["kernels", "--out", "."], "--out"),
    (["kernels", "--out", UNWRITABLE], "--out"),
    (["loader", "--images", "0"], "--images"),
    (["loader", "--images", "8", "--batch-size", "8"], "--images"),
    (["loader", "--batch-size", "0"], "--batch-size"),
    (["loader", "--batches", "0"], "--batches"),
    (["loader", "--size", "0"], "--size"),
    (["loader", "--workers", "1", "-1"], "--workers"),
    (["loader", "--workers"], "--workers"),
    (["loader", "--workdir", "/dev/null"], "--workdir"),
    (["loader", "--out", UNWRITABLE], "--out"),
    (["align", "--preset", "nope"], "--preset"),
    (["align", "--batch-size", "-1"], "--batch-size"),
    (["align", "--steps", "0"], "--steps"),
    (["align", "--warmup", "-1"], "--warmup"),
    (["align", "--workdir", "/dev/null"], "--workdir"),
    (["align", "--host-workers", "0"], "--host-workers"),
    (["align", "--host-workers", "-2"], "--host-workers"),
    (["align", "--out", UNWRITABLE], "--out"),
    (["probe", "--data", "/nowhere"], "--data"),
    (["probe", "--data", "{empty}"], "--data"),  # a folder that is no shard set
    (["probe", "--images", "0"], "--images"),
    (["probe", "--images", "8", "--batch-size", "16"], "--images"),
    (["probe", "--val-images", "0"], "--val-images"),
    (["probe", "--epochs", "0"], "--epochs"),
    (["probe", "--batch-size", "0"], "--batch-size"),
    (["probe", "--workers", "-2"], "--workers"),
    (["probe", "--backbone", "nope"], "--backbone"),
    (["probe", "--weights", "/nowhere.safetensors"], "--weights"),
    (["probe", "--workdir", "/dev/null"], "--workdir"),
    (["probe", "--out", UNWRITABLE], "--out"),
    (["evals", "--data", "/nowhere"], "--data"),
    (["evals", "--protocols"], "--protocols"),
    (["evals", "--workers", "-2"], "--workers"),
    (["evals", "--backbone", "nope"], "--backbone"),
    (["evals", "--weights", "/nowhere.pt"], "--weights"),
    (["evals", "--workdir", "/dev/null"], "--workdir"),
    (["evals", "--out", UNWRITABLE], "--out"),
]


@pytest.mark.parametrize("argv, flag", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_values_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, argv, flag):
    """Each bad value: exit 2, one error line naming the option, nothing printed or written."""
    work, empty = tmp_path / "work", tmp_path / "empty"
    work.mkdir()
    empty.mkdir()
    monkeypatch.chdir(work)  # the benchmarks write under ./runs/bench by default
    assert main([a.format(empty=empty) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {flag} ") and captured.err.count("\n") == 1, captured.err
    assert captured.out == "" and list(work.iterdir()) == [] and list(empty.iterdir()) == []


def checked_fields(cls) -> set[str]:
    """The fields with a count, a size, a list of counts or a path: each must have a rule."""
    hints = typing.get_type_hints(cls)
    kinds = (int, Path | None, tuple[int, ...])
    return {f.name for f in dataclasses.fields(cls) if hints[f.name] in kinds}


def test_the_table_covers_every_numeric_and_path_option():
    named = {(argv[0], flag) for argv, flag in BAD_OPTIONS}
    for name, (cls, _) in BENCHMARKS.items():
        options = {"--" + field.replace("_", "-") for field in checked_fields(cls)}
        assert options - {flag for bench, flag in named if bench == name} == set(), name


GOOD_EDGES = [
    ["shard", "--processes", "0"],  # 0: all cores
    ["kernels", "--classes", "256", "--pool-patch", "224", "--mask-patch", "224"],
    ["loader", "--workers", "0", "--images", "8", "--batch-size", "4"],  # 0: the main process
    ["align", "--batch-size", "0", "--warmup", "0"],  # 0: the preset's micro-batch
    ["align", "--preset", "neco-tiny", "--host-workers", "-1"],  # -1: min(10, cores)
    ["probe", "--workers", "-1", "--images", "16", "--batch-size", "16"],  # -1: by device
    ["evals", "--workers", "-1", "--backbone", "tiny"],
]


@pytest.mark.parametrize("argv", GOOD_EDGES, ids=[" ".join(a) for a in GOOD_EDGES])
def test_the_values_that_help_texts_give_a_meaning_are_accepted(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    tyro.cli(_subcommands(), args=argv).validate()
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*")] == [Path("runs"), Path("runs/bench")]


@pytest.mark.parametrize(
    "error, line",
    [
        (OSError(errno.ENOSPC, "No space left on device", "runs/bench/k.json"), "error: runs/bench/k.json: No space"),
        (ValueError("labels\noutside [0, C)"), "error: labels outside [0, C)"),
    ],
)
def test_errors_during_a_benchmark_are_one_line(tmp_path, capsys, monkeypatch, error, line):
    def fail(cfg, command):
        raise error

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(BENCHMARKS, "kernels", (BENCHMARKS["kernels"][0], fail))
    assert main(["kernels", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err


def test_the_real_process_refuses_a_missing_data_folder_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastloc.bench", "probe", "--data", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: --data {tmp_path / 'nowhere'}: no such shard set"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_loader_benchmark_compares_dali_cpu_with_the_torch_twin_and_the_feed(tmp_path, capsys):
    out = tmp_path / "loader.json"
    args = ["loader", "--images", "24", "--batch-size", "4", "--batches", "2", "--size", "64", "--workers", "1"]
    assert main([*args, "--out", str(out), "--workdir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "DALI-CPU" in printed and "host feed" in printed
    record = json.loads(out.read_text())
    rows = {(r["data"], r["recipe"], r["loader"]) for r in record["rows"]}
    loaders = ("host feed", "torch twin", "DALI cpu")
    assert rows == {
        (d, r, name) for d in ("synthetic", "imagenet-size JPEGs") for r in ("train", "eval") for name in loaders
    }
    for row in record["rows"]:
        assert row["workers"] == 1 and row["images"] == 8 and row["images_per_s"] == row["images"] / row["seconds"]
        assert row["main_cpu_us_per_image"] > 0
    if not torch.cuda.is_available():  # the GPU rows are named as missing, with the reason
        assert [m["row"] for m in record["missing"]] == ["DALI gpu (every data, recipe and worker count)"]
        assert "missing: DALI gpu" in printed and "CUDA" in record["missing"][0]["reason"]


def test_align_benchmark_compares_the_step_with_the_original_style(tmp_path, capsys):
    """On a CPU: the tiny preset, eager against the original-style step (the compiled rows are
    named as missing with --no-compile; the compiled step itself is tested in test_align_train)."""
    out = tmp_path / "align.json"
    assert main(["align", "--steps", "2", "--warmup", "1", "--no-compile", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "original-style" in printed and "GFLOP per image" in printed
    record = json.loads(out.read_text())
    assert record["benchmark"] == "align" and record["preset"] == "tiny" and record["flops_per_image"] > 0
    assert [r["step"] for r in record["rows"]] == ["fastloc (eager)", "original-style"]
    assert all(len(r["times_s"]) == 2 and r["images_per_s"] > 0 for r in record["rows"])
    assert record["missing"] == [{"row": "fastloc (compiled), fastloc end to end", "reason": "--no-compile"}]


@pytest.mark.parametrize("name", ["leopart-tiny", "neco-tiny"])
def test_align_benchmark_times_leopart_and_neco_against_the_original_style(name, tmp_path, capsys):
    """On a CPU, a dense preset: eager, the original-style step and its host crops (the compiled row
    named as missing with --no-compile; the compiled dense step is tested in test_align_dense)."""
    out = tmp_path / "dense.json"
    argv = ["align", "--preset", name, "--steps", "1", "--warmup", "0", "--no-compile", "--host-workers", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GFLOP per image" in printed and "original-style: on shared cores, the times added" in printed
    assert "eager / original-style:" in printed and "aim on one H100: >= 4x" in printed
    record = json.loads(out.read_text())
    assert record["benchmark"] == "align" and record["preset"] == name and f"--preset {name}" in record["command"]
    assert record["objective"] == {"leopart-tiny": "Leopart", "neco-tiny": "Neco"}[name]
    assert record["device"]["cores"] >= 1 and record["versions"]["torch"] and record["flops_per_image"] > 0
    assert record["batch_size"] == 16 and record["base_size"] == 64 and record["view_sizes"] == [32, 32, 16, 16, 16, 16]
    rows = {r["step"]: r for r in record["rows"]}
    assert list(rows) == ["fastloc (eager)", "original-style step", "original-style host crops (3 workers)"]
    for row in rows.values():
        assert row["times_s"] and all(t > 0 for t in row["times_s"]) and row["images_per_s"] > 0
    crops = rows["original-style host crops (3 workers)"]
    assert len(crops["times_s"]) == 2 and crops["images_per_s"] == pytest.approx(3 * 16 / min(crops["times_s"]))
    original = 1 / (1 / crops["images_per_s"] + 1 / rows["original-style step"]["images_per_s"])  # a CPU
    assert f"= {original:,.1f} images/s" in record["summary"][0]
    assert [m["row"] for m in record["missing"]] == ["fastloc (compiled)", "fastloc end to end"]


@pytest.mark.parametrize("name", ["pacl-tiny", "segclip-tiny"])
def test_align_benchmark_times_pacl_and_segclip_against_the_original_style(name, tmp_path, capsys):
    """On a CPU: eager against PACL's direct pooling and NMS05's form (and the pooling alone), or
    SegCLIP's host-side segment pooling; the compiled row named as missing with --no-compile."""
    out = tmp_path / "language.json"
    assert main(["align", "--preset", name, "--steps", "1", "--warmup", "0", "--no-compile", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["preset"] == name and record["objective"] == {"pacl-tiny": "Pacl", "segclip-tiny": "Segclip"}[name]
    rows = {r["step"]: r for r in record["rows"]}
    others = {
        "pacl-tiny": ["direct pooling (one [B, B, P] tensor)", "NMS05-style (own caption, sigmoid: another loss)"],
        "segclip-tiny": ["original-style (host segments, eager)"],
    }[name]
    assert list(rows) == ["fastloc (eager)", *others] and record["batch_size"] == 16
    for row in rows.values():
        assert (
            len(row["times_s"]) == 1
            and row["times_s"][0] > 0
            and row["images_per_s"] == pytest.approx(16 / row["times_s"][0])
        )
    eager = rows["fastloc (eager)"]["images_per_s"]
    assert record["summary"][: len(others)] == [
        f"fastloc (eager) / {o}: {eager / rows[o]['images_per_s']:.2f}x" for o in others
    ]
    assert all(line in printed for line in record["summary"])
    pooling = record["pooling"]
    if name == "pacl-tiny":
        assert (
            pooling["chunk"] == 4
            and pooling["patches"] == 64
            and pooling["chunked_ms"] > 0
            and pooling["direct_ms"] > 0
        )
    else:
        assert pooling == {}
    assert [m["row"] for m in record["missing"]] == ["fastloc (compiled)"]


def dense_case(name: str, batch: int = 4, **changes):
    """A dense preset's objective (random weights, eval: no drop path), full queue, and a batch of
    base images with their MultiCrop draws."""
    from fastloc.align.config import OBJECTIVES
    from fastloc.align.presets import PRESETS
    from fastloc.bench.dense import fill_queue

    method = dataclasses.replace(PRESETS[name][1].method, **changes)
    torch.manual_seed(0)
    objective = OBJECTIVES[type(method)](method).eval()
    fill_queue(objective)
    side = round(method.crops.sizes[0] * method.base_scale)
    pictures = np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    draws = [method.crops.draw(np.random.default_rng([0, i]), side, side) for i in range(batch)]
    images = torch.from_numpy(pictures).permute(0, 3, 1, 2).contiguous()
    return objective, images, torch.from_numpy(method.crops.params(draws))


def original_inputs(objective, images, params):
    """The views fastloc cuts and the pair boxes it computes, as the original-style loss takes them."""
    from fastloc.align.leopart_ops import pair_boxes
    from fastloc.data.multicrop import view_boxes

    views = objective.cfg.crops.cut(images, params, objective.image.mean, objective.image.std)
    return views, *pair_boxes(view_boxes(params), objective.cfg.crops.view_sizes, objective.groups[0])


def test_the_original_style_leopart_loss_is_fastlocs_on_the_same_views():
    """Leopart's reference-form loss (fg mask labelled on the host, queue test and push, the loop
    Sinkhorn, per-pair .item()) gives fastloc's loss: the baseline differs in form, not in math."""
    from fastloc.bench.dense import OriginalState, original_leopart_loss

    objective, images, params = dense_case("leopart-tiny")
    assert objective.cfg.loss_mask == "fg" and objective._queued == objective.queue.shape[1]
    sample = (params, objective.sample(4, torch.Generator().manual_seed(0)))
    state = OriginalState(objective.queue.clone(), objective.queue.shape[1])
    with torch.no_grad():
        expected = objective.losses(images, sample).mean()
        got = original_leopart_loss(objective, objective.trainable, state, *original_inputs(objective, images, params))
    assert torch.allclose(got, expected, rtol=1e-5), (got, expected)
    assert state.use_the_queue and not torch.equal(state.queue, objective.queue)  # the test passed, the push ran


def test_the_original_style_neco_loss_is_fastlocs_with_the_same_references(monkeypatch):
    """NeCo's reference-form loss (one pair at a time, batch references by randperm) gives fastloc's
    loss when its randperm returns the permutations fastloc draws from the step's sample."""
    from fastloc.bench.dense import OriginalState, original_neco_loss

    objective, images, params = dense_case("neco-tiny", queue_length=0, references="batch")
    sample = (params, objective.sample(4, torch.Generator().manual_seed(0)))
    (G, L), k = objective.groups, objective.cfg.roi_kernel
    P = (objective.cfg.crops.sizes[0] // objective.image.patch_size) ** 2
    u = sample[1][:, :, P:].reshape(4, G, G + L - 1, k * k).permute(1, 2, 0, 3).flatten(2)  # neco.py's draw
    orders = iter(u.argsort(dim=-1).flatten(0, 1))  # one per (global crop, other view), the loop's order
    inputs = original_inputs(objective, images, params)
    with torch.no_grad():
        expected = objective.losses(images, sample).mean()
        monkeypatch.setattr(torch, "randperm", lambda n, **kw: next(orders))
        got = original_neco_loss(objective, objective.trainable, OriginalState(None, 0), *inputs)
    assert next(orders, None) is None  # every pair drew once
    assert torch.allclose(got, expected, rtol=1e-5), (got, expected)


def test_the_host_crops_follow_the_draws_as_the_device_cut_does():
    """The reference's PIL data path on a smooth picture gives fastloc's device views within the
    named departures (resampling, uint8 rounding, PIL's blur); the boxes are pair_boxes'. Boxes
    read transposed do not."""
    from PIL import Image

    from fastloc.bench.dense import host_boxes, host_views
    from fastloc.data.multicrop import MultiCrop, MultiCropDraw, cut_views

    recipe, side, mean, std = MultiCrop(sizes=(32, 16)), 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    y, x = np.mgrid[0:side, 0:side] / side
    picture = (np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], -1) * 255).round().astype(np.uint8)
    base = torch.from_numpy(picture).permute(2, 0, 1)[None].contiguous()
    worst, transposed = 0.0, 0.0
    for seed in range(3):
        draw = recipe.draw(np.random.default_rng(seed), side, side)
        device = cut_views(base, torch.tensor(draw.params)[None], recipe.view_sizes, mean, std, sigma_max=2.0)
        host = host_views(Image.fromarray(picture), draw, recipe, mean, std)
        flipped = MultiCropDraw(tuple((left, top, w, h) for top, left, h, w in draw.boxes), draw.params)
        wrong = host_views(Image.fromarray(picture), flipped, recipe, mean, std)
        for v, view in enumerate(device):
            worst = max(worst, (host[v] - view[0]).abs().mean().item())
            transposed = max(transposed, (wrong[v] - view[0]).abs().mean().item())
        gc, other = host_boxes(draw, recipe)
        expected = pair_boxes_of(draw, recipe)
        assert torch.allclose(gc, expected[0], atol=1e-4) and torch.allclose(other, expected[1], atol=1e-4)
    assert worst < 0.05 < transposed, (worst, transposed)


def pair_boxes_of(draw, recipe):
    from fastloc.align.leopart_ops import pair_boxes

    boxes = torch.tensor(draw.params[:, :4])[None]  # normalized (x1, y1, x2, y2)
    gc, other = pair_boxes(boxes, recipe.view_sizes, recipe.counts[0])
    return gc[0], other[0]


def test_probe_benchmark_times_cold_cached_and_original_style_runs_with_equal_metrics(tmp_path, capsys, monkeypatch):
    """The smallest scale: each setting's row with its parts, the same macro recall in all three,
    and nothing left in ./results or ./runs (the runs' CSV lives in the scratch folder)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "probe.json"
    args = ["--images", "48", "--val-images", "16", "--epochs", "1", "--batch-size", "8"]
    assert main(["probe", *args, "--out", str(out), "--workdir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    table = printed.split("\n--")[1].split("\ncold:")[0]  # the rows, between the header and the summary
    for setting in ("cold", "cached", "original-style"):
        assert any(line.startswith(setting + " ") for line in table.splitlines()), setting
    assert "original-style / cold:" in printed and "aim on one H100" in printed
    assert "macro recall per epoch: equal in cold, cached, original-style" in printed
    record = json.loads(out.read_text())
    assert record["benchmark"] == "probe" and "fastloc.bench probe" in record["command"]
    assert record["samples"] == {"train": 48, "val": 16} and record["missing"] == []
    assert record["metrics_equal"] is True
    rows = {r["setting"]: r for r in record["rows"]}
    assert list(rows) == ["cold", "cached", "original-style"]
    for row in rows.values():
        for field in ("wall_s", "features_s", "train_s", "eval_s"):
            assert row[field] > 0, (row["setting"], field)
        assert set(row["timings_s"]) == {"sources_s", "train_s", "eval_s"}
        assert row["wall_s"] == pytest.approx(row["other_s"] + sum(row["timings_s"].values()))
        assert len(row["macro_recall_per_epoch"]) == 1
        assert row["macro_recall_per_epoch"] == rows["cold"]["macro_recall_per_epoch"]
        assert row["vs_original"] == pytest.approx(rows["original-style"]["wall_s"] / row["wall_s"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.json"]  # scratch removed, no results/ or runs/


def test_probe_benchmark_original_pool_gives_the_kernels_targets():
    """The original-style pooling (the per-patch loop for the run's reduction) stores what
    pool_targets stores, for each reduction."""
    from fastloc.bench.probe import original_pool
    from fastloc.probe.cache import pool_targets

    labels = torch.randint(0, 5, (3, 20, 24), dtype=torch.uint8)
    labels[0, :8, :8] = 2  # a one-class patch
    expected = pool_targets(labels, 8, 5)
    for reduction in ("union", "majority", "global-union"):
        stored = original_pool(reduction)(labels, 8, 5)
        assert set(stored) == set(expected)
        for name, value in stored.items():
            assert value.dtype == expected[name].dtype and torch.equal(value, expected[name]), (reduction, name)


def test_evals_benchmark_runs_each_protocol_beside_its_baseline(tmp_path, capsys, monkeypatch):
    """The tiny scale on a CPU: a row per dense protocol (a whole run, its headline figure) and its
    baseline row (k-means against scipy's, the head step in both orders, chunked k-NN against one
    matrix), the zero-shot sliding windows against the per-window loop (equal logits) and PAMR, and
    nothing left behind but the JSON."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "evals.json"
    assert main(["evals", "--out", str(out), "--workdir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "aim on one H100 at VOC size: < 120 s" in printed and "aim on one H100 at VOC size: < 600 s" in printed
    record = json.loads(out.read_text())
    assert record["benchmark"] == "evals" and record["scale"] == "tiny" and record["missing"] == []
    rows = {r["row"]: r for r in record["rows"]}
    assert list(rows) == [
        "overcluster",
        "kmeans",
        "linear",
        "linear head step",
        "hummingbird",
        "knn transfer",
        "zeroshot slide",
        "zeroshot pamr",
    ]
    for name in ("overcluster", "linear", "hummingbird"):
        assert rows[name]["seconds"] > 0 and 0 <= rows[name]["value"] <= 1, name
    assert rows["overcluster"]["figure"].startswith("miou_k") and rows["linear"]["setting"] == "linear-leopart-voc"
    for name in ("kmeans", "linear head step", "knn transfer", "zeroshot slide"):
        row = rows[name]
        assert row["seconds"] > 0 and row["speedup"] == pytest.approx(row["baseline_s"] / row["seconds"]), name
        assert row["seconds"] == min(row["timings_s"]) and row["baseline_s"] == min(row["baseline_timings_s"]), name
    slide, refine = rows["zeroshot slide"], rows["zeroshot pamr"]
    assert slide["same_logits"] is True and 0 <= slide["max_abs_diff"] <= 1e-4
    assert len(slide["timings_s"]) == len(slide["baseline_timings_s"]) == 3
    assert slide["figure"] == "images/s" and slide["value"] == pytest.approx(4 / slide["seconds"])
    assert "windows 48/24" in slide["setting"] and "21 random unit queries x 96" in slide["setting"]
    assert refine["figure"] == "ms/image" and refine["value"] == pytest.approx(1000 * refine["seconds"] / 4)
    assert refine["seconds"] == min(refine["timings_s"]) > 0 and "baseline_s" not in refine
    assert "zeroshot slide: " in printed and "x the per-window loop (equal logits" in printed
    assert "aim on one H100 at VOC size: >= 2x" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evals.json"]
    assert main(["evals", "--protocols", "hummingbird", "--out", str(out), "--workdir", str(tmp_path)]) == 0
    record = json.loads(out.read_text())
    assert [r["row"] for r in record["rows"]] == ["hummingbird", "knn transfer"]
    assert [m["row"] for m in record["missing"]] == ["overcluster", "linear", "zeroshot"]


def test_evals_benchmark_says_when_the_per_window_loop_computes_other_logits(tmp_path, capsys, monkeypatch):
    """The untimed check compares the two sides' logits: a baseline off by 1e-3 is reported as not equal work."""
    from fastloc.bench import evals

    loop = evals.slide_logits_loop
    monkeypatch.setattr(evals, "slide_logits_loop", lambda *args: loop(*args) + 1e-3)
    monkeypatch.setitem(evals.ZEROSHOT, "tiny", (2, *evals.ZEROSHOT["tiny"][1:]))  # 2 images: quicker
    out = tmp_path / "evals.json"
    assert main(["evals", "--protocols", "zeroshot", "--out", str(out), "--workdir", str(tmp_path)]) == 0
    assert "LOGITS DIFFER beyond 0.0001: not equal work" in capsys.readouterr().out
    slide = json.loads(out.read_text())["rows"][0]
    assert slide["row"] == "zeroshot slide" and slide["same_logits"] is False
    assert slide["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)


def test_evals_benchmark_without_scipy_leaves_out_what_needs_it(tmp_path, capsys, monkeypatch):
    """The GPU machine's minimal install has no scipy and no open_clip: no Hungarian matching
    (overcluster's K = C, Hummingbird's matching) and no scipy k-means row, each named as missing;
    the zero-shot rows run (their queries are random: the readouts need no text tower)."""
    monkeypatch.chdir(tmp_path)
    # the modules that would import open_clip are imported afresh (and would fail)
    hidden = (
        "scipy",
        "open_clip",
        "fastloc.models.text",
        "fastloc.probe.zeroshot.readout",
        "fastloc.probe.zeroshot.segment",
    )
    for name in [m for m in sys.modules if m in hidden or m.startswith(("scipy.", "open_clip."))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy... raises ImportError
    monkeypatch.setitem(sys.modules, "open_clip", None)
    out = tmp_path / "evals.json"
    protocols = ["overcluster", "hummingbird", "zeroshot"]
    argv = ["evals", "--protocols", *protocols, "--out", str(out), "--workdir", str(tmp_path)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    rows = {r["row"]: r for r in record["rows"]}
    assert list(rows) == ["overcluster", "hummingbird", "knn transfer", "zeroshot slide", "zeroshot pamr"]
    assert [k for k in rows["overcluster"]["selected"]] == ["miou_k30"]  # K = C (16) left out
    assert [m["row"] for m in record["missing"]] == [
        "linear",
        "overcluster K = C, hummingbird Hungarian matching, kmeans",
    ]
    assert "fastloc.models.text" not in sys.modules  # nothing asked for a text tower
