"""Turn a ``LaunchConfig`` and resolved jobs into submitit submissions (one job, or an array).

Every user value that reaches the sbatch script is checked first: a name, path or option with a
control character (a newline would start a new shell line in the script) or an option key that
is not a plain word is refused with a message, never written. The script is built by submitit's
own script builder without a ``SlurmExecutor`` (which refuses to exist where ``srun`` is missing),
so the dry run works on a laptop; only a real submission needs SLURM's binaries, and says so in
one line where they are missing.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import submitit

from fastloc.launch.config import LaunchConfig
from fastloc.launch.job import Job, JobPlan

_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SLURM_CLIENTS = ("sbatch", "srun")  # sbatch submits; submitit's script starts the tasks with srun


class SubmitError(RuntimeError):
    """The cluster cannot take the job (no SLURM here, or sbatch refused it): one line, exit 2."""


def checked(what: str, value: str) -> str:
    """``value``, unless it holds a control character (ValueError saying what and where)."""
    if _CONTROL.search(value):
        raise ValueError(f"{what} {value!r} holds a control character (newline, tab, ...): refused")
    return value


def extra_options(options: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` (or ``KEY`` for a flag) -> submitit's ``additional_parameters``."""
    extra: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.removeprefix("--")
        if not _KEY.fullmatch(key):
            raise ValueError(f"--launch.sbatch {option!r}: the option name must be a word like mail-type")
        extra[key] = checked(f"--launch.sbatch {key}", value) if sep else True
    return extra


def slurm_parameters(cfg: LaunchConfig, name: str) -> dict[str, Any]:
    """The SlurmExecutor's parameters: one task per GPU, the signal before the time limit."""
    params: dict[str, Any] = {
        "job_name": checked("--launch.job-name", cfg.job_name or name),
        "nodes": cfg.nodes,
        "ntasks_per_node": cfg.tasks,
        "cpus_per_task": cfg.cpus_per_task,
        "time": cfg.time_min,
        "signal_delay_s": cfg.signal_delay_s,
        "array_parallelism": cfg.parallel,
    }
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb:
        params["mem"] = f"{cfg.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if value := getattr(cfg, key):
            params[key] = checked(f"--launch.{key}", value)
    if cfg.exclusive:
        params["exclusive"] = True
    if cfg.sbatch:
        params["additional_parameters"] = extra_options(cfg.sbatch)
    return params


def require_slurm() -> None:
    """A ``SubmitError`` unless SLURM's client binaries are on PATH (checked before anything is written)."""
    missing = [program for program in SLURM_CLIENTS if shutil.which(program) is None]
    if missing:
        raise SubmitError(
            f"--launch.cluster slurm needs SLURM's {' and '.join(missing)} on PATH, not found here: submit "
            "from a SLURM login node (--launch.dry-run prints the script anywhere; --launch.cluster local runs here)"
        )


def executor(cfg: LaunchConfig, folder: Path, name: str) -> submitit.Executor:
    """A SLURM (or local) executor writing its logs under ``folder``."""
    checked("the job folder", str(folder))
    if cfg.cluster == "local":
        local = submitit.LocalExecutor(folder, max_num_timeout=cfg.max_requeues)
        local.update_parameters(
            timeout_min=cfg.time_min, tasks_per_node=cfg.tasks, signal_delay_s=cfg.signal_delay_s, gpus_per_node=0
        )
        return local
    params = slurm_parameters(cfg, name)  # the values are checked before SLURM's presence
    require_slurm()
    slurm = submitit.SlurmExecutor(folder, max_num_timeout=cfg.max_requeues)
    slurm.update_parameters(**params)
    return slurm


def sbatch_script(cfg: LaunchConfig, folder: Path, name: str, members: int = 1) -> str:
    """The sbatch script ``submit`` would write (an array of ``members`` when more than one), built
    without SLURM's binaries: submitit's script builder with the command its executor passes it."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = {**slurm_parameters(cfg, name), **({"map_count": members} if members > 1 else {})}
    folder = Path(folder).expanduser().absolute()  # as submitit's executor holds it
    checked("the job folder", str(folder))
    return _make_sbatch_string(command=worker_command(folder), folder=folder, **params)


def worker_command(folder: Path) -> str:
    """What ``SlurmExecutor._submitit_command_str`` says for ``folder`` (submitit 1.5): the worker
    that unpickles and runs the job. Written out because only an executor has it, and constructing
    one needs ``srun``; tests/test_launch.py checks the two agree."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def submit(cfg: LaunchConfig, plans: list[JobPlan], folder: Path, name: str) -> list[submitit.Job]:
    """Submit one job per plan: a single job, or one array (``--launch.parallel`` at once)."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    ex = executor(cfg, folder, name)
    jobs = [Job(plan.command, plan.args, plan.run_dir) for plan in plans]
    said = io.StringIO()  # submitit prints a refusing sbatch's stderr itself, then raises: one line instead
    try:
        with contextlib.redirect_stderr(said):
            handles = _submit_all(ex, jobs)
    except (FailedJobError, FailedSubmissionError) as exc:
        complaint = " ".join((said.getvalue().strip() or str(exc)).split())
        refused = "sbatch" if cfg.cluster == "slurm" else "submitit's local executor"
        raise SubmitError(f"{refused} refused the job: {complaint}") from None
    sys.stderr.write(said.getvalue())  # what a submission that went through said (warnings)
    return handles


def _submit_all(ex: submitit.Executor, jobs: list[Job]) -> list[submitit.Job]:
    if len(jobs) == 1:
        return [ex.submit(jobs[0])]
    with ex.batch():
        return [ex.submit(job) for job in jobs]
