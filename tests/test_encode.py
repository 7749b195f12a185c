"""JPEG pass-through decisions and label PNG round trips."""

import io

import numpy as np
import pytest
from PIL import Image

from fastloc.shard.encode import (
    MAX_PIXELS_DEFAULT,
    decode_label,
    encode_label,
    jpeg_size,
    parse_jpeg_header,
    prepare_image,
)
from fastloc.shard.errors import SampleError


def jpeg(mode="RGB", size=(40, 30), **save):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, **save)
    return out.getvalue()


def png(mode="RGB", size=(40, 30)):
    out = io.BytesIO()
    Image.new(mode, size, "red" if mode == "RGB" else 3).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_baseline_passes_through_untouched(mode):
    data = jpeg(mode)
    header = parse_jpeg_header(data)
    assert (header.width, header.height, header.coding) == (40, 30, "baseline")
    out = prepare_image("x.jpg", data, None)
    assert out.data is data and out.reencoded is None and (out.width, out.height) == (40, 30)


@pytest.mark.parametrize(
    "data, reason",
    [
        (lambda: jpeg("CMYK"), "CMYK JPEG"),
        (lambda: jpeg("RGB", progressive=True), "progressive JPEG"),
        (lambda: png(), "PNG data named as JPEG"),
        (lambda: png("P"), "PNG data named as JPEG"),
    ],
)
def test_unusable_images_are_reencoded_as_baseline(data, reason):
    out = prepare_image("x.jpg", data(), None)
    assert out.reencoded == reason
    header = parse_jpeg_header(out.data)
    assert header.coding == "baseline" and header.components in (1, 3)
    assert Image.open(io.BytesIO(out.data)).size == (40, 30)


def test_progressive_kept_on_request():
    data = jpeg("RGB", progressive=True)
    assert prepare_image("x.jpg", data, None, keep_progressive=True).data is data


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (jpeg()[:-2], "no end-of-image marker"),
        (jpeg()[:200], "corrupt JPEG"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "corrupt JPEG"),
        (b"this is not an image at all", "cannot decode image"),
        (png()[:40], "cannot decode image"),
    ],
)
def test_bad_images_raise_sample_error(data, message):
    with pytest.raises(SampleError, match=message) as info:
        prepare_image("some/dir/bad.jpg", data, None)
    assert info.value.path == "some/dir/bad.jpg"


def test_decode_check_catches_what_the_header_cannot():
    data = bytearray(jpeg(size=(64, 64)))
    table = data.find(b"\xff\xc4")  # a Huffman table: the marker walk skips its contents
    data[table + 6 : table + 20] = b"\xff" * 14
    prepare_image("x.jpg", bytes(data), None)  # header check: structure is fine
    with pytest.raises(SampleError):
        prepare_image("x.jpg", bytes(data), None, check="decode")


def test_generated_pixels_are_encoded():
    pixels = np.zeros((30, 40, 3), np.uint8)
    out = prepare_image("gen", None, pixels)
    assert out.reencoded is None and parse_jpeg_header(out.data).width == 40


@pytest.mark.parametrize("num_classes, dtype", [(2, np.uint8), (183, np.uint8), (256, np.uint8), (3689, np.uint16)])
def test_label_round_trip(num_classes, dtype):
    label = np.random.default_rng(1).integers(0, num_classes, (30, 40))
    data = encode_label("x", label, num_classes, (40, 30))
    back = decode_label(data)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, label)


def test_label_checks():
    label = np.zeros((30, 40), np.int64)
    with pytest.raises(SampleError, match="label map is 40x30 but the image is 41x30"):
        encode_label("x", label, 10, (41, 30))
    label[3, 4] = 10
    with pytest.raises(SampleError, match=r"label ids \[10\] outside the class space \[0, 10\)"):
        encode_label("x", label, 10, (40, 30))
    with pytest.raises(SampleError, match="shape"):
        encode_label("x", np.zeros((30, 40, 3), np.uint8), 10, (40, 30))


def _with_size(data: bytes, width: int, height: int) -> bytes:
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[sof + 9 :]


def test_pixel_limit_is_checked_from_the_header():
    small = jpeg()  # 40x30
    assert jpeg_size(small) == (40, 30) and jpeg_size(b"not a jpeg") is None
    for width, height in ((50000, 50000), (12000, 12000)):
        huge = _with_size(small, width, height)
        assert jpeg_size(huge) == (width, height)
        for check in ("header", "decode"):
            with pytest.raises(SampleError, match=f"{width}x{height}.*--max-pixels"):
                prepare_image("x.jpg", huge, None, check=check)
    assert MAX_PIXELS_DEFAULT >= 8000 * 8000
    assert prepare_image("x.jpg", small, None, max_pixels=1200).data == small  # exactly at the limit
    with pytest.raises(SampleError, match="40x30"):
        prepare_image("x.jpg", small, None, max_pixels=1199)
    png = io.BytesIO()
    Image.new("1", (9000, 9000)).save(png, format="PNG")  # not a JPEG: checked before decoding too
    with pytest.raises(SampleError, match="9000x9000"):
        prepare_image("x.jpg", png.getvalue(), None)
    with pytest.raises(SampleError, match="40x30"):
        prepare_image("gen", None, np.zeros((30, 40, 3), np.uint8), max_pixels=100)
    label = encode_label("l.png", np.zeros((30, 40), np.uint8), 5, (40, 30))
    assert decode_label(label, max_pixels=1200).shape == (30, 40)
    with pytest.raises(ValueError, match="label PNG is 40x30"):
        decode_label(label, max_pixels=1000)
