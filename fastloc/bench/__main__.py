"""Measure fastloc's speed: each benchmark prints a table and saves a JSON record.

The record holds the device, the package versions, the command, every raw timing, and the rows
this machine could not produce with the reason (for instance the Triton rows without a GPU).
Every option is checked before any measurement; a bad value, a missing data folder or a file
system error is one "error:" line and exit status 2.

Examples:
    python -m fastloc.bench kernels
    python -m fastloc.bench loader --workers 1 2 4
    python -m fastloc.bench shard --images 4000
    python -m fastloc.bench align --preset clip-vit-b
    python -m fastloc.bench probe --backbone clip-vit-b --data shards/coco --epochs 5
    python -m fastloc.bench evals --scale voc
"""

from __future__ import annotations

import difflib
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Union

import tyro

from fastloc.bench import align, evals, kernels, loader, probe, shard
from fastloc.cli import run_command

# benchmark name -> (config class, runner(config, command) -> JSON path)
BENCHMARKS: dict[str, tuple[type, Callable[[Any, str], Path]]] = {
    "shard": (shard.ShardBench, shard.run),
    "kernels": (kernels.KernelBench, kernels.run),
    "loader": (loader.LoaderBench, loader.run),
    "align": (align.AlignBench, align.run),
    "probe": (probe.ProbeBench, probe.run),
    "evals": (evals.EvalsBench, evals.run),
}
PROG = "python -m fastloc.bench"


def _subcommands():
    options = [Annotated[cfg, tyro.conf.subcommand(name)] for name, (cfg, _) in BENCHMARKS.items()]
    return Union[tuple(options)]  # noqa: UP007 (tyro needs a runtime Union)


def unknown_benchmark(name: str) -> str | None:
    """The error message for a benchmark name that does not exist, None for a known one."""
    if name in BENCHMARKS:
        return None
    close = difflib.get_close_matches(name, BENCHMARKS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    names = ", ".join(BENCHMARKS)
    return f"error: unknown benchmark {name!r}{hint}; the benchmarks are {names} ({PROG} --help describes them)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("-") and (message := unknown_benchmark(argv[0])):
        print(message, file=sys.stderr)
        return 2
    try:
        cfg = tyro.cli(_subcommands(), args=argv, prog=PROG, description=__doc__)
    except SystemExit as exc:  # --help (0) or a usage error tyro has explained (2)
        return exc.code if isinstance(exc.code, int) else 2
    runner = next(run for cls, run in BENCHMARKS.values() if isinstance(cfg, cls))

    def command() -> int:
        cfg.validate()
        print(f"results: {runner(cfg, shlex.join(['python', '-m', 'fastloc.bench', *argv]))}")
        return 0

    return run_command(command, "nothing was recorded; run the benchmark again")


if __name__ == "__main__":
    sys.exit(main())
