"""Bytes in, bytes out: JPEG pass-through or re-encoding, and label-map PNGs.

The JPEG check reads only the marker segments (microseconds), so pass-through conversion runs
near copy speed. A JPEG passes through untouched when a GPU decoder takes it as it is: baseline
(or extended) Huffman coding, 8-bit, one (grayscale) or three (YCbCr) components, with its
end-of-image marker present. Everything else that PIL can decode (CMYK/YCCK, progressive, 12-bit,
arithmetic coding, PNG or other formats named .jpg) is re-encoded as a baseline JPEG, and the
reason is counted in the report. What PIL cannot decode is a ``SampleError``, and so is an image
whose header announces more than ``max_pixels`` pixels (checked before anything is decoded).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastloc.shard.errors import SampleError

# The default pixel limit (width x height) of one image, applied from the header at conversion,
# by verify and inspect, and by the loaders when they read shards: 64 Mpixels (8000 x 8000) is
# generous for photographs (a 50-megapixel camera image fits; COCO's are at most 640 x 640,
# ADE20K's few thousand pixels a side) and stops absurd headers (12000 x 12000 would decode to
# 432 MB of RGB) before anything is decoded.
MAX_PIXELS_DEFAULT = 64_000_000
# Pillow refuses to open larger images at all (twice its decompression-bomb threshold): the
# largest value a pixel limit may take.
MAX_PIXELS_CAP = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)

# Start-of-frame markers and the coding they announce (ITU T.81, table B.1).
_SOF_NAMES = {
    0xC0: "baseline",
    0xC1: "extended",
    0xC2: "progressive",
    0xC3: "lossless",
    0xC5: "hierarchical",
    0xC6: "hierarchical",
    0xC7: "hierarchical",
    0xC9: "arithmetic",
    0xCA: "arithmetic",
    0xCB: "arithmetic",
    0xCD: "arithmetic",
    0xCE: "arithmetic",
    0xCF: "arithmetic",
}
_STANDALONE = {0x01, 0xD8} | set(range(0xD0, 0xD8))  # markers without a length field


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int  # 1 grayscale, 3 YCbCr (or RGB), 4 CMYK/YCCK
    precision: int  # bits per sample
    coding: str  # baseline, extended, progressive, ...
    adobe_transform: int | None  # APP14 colour transform: 0 = none (RGB/CMYK), 1 = YCbCr, 2 = YCCK


def parse_jpeg_header(data: bytes) -> JpegHeader:
    """Walk the marker segments up to the first scan; raise ValueError on anything malformed."""
    n = len(data)
    if n == 0:
        raise ValueError("empty file")
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no start-of-image marker)")
    pos, frame, adobe = 2, None, None
    while True:
        if pos >= n:
            raise ValueError("truncated in the header")
        if data[pos] != 0xFF:
            raise ValueError(f"corrupt marker structure at byte {pos}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise ValueError("truncated in the header")
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker == 0xD9:
            raise ValueError("end-of-image marker before any image data")
        if pos + 2 > n:
            raise ValueError("truncated in the header")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > n:
            raise ValueError(f"truncated or corrupt segment (marker 0x{marker:02X})")
        segment = data[pos + 2 : pos + length]
        if marker in _SOF_NAMES:
            if len(segment) < 6:
                raise ValueError("corrupt frame header")
            height = int.from_bytes(segment[1:3], "big")
            width = int.from_bytes(segment[3:5], "big")
            frame = (segment[0], height, width, segment[5], _SOF_NAMES[marker])
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe = segment[11]
        elif marker == 0xDA:
            break
        pos += length
    if frame is None:
        raise ValueError("no frame header before the image data")
    # Entropy-coded data never contains FF D9 (FF is always stuffed), so an EOI after the
    # first scan header exists iff the file was not cut short.
    if data.rfind(b"\xff\xd9", pos) < 0:
        raise ValueError("truncated (no end-of-image marker)")
    precision, height, width, components, coding = frame
    return JpegHeader(width, height, components, precision, coding, adobe)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None when the data is no well-formed JPEG.

    Read without Pillow, which refuses to even open images above its own limit: this lets a caller
    name the size of an absurd header instead of reporting Pillow's error.
    """
    try:
        header = parse_jpeg_header(data)
    except ValueError:
        return None
    return header.width, header.height


def reencode_reason(header: JpegHeader, keep_progressive: bool) -> str | None:
    """Why this JPEG cannot pass through, or None when it can."""
    if header.coding == "progressive" and not keep_progressive:
        return "progressive JPEG"
    if header.coding not in ("baseline", "extended", "progressive"):
        return f"{header.coding} JPEG"
    if header.precision != 8:
        return f"{header.precision}-bit JPEG"
    if header.components == 4:
        return "CMYK JPEG"
    if header.components not in (1, 3):
        return f"{header.components}-component JPEG"
    if header.components == 3 and header.adobe_transform == 0:
        return "RGB-coded JPEG"
    if header.width == 0 or header.height == 0:
        return "JPEG with height in a DNL marker"
    return None


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    width: int
    height: int
    reencoded: str | None  # reason for re-encoding, None when passed through or generated


def pixel_problem(width: int, height: int, max_pixels: int | None) -> str | None:
    """Why an image of this size is refused, or None when it is within the limit."""
    if max_pixels is None or width * height <= max_pixels:
        return None
    return (
        f"image is {width}x{height} = {width * height / 1e6:.1f} Mpixels, over the limit of "
        f"{max_pixels / 1e6:.1f} Mpixels (--max-pixels {max_pixels})"
    )


