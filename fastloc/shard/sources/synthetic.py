"""A seeded synthetic segmentation dataset: textured regions overlaid with shaped objects.

It needs no download: the data of the demo and the tests. The label map comes from the very masks
that paint the pixels, and sample ``i`` depends only on (data seed, split, i, sizes, difficulty).
What is drawn, the two difficulties and the seeding: shards/README.md ("What each converter writes").
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

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


@dataclass(frozen=True)
class Difficulty:
    """What the generator draws: the class set and the scene statistics. ``standard`` holds the
    module constants above; the class ids are background (0), the textures, then the shapes."""

    name: str  # part of the sample seed unless "standard"
    textures: tuple[str, ...]  # region classes besides background
    shapes: tuple[str, ...]  # object classes
    regions_per_image: tuple[int, int]  # inclusive
    region_count_weights: tuple[float, ...]  # one per cell count in regions_per_image
    background_weight: float  # of class 0 per cell vs (1 - it) / len(textures) per texture
    objects_per_image: tuple[int, int]  # inclusive, uniform
    object_diameter: tuple[float, float]  # equal-area disc diameter / shorter side, uniform
    object_margin: float  # centres lie this many equal-area radii inside the edges (0: anywhere)
    fills: tuple[str, ...]  # object fills: "flat", "gradient" or textures
    fill_weights: tuple[float, ...]
    # Region texture period (stripe period, two checkerboard cells, dot spacing) as a fraction of
    # the shorter side, log-uniform; None: each texture's own range in pixels, capped by the size.
    texture_period: tuple[float, float] | None
    # "gradient": class 0 is a gentle gradient near one colour; "noisy": a gradient between two
    # random colours plus low-frequency value noise.
    background: Literal["gradient", "noisy"]

    @property
    def classes(self) -> list[str]:
        return ["background", *self.textures, *self.shapes]

    @property
    def region_classes(self) -> list[int]:
        return list(range(1 + len(self.textures)))

    @property
    def object_classes(self) -> list[int]:
        return list(range(1 + len(self.textures), len(self.classes)))

    def facts(self) -> dict[str, Any]:
        """The parameters as JSON-ready values (for manifests)."""
        return {f: list(v) if isinstance(v, tuple) else v for f, v in vars(self).items()}


DIFFICULTIES: dict[str, Difficulty] = {
    "standard": Difficulty(
        name="standard",
        textures=tuple(TEXTURES),
        shapes=tuple(SHAPES),
        regions_per_image=REGIONS_PER_IMAGE,
        region_count_weights=REGION_COUNT_WEIGHTS,
        background_weight=BACKGROUND_WEIGHT,
        objects_per_image=OBJECTS_PER_IMAGE,
        object_diameter=OBJECT_DIAMETER,
        object_margin=0.0,
        fills=tuple(FILLS),
        fill_weights=tuple(FILL_WEIGHTS.tolist()),
        texture_period=None,
        background="gradient",
    ),
    # A tiny ViT at 64 px input with 8 px patches sees 8 patches per side: a period of 1/12-1/6
    # of the side is 5.3-10.7 input pixels (about one patch; 8-27 px on 96-160 px images), so a
    # patch shows at least most of a period and no stripe or cell falls below ~1.6 input pixels.
    "demo": Difficulty(
        name="demo",
        textures=("stripes", "checkerboard", "dots"),
        shapes=("circle", "square", "triangle", "cross"),
        regions_per_image=(1, 3),
        region_count_weights=(0.2, 0.4, 0.4),
        background_weight=BACKGROUND_WEIGHT,
        objects_per_image=(1, 3),
        object_diameter=(1 / 4, 1 / 2),
        object_margin=0.8,  # a shape that runs far off the edge no longer shows its class
        fills=("flat", "gradient"),
        fill_weights=(0.5, 0.5),
        texture_period=(1 / 12, 1 / 6),
        background="noisy",
    ),
}


def difficulty_of(difficulty: str | Difficulty) -> Difficulty:
    """A ``Difficulty`` from itself or its name in ``DIFFICULTIES``."""
    if isinstance(difficulty, Difficulty):
        return difficulty
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r} (known: {', '.join(DIFFICULTIES)})")
    return DIFFICULTIES[difficulty]


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


def _length(
    rng: np.random.Generator, period: tuple[float, float] | None, default: tuple[float, float], part: float = 1.0
) -> float:
    """Log-uniform: ``part`` of a period drawn from ``period`` (pixels) if given, else from ``default``."""
    lo, hi = default if period is None else (period[0] * part, period[1] * part)
    return _log_uniform(rng, lo, hi)


def _texture(
    kind: str,
    rng: np.random.Generator,
    y: np.ndarray,
    x: np.ndarray,
    scale: float,
    period: tuple[float, float] | None = None,
) -> np.ndarray:
    """A blend field in [0, 1] (0 = first colour, 1 = second) of shape [h, w].

    ``y`` [h, 1] and ``x`` [1, w] are image pixel coordinates (float32); ``scale`` caps the
    texture period in pixels (the image side for regions, about the diameter for objects), unless
    ``period`` (lo, hi) in pixels gives the range of the period (two cells of a checkerboard).
    """
    angle = rng.uniform(0.0, 2.0 * math.pi)
    if kind in ("flat", "gradient"):  # linear ramp from one corner of the box to the other
        c, s = math.cos(angle), math.sin(angle)
        ys, xs = (float(y[0, 0]), float(y[-1, 0])), (float(x[0, 0]), float(x[0, -1]))
        ends = [xx * c + yy * s for yy in ys for xx in xs]
        lo, span = min(ends), max(max(ends) - min(ends), 1.0)
        return _along(y, x, angle, 1.0 / span, -lo / span)
    if kind == "stripes":
        period = _length(rng, period, (6.0, max(7.0, min(48.0, scale))))
        duty, phase, soft = rng.uniform(0.3, 0.7), rng.uniform(), rng.uniform() < 0.4
        if soft:  # sinusoidal stripes
            t = np.sin(_along(y, x, angle, 2.0 * math.pi / period, 2.0 * math.pi * phase))
            t *= 0.5
            t += 0.5
            return t
        return (_frac(_along(y, x, angle, 1.0 / period, phase + _POSITIVE)) < duty).astype(np.float32)
    if kind == "checkerboard":
        k = 1.0 / _length(rng, period, (5.0, max(6.0, min(32.0, scale / 2))), 0.5)
        iu = _along(y, x, angle, k, _POSITIVE).astype(np.int32)
        iu += _along(y, x, angle + 0.5 * math.pi, k, _POSITIVE).astype(np.int32)
        return (iu & 1).astype(np.float32)
    if kind == "dots":
        k = 1.0 / _length(rng, period, (6.0, max(7.0, min(28.0, scale / 1.5))))
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
        spacing = _length(rng, period, (8.0, max(9.0, min(36.0, scale))))
        edge = 0.5 - rng.uniform(0.5, 1.5) / spacing  # lines: within a half width of the cell edge
        du = np.abs(_frac(_along(y, x, angle, 1.0 / spacing, _POSITIVE)) - 0.5)
        dv = np.abs(_frac(_along(y, x, angle + 0.5 * math.pi, 1.0 / spacing, _POSITIVE)) - 0.5)
        return (np.maximum(du, dv, out=du) > edge).astype(np.float32)
    if kind == "clouds":
        return _value_noise(rng, y, x, _length(rng, period, (10.0, max(11.0, min(64.0, scale)))))
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
    classes: tuple[str, ...] = tuple(CLASSES)  # class names of the difficulty, index = class id
    object_fills: list[str] = field(default_factory=list)  # fill of each object ("palette" if flat)

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
            f"{_article(self.object_colours[k])} {self.object_colours[k]} {self.classes[self.objects[k]]}"
            for k in order
            if self.object_pixels[k] > 0
        ]
        area = self.class_pixels
        names = {"background": "a plain background", "checkerboard": "a checkerboard", "grid": "a grid"}
        order = sorted(self.regions, key=lambda c: (-area[c], c))
        grounds = [names.get(self.classes[c], self.classes[c]) for c in order if area[c] > 0]
        text = _join(things)
        return f"{text} on {_join(grounds)}" if grounds else text


def _article(word: str) -> str:
    """'a' or 'an' before ``word`` (the colour names start with a vowel sound exactly when with a vowel)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _region_colours(look: np.random.Generator, d: Difficulty, c: int) -> tuple[np.ndarray, np.ndarray]:
    """The two colours of a region cell of class ``c``."""
    if c == 0 and d.background == "gradient":  # a gentle gradient near one colour
        c1 = look.integers(0, 256, 3).astype(np.float32)
        return c1, np.clip(c1 + look.normal(0, 30, 3), 0, 255).astype(np.float32)
    return _colour_pair(look)


