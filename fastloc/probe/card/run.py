"""``card(cfg)``: plan, reuse or run, gather, render.

Plan: for every protocol and backbone, the protocol's data folder (absent: "no data: PATH", not
run), its command line and its config and run directory as the launcher resolves them
(``fastloc.launch.job.parse``: the values, the splits and the data checked before any work).
Reuse: the run directory's result.json when its config equals the planned one (where the outputs
go aside) and neither the backbone's file, the weights file nor the data's manifests are newer.
Run: the missing ones here, one after another, through the same ``fastloc.launch.job.run`` a
launched job calls, or with --slurm as one job array through ``fastloc.launch.submit``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fastloc.cli import BadValue, exception_line, user_errors
from fastloc.launch.job import JobPlan
from fastloc.models.exported import exported_metadata, is_export
from fastloc.probe.backbone import backbone_tag
from fastloc.probe.card.config import PROTOCOLS, CardConfig
from fastloc.probe.compare import load_result
from fastloc.probe.report import checked_folders

REUSED, TO_RUN = "reused", "to run"
# config fields that say where outputs go or how fast they come, not what is measured
WHERE = frozenset({"out", "results", "cache_dir", "cache", "name", "workers", "predictions", "pictures"})


@dataclass
class Cell:
    """One protocol for one backbone: what happened to it, and its result once there."""

    protocol: str
    backbone: str  # as given
    label: str  # its column in the card
    status: str = TO_RUN  # reused, ran ..., no data: PATH, not applicable: ..., failed: ...
    plan: JobPlan | None = None
    why: str = ""  # why it had to run
    result_path: Path | None = None
    result: dict | None = None


def labels(backbones: tuple[str, ...]) -> list[str]:
    """Each backbone's column: its name ('/' made '_'), an export's file stem with a path digest."""
    return [backbone_tag(name, "pretrained") for name in backbones]


def check_backbone(name: str, weights: str) -> None:
    """A ``BadValue`` naming the backbone (or --weights) unless it can be loaded: an export that is
    a readable fastloc export, or a registered name or timm id, and a weights file that exists."""
    if name.endswith(".safetensors"):
        if not Path(name).is_file():
            raise BadValue(f"BACKBONE {name}: no such file")
        try:
            export = is_export(name) and bool(exported_metadata(Path(name)).get("timm_id"))
        except Exception as exc:  # safetensors' own error types: a truncated or foreign file
            raise BadValue(f"BACKBONE {name}: not a readable safetensors file ({exception_line(exc)})") from None
        if not export:
            raise BadValue(
                f"BACKBONE {name}: not a fastloc export (python -m fastloc.align export writes one); "
                "a plain weights file goes to --weights with its architecture as BACKBONE"
            )
        return
    from fastloc.models.registry import backbone

    backbone(name)  # a ValueError naming it, unless registered or a timm id
    if weights not in ("pretrained", "random") and not Path(weights).is_file():
        raise BadValue(f"--weights {weights}: no such file (a weights file, pretrained or random)")


def command_line(cfg: CardConfig, protocol: str, backbone: str) -> tuple[str, ...]:
    """The protocol's command line (after ``python -m fastloc.probe``) for one backbone: the card's
    shared options, then the protocol's --knobs (later flags win)."""
    spec = PROTOCOLS[protocol]
    args = [*spec.command, str(cfg.data_root(protocol)), "--backbone", backbone]
    if not is_export(backbone):
        args += ["--weights", cfg.weights]
    if protocol != "knn":  # DINO's k-NN is fp32 by its own default
        args += ["--precision", cfg.precision]
    args += ["--seed", str(cfg.seed), "--device", cfg.device]
    args += ["--out", str(cfg.out), "--results", str(cfg.results), "--cache-dir", str(cfg.cache_dir)]
    if not spec.zeroshot:  # zero-shot reads images one by one, in this process
        args += ["--loader", cfg.loader, "--workers", str(cfg.workers)]
    return (*args, *cfg.knob_args(protocol))


def plan_job(protocol: str, args: tuple[str, ...]) -> JobPlan:
    """The config and run directory the protocol's command would run with (the data checked)."""
    from fastloc.launch.job import parse

    return parse("probe", args)


def no_text_tower(plan: JobPlan) -> str:
    """Why zero-shot cannot read this backbone out (no paired text tower), or ''."""
    from fastloc.models.pairing import text_backbones
    from fastloc.probe.zeroshot.run import text_tower_name

    try:
        tower = text_tower_name(plan.config)
    except ValueError as exc:
        return str(exc)
    return "" if tower in text_backbones() else f"no text tower is paired with {tower}"


