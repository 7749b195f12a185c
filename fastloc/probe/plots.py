"""Pictures of Patch-Seg results: per-class recall, patch predictions, and a before/after of two runs.

Drawn with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``) straight to PNG files, so
nothing touches pyplot's global state or the backend that another user of matplotlib has chosen.
The result dicts are those of ``result.json`` (metrics that were NaN are ``None`` there).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

if TYPE_CHECKING:
    import torch

DPI = 100
_GOLDEN = 0.618033988749895  # hue step: consecutive ids land far apart on the colour wheel
_UNLABELED = (0.25, 0.25, 0.25)  # class 0 is "unlabeled" (COCO) or "other" (ADE20k): dark, not a hue
_INVALID = (0.6, 0.6, 0.6)  # negative ids: not a class
_GROUP_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def class_colors(ids) -> np.ndarray:
    """The fixed palette: RGB in [0, 1] for every class id, shape [..., 3].

    It depends on the id alone, so one class has one colour in every panel of every plot.
    """
    ids = np.asarray(ids, dtype=np.int64)
    hue = (ids * _GOLDEN) % 1.0
    sat = np.where(ids % 2 == 0, 0.85, 0.6)
    val = np.choose((ids // 2) % 3, [0.95, 0.78, 0.6])  # three brightness levels separate close hues
    rgb = hsv_to_rgb(np.stack([hue, sat, val], axis=-1))
    rgb[ids == 0] = _UNLABELED
    rgb[ids < 0] = _INVALID
    return rgb


def plot_recall_by_class(result: dict, path: Path) -> Path:
    """Recall of every valid class at the selected epoch, as sorted horizontal bars."""
    metrics = result["selected"]
    recall = _floats(metrics["per_class"]["recall"])
    ids = _valid_ids(metrics)
    ids = ids[np.argsort(recall[ids], kind="stable")]  # barh draws index 0 at the bottom: best on top
    n = len(ids)
    font = _tick_font(n)
    fig = Figure(figsize=(8.0, _rows_height(n) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(n)
    colors, handles = _group_colors(result, ids)
    bars = ax.barh(y, recall[ids], height=0.8, color=colors)
    ax.bar_label(bars, fmt="%.2f", fontsize=max(font - 1, 4), padding=1)
    ax.set_yticks(y, [class_name(result, c) for c in ids], fontsize=font)
    ax.set_ylim(-0.6, max(n, 1) - 0.4)
    ax.set_xlim(0.0, 1.08)  # room for the value labels at the end of full bars
    macro = as_float(metrics.get("macro_recall"))
    ax.axvline(macro, color="black", linestyle="--", linewidth=0.8)
    handles.append(_line_handle(f"macro recall {macro:.4f}"))
    ax.legend(handles=handles, loc="lower right", fontsize=7)
    ax.set_xlabel("recall (selected epoch)")
    ax.grid(axis="x", alpha=0.3)
    epoch = _epoch_number(result)
    ax.set_title(f"{describe(result)}\nmacro recall {macro:.4f} over {n} valid classes, epoch {epoch}", fontsize=9)
    return save_figure(fig, path)


def plot_predictions(
    images: torch.Tensor,
    targets: torch.Tensor,
    predictions: torch.Tensor,
    class_names: Sequence[str | None],
    path: Path,
    title: str,
) -> Path:
    """K rows of (image, ground truth per patch, prediction per patch) with a legend of the classes shown.

    images: [K, 3, S, S] float in [0, 1]; targets, predictions: [K, g, g] int64 class ids.
    """
    return plot_patch_maps(images, {"ground truth": targets, "prediction": predictions}, class_names, path, title)


def plot_patch_maps(
    images: torch.Tensor,
    maps: dict[str, torch.Tensor],
    class_names: Sequence[str | None],
    path: Path,
    title: str,
) -> Path:
    """K rows: the image, then one column per named patch map ([K, g, g] class ids), one palette."""
    pictures = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # [K, S, S, 3]
    columns = {name: m.detach().cpu().numpy() for name, m in maps.items()}  # each [K, g, g]
    k, height, width = pictures.shape[:3]
    present = np.unique(np.concatenate([m.ravel() for m in columns.values()]))
    handles = [Patch(facecolor=class_colors(c), label=_name(class_names, c)) for c in present]
    ncol = min(len(handles), 4) or 1
    legend_height = 0.2 * math.ceil(len(handles) / ncol)
    fig = Figure(figsize=(2.4 * (1 + len(columns)), 2.4 * k + 0.5 + legend_height), layout="constrained")
    axes = fig.subplots(k, 1 + len(columns), squeeze=False)
    for row in range(k):
        panels = (pictures[row], *(class_colors(m[row]) for m in columns.values()))
        for col, (ax, picture) in enumerate(zip(axes[row], panels)):
            # the patch maps cover the g*p pixels the labels came from (the border beyond is dropped)
            extent = (0, width, height, 0) if col == 0 else _patch_extent(picture.shape, height, width)
            ax.imshow(picture, extent=extent, interpolation="nearest")
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
            ax.set_axis_off()
    for ax, heading in zip(axes[0], ("image", *columns)):
        ax.set_title(heading, fontsize=9)
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_comparison(a: dict, b: dict, path: Path, labels: tuple[str, str] | None = None) -> Path:
    """Before/after of two results: per-class recall of A and B, and macro recall by object size.

    The legends name the backbones, or the run ``labels`` (default "A", "B") when the backbones are the same.
    """
    names = legend_names(a, b, labels)
    has_size = bool(a["selected"].get("by_size")) and bool(b["selected"].get("by_size"))
    ids = np.intersect1d(_compared_ids(a), _compared_ids(b))
    top = _rows_height(len(ids)) + 1.0
    bottom = 3.0 if has_size else 0.0
    fig = Figure(figsize=(9.0, top + bottom + 0.4), layout="constrained")
    if has_size:
        ax_class, ax_size = fig.subplots(2, 1, height_ratios=[top, bottom])
        _draw_size_buckets(ax_size, a, b, names)
    else:
        ax_class = fig.add_subplot()
    _draw_class_dumbbells(ax_class, a, b, ids, names)
    return save_figure(fig, path)


def is_dense(result: dict) -> bool:
    """A dense protocol's result (overcluster, linear, hummingbird) rather than Patch-Seg's."""
    return result.get("protocol", {}).get("name", "patch-seg") != "patch-seg"


def headline(result: dict) -> tuple[str, float]:
    """The figure a plot leads with: macro recall (Patch-Seg), or a dense protocol's first figure."""
    if is_dense(result):
        name, value = next(iter(result["selected"].items()))
        return name, as_float(value)
    return "macro recall", as_float(result["selected"].get("macro_recall"))


