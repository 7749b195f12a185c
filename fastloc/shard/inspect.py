"""Look at a shard set: a manifest summary and a contact sheet of samples with labels overlaid."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from fastloc.shard.encode import decode_label
from fastloc.shard.manifest import find_manifest, read_manifest
from fastloc.shard.tario import iter_samples

TILE = 256
CAPTION = 30


def summarize(manifest: dict[str, Any]) -> str:
    """A few lines: what, how many, which classes, how it was made, what was lost."""
    report = manifest.get("report", {})
    size = sum(s["bytes"] for s in manifest["shards"])
    named = [c for c in manifest["classes"] if c is not None]
    lines = [
        f"dataset {manifest['dataset']} / split {manifest['split']}: {manifest['num_samples']} samples "
        f"in {len(manifest['shards'])} shards, {size / 1e6:.1f} MB",
        f"keys: {' '.join(manifest['keys'])}",
        f"classes: {manifest['num_classes']} ({len(named)} named), e.g. {', '.join(map(str, named[:6]))}",
    ]
    if manifest.get("label"):
        label = manifest["label"]
        lines.append(f"label: {label['format']}; " + "; ".join(
            f"{k} = {v}" for k, v in label.items() if k not in ("key", "format", "dtype")))  # fmt: skip
    if manifest.get("source"):
        lines.append(f"source: {manifest['source'].get('path')}")
    if manifest.get("conversion", {}).get("command"):
        lines.append(f"command: {manifest['conversion']['command']}")
    if report:
        lines.append(f"report: converted {report.get('converted')}, re-encoded {report.get('reencoded')}, "
                     f"skipped {report.get('skipped')}")  # fmt: skip
    return "\n".join(lines)


def class_colors(num_classes: int) -> np.ndarray:
    """[C, 3] uint8: a fixed, well-spread colour per class (golden-ratio hues); class 0 black."""
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    sat = 0.55 + 0.45 * ((np.arange(num_classes) * 7) % 3) / 2
    rgb = np.stack([_hsv_channel(hues, sat, k) for k in (5, 3, 1)], axis=1)
    colors = (rgb * 255).astype(np.uint8)
    colors[0] = 0
    return colors


def _hsv_channel(h: np.ndarray, s: np.ndarray, n: int) -> np.ndarray:
    k = (n + h * 6) % 6
    return 1 - s * np.clip(np.minimum(k, 4 - k), 0, 1)


def contact_sheet(path: Path, out: Path, samples: int = 16, columns: int = 4) -> Path:
    """Tiles of the first samples of the set, label maps blended over the images."""
    manifest_path = find_manifest(Path(path))
    manifest = read_manifest(manifest_path)
    classes = manifest["classes"]
    colors = class_colors(max(manifest["num_classes"], 1))
    tiles = []
    for shard in manifest["shards"]:
        for key, members in iter_samples(manifest_path.parent / shard["tar"]):
            tiles.append(_tile(key, {ext: data for ext, _, data in members}, classes, colors))
            if len(tiles) == samples:
                break
        if len(tiles) == samples:
            break
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + CAPTION)), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * TILE, (i // columns) * (TILE + CAPTION)))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _tile(key: str, data: dict[str, bytes], classes: list, colors: np.ndarray) -> Image.Image:
    image = Image.open(io.BytesIO(data["jpg"])).convert("RGB")
    scale = TILE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pixels = np.asarray(image.resize(size, Image.BILINEAR)).astype(np.float32)
    names = []
    if "seg.png" in data:
        label = np.asarray(Image.fromarray(decode_label(data["seg.png"])).resize(size, Image.NEAREST))
        label = np.minimum(label, len(colors) - 1)
        overlay = colors[label].astype(np.float32)
        labelled = (label > 0)[..., None]
        pixels = np.where(labelled, 0.5 * pixels + 0.5 * overlay, pixels)
        for cid, _ in Counter(label[label > 0].tolist()).most_common(3):
            names.append(str(classes[cid] if cid < len(classes) else cid))
    if "cls" in data:
        cid = int(data["cls"])
        names.insert(0, f"cls={classes[cid] if cid < len(classes) else cid}")
    tile = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    tile.paste(Image.fromarray(pixels.astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(tile)
    draw.text((3, TILE + 2), key[:40], fill="black")
    draw.text((3, TILE + 15), ", ".join(names)[:42], fill="dimgray")
    return tile
