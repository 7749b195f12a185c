"""``python -m fastloc.launch``: the sbatch script it writes, the values it refuses, and real runs,
through submitit's local executor and through a real SLURM with accounting (tests/slurm_cluster.py):
2 ranks with gloo equal torchrun, a time-limit signal requeues and resumes exactly, a probe array
ends with its summary, a crash is reported as failed with its log.

Only the tests named ``*on_slurm*`` need a cluster (the ``slurm`` fixture installs and starts one,
or skips saying why); every other test runs alone, in any order, where no SLURM binary exists
(``-k "not on_slurm"`` selects them)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from align_runs import args, assert_same_curve, make_shards, metrics

from fastloc.launch.__main__ import main, split
from fastloc.launch.config import LaunchConfig
from fastloc.launch.submit import sbatch_script, slurm_parameters


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("launch-shards"))


def align(shards: Path, out: Path, *extra) -> list[str]:
    """``python -m fastloc.launch align`` arguments of a 2-epoch tiny run (16 updates), checkpoints every 3."""
    return ["align", *args(shards, out, "--optim.epochs", 2, "--run.checkpoint-every", 3, *extra)[1:]]


def probe(shards: Path, out: Path, *extra) -> list[str]:
    common = ["--backbone", "tiny", "--weights", "random", "--epochs", "1", "--batch-size", "16", "--device", "cpu"]
    common += ["--loader", "cpu", "--workers", "0", "--predictions", "0", "--precision", "fp32"]
    common += ["--out", str(out), "--results", str(out / "results"), "--cache-dir", str(out / "cache")]
    return ["probe", str(shards), *common, *map(str, extra)]


CPU = ["--launch.gpus-per-node", "0", "--launch.cpus-per-task", "1", "--launch.time-min", "10"]


# ---------------------------------------------------------------- without SLURM


def test_launch_options_are_told_apart_from_the_jobs():
    argv = ["tiny", "--launch.nodes", "2", "--optim.lr", "1e-4", "--launch.sbatch", "a=1", "b", "--launch.dry-run"]
    argv += ["--launch.partition=x", "--run.name", "n"]
    launch, job = split(argv)
    assert launch == ["--launch.nodes", "2", "--launch.sbatch", "a=1", "b", "--launch.dry-run", "--launch.partition=x"]
    assert job == ["tiny", "--optim.lr", "1e-4", "--run.name", "n"]


def test_dry_run_prints_the_sbatch_script_and_the_resolved_config(shards, tmp_path, capsys):
    argv = align(shards, tmp_path, "--launch.nodes", "8", "--launch.partition", "h100", "--launch.account", "vision")
    argv += ["--launch.sbatch", "reservation=big", "requeue", "--launch.exclusive", "--launch.dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    script, config = out.split("\n{\n", 1)
    for line in ("--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script
    for line in ("--partition=h100", "--account=vision", "--reservation=big", "--requeue", "--exclusive"):
        assert f"#SBATCH {line}\n" in script
    assert (
        f"#SBATCH --output={tmp_path}/tiny/slurm/%j_0_log.out" in script and "--job-name=fastloc-align-tiny" in script
    )
    resolved = json.loads("{\n" + config)
    assert resolved["run_dir"] == str(tmp_path / "tiny") and resolved["config"]["optim"]["epochs"] == 2
    assert not (tmp_path / "tiny").exists()  # nothing submitted, nothing written


def test_a_sweep_is_one_array_and_members_get_their_own_run_directories(shards, tmp_path, capsys):
    argv = align(shards, tmp_path, "--launch.sweep", "optim.lr=1e-3,1e-4", "method.decoder-depth=1,2")
    assert main([*argv, "--launch.parallel", "3", "--launch.dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-3%3\n" in out
    members = [json.loads("{" + part) for part in out.split("\n{")[1:]]
    assert [m["sweep"] for m in members] == [
        {"optim.lr": a, "method.decoder-depth": d} for a in ("1e-3", "1e-4") for d in ("1", "2")
    ]
    assert [Path(m["run_dir"]).name for m in members] == [
        f"tiny-lr{a}-decoder-depth{d}" for a in ("1e-3", "1e-4") for d in ("1", "2")
    ]
    assert [(m["config"]["optim"]["lr"], m["config"]["method"]["decoder_depth"]) for m in members] == [
        (1e-3, 1),
        (1e-3, 2),
        (1e-4, 1),
        (1e-4, 2),
    ]


def test_a_sweep_over_presets_replaces_the_preset(shards, tmp_path, capsys):
    argv = align(shards, tmp_path, "--run.name", "tiny", "--launch.sweep", "preset=tiny,clip-vit-b")
    assert main([*argv, "--launch.dry-run", "--launch.cluster", "local"]) == 0
    members = [json.loads("{" + part) for part in capsys.readouterr().out.split("\n{")[1:]]
    assert [m["config"]["method"]["backbone"] for m in members] == ["tiny", "clip-vit-b"]
    assert [Path(m["run_dir"]).name for m in members] == ["tiny-presettiny", "tiny-presetclip-vit-b"]


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir()) if path.exists() else []


# (command, option) -> the option the one error line starts with, and a word of its rule; checked
# before anything is built, written or submitted, so the table runs without --launch.dry-run
BAD_OPTIONS = [
    ("align", ["--launch.nodes", "0"], "--launch.nodes", "at least 1"),
    ("align", ["--launch.nodes", "-2"], "--launch.nodes", "at least 1"),
    ("align", ["--launch.gpus-per-node", "-1"], "--launch.gpus-per-node", "at least 0"),
    ("align", ["--launch.tasks-per-node", "0"], "--launch.tasks-per-node", "at least 1"),
    ("align", ["--launch.cpus-per-task", "0"], "--launch.cpus-per-task", "at least 1"),
    ("align", ["--launch.mem-gb", "0"], "--launch.mem-gb", "at least 1"),
    ("align", ["--launch.time-min", "0"], "--launch.time-min", "at least 1"),
    ("align", ["--launch.time-min", "-5"], "--launch.time-min", "at least 1"),
    ("align", ["--launch.signal-delay-s", "-1"], "--launch.signal-delay-s", "at least 0"),
    ("align", ["--launch.time-min", "2", "--launch.signal-delay-s", "120"], "--launch.signal-delay-s", "time limit"),
    ("align", ["--launch.max-requeues", "-1"], "--launch.max-requeues", "at least 0"),
    ("align", ["--launch.parallel", "0"], "--launch.parallel", "at least 1"),
    ("align", ["--launch.job-name", "x\ntouch /tmp/fastloc-pwned"], "--launch.job-name", "control character"),
    ("align", ["--launch.partition", "gpu\n#SBATCH --uid=0"], "--launch.partition", "control character"),
    ("align", ["--launch.sbatch", "comment=a\rb"], "--launch.sbatch", "control character"),
    ("align", ["--launch.sbatch", "x;rm -rf ~=1"], "--launch.sbatch", "must be a word"),
    ("align", ["--launch.sweep", "optim.lr"], "--launch.sweep", "FIELD=V1,V2"),
    ("align", ["--data.train", "{tmp}/no-shards"], "--data.train", "no such folder"),
    ("align", ["--data.val", "{tmp}/no-shards"], "--data.val", "no such folder"),
    ("align", ["--data.train", "{tmp}"], "--data.train", "no manifest"),
    ("align", ["--optim.epochs", "0"], "--optim.epochs", "at least 1"),  # the job's own rules, at submission
    ("align", ["--run.checkpoint-every", "0"], "--run.checkpoint-every", "at least 1"),
    ("align", ["--run.name", "../../escape"], "--run.name", "plain name"),
    ("probe", ["--epochs", "0"], "--epochs", "at least 1"),
    ("probe", ["--launch.time-min", "-5"], "--launch.time-min", "at least 1"),
]


@pytest.mark.parametrize(
    ("command", "option", "flag", "rule"), BAD_OPTIONS, ids=[" ".join([c, *o]) for c, o, _, _ in BAD_OPTIONS]
)
def test_bad_values_are_one_line_naming_the_option_and_nothing_is_written(
    shards, tmp_path, capsys, monkeypatch, command, option, flag, rule
):
    monkeypatch.chdir(tmp_path)  # a default sweep folder (runs/sweeps) would land here
    job = align if command == "align" else probe
    argv = [*job(shards, tmp_path / "runs"), *[o.format(tmp=tmp_path) for o in option]]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {flag} ") and err.count("\n") == 1, err
    assert rule in err and "Traceback" not in out + err
    assert files_under(tmp_path) == [] and not Path("/tmp/fastloc-pwned").exists()


def test_usage_errors_fail_at_submission(shards, tmp_path, capsys):
    assert main(["train", "tiny"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err
    assert main([*align(shards, tmp_path), "--optim.lrr", "1", "--launch.dry-run"]) == 2  # tyro names the typo
    assert main(probe(tmp_path / "missing", tmp_path) + ["--launch.dry-run"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "--launch.nodes" in capsys.readouterr().out


@pytest.fixture
def no_slurm(tmp_path, monkeypatch) -> None:
    """PATH holds no SLURM binary (whatever this machine has installed)."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert not any(shutil.which(program) for program in ("sbatch", "srun"))