def plan(cfg: CardConfig) -> list[Cell]:
    """Every protocol x backbone, in the card's order: reused, to run, or why not."""
    cells = []
    for protocol in cfg.chosen():
        root = cfg.data_root(protocol)
        for backbone, label in zip(cfg.backbones, labels(cfg.backbones)):
            cell = Cell(protocol, backbone, label)
            cells.append(cell)
            if not root.is_dir():
                cell.status = f"no data: {root}"
                continue
            try:
                cell.plan = plan_job(protocol, command_line(cfg, protocol, backbone))
            except Exception as exc:  # the protocol's own refusal of its options or data: one line, with where
                if not isinstance(exc, user_errors()):
                    raise
                raise BadValue(f"{protocol} for {backbone}: {exception_line(exc, 600)}") from None
            if PROTOCOLS[protocol].zeroshot and (reason := no_text_tower(cell.plan)):
                cell.status = f"not applicable: {reason}"
                continue
            cell.why = stale(cell.plan)
            cell.status = TO_RUN if cell.why else REUSED
    return cells


def settings(config: dict) -> dict:
    """What of a config decides the figures: everything but where the outputs go; paths resolved."""
    out = {k: v for k, v in config.items() if k not in WHERE}
    if out.get("data"):
        out["data"] = str(Path(out["data"]).resolve())
    return out


def stale(job: JobPlan) -> str:
    """Why the run directory's result is not this run's ('' when it is, so it is reused)."""
    path = job.run_dir / "result.json"
    if not path.is_file():
        return "no result yet"
    try:
        result = load_result(path)
    except ValueError as exc:
        return f"the result there cannot be used ({exc})"
    want = settings(json.loads(json.dumps(asdict(job.config), default=str)))
    have = settings(result.get("config") or {})
    differ = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if differ:
        shown = ", ".join(f"{k} {have.get(k)!r}, now {want.get(k)!r}" for k in differ[:3])
        return f"the result there was made with other settings ({shown})"
    written = path.stat().st_mtime
    newer = [p for p in inputs(job.config) if p.stat().st_mtime > written]
    return f"{newer[0]} is newer than the result there" if newer else ""


def inputs(config) -> list[Path]:
    """The files a result depends on besides its config: the backbone's export or weights file and
    the shard set's manifests."""
    files = [Path(config.backbone)] if is_export(config.backbone) else []
    if config.weights not in ("pretrained", "random"):
        files.append(Path(config.weights))
    return [*files, *sorted(Path(config.data).glob("*/manifest.json"))]


def run_here(cell: Cell) -> None:
    """Run the cell's protocol in this process (as a launched job does); a user error is its status."""
    from fastloc.launch.job import run

    print(f"\n[card] {cell.protocol} for {cell.backbone}: running ({cell.why})")
    try:
        run(cell.plan)
    except Exception as exc:
        if not isinstance(exc, (*user_errors(), OSError)):
            raise
        cell.status = f"failed: {exception_line(exc)}"
        return
    cell.status = "ran"


def run_array(cfg: CardConfig, cells: list[Cell], folder: Path, poll_s: float = 2.0) -> None:
    """The cells as one job array through fastloc.launch, waited for; each cell's status says how
    its job ended. A cell whose job an
    earlier card submitted (``folder``/jobs.json) and that has not ended is waited for, not
    submitted again: a card stopped while it waited is run again to go on waiting."""
    from fastloc.launch import submit

    earlier = [(c, job) for c in cells if (job := unfinished(folder, c)) is not None]
    new = [c for c in cells if all(c is not e for e, _ in earlier)]
    jobs = (
        submit.submit(cfg.launch, [c.plan for c in new], folder, cfg.launch.job_name or "fastloc-card") if new else []
    )
    record_jobs(folder, new, jobs, cfg.launch.cluster)
    for cell, job in (*earlier, *zip(new, jobs)):
        said = "waiting for" if any(cell is e for e, _ in earlier) else "submitted"
        print(f"[card] {said} {job.job_id}: {cell.protocol} for {cell.backbone} (logs: {job.paths.stdout})")
    waited = [*earlier, *zip(new, jobs)]
    while not all(job.done(force_check=True) for _, job in waited):
        time.sleep(poll_s)
    for cell, job in waited:
        cell.status = job_status(job)


def job_status(job) -> str:
    """How a launched job ended, as the card's status."""
    from fastloc.launch.sweep import outcome

    ended = outcome(job)
    if ended["state"] == "COMPLETED":
        return f"ran as job {job.job_id}"
    return f"failed: job {job.job_id} {ended['state']}: {ended.get('error', '')} (log: {ended['log']})"


