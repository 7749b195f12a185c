"""``python -m fastloc.bench NAME [options]``: measured speed, printed as a table and saved as JSON.

Each benchmark records the device, the package versions, the command and every raw timing.
``python -m fastloc.bench NAME --help`` explains a benchmark's options.
"""

from __future__ import annotations

import shlex
import sys

import tyro

from fastloc.bench import kernels, loader, shard

# benchmark name -> (config class, runner)
BENCHMARKS = {
    "shard": (shard.ShardBench, shard.run),
    "kernels": (kernels.KernelBench, kernels.run),
    "loader": (loader.LoaderBench, loader.run),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print(__doc__.strip(), file=sys.stderr)
        for name, (cfg, _) in BENCHMARKS.items():
            print(f"  {name:10s} {(cfg.__doc__ or '').strip()}", file=sys.stderr)
        return 0 if argv[:1] in (["--help"], ["-h"]) else 2
    cfg_class, runner = BENCHMARKS[argv[0]]
    cfg = tyro.cli(cfg_class, args=argv[1:], prog=f"python -m fastloc.bench {argv[0]}")
    print(f"results: {runner(cfg, shlex.join(['python', '-m', 'fastloc.bench', *argv]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