def _region_field(
    look: np.random.Generator, d: Difficulty, c: int, y: np.ndarray, x: np.ndarray, side: int
) -> np.ndarray:
    """The blend field of a region cell of class ``c`` over the box ``y`` [h, 1] x ``x`` [1, w]."""
    if c == 0 and d.background == "noisy":  # a ramp plus low-frequency noise: no texture, no one colour
        ramp = _texture("gradient", look, y, x, side)
        noise = _value_noise(look, y, x, side * look.uniform(0.3, 0.6))
        mix = np.float32(look.uniform(0.3, 0.6))
        ramp *= 1 - mix
        ramp += mix * noise
        return ramp
    if c == 0:
        return _texture("gradient", look, y, x, side)
    period = None if d.texture_period is None else (d.texture_period[0] * side, d.texture_period[1] * side)
    return _texture(d.classes[c], look, y, x, side, period)


def draw_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    palette: np.ndarray | None = None,
    difficulty: str | Difficulty = "standard",
) -> Scene:
    """Draw one scene of ``height`` x ``width`` pixels from ``rng`` at ``difficulty`` (a
    ``Difficulty`` or a name in ``DIFFICULTIES``), whose ``classes`` the label ids index.

    With ``palette`` ([C, 3] uint8) every region and object is painted flat in its class's
    palette colour and no noise is added: the layout is identical to the textured rendering of
    the same ``rng`` state (geometry and appearance use separate child generators), and then
    ``pixels == palette[label]`` everywhere. The tests use this to check pixel/label agreement.
    """
    d = difficulty_of(difficulty)
    geo_seed, look_seed = rng.integers(0, 2**63, size=2)
    geo, look = np.random.default_rng(geo_seed), np.random.default_rng(look_seed)
    H, W, side = int(height), int(width), min(int(height), int(width))
    y = np.arange(H, dtype=np.float32)[:, None]  # [H, 1]
    x = np.arange(W, dtype=np.float32)[None, :]  # [1, W]

    # Regions: Voronoi cells of warped coordinates, each a distinct region class.
    n_cells = int(geo.choice(len(d.region_count_weights), p=d.region_count_weights)) + d.regions_per_image[0]
    bg, n_tex = d.background_weight, len(d.textures)
    weights = np.array([bg] + [(1 - bg) / n_tex] * n_tex)
    regions = [int(c) for c in geo.choice(len(d.region_classes), size=n_cells, replace=False, p=weights)]
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
            dist = wx * np.float32(-2 * sx)
            dist += np.float32(sx * sx + sy * sy)
            dist += wy * np.float32(-2 * sy)
            if best is None:
                best = dist
                continue
            closer = dist < best
            np.minimum(best, dist, out=best)
            np.copyto(cell, np.uint8(j), where=closer)
    label = np.asarray(regions, np.uint8)[cell]  # [H, W]

    # Objects: shapes drawn in rough size order (largest first), so few are hidden completely.
    n_objects = int(geo.integers(d.objects_per_image[0], d.objects_per_image[1] + 1))
    objs = []
    for _ in range(n_objects):
        cls = d.object_classes[int(geo.integers(len(d.shapes)))]
        param = geo.uniform()  # shape parameter: aspect ratio, hole size, arm width, ...
        # diameter of the disc with the object's area, so that every shape covers as many pixels
        diameter = side * geo.uniform(*d.object_diameter)
        radius = 0.5 * diameter * math.sqrt(math.pi / _shape_area(d.classes[cls], param))
        inset = 0.5 * diameter * d.object_margin
        cy, cx = geo.uniform(inset, H - inset), geo.uniform(inset, W - inset)
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
            c1s[j], c2s[j] = _region_colours(look, d, c)
            if n_cells == 1:
                blend = _region_field(look, d, c, y, x, side)
                continue
            inside = cell == j  # texture only the cell's bounding box
            rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
            if len(rows) == 0:  # a cell that no pixel is nearest to
                continue
            box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
            np.copyto(blend[box], _region_field(look, d, c, y[box[0]], x[:, box[1]], side), where=inside[box])
        img = np.empty((3, H, W), np.float32)
        table = np.concatenate([c2s - c1s, c1s], axis=1).T.copy()  # [6, cells]: span, base
        per_pixel = np.take(table, cell.astype(np.intp), axis=1)  # [6, H, W]
        np.multiply(blend, per_pixel[:3], out=img)
        img += per_pixel[3:]

    colours, fills = [], []
    for k, (_, cls, radius, cy, cx, angle, param) in enumerate(objs):
        reach = 1.05 * radius
        y0, y1 = max(0, int(cy - reach)), min(H, int(cy + reach) + 2)
        x0, x1 = max(0, int(cx - reach)), min(W, int(cx + reach) + 2)
        by, bx = y[y0:y1] - np.float32(cy), x[:, x0:x1] - np.float32(cx)  # [h, 1], [1, w]
        u = _along(by, bx, angle, 1.0 / radius)  # object coordinates: radius 1 = half diameter
        v = _along(by, bx, angle + 0.5 * math.pi, 1.0 / radius)
        inside = _shape_mask(d.classes[cls], u, v, param)
        if palette is not None:
            fill = pal[cls].astype(np.float32)[:, None]  # [3, 1]
            colours.append(colour_name(pal[cls]))
            fills.append("palette")
        else:
            kind = d.fills[int(look.choice(len(d.fills), p=d.fill_weights))]
            c1, c2 = _colour_pair(look)
            if kind == "flat":  # faint shading only
                c2 = np.clip(c1 + look.normal(0, 12, 3), 0, 255).astype(np.float32)
            t = _texture(kind, look, y[y0:y1], x[:, x0:x1], min(y1 - y0, x1 - x0))
            fill = c1[:, None] + t[inside][None, :] * (c2 - c1)[:, None]  # [3, n]
            colours.append(colour_name(c1))
            fills.append(kind)
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
        class_pixels=np.bincount(label.ravel(), minlength=len(d.classes)).tolist(),
        classes=tuple(d.classes),
        object_fills=fills,
    )