JOBS = "jobs.json"  # in the array's folder: {run directory: {job_id, cluster}} of every job a card submitted


def record_jobs(folder: Path, cells: list[Cell], jobs: list, cluster: str) -> None:
    path = folder / JOBS
    known = json.loads(path.read_text()) if path.is_file() else {}
    known |= {str(c.plan.run_dir): {"job_id": j.job_id, "cluster": cluster} for c, j in zip(cells, jobs)}
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=1) + "\n")


def unfinished(folder: Path, cell: Cell):
    """The job an earlier card submitted for the cell's run directory, while it has not ended."""
    import submitit

    path = folder / JOBS
    entry = json.loads(path.read_text()).get(str(cell.plan.run_dir)) if path.is_file() else None
    if entry is None:
        return None
    job = (submitit.LocalJob if entry["cluster"] == "local" else submitit.SlurmJob)(folder, entry["job_id"])
    return None if job.done(force_check=True) else job


def gather(cells: list[Cell]) -> None:
    """Each reused or run cell's result.json."""
    for cell in cells:
        if cell.status == REUSED or cell.status.startswith("ran"):
            cell.result_path = cell.plan.run_dir / "result.json"
            cell.result = load_result(cell.result_path)


def card_of_results(folder: Path, results: dict[str, dict[str, Path]], status: str = REUSED) -> Path:
    """A card of results already there ({column: {protocol: result.json}}, e.g. the demo's roles),
    nothing planned or run; card.md's path."""
    from fastloc.probe.card.render import write_card

    cells = []
    for protocol in dict.fromkeys(p for row in results.values() for p in row):
        for label, row in results.items():
            cell = Cell(protocol, label, label, status if protocol in row else "not run")
            if protocol in row:
                cell.result_path = Path(row[protocol])
                cell.result = load_result(cell.result_path)
            cells.append(cell)
    return write_card(folder, cells, list(results), {"results": results})


def check_data(cfg: CardConfig) -> None:
    """A ``BadValue`` for a --shards root or a --data folder that is not there (a protocol's own
    folder missing under --shards is only "no data")."""
    if not Path(cfg.shards).is_dir():
        raise BadValue(f"--shards {cfg.shards}: no such folder (the root of shards/coco, ade20k, voc, imagenet)")
    for protocol, path in cfg.overrides("--data", cfg.data).items():
        if not Path(path).is_dir():
            raise BadValue(f"--data {protocol}={path}: no such folder")


def card_dir(cfg: CardConfig) -> Path:
    return cfg.card_dir or cfg.out / "cards" / "-vs-".join(labels(cfg.backbones))


def card(cfg: CardConfig) -> tuple[Path, list[Cell]]:
    """Plan, reuse or run, gather and write the card; (its folder, the cells)."""
    from fastloc.probe.card.render import write_card

    cfg.validate()
    for backbone in cfg.backbones:
        check_backbone(backbone, cfg.weights)
    columns = labels(cfg.backbones)
    if len(set(columns)) < len(columns):  # e.g. org/vit and org_vit
        raise BadValue(f"BACKBONE {' '.join(cfg.backbones)}: two of them share a column name ({', '.join(columns)})")
    check_data(cfg)
    folder = card_dir(cfg)
    with checked_folders(*cfg.folders(), ("--card-dir", folder)):
        cells = plan(cfg)
    todo = [c for c in cells if c.status == TO_RUN]
    for cell in cells:
        if cell.status != TO_RUN:
            print(f"[card] {cell.protocol} for {cell.backbone}: {cell.status}")
    if cfg.slurm and cfg.launch.dry_run:
        dry_run(cfg, todo, cfg.launch.folder or folder / "slurm")
    elif cfg.slurm and todo:
        run_array(cfg, todo, cfg.launch.folder or folder / "slurm")
    else:
        for cell in todo:
            run_here(cell)
    gather(cells)
    options = json.loads(json.dumps(asdict(cfg), default=str))
    return write_card(folder, cells, columns, options), cells


def dry_run(cfg: CardConfig, cells: list[Cell], folder: Path) -> None:
    """--launch.dry-run: the array's sbatch script and each member's command line; nothing submitted
    (the card lists them as still to run)."""
    from fastloc.launch.submit import sbatch_script

    if cells:
        print(sbatch_script(cfg.launch, folder, cfg.launch.job_name or "fastloc-card", len(cells)))
    for cell in cells:
        print(f"[card] would run in the array: python -m fastloc.probe {' '.join(cell.plan.args)}")
        cell.status = f"{TO_RUN} (dry run)"
