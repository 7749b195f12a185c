"""A seeded synthetic segmentation dataset: textured regions overlaid with shaped objects.

It needs no download, so it is the data of the README demo, the tests and the end-to-end demo.
Every image is drawn in two layers, and the label map comes from the very masks that paint the
pixels (hard edges, no anti-aliasing), so pixels and labels agree exactly:

1. **Regions.** A random Voronoi partition (1-4 cells; boundaries straight, or curved by a
   sinusoidal warp of the coordinates) tiles the image. Each cell shows one *region class*:
   ``background`` (a low-contrast gradient, class 0, which plays Patch-Seg's "unlabeled" role) or
   a texture (stripes, checkerboard, dots, clouds, grid) with random colours, angle and scale.
2. **Objects.** 3-8 objects whose class is defined only by their shape (circle, square,
   triangle, ring, cross, star, ellipse, diamond, hexagon, crescent), with random size (the
   diameter of the disc of equal area is uniform in 1/12 to 1/3 of the shorter side, so every
   shape class covers as many pixels on average), centre, rotation, shape parameter (aspect
   ratio, hole, arm width), colour and fill (flat, gradient or one of the textures). They are
   painted roughly largest first; later objects cover earlier ones, a ring's hole shows what lies
   behind it and objects may run off the image edge.

Colours are drawn from the same distribution for regions and objects, so colour never gives a
class away, and texture periods vary so that one 16x16 patch may not show a full period.
Mild grey noise (standard deviation 1-4 levels) is added so that JPEG-encoding the pixels is
realistic. About 23% of 16x16 patches hold two or more classes; about 7 classes per image.

Sample ``i`` depends only on ``(data_seed, split, i, min_size, max_size)``: its generator is
``np.random.default_rng([data_seed, crc32(split), i])``, whatever else is generated and in
whatever order.
Within one image, geometry and appearance come from two separate child generators, so a
flat-palette rendering (``draw_scene(..., palette=...)``, used by the tests to check
pixel/label consistency) has exactly the same layout as the textured one.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastloc.cli import flowing_help
from fastloc.shard.config import ConvertConfig, require
from fastloc.shard.errors import SampleError
from fastloc.shard.sources.base import Item, Sample, SourceInfo

# Bump when the images or captions drawn for a given (data_seed, split, i, sizes) change; recorded
# in manifests. 2: captions say "an orange" (was "a orange").
GENERATOR_VERSION = 2

TEXTURES = ["stripes", "checkerboard", "dots", "clouds", "grid"]
SHAPES = [
    "circle",
    "square",
    "triangle",
    "ring",
    "cross",
    "star",
    "ellipse",
    "diamond",
    "hexagon",
    "crescent",
]
CLASSES: list[str] = ["background", *TEXTURES, *SHAPES]  # index = class id (label value)
REGION_CLASSES = list(range(1 + len(TEXTURES)))  # 0 (background) and the textures
OBJECT_CLASSES = list(range(1 + len(TEXTURES), len(CLASSES)))

REGIONS_PER_IMAGE = (1, 4)  # inclusive
REGION_COUNT_WEIGHTS = (0.10, 0.30, 0.30, 0.30)  # for 1, 2, 3, 4 cells
BACKGROUND_WEIGHT = 0.3  # chance weight of class 0 per region cell vs 0.7/5 per texture
OBJECTS_PER_IMAGE = (3, 8)  # inclusive
OBJECT_DIAMETER = (1 / 12, 1 / 3)  # equal-area disc diameter / shorter image side, uniform
NOISE_STD = (1.0, 4.0)  # per-image pixel-noise standard deviation, grey levels

# Object fills: flat colour with faint shading, a stronger gradient, or a texture.
FILLS = ["flat", "gradient", *TEXTURES]
FILL_WEIGHTS = np.array([0.30, 0.15, 0.12, 0.10, 0.12, 0.11, 0.10])

# Encoded bytes per image pixel of a sample as the writer stores it (JPEG quality 95 with 4:4:4
# chroma, plus the uint8 label PNG at compress_level 3), measured over 200 samples at the default
# sizes: JPEG ~1.01 B/px, PNG ~0.03 B/px; the total's 5/50/95th percentiles are 0.56/1.03/1.61.
BYTES_PER_PIXEL = 1.05


# ---------------------------------------------------------------- textures


def _frac(a: np.ndarray) -> np.ndarray:
    """Fractional part, in place (``a`` is a temporary)."""
    a -= np.floor(a)
    return a


def _along(y: np.ndarray, x: np.ndarray, angle: float, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """(x cos + y sin) * scale + offset as [h, w] from y [h, 1] and x [1, w]: one full-size pass."""
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return x * np.float32(c) + (y * np.float32(s) + np.float32(offset))


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# Added to lattice coordinates so that they stay positive and int conversion floors them.
_POSITIVE = 4096.0


def _texture(kind: str, rng: np.random.Generator, y: np.ndarray, x: np.ndarray, scale: float) -> np.ndarray:
    """A blend field in [0, 1] (0 = first colour, 1 = second) of shape [h, w].

    ``y`` [h, 1] and ``x`` [1, w] are image pixel coordinates (float32); ``scale`` caps the
    texture period in pixels (the image side for regions, about the diameter for objects).
    """
    angle = rng.uniform(0.0, 2.0 * math.pi)
    if kind in ("flat", "gradient"):  # linear ramp from one corner of the box to the other
        c, s = math.cos(angle), math.sin(angle)
        ys, xs = (float(y[0, 0]), float(y[-1, 0])), (float(x[0, 0]), float(x[0, -1]))
        ends = [xx * c + yy * s for yy in ys for xx in xs]
        lo, span = min(ends), max(max(ends) - min(ends), 1.0)
        return _along(y, x, angle, 1.0 / span, -lo / span)
    if kind == "stripes":
        period = _log_uniform(rng, 6.0, max(7.0, min(48.0, scale)))
        duty, phase, soft = rng.uniform(0.3, 0.7), rng.uniform(), rng.uniform() < 0.4
        if soft:  # sinusoidal stripes
            t = np.sin(_along(y, x, angle, 2.0 * math.pi / period, 2.0 * math.pi * phase))
            t *= 0.5
            t += 0.5
            return t
        return (_frac(_along(y, x, angle, 1.0 / period, phase + _POSITIVE)) < duty).astype(np.float32)
    if kind == "checkerboard":
        k = 1.0 / _log_uniform(rng, 5.0, max(6.0, min(32.0, scale / 2)))
        iu = _along(y, x, angle, k, _POSITIVE).astype(np.int32)
        iu += _along(y, x, angle + 0.5 * math.pi, k, _POSITIVE).astype(np.int32)
        return (iu & 1).astype(np.float32)
    if kind == "dots":
        k = 1.0 / _log_uniform(rng, 6.0, max(7.0, min(28.0, scale / 1.5)))
        radius = rng.uniform(0.2, 0.4)  # in lattice units
        fu = _frac(_along(y, x, angle, k, _POSITIVE))
        fv = _frac(_along(y, x, angle + 0.5 * math.pi, k, _POSITIVE))
        fu -= 0.5
        fv -= 0.5
        fu *= fu
        fv *= fv
        fu += fv
        return (fu < radius * radius).astype(np.float32)
    if kind == "grid":
        spacing = _log_uniform(rng, 8.0, max(9.0, min(36.0, scale)))
        edge = 0.5 - rng.uniform(0.5, 1.5) / spacing  # lines: within a half width of the cell edge
        du = np.abs(_frac(_along(y, x, angle, 1.0 / spacing, _POSITIVE)) - 0.5)
        dv = np.abs(_frac(_along(y, x, angle + 0.5 * math.pi, 1.0 / spacing, _POSITIVE)) - 0.5)
        return (np.maximum(du, dv, out=du) > edge).astype(np.float32)
    if kind == "clouds":
        return _value_noise(rng, y, x, _log_uniform(rng, 10.0, max(11.0, min(64.0, scale))))
    raise ValueError(f"unknown texture {kind!r}")


def _value_noise(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, cell: float) -> np.ndarray:
    """Two octaves of smoothly interpolated lattice noise, contrast-stretched to [0, 1]."""
    total = np.zeros((y.shape[0], x.shape[1]), np.float32)
    for octave, weight in ((cell, 1.0), (cell / 2.5, 0.35)):
        gy, gx = (y - y[0, 0]) / octave, (x - x[0, 0]) / octave  # [h, 1], [1, w] lattice units
        grid = rng.random((int(gy[-1, 0]) + 2, int(gx[0, -1]) + 2), dtype=np.float32)
        iy, ix = gy.astype(np.int64), gx.astype(np.int64)
        fy, fx = gy - iy, gx - ix
        fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep
        rows = grid[:, ix[0]] * (1 - fx) + grid[:, ix[0] + 1] * fx  # [gh, w] (separable lerp)
        total += weight * (rows[iy[:, 0]] * (1 - fy) + rows[iy[:, 0] + 1] * fy)
    lo, hi = float(total.min()), float(total.max())
    return (total - lo) * np.float32(1.0 / max(hi - lo, 1e-6))


# ---------------------------------------------------------------- shapes


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """Inside-mask of a shape in object coordinates (radius 1 ~ the object's half diameter).

    ``p`` in [0, 1) is a per-object shape parameter (aspect ratio, hole size, arm width, ...).
    Every shape lies within radius 1.05, which bounds the drawn box.
    """
    rr = u * u + v * v
    if shape == "circle":
        return rr <= 1.0
    if shape == "ellipse":
        a = 0.40 + 0.25 * p  # minor/major axis ratio, kept well away from a circle
        return u * u + (v * v) / (a * a) <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.74
    if shape == "diamond":  # a rhombus, elongated so that it is no rotated square
        a = 0.45 + 0.2 * p
        return np.abs(u) + np.abs(v) / a <= 1.0
    if shape in ("triangle", "hexagon"):
        n = 3 if shape == "triangle" else 6
        inside = np.ones(u.shape, bool)
        for k in range(n):  # regular polygon inscribed in the unit circle: n half-planes
            phi = 2 * math.pi * (k + 0.5) / n
            inside &= u * math.cos(phi) + v * math.sin(phi) <= math.cos(math.pi / n)
        return inside
    if shape == "ring":
        inner = 0.45 + 0.25 * p
        return (rr <= 1.0) & (rr >= inner * inner)
    if shape == "cross":
        arm = 0.22 + 0.12 * p  # half width of the arms
        au, av = np.abs(u), np.abs(v)
        return ((au <= arm) & (av <= 0.95)) | ((av <= arm) & (au <= 0.95))
    if shape == "star":  # five points; inner radius 0.38-0.5
        inner, sector = 0.38 + 0.12 * p, math.pi / 5
        phi = np.arctan2(v, u) % (2 * sector)
        phi = np.where(phi > sector, 2 * sector - phi, phi)  # fold onto [outer tip, inner vertex]
        rho = np.sqrt(rr)
        pu, pv = rho * np.cos(phi), rho * np.sin(phi)
        # inside iff on the origin's side of the edge from (1, 0) to the inner vertex
        qu, qv = inner * math.cos(sector) - 1.0, inner * math.sin(sector)
        return (qu * pv - qv * (pu - 1.0)) >= 0.0
    if shape == "crescent":  # the unit disc minus a disc shifted along +u
        shift, bite = 0.35 + 0.25 * p, 0.8 + 0.15 * p
        return (rr <= 1.0) & ((u - shift) ** 2 + v * v > bite * bite)
    raise ValueError(f"unknown shape {shape!r}")


def _shape_area(shape: str, p: float) -> float:
    """Area of ``_shape_mask(shape, ., ., p)`` in object coordinates (checked numerically)."""
    if shape == "circle":
        return math.pi
    if shape == "ellipse":
        return math.pi * (0.40 + 0.25 * p)
    if shape == "square":
        return 1.48**2
    if shape == "diamond":
        return 2.0 * (0.45 + 0.2 * p)
    if shape == "triangle":
        return 3.0 * math.sqrt(3.0) / 4.0
    if shape == "hexagon":
        return 3.0 * math.sqrt(3.0) / 2.0
    if shape == "ring":
        return math.pi * (1.0 - (0.45 + 0.25 * p) ** 2)
    if shape == "cross":
        arm = 0.22 + 0.12 * p
        return 2 * (2 * arm) * 1.9 - (2 * arm) ** 2
    if shape == "star":
        return 5.0 * (0.38 + 0.12 * p) * math.sin(math.pi / 5)
    if shape == "crescent":
        return 1.29  # varies by < 2% over p
    raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------- colours


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours with visible contrast, float32 [3] each."""
    c1 = rng.integers(0, 256, 3).astype(np.float32)
    c2 = rng.integers(0, 256, 3).astype(np.float32)
    if np.abs(c1 - c2).sum() < 150:
        c2 = (c1 + 128) % 256
    return c1, c2


def colour_name(rgb: np.ndarray) -> str:
    """A plain English name for an RGB colour (deterministic, for captions)."""
    r, g, b = (float(c) / 255.0 for c in rgb)
    hi, lo = max(r, g, b), min(r, g, b)
    if hi < 0.2:
        return "black"
    sat = (hi - lo) / hi
    if sat < 0.2:
        return "white" if hi > 0.85 else "grey"
    if hi == r:
        hue = 60.0 * (((g - b) / (hi - lo)) % 6)
    elif hi == g:
        hue = 60.0 * ((b - r) / (hi - lo) + 2)
    else:
        hue = 60.0 * ((r - g) / (hi - lo) + 4)
    if 15 <= hue < 45 and hi < 0.6:
        return "brown"
    for limit, name in (
        (15, "red"),
        (45, "orange"),
        (70, "yellow"),
        (160, "green"),
        (200, "cyan"),
        (255, "blue"),
        (290, "purple"),
        (340, "pink"),
        (360, "red"),
    ):
        if hue < limit:
            return name
    return "red"


# ---------------------------------------------------------------- scenes


@dataclass
class Scene:
    """One generated image with its label map and what was drawn."""

    pixels: np.ndarray  # [H, W, 3] uint8
    label: np.ndarray  # [H, W] uint8 class ids (index into CLASSES)
    regions: list[int]  # class id of each Voronoi cell (distinct)
    objects: list[int]  # object class ids in paint order (later ones on top)
    object_pixels: list[int]  # visible pixels of each object, in paint order
    object_colours: list[str]  # colour name of each object's main colour, in paint order
    class_pixels: list[int]  # visible pixels of each class: the label map's histogram [C]

    @property
    def cls(self) -> int:
        """Class of the largest visible object (by visible pixels; ties to the smallest id)."""
        best = max(zip(self.object_pixels, self.objects), key=lambda pc: (pc[0], -pc[1]))
        return best[1]

    @property
    def classes_present(self) -> list[int]:
        return [c for c, n in enumerate(self.class_pixels) if n > 0]

    def caption(self) -> str:
        """E.g. 'a red circle, a blue star and a grey triangle on stripes and a plain background'.

        Visible objects by visible area (largest first), then the visible region classes by area.
        """
        order = sorted(range(len(self.objects)), key=lambda k: (-self.object_pixels[k], k))
        things = [
            f"{_article(self.object_colours[k])} {self.object_colours[k]} {CLASSES[self.objects[k]]}"
            for k in order
            if self.object_pixels[k] > 0
        ]
        area = self.class_pixels
        names = {0: "a plain background", 2: "a checkerboard", 5: "a grid"}
        grounds = [names.get(c, CLASSES[c]) for c in sorted(self.regions, key=lambda c: (-area[c], c)) if area[c] > 0]
        text = _join(things)
        return f"{text} on {_join(grounds)}" if grounds else text


def _article(word: str) -> str:
    """'a' or 'an' before ``word`` (the colour names start with a vowel sound exactly when with a vowel)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def draw_scene(rng: np.random.Generator, height: int, width: int, *, palette: np.ndarray | None = None) -> Scene:
    """Draw one scene of ``height`` x ``width`` pixels from ``rng``.

    With ``palette`` ([C, 3] uint8) every region and object is painted flat in its class's
    palette colour and no noise is added: the layout is identical to the textured rendering of
    the same ``rng`` state (geometry and appearance use separate child generators), and then
    ``pixels == palette[label]`` everywhere. The tests use this to check pixel/label agreement.
    """
    geo_seed, look_seed = rng.integers(0, 2**63, size=2)
    geo, look = np.random.default_rng(geo_seed), np.random.default_rng(look_seed)
    H, W, side = int(height), int(width), min(int(height), int(width))
    y = np.arange(H, dtype=np.float32)[:, None]  # [H, 1]
    x = np.arange(W, dtype=np.float32)[None, :]  # [1, W]

    # Regions: Voronoi cells of warped coordinates, each a distinct region class.
    n_cells = int(geo.choice(len(REGION_COUNT_WEIGHTS), p=REGION_COUNT_WEIGHTS)) + REGIONS_PER_IMAGE[0]
    weights = np.array([BACKGROUND_WEIGHT] + [(1 - BACKGROUND_WEIGHT) / len(TEXTURES)] * len(TEXTURES))
    regions = [int(c) for c in geo.choice(len(REGION_CLASSES), size=n_cells, replace=False, p=weights)]
    cell = np.zeros((H, W), np.uint8)  # [H, W] region index
    if n_cells > 1:
        amp = geo.uniform(0.0, 0.12) * side * (geo.uniform() < 0.7)  # 30% straight boundaries
        freq = 2 * math.pi / (geo.uniform(0.4, 1.2) * side)
        ph1, ph2 = geo.uniform(0, 2 * math.pi, 2)
        wx = x + np.float32(amp) * np.sin(y * np.float32(freq) + np.float32(ph1))  # [H, 1] + [1, W]
        wy = y + np.float32(amp) * np.sin(x * np.float32(freq) + np.float32(ph2))
        sites = geo.uniform(-0.1, 1.1, (n_cells, 2)) * (W, H)
        # nearest site: argmin |w - s|^2 = argmin (|s|^2 - 2 w.s), which saves passes
        best = None
        for j, (sx, sy) in enumerate(sites):
            d = wx * np.float32(-2 * sx)
            d += np.float32(sx * sx + sy * sy)
            d += wy * np.float32(-2 * sy)
            if best is None:
                best = d
                continue
            closer = d < best
            np.minimum(best, d, out=best)
            np.copyto(cell, np.uint8(j), where=closer)
    label = np.asarray(regions, np.uint8)[cell]  # [H, W]

    # Objects: shapes drawn in rough size order (largest first), so few are hidden completely.
    n_objects = int(geo.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
    objs = []
    for _ in range(n_objects):
        cls = OBJECT_CLASSES[int(geo.integers(len(SHAPES)))]
        param = geo.uniform()  # shape parameter: aspect ratio, hole size, arm width, ...
        # diameter of the disc with the object's area, so that every shape covers as many pixels
        diameter = side * geo.uniform(*OBJECT_DIAMETER)
        radius = 0.5 * diameter * math.sqrt(math.pi / _shape_area(CLASSES[cls], param))
        cy, cx = geo.uniform(0, H), geo.uniform(0, W)
        angle, jitter = geo.uniform(0, 2 * math.pi), geo.uniform(0.7, 1.3)
        objs.append((diameter * jitter, cls, radius, cy, cx, angle, param))
    objs.sort(key=lambda o: -o[0])
    instance = np.zeros((H, W), np.uint8)  # [H, W] 1 + paint index of the visible object, 0 = none

    # Pixels are composed channel-first ([3, H, W]): numpy broadcasts over a leading axis of 3
    # far faster than over a trailing one.
    if palette is not None:
        pal = np.asarray(palette, np.uint8)
        img = np.stack([np.take(pal[:, ch].astype(np.float32), label) for ch in range(3)])
    else:
        # Region appearance: one blend field per cell, then colours per pixel via the cell index.
        blend = np.empty((H, W), np.float32)  # [H, W]
        c1s, c2s = np.empty((n_cells, 3), np.float32), np.empty((n_cells, 3), np.float32)
        for j, c in enumerate(regions):
            if c == 0:  # background: a gentle gradient
                c1s[j] = look.integers(0, 256, 3)
                c2s[j] = np.clip(c1s[j] + look.normal(0, 30, 3), 0, 255)
            else:
                c1s[j], c2s[j] = _colour_pair(look)
            kind = "gradient" if c == 0 else CLASSES[c]
            if n_cells == 1:
                blend = _texture(kind, look, y, x, side)
                continue
            inside = cell == j  # texture only the cell's bounding box
            rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
            if len(rows) == 0:  # a cell that no pixel is nearest to
                continue
            box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
            field = _texture(kind, look, y[box[0]], x[:, box[1]], side)
            np.copyto(blend[box], field, where=inside[box])
        img = np.empty((3, H, W), np.float32)
        table = np.concatenate([c2s - c1s, c1s], axis=1).T.copy()  # [6, cells]: span, base
        per_pixel = np.take(table, cell.astype(np.intp), axis=1)  # [6, H, W]
        np.multiply(blend, per_pixel[:3], out=img)
        img += per_pixel[3:]

    colours = []
    for k, (_, cls, radius, cy, cx, angle, param) in enumerate(objs):
        reach = 1.05 * radius
        y0, y1 = max(0, int(cy - reach)), min(H, int(cy + reach) + 2)
        x0, x1 = max(0, int(cx - reach)), min(W, int(cx + reach) + 2)
        by, bx = y[y0:y1] - np.float32(cy), x[:, x0:x1] - np.float32(cx)  # [h, 1], [1, w]
        u = _along(by, bx, angle, 1.0 / radius)  # object coordinates: radius 1 = half diameter
        v = _along(by, bx, angle + 0.5 * math.pi, 1.0 / radius)
        inside = _shape_mask(CLASSES[cls], u, v, param)
        if palette is not None:
            fill = pal[cls].astype(np.float32)[:, None]  # [3, 1]
            colours.append(colour_name(pal[cls]))
        else:
            kind = FILLS[int(look.choice(len(FILLS), p=FILL_WEIGHTS))]
            c1, c2 = _colour_pair(look)
            if kind == "flat":  # faint shading only
                c2 = np.clip(c1 + look.normal(0, 12, 3), 0, 255).astype(np.float32)
            t = _texture(kind, look, y[y0:y1], x[:, x0:x1], min(y1 - y0, x1 - x0))
            fill = c1[:, None] + t[inside][None, :] * (c2 - c1)[:, None]  # [3, n]
            colours.append(colour_name(c1))
        img[:, y0:y1, x0:x1][:, inside] = fill
        label[y0:y1, x0:x1][inside] = cls
        instance[y0:y1, x0:x1][inside] = k + 1

    if palette is None:  # mild sensor-like grey noise: uniform, from cheap random bytes
        std = look.uniform(*NOISE_STD)
        raw = np.frombuffer(look.bytes(H * W), np.uint8).reshape(H, W)
        scale = std / 73.9  # std of uniform bytes
        noise = raw * np.float32(scale)  # [H, W]
        noise += np.float32(0.5 - 127.5 * scale)  # zero-mean, +0.5 to round when truncating
        img += noise  # the same on all three channels
        np.clip(img, 0, 255, out=img)
    pixels = np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0))  # [H, W, 3]

    visible = np.bincount(instance.ravel(), minlength=n_objects + 1)
    return Scene(
        pixels=pixels,
        label=label,
        regions=regions,
        objects=[o[1] for o in objs],
        object_pixels=visible[1:].tolist(),
        object_colours=colours,
        class_pixels=np.bincount(label.ravel(), minlength=len(CLASSES)).tolist(),
    )


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One textured scene: ``pixels`` [H, W, 3] uint8 and ``label`` [H, W] uint8 class ids."""
    scene = draw_scene(rng, height, width)
    return scene.pixels, scene.label


def sample_rng(data_seed: int, index: int, split: str = "train") -> np.random.Generator:
    """The generator of sample ``index`` of ``split``: independent of every other sample, and
    of every other split (the split name is hashed into the seed)."""
    return np.random.default_rng([data_seed, zlib.crc32(split.encode()), index])


def sample_shape(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """Height and width, each uniform in [min_size, max_size]: the first draws of a sample."""
    h, w = rng.integers(min_size, max_size + 1, size=2)
    return int(h), int(w)


def generate(data_seed: int, index: int, min_size: int = 192, max_size: int = 320, split: str = "train") -> Scene:
    """Sample ``index`` of ``split`` of the dataset seeded by ``data_seed``."""
    rng = sample_rng(data_seed, index, split)
    return draw_scene(rng, *sample_shape(rng, min_size, max_size))


# ---------------------------------------------------------------- source


@flowing_help
@dataclass(frozen=True, kw_only=True)
class SyntheticConfig(ConvertConfig):
    """Generate the built-in synthetic dataset: textured regions (stripes, checkerboard, dots,
    clouds, grid, plain background = class 0) overlaid with 3-8 objects recognisable only by
    their shape (circle, square, triangle, ring, cross, star, ellipse, diamond, hexagon,
    crescent). Seeded and download-free; labels match the pixels exactly."""

    num_samples: int = 512
    """Number of images to generate (at least 1)."""

    split: str = "train"
    """Split name (the folder under OUT/NAME). Each split is its own stream of images (the name
    is part of the seed), so train and val never share an image."""

    data_seed: int = 0
    """Seed of the generated images (--seed only seeds the shuffle). Sample i is drawn from
    numpy's default_rng([data_seed, crc32(split), i]), so it never depends on the other samples."""

    min_size: int = 192
    """Smallest image height and width in pixels, at least 32 (each side is drawn uniformly per image)."""

    max_size: int = 320
    """Largest image height and width in pixels (at least --min-size; its square at most --max-pixels)."""

    captions: bool = True
    """Store a caption listing the visible objects and region textures in `txt`."""

    def source(self) -> SyntheticSource:
        return SyntheticSource(self)

    def validate(self) -> None:
        super().validate()
        require(self.num_samples >= 1, "--num-samples", self.num_samples, "must be at least 1")
        require(self.data_seed >= 0, "--data-seed", self.data_seed, "must be 0 or more")
        require(self.min_size >= 32, "--min-size", self.min_size, "must be at least 32")
        at_least = f"must be at least --min-size {self.min_size}"
        require(self.max_size >= self.min_size, "--max-size", self.max_size, at_least)
        at_most = f"squared must be at most --max-pixels {self.max_pixels}"
        require(self.max_size**2 <= self.max_pixels, "--max-size", self.max_size, at_most)


class SyntheticSource:
    """Generates samples on demand; ``Item.ref`` is the sample index."""

    def __init__(self, config: SyntheticConfig):
        self.config = config

    def _check(self) -> None:
        self.config.validate()

    def info(self) -> SourceInfo:
        self._check()
        c = self.config
        return SourceInfo(
            dataset="synthetic",
            split=c.split,
            source=f"fastloc synthetic generator (data_seed={c.data_seed})",
            classes=list(CLASSES),
            has_label=True,
            has_cls=True,
            has_txt=c.captions,
            label_encoding={
                "space": f"synthetic-{len(CLASSES)}",
                "unlabeled": 0,
                "rule": "label = class id of the topmost painted layer (region cell, then objects in "
                "paint order); 0 = plain gradient background, the unlabeled role",
            },
            extra={
                "generator_version": GENERATOR_VERSION,
                "data_seed": c.data_seed,
                "num_samples": c.num_samples,
                "min_size": c.min_size,
                "max_size": c.max_size,
                "region_classes": REGION_CLASSES,
                "object_classes": OBJECT_CLASSES,
                "regions_per_image": list(REGIONS_PER_IMAGE),
                "objects_per_image": list(OBJECTS_PER_IMAGE),
                "object_diameter": "equal-area disc diameter, uniform in [1/12, 1/3] of the shorter side",
                "cls": "class of the largest visible object (ties to the smallest id)",
                "rng": "numpy default_rng([data_seed, zlib.crc32(split), index])",
            },
        )

    def items(self) -> list[Item]:
        """One item per index; ``size`` = image area x BYTES_PER_PIXEL (JPEG q95 4:4:4 + label PNG).

        Drawing only the image shape of each sample is cheap (about 20 us).
        """
        self._check()
        c = self.config
        out = []
        for i in range(c.num_samples):
            h, w = sample_shape(sample_rng(c.data_seed, i, c.split), c.min_size, c.max_size)
            out.append(Item(key=f"synthetic_{i:08d}", size=int(h * w * BYTES_PER_PIXEL), ref=i))
        return out

    def load(self, item: Item) -> Sample:
        c = self.config
        where = f"synthetic(data_seed={c.data_seed})#{item.ref}"
        try:
            scene = generate(c.data_seed, int(item.ref), c.min_size, c.max_size, c.split)
        except Exception as e:  # the contract: load raises SampleError only
            raise SampleError(where, f"generation failed: {e!r}") from e
        meta: dict[str, Any] = {
            "objects": scene.objects,
            "object_pixels": scene.object_pixels,
            "regions": scene.regions,
            "classes_present": scene.classes_present,
            "index": int(item.ref),
        }
        return Sample(
            key=item.key,
            source=where,
            pixels=scene.pixels,
            label=scene.label,
            cls=scene.cls,
            txt=scene.caption() if c.captions else None,
            meta=meta,
        )
