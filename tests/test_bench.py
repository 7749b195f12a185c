"""The benchmark runs end to end on tiny sizes and records what it measured (timings not checked)."""

import json

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
