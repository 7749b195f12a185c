"""Turn a ``LaunchConfig`` and resolved jobs into submitit submissions (one job, or an array).

Every user value that reaches the sbatch script is checked first: a name, path or option with a
control character (a newline would start a new shell line in the script) or an option key that
is not a plain word is refused with a message, never written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import submitit

from fastloc.launch.config import LaunchConfig
from fastloc.launch.job import Job, Spec

_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


def executor(cfg: LaunchConfig, folder: Path, name: str) -> submitit.Executor:
    """A SLURM (or local) executor writing its logs under ``folder``."""
    checked("the job folder", str(folder))
    if cfg.cluster == "local":
        local = submitit.LocalExecutor(folder, max_num_timeout=cfg.max_requeues)
        local.update_parameters(
            timeout_min=cfg.time_min, tasks_per_node=cfg.tasks, signal_delay_s=cfg.signal_delay_s, gpus_per_node=0
        )
        return local
    slurm = submitit.SlurmExecutor(folder, max_num_timeout=cfg.max_requeues)
    slurm.update_parameters(**slurm_parameters(cfg, name))
    return slurm


def sbatch_script(cfg: LaunchConfig, folder: Path, name: str, members: int = 1) -> str:
    """The sbatch script ``submit`` would write (an array of ``members`` when more than one)."""
    from submitit.slurm.slurm import _make_sbatch_string

    slurm = submitit.SlurmExecutor(folder, max_num_timeout=cfg.max_requeues)
    params = {**slurm_parameters(cfg, name), **({"map_count": members} if members > 1 else {})}
    return _make_sbatch_string(command=slurm._submitit_command_str, folder=folder, **params)


def submit(cfg: LaunchConfig, specs: list[Spec], folder: Path, name: str) -> list[submitit.Job]:
    """Submit one job per spec: a single job, or one array (``--launch.parallel`` at once)."""
    ex = executor(cfg, folder, name)
    jobs = [Job(spec.command, spec.args, spec.run_dir) for spec in specs]
    if len(jobs) == 1:
        return [ex.submit(jobs[0])]
    with ex.batch():
        handles = [ex.submit(job) for job in jobs]
    return handles
