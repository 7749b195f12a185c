"""What a probe run leaves behind: the original's CSV row, a JSON that names its protocol, plots.

The CSV is the original's (``results/outputs-{dataset}.csv``, comma + space, header once, the
best-macro-recall epoch's figures), so its rows sit beside the original's. The JSON holds every
epoch's figures, the threshold-free ones beside them, the resolved config and the protocol.
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastloc.cli import BadValue, check_writable

COLUMNS = (
    "dataset",
    "label_reduction",
    "output_head",
    "backbone",
    "skip_blocks",
    "full_finetune",
    "num_epochs",
    "loss",
    "accuracy",
    "macro_accuracy",
    "macro_recall",
    "macro_precision",
    "macro_f1",
)
SEPARATOR = ", "


def csv_row(cfg, dataset: str, selected: dict[str, Any]) -> list[str]:
    """The original's row: CLI strings as given, metrics as full-precision floats (nan possible)."""
    given = [dataset, cfg.reduction, cfg.head, cfg.backbone, str(cfg.skip_blocks), str(cfg.full_finetune)]
    metrics = [selected[k] for k in COLUMNS[8:]]
    return [*given, str(cfg.epochs), repr(float(selected["loss"])), *(repr(float(v)) for v in metrics)]


def append_csv(path: Path, row: list[str], columns: tuple[str, ...] = COLUMNS, *more: list[str]) -> None:
    """Append ``row`` (and ``more`` rows), writing the header first into a new file; a file with
    another header is refused rather than mixed. Locked, so that array jobs can share one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = SEPARATOR.join(columns)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        first = f.readline().rstrip("\n")
        if first and first != header:
            raise ValueError(f"{path}: its header is not this protocol's results header; write elsewhere (--results)")
        if not first:
            f.write(header + "\n")
        f.writelines(SEPARATOR.join(r) + "\n" for r in (row, *more))


@contextmanager
def checked_folders(*folders: tuple[str, Path], keep: bool = True) -> Iterator[None]:
    """``check_writable`` for each (flag, folder) in order, then the body (the checks that need
    the data); when anything is refused, or ``keep`` is False, the folders these checks created are
    removed again, so that a refused run leaves nothing behind."""
    created: list[Path] = []
    try:
        for flag, folder in folders:
            created += _missing(Path(folder))
            check_writable(flag, folder)
        yield
    except BaseException:
        _remove_empty(created)
        raise
    if not keep:
        _remove_empty(created)


def check_folders(*folders: tuple[str, Path]) -> None:
    """The checks of ``checked_folders`` alone: nothing is left (the run makes the folders)."""
    with checked_folders(*folders, keep=False):
        pass


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders``, the deepest first, those that are still empty."""
    for path in sorted(set(folders), key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()
        except OSError:  # it holds something now (another run's files): not ours to remove
            pass


def _missing(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet."""
    out = []
    while not folder.exists() and folder != folder.parent:
        out.append(folder)
        folder = folder.parent
    return out


def check_csv(path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
    """Before any work: a BadValue for a results CSV that holds another table or cannot be
    appended to (a run that fails there only after training loses its figures)."""
    if not path.exists():
        return
    try:
        with open(path, "a+") as f:
            f.seek(0)
            first = f.readline().rstrip("\n")
    except OSError as exc:
        raise BadValue(f"--results {path}: cannot append there ({exc.strerror or exc})") from None
    if first and first != SEPARATOR.join(columns):
        raise BadValue(f"--results {path}: its header is not this protocol's results header; write elsewhere")


def check_run_dir(flag: str, run_dir: Path) -> None:
    """Before any work: a BadValue when the run directory's path is taken by something not a folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise BadValue(f"{flag} {run_dir}: exists and is not a folder")


def prevalence_flag(metrics: dict[str, Any]) -> str | None:
    """A warning when a selected epoch's precision is no better than predicting every class everywhere."""
    precision, prevalence = metrics["macro_precision_nansafe"], metrics["mean_prevalence"]
    if precision <= prevalence:
        return (
            f"epoch {metrics['epoch']}'s NaN-safe macro precision {precision:.4f} is at or below the mean class "
            f"prevalence {prevalence:.4f}: its macro recall comes from predicting classes everywhere, not from "
            "locating them"
        )
    return None


def jsonable(value: Any) -> Any:
    """``value`` with every NaN as None (strict JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: Path, obj: dict[str, Any]) -> Path:
    """Strict JSON (NaN written as null), written then renamed."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