def test_the_dry_run_needs_no_slurm_binaries(no_slurm, shards, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main([*align(shards, out, "--launch.nodes", "2", "--launch.dry-run")]) == 0
    script = capsys.readouterr().out.split("\n{\n", 1)[0]
    assert "#SBATCH --nodes=2\n" in script and "srun --unbuffered --output" in script
    assert script.rstrip().endswith(f"-u -m submitit.core._submit {out}/tiny/slurm")
    sweep = ["--launch.sweep", "optim.lr=1e-3,1e-4", "--launch.sweep-dir", str(out / "sweeps")]
    assert main([*align(shards, out, *sweep, "--launch.dry-run")]) == 0
    assert "#SBATCH --array=0-1%2\n" in capsys.readouterr().out
    assert not out.exists()


def fake_programs(folder: Path, **scripts: str) -> Path:
    """Executables ``folder/NAME`` running the shell ``scripts`` (a stand-in for SLURM's clients)."""
    folder.mkdir()
    for name, script in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{script}\n")
        (folder / name).chmod(0o755)
    return folder


@pytest.mark.parametrize("members", [1, 3])
def test_the_dry_run_script_is_the_one_submitit_writes(tmp_path, monkeypatch, members):
    """sbatch_script builds the script without an executor; with an srun on PATH (a stand-in) the
    executor exists, and its own script for the same parameters must be the same text."""
    import submitit

    monkeypatch.setenv("PATH", str(fake_programs(tmp_path / "bin", srun="exit 0")))
    cfg = LaunchConfig(nodes=2, partition="h100", sbatch=("requeue",), parallel=2)
    folder = tmp_path / "logs dir"  # a space: the folder is quoted the same way in both
    executor = submitit.SlurmExecutor(folder, max_num_timeout=cfg.max_requeues)
    executor.update_parameters(**slurm_parameters(cfg, "job"))
    if members > 1:
        executor.parameters["map_count"] = members  # as submitit's array submission sets it
    expected = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    assert sbatch_script(cfg, folder, "job", members) == expected


def test_a_submission_without_slurm_is_one_clear_line(no_slurm, shards, tmp_path, capsys):
    assert main(align(shards, tmp_path / "runs")) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: --launch.cluster slurm needs SLURM's sbatch and srun on PATH"), err
    assert err.count("\n") == 1 and "Traceback" not in out + err
    assert not (tmp_path / "runs").exists()


def test_sbatch_refusing_the_job_is_one_line(shards, tmp_path, capsys, monkeypatch):
    complaint = "sbatch: error: Batch job submission failed: Invalid partition name specified"
    sbatch = f"echo '{complaint}' >&2; exit 1"
    monkeypatch.setenv("PATH", str(fake_programs(tmp_path / "bin", srun="exit 0", sbatch=sbatch)))
    assert main([*align(shards, tmp_path / "runs"), "--launch.partition", "nope"]) == 2
    assert capsys.readouterr().err == f"error: sbatch refused the job: {complaint}\n"


def test_the_local_cluster_runs_a_sweep_and_its_summary_names_the_failed_member(shards, tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    argv = probe(shards, tmp_path / "runs", "--head", "linear") + ["--launch.cluster", "local", *CPU]
    argv += ["--launch.sweep", f"weights=random,{missing}", "--launch.sweep-dir", str(tmp_path / "sweeps")]
    assert main([*argv, "--launch.wait"]) == 1  # not every member completed
    out = capsys.readouterr().out
    (folder,) = (tmp_path / "sweeps").iterdir()
    ok, failed = list(csv.DictReader((folder / "summary.csv").read_text().splitlines()))
    assert ok["state"] == "COMPLETED" and 0 <= float(ok["macro_ap"]) <= 1
    assert failed["state"] == "FAILED" and "missing.safetensors" in failed["error"]
    assert f"{failed['job_id']} FAILED: " in out and f"(log: {failed['log']})" in out
    assert "missing.safetensors" in Path(failed["log"]).read_text()
    run = Path(ok["run"])
    events = [json.loads(line)["event"] for line in (run / "attempts.jsonl").read_text().splitlines()]
    assert events == ["started", "finished"] and (run / "result.json").is_file()


def test_a_dense_protocol_sweep_runs_and_reports_its_figures(voc, tmp_path, capsys):
    """python -m fastloc.launch probe overcluster ...: parsed as python -m fastloc.probe overcluster
    parses it (the run directory named by the protocol), run on the local cluster, its figures in
    the summary."""
    argv = ["probe", "overcluster", str(voc), "--backbone", "tiny", "--weights", "random", "--image-size", "64"]
    argv += ["--clusters", "30", "--seeds", "1", "--iterations", "5", "--restarts", "1", "--mask-size", "32"]
    argv += ["--batch-size", "4", "--device", "cpu", "--loader", "cpu", "--workers", "0", "--precision", "fp32"]
    argv += ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]
    assert main([*argv, "--launch.dry-run"]) == 0
    resolved = json.loads("{" + capsys.readouterr().out.split("\n{", 1)[1])
    assert resolved["run_dir"] == str(tmp_path / "runs" / "overcluster-voc-tiny-size64-skip0")
    assert resolved["config"]["clusters"] == [30]
    sweep = ["--launch.sweep", "seed=0,1", "--launch.sweep-dir", str(tmp_path / "sweeps"), "--launch.wait"]
    assert main([*argv, "--launch.cluster", "local", *CPU, *sweep]) == 0
    (folder,) = (tmp_path / "sweeps").iterdir()
    rows = list(csv.DictReader((folder / "summary.csv").read_text().splitlines()))
    assert [row["state"] for row in rows] == ["COMPLETED", "COMPLETED"]
    assert all(0 <= float(row["miou_k30"]) <= 1 for row in rows)
    assert [Path(row["run"]).name for row in rows] == [f"overcluster-voc-tiny-size64-skip0-seed{s}" for s in (0, 1)]


def test_a_dense_jobs_run_directory_is_the_one_its_protocol_writes(voc, tmp_path, capsys):
    """dinov3-ade20k feeds the backbone its crop (image size = crop size): the launcher names the run
    directory from the config as the protocol resolves it, not as parsed (size 448)."""
    from fastloc.probe.dense.config import Dinov3Ade20kConfig
    from fastloc.probe.dense.report import run_dir

    argv = ["probe", "linear", str(voc), "--protocol", "dinov3-ade20k", "--crop-size", "64", "--stride", "43"]
    argv += ["--backbone", "tiny", "--weights", "random", "--out", str(tmp_path / "runs")]
    assert main([*argv, "--launch.dry-run", *CPU]) == 0
    resolved = json.loads("{" + capsys.readouterr().out.split("\n{", 1)[1])
    cfg = Dinov3Ade20kConfig(data=voc, crop_size=64, stride=43, backbone="tiny", weights="random")
    written = run_dir(replace(cfg, out=tmp_path / "runs"), "voc")
    assert resolved["run_dir"] == str(written) and written.name == "linear-dinov3-ade20k-voc-tiny-size64-skip0"


def test_a_knn_jobs_run_directory_carries_the_backbones_own_size(shards, tmp_path, capsys):
    """k-NN reads image-level classes (no label maps) and feeds the backbone its own size: the
    launcher checks the splits and k as the protocol does and names the run directory the same."""
    argv = ["probe", "knn", str(shards), "--backbone", "tiny", "--weights", "random", "--k", "5"]
    argv += ["--out", str(tmp_path / "runs")]
    assert main([*argv, "--launch.dry-run", *CPU]) == 0
    resolved = json.loads("{" + capsys.readouterr().out.split("\n{", 1)[1])
    assert resolved["run_dir"] == str(tmp_path / "runs" / "knn-synthetic-tiny-size64-skip0")
    assert main([*argv[:-4], "--k", "500", *argv[-2:], "--launch.dry-run", *CPU]) == 2  # more than the bank
    assert "--k" in capsys.readouterr().err


# ---------------------------------------------------------------- through a real SLURM


@pytest.fixture
def on_slurm(slurm, monkeypatch):
    """Point sbatch, squeue and sacct (run by submitit in this process) at the test cluster."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    return slurm


@pytest.fixture(scope="module")
def torchrun(shards, tmp_path_factory) -> Path:
    """The reference: the same 2-rank tiny run under torchrun."""
    out = tmp_path_factory.mktemp("torchrun")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    command += ["-m", "fastloc.align", *args(shards, out, "--optim.epochs", 2, "--run.checkpoint-every", 3)]
    command += ["--data.batch-size", "8", "--data.val-batch-size", "4", "--data.workers", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "tiny"


TWO_RANKS = ["--data.batch-size", "8", "--data.val-batch-size", "4", "--launch.tasks-per-node", "2", *CPU]


def test_two_tasks_on_slurm_equal_torchrun(on_slurm, shards, torchrun, tmp_path, capsys):
    assert main([*align(shards, tmp_path), *TWO_RANKS, "--data.workers", "0", "--launch.wait"]) == 0
    ended = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert ended["state"] == "COMPLETED" and ended["step"] == 16
    assert_same_curve(tmp_path / "tiny", torchrun)
    attempt = json.loads((tmp_path / "tiny" / "attempts.jsonl").read_text().splitlines()[0])
    assert (attempt["tasks"], attempt["attempt"]) == (2, 0)


def wait_for(condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_on_slurm_the_time_limit_signal_requeues_the_job_and_it_resumes_exactly(
    on_slurm, shards, torchrun, tmp_path, capsys
):
    """With loader workers (2 per rank): SLURM signals every process of the step, and only the
    task itself may requeue (a forked worker inheriting submitit's handler requeued it again)."""
    run = tmp_path / "tiny"
    assert main([*align(shards, tmp_path), *TWO_RANKS]) == 0
    job_id = capsys.readouterr().out.split()[1].rstrip(":")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and max(m["step"] for m in metrics(run)) >= 7, "update 7")
    sent = on_slurm.client("scancel", "--signal=USR2", job_id)  # what SLURM sends signal_delay_s before the limit
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: state(on_slurm, job_id) in ("PENDING", "CANCELLED", "FAILED"), "the requeue")
    assert state(on_slurm, job_id) == "PENDING", (events(run), on_slurm.log_tails())
    # slurmctld holds a requeued job back (about 2 minutes here); as the cluster's admin, release it now
    assert on_slurm.client("scontrol", "update", f"JobId={job_id}", "StartTime=now").returncode == 0
    wait_for(lambda: state(on_slurm, job_id) == "COMPLETED", "the requeued attempt to finish")
    lines = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]
    lines = [line for line in lines if line["event"] != "stopped"]  # how the requeued attempt unwound, if noisily
    assert [line["event"] for line in lines] == ["started", "requeued", "started", "finished"], lines
    assert [line["attempt"] for line in lines] == [0, 0, 1, 1]
    resumed = json.loads((run / "run.json").read_text())["attempts"][-1]
    # checkpoints: every 3 updates and at the end of epoch 1 (update 8); the signal comes after update 7
    assert resumed["step"] in (6, 8, 9, 12), resumed
    assert resumed["resumed_from"].endswith(f"ckpt-{resumed['step']:08d}.pt")
    assert_same_curve(run, torchrun)