def class_values(result: dict) -> tuple[np.ndarray, str]:
    """Per-class values of the headline figure and their name: recall (Patch-Seg) or IoU (dense)."""
    if is_dense(result):
        name = headline(result)[0]
        return _floats(result["per_class_iou"][name]), f"IoU ({name})"
    return _floats(result["selected"]["per_class"]["recall"]), "recall (selected epoch)"


def _compared_ids(result: dict) -> np.ndarray:
    if is_dense(result):
        return np.flatnonzero(np.isfinite(class_values(result)[0]))
    return _valid_ids(result["selected"])


def legend_names(a: dict, b: dict, labels: tuple[str, str] | None = None) -> tuple[str, str]:
    """What the legends call A and B: the labels given, else the backbones when they differ."""
    backbone_a, backbone_b = _backbone(a), _backbone(b)
    if labels is not None and labels[0] != labels[1]:
        return labels[0], labels[1]
    if backbone_a != backbone_b:
        return backbone_a, backbone_b
    return f"A ({backbone_a})", f"B ({backbone_b})"


def describe(result: dict) -> str:
    """One line naming a run: backbone, head, reduction, dataset (dense: backbone, protocol, dataset)."""
    protocol, dataset = result.get("protocol", {}), result.get("dataset", {})
    if is_dense(result):
        return f"{_backbone(result)} · {protocol['name']} · {dataset.get('name', '?')}"
    head = result.get("head", "?")
    head = head.get("name", "?") if isinstance(head, dict) else head
    return f"{_backbone(result)} · {head} head · {protocol.get('reduction', '?')} · {dataset.get('name', '?')}"


def class_name(result: dict, class_id: int) -> str:
    """The dataset's name for a class id, or "class {id}" where it is unknown."""
    return _name(result.get("dataset", {}).get("classes") or [], class_id)


def _draw_class_dumbbells(ax, a: dict, b: dict, ids: np.ndarray, names: tuple[str, str]) -> None:
    """One row per class valid in both: a line from A's value (recall, or a dense protocol's IoU) to
    B's, sorted by B - A (gains on top)."""
    (recall_a, what), (recall_b, _) = class_values(a), class_values(b)
    recall_a, recall_b = recall_a[ids], recall_b[ids]
    order = np.argsort(recall_b - recall_a, kind="stable")
    ids, recall_a, recall_b = ids[order], recall_a[order], recall_b[order]
    n = len(ids)
    y = np.arange(n)
    gain = np.where(recall_b >= recall_a, "tab:green", "tab:red")
    ax.hlines(y, recall_a, recall_b, colors=gain, linewidth=1.2, alpha=0.7)
    ax.scatter(recall_a, y, s=12, color="tab:gray", label=names[0], zorder=3)
    ax.scatter(recall_b, y, s=12, color="tab:blue", label=names[1], zorder=3)
    ticks = [f"{class_name(b, c)} ({d:+.2f})" for c, d in zip(ids, recall_b - recall_a)]
    ax.set_yticks(y, ticks, fontsize=_tick_font(n))
    ax.set_ylim(-0.6, max(n, 1) - 0.4)
    ax.set_xlim(-0.02, 1.02)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel(what)
    (figure, macro_a), (_, macro_b) = headline(a), headline(b)
    protocol = b.get("protocol", {})
    dataset, reduction = b.get("dataset", {}).get("name", "?"), protocol.get("reduction", protocol.get("name", "?"))
    ax.set_title(
        f"{dataset} · {reduction}: per-class {what.split(' ')[0]} of {n} classes, sorted by B - A\n"
        f"{figure} {names[0]} {macro_a:.4f} → {names[1]} {macro_b:.4f}",
        fontsize=9,
    )


