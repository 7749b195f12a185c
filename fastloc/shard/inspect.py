"""Look at a shard set: a manifest summary and a contact sheet of samples with labels overlaid.

The sheet draws what decodes; a sample that does not (or whose header announces more pixels than
the limit) gets a grey tile naming the problem, and the problem is returned to be printed, so one
bad sample never costs the whole sheet.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from fastloc.shard.encode import decode_label, jpeg_size, pixel_problem
from fastloc.shard.manifest import find_manifest, read_manifest
from fastloc.shard.tario import iter_samples
from fastloc.shard.verify import conversion_max_pixels
from fastloc.shard.words import plural

TILE = 256
CAPTION = 30


def summarize(manifest: dict[str, Any]) -> str:
    """A few lines: what, how many, which classes, how it was made, what was lost."""
    report = manifest.get("report", {})
    size = sum(s["bytes"] for s in manifest["shards"])
    named = [c for c in manifest["classes"] if c is not None]
    lines = [
        f"dataset {manifest['dataset']} / split {manifest['split']}: {plural(manifest['num_samples'], 'sample')} "
        f"in {plural(len(manifest['shards']), 'shard')}, {size / 1e6:.1f} MB",
        f"keys: {' '.join(manifest['keys'])}",
        f"classes: {manifest['num_classes']} ({len(named)} named), e.g. {', '.join(map(str, named[:6]))}",
    ]
    if manifest.get("label"):
        label = manifest["label"]
        lines.append(
            f"label: {label['format']}; "
            + "; ".join(f"{k} = {v}" for k, v in label.items() if k not in ("key", "format", "dtype"))
        )
    if manifest.get("source"):
        lines.append(f"source: {manifest['source'].get('path')}")
    if manifest.get("conversion", {}).get("command"):
        lines.append(f"command: {manifest['conversion']['command']}")
    if report:
        lines.append(
            f"report: converted {report.get('converted')}, re-encoded {report.get('reencoded')}, "
            f"skipped {report.get('skipped')}"
        )
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


def contact_sheet(
    path: Path, out: Path, samples: int = 16, columns: int = 4, max_pixels: int | None = None
) -> tuple[Path, list[str]]:
    """Tiles of the first samples of the set, label maps blended over the images.

    Returns the sheet's path and the samples (or shards) that could not be drawn, with the reason;
    ``max_pixels`` (default: the limit the set was converted with) bounds what is decoded.
    """
    manifest_path = find_manifest(Path(path))
    manifest = read_manifest(manifest_path)
    limit = conversion_max_pixels(manifest) if max_pixels is None else max_pixels
    classes = manifest["classes"]
    colors = class_colors(max(manifest["num_classes"], 1))
    void = (manifest.get("label") or {}).get("ignore")
    tiles: list[Image.Image] = []
    problems: list[str] = []
    for shard in manifest["shards"]:
        tar = manifest_path.parent / shard["tar"]
        try:
            for key, members in iter_samples(tar):
                try:
                    members = {ext: data for ext, _, data in members}
                    tiles.append(_tile(key, members, classes, colors, limit, void))
                except Exception as exc:  # any decoder failure is a finding, not a crash
                    problems.append(f"{shard['tar']} sample {key}: {exc}")
                    tiles.append(_blank_tile(key, str(exc)))
                if len(tiles) == samples:
                    break
        except Exception as exc:  # a missing or damaged tar: draw what the other shards hold
            problems.append(f"{shard['tar']}: cannot read: {exc}")
        if len(tiles) == samples:
            break
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + CAPTION)), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * TILE, (i // columns) * (TILE + CAPTION)))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out, problems


def _blank_tile(key: str, reason: str) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, 0, TILE - 1, TILE - 1), fill=(200, 200, 200))
    draw.text((6, TILE // 2 - 20), "not drawn:", fill="black")
    for i in range(0, min(len(reason), 4 * 40), 40):
        draw.text((6, TILE // 2 - 6 + 12 * (i // 40)), reason[i : i + 40], fill="black")
    draw.text((3, TILE + 2), key[:40], fill="black")
    return tile


def _tile(
    key: str, data: dict[str, bytes], classes: list, colors: np.ndarray, max_pixels: int | None, void: int | None
) -> Image.Image:
    """One sample's tile: the image, its label map blended in (void pixels white, never named), its
    key and its three largest classes."""
    size = jpeg_size(data["jpg"])  # read without Pillow, which refuses absurd sizes unnamed
    too_large = pixel_problem(*size, max_pixels) if size else None
    if too_large is not None:
        raise ValueError(f"jpg not decoded: {too_large.replace('image is', 'it is', 1)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides
        image = Image.open(io.BytesIO(data["jpg"]))
        too_large = pixel_problem(image.width, image.height, max_pixels)
        if too_large is not None:
            raise ValueError(f"jpg not decoded: {too_large.replace('image is', 'it is', 1)}")
        image.draft("RGB", (TILE, TILE))  # JPEG: decode at a reduced scale, enough for a tile
        image = image.convert("RGB")
    scale = TILE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pixels = np.asarray(image.resize(size, Image.BILINEAR)).astype(np.float32)
    names = []
    if "seg.png" in data:
        label = np.asarray(Image.fromarray(decode_label(data["seg.png"], max_pixels)).resize(size, Image.NEAREST))
        blank = label == void if void is not None else np.zeros(label.shape, bool)
        label = np.where(blank, 0, np.minimum(label, len(colors) - 1))
        overlay = np.where(blank[..., None], 255.0, colors[label].astype(np.float32))
        labelled = ((label > 0) | blank)[..., None]
        pixels = np.where(labelled, 0.5 * pixels + 0.5 * overlay, pixels)
        for cid, _ in Counter(label[label > 0].tolist()).most_common(3):
            names.append(str(classes[cid] if cid < len(classes) else cid))
    if "cls" in data:
        cid = int(data["cls"])
        names.insert(0, f"cls={classes[cid] if 0 <= cid < len(classes) else cid}")
    tile = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    tile.paste(Image.fromarray(pixels.astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(tile)
    draw.text((3, TILE + 2), key[:40], fill="black")
    draw.text((3, TILE + 15), ", ".join(names)[:42], fill="dimgray")
    return tile