def _decode(data: bytes, path: str, max_pixels: int | None = MAX_PIXELS_DEFAULT) -> Image.Image:
    """Fully decode with PIL after checking the size in the header; any failure is a SampleError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides
            image = Image.open(io.BytesIO(data))
            problem = pixel_problem(image.width, image.height, max_pixels)
            if problem is not None:
                raise SampleError(path, problem)
            image.load()
        return image
    except SampleError:
        raise
    except Image.DecompressionBombError as exc:  # beyond what Pillow opens at all
        raise SampleError(path, f"image too large to open: {exc}") from None
    except UnidentifiedImageError:  # its message shows the BytesIO object, not the problem
        raise SampleError(path, "cannot decode image: not in an image format Pillow can read") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise SampleError(path, f"cannot decode image: {exc}") from None


def encode_jpeg(image: Image.Image, quality: int, full_chroma: bool = False) -> bytes:
    """Baseline JPEG of an image, grayscale kept grayscale, everything else as RGB.

    ``full_chroma`` keeps colour at full resolution (4:4:4) instead of PIL's 4:2:0: generated
    scenes have sharp, saturated colour edges that 4:2:0 smears across label boundaries.
    """
    if image.mode not in ("L", "RGB"):
        image = image.convert("L" if image.mode in ("1", "I", "I;16", "F", "LA") else "RGB")
    out = io.BytesIO()
    image.save(
        out, format="JPEG", quality=quality, progressive=False, optimize=False, subsampling=0 if full_chroma else -1
    )
    return out.getvalue()


def prepare_image(
    path: str,
    data: bytes | None,
    pixels: np.ndarray | None,
    *,
    check: str = "header",
    keep_progressive: bool = False,
    quality: int = 95,
    max_pixels: int | None = MAX_PIXELS_DEFAULT,
) -> EncodedImage:
    """The `jpg` member of a sample: source bytes untouched where possible, else re-encoded.

    Images over ``max_pixels`` (width x height, read from the header) are a SampleError.
    """
    if pixels is not None:
        height, width = pixels.shape[:2]
        problem = pixel_problem(width, height, max_pixels)
        if problem is not None:
            raise SampleError(path, problem)
        image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
        return EncodedImage(encode_jpeg(image, quality, full_chroma=True), image.width, image.height, None)
    if not data:
        raise SampleError(path, "empty file (0 bytes)")
    if data[:2] == b"\xff\xd8":
        try:
            header = parse_jpeg_header(data)
        except ValueError as exc:
            raise SampleError(path, f"corrupt JPEG: {exc}") from None
        problem = pixel_problem(header.width, header.height, max_pixels)
        if problem is not None:
            raise SampleError(path, problem)
        reason = reencode_reason(header, keep_progressive)
        if reason is None:
            if check == "decode":
                _decode(data, path, max_pixels)
            return EncodedImage(data, header.width, header.height, None)
    else:
        reason = None  # decided below from what PIL finds
    image = _decode(data, path, max_pixels)
    if reason is None:
        reason = f"{image.format or 'unknown'} data named as JPEG"
    return EncodedImage(encode_jpeg(image, quality), image.width, image.height, reason)


def label_space(num_classes: int, ignore: int | None = None) -> int:
    """How many values a label PNG must hold: the classes, and the ignore value when it lies above them."""
    return max(num_classes, ignore + 1) if ignore is not None else num_classes


def label_dtype(num_classes: int) -> np.dtype:
    """uint8 PNG when the classes fit, uint16 otherwise."""
    if num_classes <= 256:
        return np.dtype(np.uint8)
    if num_classes <= 65536:
        return np.dtype(np.uint16)
    raise ValueError(f"{num_classes} classes do not fit a 16-bit label PNG")


def encode_label(
    path: str, label: np.ndarray, num_classes: int, size: tuple[int, int], ignore: int | None = None
) -> bytes:
    """A single-channel PNG of the label map, after checking shape and class range (``ignore``, the
    dataset's "do not score" value such as VOC's 255, is kept as is)."""
    width, height = size
    if label.ndim != 2:
        raise SampleError(path, f"label map has shape {label.shape}, expected [H, W]")
    if label.shape != (height, width):
        raise SampleError(path, f"label map is {label.shape[1]}x{label.shape[0]} but the image is {width}x{height}")
    if not np.issubdtype(label.dtype, np.integer):
        raise SampleError(path, f"label map has non-integer dtype {label.dtype}")
    outside = (label < 0) | (label >= num_classes)
    if ignore is not None:
        outside &= label != ignore
    if outside.any():
        bad = np.unique(label[outside])[:8].tolist()
        also = f" (or {ignore} = ignore)" if ignore is not None else ""
        raise SampleError(path, f"label ids {bad} outside the class space [0, {num_classes}){also}")
    dtype = label_dtype(label_space(num_classes, ignore))
    image = Image.fromarray(np.ascontiguousarray(label, dtype=dtype))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=3)
    return out.getvalue()


def decode_label(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """[H, W] uint8 or uint16 from a label PNG written by ``encode_label``.

    With ``max_pixels``, a PNG whose header announces more pixels is a ValueError, raised before
    anything is decoded.
    """
    image = Image.open(io.BytesIO(data))
    problem = pixel_problem(image.width, image.height, max_pixels)
    if problem is not None:
        raise ValueError(problem.replace("image is", "label PNG is", 1))
    if image.mode not in ("L", "I;16", "I"):
        raise ValueError(f"label PNG has mode {image.mode}, expected single-channel")
    array = np.asarray(image)
    return array.astype(np.uint16) if image.mode != "L" else array
