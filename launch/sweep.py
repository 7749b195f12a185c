"""Sweeps: one array member per combination of the axes, and the table of how each one ended.

``--launch.sweep backbone=clip-vit-b,dino-vit-b`` appends ``--backbone VALUE`` to the command
line of each member (``preset=a,b`` replaces an align run's preset). Members that would write
the same run directory get the sweep values appended to their run name. The sweep folder holds
``sweep.json`` (each member's values, command line, run directory and job id), submitit's logs
and, once asked, ``summary.csv``.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path
from typing import Any

import submitit

from fastloc.launch.job import JobPlan, parse

Values = dict[str, str]
ENDED_BADLY = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def axes(sweep: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """``FIELD=V1,V2`` strings -> [(field, [values])] (ValueError for a malformed axis)."""
    parsed = []
    for axis in sweep:
        key, sep, values = axis.partition("=")
        choices = [v for v in values.split(",") if v]
        if not sep or not key.strip("-") or not choices:
            raise ValueError(f"--launch.sweep {axis!r}: write FIELD=V1,V2,...")
        parsed.append((key.strip("-"), choices))
    return parsed


def member_args(command: str, args: tuple[str, ...], values: Values) -> tuple[str, ...]:
    """A member's command line: the sweep's values appended as flags (later flags win)."""
    from fastloc.align.presets import PRESETS

    out = list(args)
    for key, value in values.items():
        if command == "align" and key == "preset":  # the first preset name is the preset (as align reads it)
            at = next((i for i, a in enumerate(out) if a in PRESETS), None)
            out = [value, *out] if at is None else [*out[:at], value, *out[at + 1 :]]
        else:
            out += [f"--{key}", value]
    return tuple(out)


def members(command: str, args: tuple[str, ...], sweep: tuple[str, ...]) -> list[tuple[Values, JobPlan]]:
    """Every member's sweep values and resolved job, each with its own run directory."""
    grid = axes(sweep)
    combos = [dict(zip([k for k, _ in grid], combo)) for combo in itertools.product(*[v for _, v in grid])]
    plans = [parse(command, member_args(command, args, values)) for values in combos]
    if len({plan.run_dir for plan in plans}) < len(plans):
        name_flag = "--run.name" if command == "align" else "--name"
        plans = [
            parse(command, (*plan.args, name_flag, f"{plan.run_dir.name}-{_tag(values)}"))
            for values, plan in zip(combos, plans)
        ]
    return list(zip(combos, plans))


def _tag(values: Values) -> str:
    text = "-".join(f"{key.rsplit('.', 1)[-1]}{value}" for key, value in values.items())
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def write_record(folder: Path, command: str, cluster: str, pairs: list[tuple[Values, JobPlan]], jobs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command,
        "cluster": cluster,
        "members": [
            {"values": values, "args": list(plan.args), "run_dir": str(plan.run_dir), "job_id": job.job_id}
            for (values, plan), job in zip(pairs, jobs)
        ],
    }
    path = folder / "sweep.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def outcome(job: submitit.Job) -> dict[str, Any]:
    """How a job ended (or where it is): its result's figures, or its state, last error line and log."""
    if not job.done(force_check=True):
        return {"state": job.state, "log": str(job.paths.stderr)}
    error = job.exception()
    if error is None:
        return {"state": "COMPLETED", **job.results()[0]}  # rank 0's
    text = str(error).split("-" * 22)  # submitit: a header, the job's traceback, then where the logs are
    lines = [line for line in (text[1] if len(text) > 2 else text[0]).splitlines() if line.strip()]
    state = (job.state.split() or [""])[0]  # "CANCELLED by 0" -> CANCELLED
    state = state if state in ENDED_BADLY else "FAILED"  # sacct may still say RUNNING for a second
    return {"state": state, "error": lines[-1] if lines else "", "log": str(job.paths.stderr)}


def summarize(folder: Path) -> tuple[str, Path, bool]:
    """The sweep's table (one row per member, failed ones with their log), its CSV, and whether
    every member completed."""
    record = json.loads((folder / "sweep.json").read_text())
    job_class = submitit.LocalJob if record["cluster"] == "local" else submitit.SlurmJob
    rows = []
    for member in record["members"]:
        job = job_class(folder, member["job_id"])
        rows.append({"job_id": member["job_id"], **member["values"], **outcome(job)})
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path = folder / "summary.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return table(rows, columns), path, all(row["state"] == "COMPLETED" for row in rows)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value if value is not None else "")

    shown = [c for c in columns if c not in ("run", "log", "error")]
    cells = [[cell(row.get(c)) for c in shown] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(shown)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(shown, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    failed = [row for row in rows if row["state"] != "COMPLETED"]
    lines += [f"{row['job_id']} {row['state']}: {row.get('error', '')} (log: {row['log']})" for row in failed]
    return "\n".join(lines)