def state(cluster, job_id: str) -> str:
    out = cluster.client("sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State").stdout.split()
    return out[-1] if out else ""


def events(run: Path) -> list[str]:
    path = run / "attempts.jsonl"
    return [json.loads(line)["event"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_on_slurm_a_probe_array_finishes_with_its_summary(on_slurm, shards, tmp_path, capsys):
    argv = probe(shards, tmp_path / "runs") + ["--launch.sweep", "head=linear,mlp,transformer", *CPU]
    argv += ["--launch.parallel", "2", "--launch.sweep-dir", str(tmp_path / "sweeps"), "--launch.wait"]
    assert main(argv) == 0
    (folder,) = (tmp_path / "sweeps").iterdir()
    rows = list(csv.DictReader((folder / "summary.csv").read_text().splitlines()))
    assert [(r["head"], r["state"]) for r in rows] == [(h, "COMPLETED") for h in ("linear", "mlp", "transformer")]
    assert all(0 <= float(r["macro_ap"]) <= 1 and Path(r["run"]).is_dir() for r in rows)
    assert len({r["job_id"].split("_")[0] for r in rows}) == 1  # one array
    assert main(["summary", str(folder)]) == 0  # later, from the folder alone
    assert "linear" in capsys.readouterr().out


def test_on_slurm_a_crashing_job_is_reported_failed_with_its_log_and_its_name_stays_literal(
    on_slurm, shards, tmp_path, capsys
):
    """The job is submitted held with a data folder that exists (it is checked at submission),
    the folder is removed, and the released job fails when it opens it."""
    import submitit

    from fastloc.launch.sweep import outcome

    vanishing = Path(shutil.copytree(shards / "train", tmp_path / "vanishing-shards"))
    hostile = "x$(touch pwned) `touch pwned2`; echo 'q' \"d\""
    argv = align(shards, tmp_path, "--data.train", str(vanishing), "--launch.job-name", hostile, *CPU)
    assert main([*argv, "--launch.sbatch", "hold"]) == 0
    job_id = capsys.readouterr().out.split()[1].rstrip(":")
    shutil.rmtree(vanishing)
    assert on_slurm.client("scontrol", "release", job_id).returncode == 0
    job = submitit.SlurmJob(tmp_path / "tiny" / "slurm", job_id)
    wait_for(lambda: job.done(force_check=True), "the released job to end")
    ended = outcome(job)
    assert ended["state"] == "FAILED" and "vanishing-shards" in ended["error"], ended
    assert "vanishing-shards" in Path(ended["log"]).read_text()
    assert not list(Path.cwd().glob("pwned*")) and not list(tmp_path.rglob("pwned*"))
    shown = on_slurm.client("scontrol", "show", "job", job_id, "--oneliner").stdout  # (slurmdbd stores " as `)
    assert re.search(r"JobName=(.*) UserId=", shown).group(1) == hostile
