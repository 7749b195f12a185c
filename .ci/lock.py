#!/usr/bin/env python3
"""Refresh constraints.txt: the lock of every distribution that `pip install -e ".[dev]"` installs.

pip resolves pyproject.toml's requirements (the dependencies and every extra) afresh, as on a
new machine: `pip install --dry-run --ignore-installed --report` ignores what is installed and
the current lock, installs nothing and builds only metadata. pip's own configuration (indexes,
find-links, a configured constraint) applies as for any install. The lock is written sorted, one
`name==version` a line, under a header that says how it was made and for which Python and
platform; the same resolution always gives the same file. Run it with CI's Python (3.11, Linux
x86_64), from any environment (nothing installed in it is used but pip):

    python3 .ci/lock.py            # rewrite constraints.txt
    python3 .ci/lock.py --check    # exit 1 if a fresh resolution differs from constraints.txt
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"


def canonical(name: str) -> str:
    """PEP 503 normalized name: runs of -, _ and . become one -, lower case."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path) -> tuple[list[str], list[str]]:
    """The project's requirements, the dependencies and every extra's, and the extras' names."""
    if sys.version_info < (3, 11):
        raise SystemExit("error: .ci/lock.py needs Python >= 3.11 (tomllib); CI's lock is made with 3.11")
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    reqs = [*project.get("dependencies", []), *(r for name in sorted(extras) for r in extras[name])]
    own = canonical(project["name"])
    # a self-reference such as "fastloc[dev]" inside an extra adds nothing to resolve
    reqs = [r for r in reqs if canonical(re.split(r"[\s\[<>=!~;@(]", r.strip(), maxsplit=1)[0]) != own]
    return reqs, sorted(extras)


def resolve(reqs: list[str]) -> dict:
    """pip's installation report for ``reqs``, resolved as if nothing were installed."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--disable-pip-version-check",
            "--report",
            str(report),
            *reqs,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not report.is_file():
            raise SystemExit(f"error: pip could not resolve the requirements:\n{result.stderr}")
        return json.loads(report.read_text())


def pins(report: dict) -> list[str]:
    """``name==version`` of every distribution in the report, sorted by canonical name."""
    found = {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}
    return [f"{name}=={found[name]}" for name in sorted(found)]


def render(report: dict, extras: list[str]) -> str:
    """The lock file's text: header, then the sorted pins (deterministic for one resolution)."""
    env = report["environment"]
    target = (
        f"{env['platform_python_implementation']} {env['python_version']} on "
        f"{env['sys_platform']} {env['platform_machine']}"
    )
    header = [
        "# The lock of fastloc's whole dependency set: every distribution that",
        '# `pip install -e ".[dev]"` installs, transitive ones included. Use it as constraints:',
        '#     pip install -c constraints.txt -e ".[dev]"',
        "# Made by `python3 .ci/lock.py` (do not edit by hand) from pyproject.toml's dependencies",
        f"# and extras ({', '.join(extras) or 'none'}), resolved afresh by pip {report['pip_version']} for {target}.",
    ]
    return "\n".join([*header, *pins(report)]) + "\n"


def read_pins(text: str) -> list[str]:
    """The pin lines of a lock file (comments and blank lines dropped)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 .ci/lock.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=LOCK, help="lock file to write (default: %(default)s)")
    parser.add_argument(
        "--pyproject", type=Path, default=REPO / "pyproject.toml", help="requirements to lock (default: %(default)s)"
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the lock is not current")
    args = parser.parse_args(argv)
    reqs, extras = requirements(args.pyproject)
    text = render(resolve(reqs), extras)
    if args.check:
        current = read_pins(args.output.read_text()) if args.output.is_file() else []
        fresh = read_pins(text)
        if current == fresh:
            print(f"{args.output}: current ({len(fresh)} pins)")
            return 0
        for line in sorted(set(current) - set(fresh)):
            print(f"- {line}")
        for line in sorted(set(fresh) - set(current)):
            print(f"+ {line}")
        print(f"{args.output}: out of date; refresh with: python3 .ci/lock.py", file=sys.stderr)
        return 1
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.output)
    print(f"{args.output}: {len(read_pins(text))} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
