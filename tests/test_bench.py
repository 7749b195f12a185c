"""The benchmark runs end to end on tiny sizes and records what it measured (timings not checked)."""

import json

import pytest

from fastloc.bench.__main__ import main


def test_shard_benchmark_writes_table_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "shard.json"
    assert main(["shard", "--images", "24", "--synthetic", "8", "--repeats", "2",
                 "--processes", "2", "--out", str(out), "--workdir", str(tmp_path)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    for method in ("fastloc pass-through", "--no-fsync", "PIL decode+re-encode", "cp -r", "cp -r; sync", "fastloc generate+encode"):
        assert method in printed
    assert "of cp's rate" in printed and "from 1 to 2 processes" in printed
    record = json.loads(out.read_text())
    assert record["benchmark"] == "shard" and "fastloc.bench shard" in record["command"]
    assert record["device"]["cores"] >= 1 and record["versions"]["fastloc"]
    rows = {(r["workload"], r["method"], r["processes"]): r for r in record["rows"]}
    assert set(rows) == {
        ("jpeg-folder", "fastloc pass-through", 1), ("jpeg-folder", "fastloc pass-through", 2),
        ("jpeg-folder", "fastloc pass-through --no-fsync", 1), ("jpeg-folder", "fastloc pass-through --no-fsync", 2),
        ("jpeg-folder", "PIL decode+re-encode", 1), ("jpeg-folder", "cp -r", 1), ("jpeg-folder", "cp -r; sync", 1),
        ("synthetic", "fastloc generate+encode", 1), ("synthetic", "fastloc generate+encode", 2),
    }  # fmt: skip
    for row in rows.values():
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
        assert row["images_per_s"] == row["images"] / min(row["times_s"])
    assert [p.name for p in tmp_path.iterdir()] == ["shard.json"]  # scratch removed


def test_bench_without_a_name_lists_the_benchmarks(capsys):
    assert main([]) == 2
    assert "shard" in capsys.readouterr().err


def test_kernels_benchmark_on_cpu_reports_reference_paths(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert main(["kernels", "--batch", "2", "--size", "64", "--loop-batch", "1", "--repeats", "3",
                 "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "copy bandwidth" in printed and "triton" not in printed  # CPU: references only
    record = json.loads(out.read_text())
    assert record["benchmark"] == "kernels" and record["copy_bandwidth_GBps"] > 0
    impls = {(r["op"], r["impl"]) for r in record["rows"]}
    assert impls == {
        ("patch_mask", "eager reference"), ("patch_mask", "torch.compile(reference)"),
        ("label_pool", "eager reference"), ("label_pool", "torch.compile(reference)"),
        ("label_pool", "per-patch torch.unique loop (original)"),
    }  # fmt: skip
    for row in record["rows"]:
        assert row["GB_per_s"] == pytest.approx(row["bytes"] / (row["best_ms"] / 1e3) / 1e9)
        assert row["times_s"] and all(t > 0 for t in row["times_s"])


def test_loader_benchmark_compares_dali_cpu_with_the_torch_twin(tmp_path, capsys):
    out = tmp_path / "loader.json"
    assert main(["loader", "--images", "24", "--batch-size", "4", "--batches", "2", "--size", "64",
                 "--threads", "1", "--out", str(out), "--workdir", str(tmp_path)]) == 0  # fmt: skip
    assert "DALI-CPU" in capsys.readouterr().out
    record = json.loads(out.read_text())
    rows = {(r["data"], r["recipe"], r["loader"]) for r in record["rows"]}
    assert rows == {(d, r, loader) for d in ("synthetic", "imagenet-size JPEGs")
                    for r in ("train", "eval") for loader in ("torch twin", "DALI cpu")}  # fmt: skip
    for row in record["rows"]:
        assert row["images"] == 8 and row["images_per_s"] == row["images"] / row["seconds"]
