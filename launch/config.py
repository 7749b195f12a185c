"""Where and how a job runs: the launcher's one config (``--launch.FIELD`` on the command line).

``validate`` refuses numbers SLURM would misread or reject (``#SBATCH --nodes=0``, a negative time)
before any script is built or any file written: one ``error:`` line naming the option, exit 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastloc.cli import flowing_help, require


@flowing_help
@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """The SLURM resources of one job (each member of a sweep gets the same)."""

    cluster: Literal["slurm", "local"] = "slurm"
    """slurm submits with sbatch; local runs the job on this machine through submitit's local
    executor (debugging without SLURM)."""

    nodes: int = 1
    """Nodes of the job."""

    gpus_per_node: int = 8
    """GPUs per node; one task (one rank) per GPU. 0 runs one CPU task per node."""

    tasks_per_node: int | None = None
    """Tasks (ranks) per node (default: one per GPU, or 1 without GPUs)."""

    cpus_per_task: int = 10
    """CPU cores per task: DALI decodes on the GPU but still needs cores to read and feed."""

    mem_gb: int | None = None
    """Memory per node in GB (default: the partition's)."""

    time_min: int = 24 * 60
    """Time limit of one attempt, in minutes; the job checkpoints and requeues itself when it runs out."""

    partition: str = ""
    """SLURM partition (default: the cluster's default partition)."""

    account: str = ""
    """SLURM account."""

    qos: str = ""
    """SLURM quality of service."""

    constraint: str = ""
    """SLURM node constraint (e.g. h100)."""

    exclusive: bool = False
    """Whole nodes only."""

    sbatch: tuple[str, ...] = ()
    """More sbatch options as KEY=VALUE (e.g. reservation=big mail-type=END); KEY alone for a flag."""

    signal_delay_s: int = 120
    """Seconds between the time-limit signal and the kill: the job's time to requeue itself."""

    max_requeues: int = 3
    """Requeues after a time-out before the job gives up (preemptions do not count)."""

    job_name: str = ""
    """The job's name in squeue (default: fastloc-COMMAND-RUN)."""

    folder: Path | None = None
    """Folder of submitit's logs and pickles (default: RUN_DIR/slurm, or SWEEP_DIR for a sweep)."""

    sweep: tuple[str, ...] = ()
    """Sweep axes as FIELD=V1,V2,... (e.g. backbone=clip-vit-b,dino-vit-b; preset=a,b for align):
    one array member per combination."""

    sweep_dir: Path = Path("runs/sweeps")
    """Parent of a sweep's folder (its members, their job ids and the summary table)."""

    parallel: int = 64
    """Most array members running at once."""

    wait: bool = False
    """Wait for the job (or every member of the sweep) to finish, then print its result (or the summary)."""

    dry_run: bool = False
    """Print the sbatch script and the resolved config; submit nothing."""

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    def validate(self) -> LaunchConfig:
        """Refuse nonsense numbers (``BadValue`` naming the option); ``self`` when all is well."""
        for name in ("nodes", "cpus_per_task", "time_min", "parallel"):
            _at_least(name, getattr(self, name), 1)
        for name in ("gpus_per_node", "signal_delay_s", "max_requeues"):
            _at_least(name, getattr(self, name), 0)
        for name in ("tasks_per_node", "mem_gb"):  # None: SLURM's default
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        # a signal due before the job starts would requeue every attempt at once, forever
        require(
            self.signal_delay_s < 60 * self.time_min,
            "--launch.signal-delay-s",
            self.signal_delay_s,
            f"must be shorter than the time limit (--launch.time-min {self.time_min} = {60 * self.time_min} s)",
        )
        return self


def _at_least(name: str, value: int, low: int) -> None:
    require(value >= low, f"--launch.{name.replace('_', '-')}", value, f"must be at least {low}")