def render_scene(
    rng: np.random.Generator, height: int, width: int, difficulty: str | Difficulty = "standard"
) -> tuple[np.ndarray, np.ndarray]:
    """One textured scene: ``pixels`` [H, W, 3] uint8 and ``label`` [H, W] uint8 class ids."""
    scene = draw_scene(rng, height, width, difficulty=difficulty)
    return scene.pixels, scene.label


def _seed(data_seed: int, index: int, split: str, difficulty: str | Difficulty) -> list[int]:
    """The seed of a sample; a difficulty other than standard is hashed in, standard adds nothing."""
    name = difficulty_of(difficulty).name
    seed = [data_seed, zlib.crc32(split.encode()), index]
    return seed if name == "standard" else [*seed, zlib.crc32(name.encode())]


def sample_rng(
    data_seed: int, index: int, split: str = "train", difficulty: str | Difficulty = "standard"
) -> np.random.Generator:
    """The generator of sample ``index`` of ``split``: independent of every other sample, and
    of every other split and difficulty (their names are hashed into the seed)."""
    return np.random.default_rng(_seed(data_seed, index, split, difficulty))


def sample_shape(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """Height and width, each uniform in [min_size, max_size]: the first draws of a sample."""
    h, w = rng.integers(min_size, max_size + 1, size=2)
    return int(h), int(w)


def generate(
    data_seed: int,
    index: int,
    min_size: int = 192,
    max_size: int = 320,
    split: str = "train",
    difficulty: str | Difficulty = "standard",
) -> Scene:
    """Sample ``index`` of ``split`` of the dataset seeded by ``data_seed``, at ``difficulty``."""
    rng = sample_rng(data_seed, index, split, difficulty)
    return draw_scene(rng, *sample_shape(rng, min_size, max_size), difficulty=difficulty)


# ---------------------------------------------------------------- source


@flowing_help
@dataclass(frozen=True, kw_only=True)
class SyntheticConfig(ConvertConfig):
    """Generate the built-in synthetic dataset: textured regions (stripes, checkerboard, dots,
    clouds, grid, plain background = class 0) overlaid with 3-8 objects recognisable only by
    their shape (circle, square, triangle, ring, cross, star, ellipse, diamond, hexagon,
    crescent). Seeded and download-free; labels match the pixels exactly. --difficulty demo draws
    an easier 8-class set for tiny models at low resolution."""

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

    difficulty: Literal["standard", "demo"] = "standard"
    """standard: the 16 classes above, 1-4 region cells, 3-8 objects of 1/12-1/3 of the shorter
    side, textured object fills. demo: an easier task for a tiny ViT at 64 px with 8 px patches: 8
    classes (background, stripes, checkerboard, dots, circle, square, triangle, cross), 1-3 cells,
    1-3 objects of 1/4-1/2 of the shorter side, mostly inside the image, with flat or gradient
    fills, coarse textures (period 1/12-1/6 of the shorter side) and a background of two-colour
    gradient plus low-frequency noise. Each difficulty is its own stream of images (the name is
    part of the seed, except standard)."""

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

    def _tag(self) -> str:
        """``, difficulty=NAME`` unless standard (so that standard's texts stay as they were)."""
        name = self.config.difficulty
        return "" if name == "standard" else f", difficulty={name}"

    def info(self) -> SourceInfo:
        self._check()
        c, d = self.config, difficulty_of(self.config.difficulty)
        standard = d.name == "standard"
        background = "plain gradient background" if standard else "background (gradient and smooth noise)"
        lo, hi = (str(Fraction(f).limit_denominator(1000)) for f in d.object_diameter)
        extra: dict[str, Any] = {
            "generator_version": GENERATOR_VERSION,
            "data_seed": c.data_seed,
            "num_samples": c.num_samples,
            "min_size": c.min_size,
            "max_size": c.max_size,
            "region_classes": d.region_classes,
            "object_classes": d.object_classes,
            "regions_per_image": list(d.regions_per_image),
            "objects_per_image": list(d.objects_per_image),
            "object_diameter": f"equal-area disc diameter, uniform in [{lo}, {hi}] of the shorter side",
            "cls": "class of the largest visible object (ties to the smallest id)",
            "rng": "numpy default_rng([data_seed, zlib.crc32(split), index"
            + ("])" if standard else f", zlib.crc32(b'{d.name}')])"),
        }
        if not standard:
            extra |= {"difficulty": d.name, "difficulty_parameters": d.facts()}
        return SourceInfo(
            dataset="synthetic",
            split=c.split,
            source=f"fastloc synthetic generator (data_seed={c.data_seed}{self._tag()})",
            classes=d.classes,
            has_label=True,
            has_cls=True,
            has_txt=c.captions,
            label_encoding={
                "space": f"synthetic-{len(d.classes)}" if standard else f"synthetic-{d.name}-{len(d.classes)}",
                "unlabeled": 0,
                "rule": "label = class id of the topmost painted layer (region cell, then objects in "
                f"paint order); 0 = {background}, the unlabeled role",
            },
            extra=extra,
        )

    def items(self) -> list[Item]:
        """One item per index; ``size`` = image area x BYTES_PER_PIXEL (JPEG q95 4:4:4 + label PNG).

        Drawing only the image shape of each sample is cheap (about 20 us).
        """
        self._check()
        c = self.config
        out = []
        for i in range(c.num_samples):
            h, w = sample_shape(sample_rng(c.data_seed, i, c.split, c.difficulty), c.min_size, c.max_size)
            out.append(Item(key=f"synthetic_{i:08d}", size=int(h * w * BYTES_PER_PIXEL), ref=i))
        return out

    def load(self, item: Item) -> Sample:
        c = self.config
        where = f"synthetic(data_seed={c.data_seed}{self._tag()})#{item.ref}"
        try:
            scene = generate(c.data_seed, int(item.ref), c.min_size, c.max_size, c.split, c.difficulty)
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
