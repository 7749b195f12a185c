"""The local SLURM cluster of tests/slurm_cluster.py: jobs run, and sacct reports them as a real cluster does."""

import time
from datetime import datetime
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster

FIELDS = "JobID,State,ExitCode,Start,End"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "PREEMPTED"}


@pytest.fixture
def cluster(slurm):
    return slurm


def submit(cluster: SlurmCluster, *args: str) -> str:
    """sbatch with the job's output in the cluster's directory; the job id."""
    done = cluster.client("sbatch", "--parsable", f"--chdir={cluster.root}", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def finished(cluster: SlurmCluster, job: str, members: int = 1, timeout: float = 30.0) -> dict[str, dict[str, str]]:
    """sacct's rows for ``job`` (by JobID) once all ``members`` are in a final state."""
    deadline = time.monotonic() + timeout
    while True:
        out = cluster.client("sacct", "-j", job, "-X", "-n", "-P", "-o", FIELDS).stdout
        rows = {line.split("|")[0]: dict(zip(FIELDS.split(","), line.split("|"))) for line in out.splitlines()}
        if len(rows) == members and all(row["State"].split()[0] in TERMINAL for row in rows.values()):
            return rows
        assert time.monotonic() < deadline, f"sacct after {timeout} s: {out!r}"
        time.sleep(0.5)


def test_completed_job(cluster):
    job = submit(cluster, "--output=hi-%j.out", "--wrap", "echo hi")
    row = finished(cluster, job)[job]
    assert (row["State"], row["ExitCode"]) == ("COMPLETED", "0:0")
    assert (cluster.root / f"hi-{job}.out").read_text() == "hi\n"


def test_srun_step_inside_a_batch_job(cluster):
    """submitit's batch script launches its worker with srun."""
    job = submit(cluster, "--output=step-%j.out", "--wrap", "srun echo step")
    assert finished(cluster, job)[job]["State"] == "COMPLETED"
    assert (cluster.root / f"step-{job}.out").read_text() == "step\n"


@pytest.mark.parametrize(("script", "exit_code"), [("exit 3", "3:0"), ("kill -9 $$", "0:9")])
def test_failed_job(cluster, script, exit_code):
    job = submit(cluster, "--output=/dev/null", "--wrap", script)
    row = finished(cluster, job)[job]
    assert (row["State"], row["ExitCode"]) == ("FAILED", exit_code)


def test_one_cpu_jobs_run_concurrently(cluster):
    jobs = [submit(cluster, "--cpus-per-task=1", "--output=/dev/null", "--wrap", "sleep 3") for _ in range(2)]
    rows = [finished(cluster, job)[job] for job in jobs]
    assert all(row["State"] == "COMPLETED" for row in rows)
    (start_a, end_a), (start_b, end_b) = [
        (datetime.fromisoformat(r["Start"]), datetime.fromisoformat(r["End"])) for r in rows
    ]
    assert start_a < end_b and start_b < end_a, rows


def test_throttled_array(cluster):
    job = submit(cluster, "--array=0-2%2", "--output=/dev/null", "--wrap", "sleep 1")
    rows = finished(cluster, job, members=3)
    assert sorted(rows) == [f"{job}_{i}" for i in range(3)]
    assert {row["State"] for row in rows.values()} == {"COMPLETED"}


def test_a_second_cluster_starts_fresh_and_stops_clean(cluster, tmp_path: Path):
    """A fresh cluster (beside the session's) starts with a fresh state, runs a job, and stops leaving no process."""
    with SlurmCluster(tmp_path) as fresh:
        daemons = fresh.processes()
        job = submit(fresh, "--output=/dev/null", "--wrap", "true")
        assert job == "1"  # a fresh state and database
        assert finished(fresh, job)[job]["State"] == "COMPLETED"
    assert daemons and not fresh.processes()