def _draw_size_buckets(ax, a: dict, b: dict, names: tuple[str, str]) -> None:
    """Paired bars of macro recall per object-size bucket (the fraction of the image a class covers)."""
    size_a, size_b = a["selected"]["by_size"], b["selected"]["by_size"]
    edges = size_a["edges"]
    x = np.arange(len(edges) - 1)
    ax.bar(x - 0.2, _floats(size_a["macro_recall"]), width=0.4, color="tab:gray", label=names[0])
    ax.bar(x + 0.2, _floats(size_b["macro_recall"]), width=0.4, color="tab:blue", label=names[1])
    ax.set_xticks(x, [f"{lo:.1f}-{hi:.1f}" for lo, hi in itertools.pairwise(edges)], fontsize=7)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("fraction of the image's patches that hold the class")
    ax.set_ylabel("macro recall")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("macro recall by object size", fontsize=9)


def _group_colors(result: dict, ids: np.ndarray) -> tuple[list, list]:
    """Bar colours by class group (things, stuff, ...) and their legend handles; one colour without groups."""
    groups = result.get("dataset", {}).get("groups") or {}
    if not groups:
        return ["tab:blue"] * len(ids), []
    owner = {c: i for i, members in enumerate(groups.values()) for c in members}
    colors = [_GROUP_COLORS[owner[c] % len(_GROUP_COLORS)] if c in owner else "tab:gray" for c in ids]
    handles = [Patch(color=_GROUP_COLORS[i % len(_GROUP_COLORS)], label=g) for i, g in enumerate(groups)]
    if any(c not in owner for c in ids):
        handles.append(Patch(color="tab:gray", label="no group"))
    return colors, handles


def _patch_extent(shape: tuple, height: int, width: int) -> tuple[int, int, int, int]:
    """Where a [g, g] patch map lies over an S x S image: g patches of S // g pixels from the top left."""
    rows, cols = shape[:2]
    return (0, cols * (width // cols), rows * (height // rows), 0)


def _line_handle(label: str) -> Line2D:
    return Line2D([], [], color="black", linestyle="--", linewidth=0.8, label=label)


def _valid_ids(metrics: dict) -> np.ndarray:
    """Classes with positives in validation and a recall (the macro averages run over these)."""
    positives = np.asarray(metrics["per_class"]["positives"], dtype=np.int64)
    recall = _floats(metrics["per_class"]["recall"])
    return np.flatnonzero((positives > 0) & np.isfinite(recall))


def _epoch_number(result: dict) -> int:
    epoch = result["selected"].get("epoch")
    return int(epoch) if epoch is not None else int(result.get("selected_epoch", 0)) + 1


def _rows_height(n: int) -> float:
    """Inches for n labelled rows: 183 COCO classes stay readable at a 6 pt font."""
    return max(2.5, 0.14 * n)


def _tick_font(n: int) -> float:
    return 6.0 if n > 40 else 8.0


def _name(class_names: Sequence[str | None], class_id) -> str:
    class_id = int(class_id)
    if class_id < 0:
        return "void (not scored)"  # the dense protocols' VOID
    known = class_id < len(class_names) and class_names[class_id]
    return class_names[class_id] if known else f"class {class_id}"


def _backbone(result: dict) -> str:
    backbone = result.get("backbone") or {}
    return str(backbone.get("name", "?")) if isinstance(backbone, dict) else str(backbone)


def as_float(value) -> float:
    """A JSON number, null as NaN."""
    return math.nan if value is None else float(value)


def _floats(values) -> np.ndarray:
    """A JSON list of numbers with nulls as a float array with NaNs."""
    return np.array([as_float(v) for v in values], dtype=np.float64)


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` (its folder made) on an Agg canvas of its own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # an Agg canvas of its own: no pyplot, no global backend
    fig.savefig(path, dpi=DPI)
    return path
