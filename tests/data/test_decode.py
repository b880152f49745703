"""Decoding: odd but valid images become exact uint8 RGB; broken ones raise BadImageError."""
import io

import numpy as np
import pytest
from PIL import Image

from mmjax.data.decode import (BadImageError, center_crop, decode_image, fit_square,
                               random_square_crop, resize_shorter_side)
from tests.data import files


def _composite(rgb, alpha):
    return np.round(np.asarray(rgb, np.float64) * np.asarray(alpha, np.float64)[..., None] / 255).astype(np.uint8)


def _palette_image(transparent: bool) -> tuple[bytes, np.ndarray]:
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 10)]
    indices = np.array([[0, 1, 2], [3, 2, 1]], np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([c for rgb in palette for c in rgb])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **({"transparency": 2} if transparent else {}))
    expected = np.array([[palette[i] for i in row] for row in indices], np.uint8)
    if transparent:
        expected[indices == 2] = 0  # the transparent entry composites to black
    return buffer.getvalue(), expected


def _odd_image(kind: str) -> tuple[bytes, np.ndarray]:
    """(file bytes, the exact uint8 RGB it must decode to)."""
    if kind == "gray16":
        values = np.array([[0, 1000, 32896], [40000, 65280, 65535]], np.uint16)
        expected = np.round(values / 65535 * 255).astype(np.uint8)  # 1000 -> 4 (not 3, as >> 8 gives)
        data = files.png_bytes(3, 2, 16, 0, values.astype(">u2").tobytes())
        return data, np.repeat(expected[..., None], 3, -1)
    if kind == "rgb16":
        values = (np.arange(18).reshape(2, 3, 3) * 14 * 257).astype(np.uint16)  # k * 257 -> k
        data = files.png_bytes(3, 2, 16, 2, values.astype(">u2").tobytes())
        return data, (values // 257).astype(np.uint8)
    if kind == "palette":
        return _palette_image(transparent=False)
    if kind == "palette_transparent":
        return _palette_image(transparent=True)
    if kind == "rgba":
        rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128]],
                         [[10, 20, 30, 0], [255, 255, 255, 64]]], np.uint8)
        return files.encoded(rgba, "PNG"), _composite(rgba[..., :3], rgba[..., 3])
    if kind == "gray_alpha":
        la = np.array([[[100, 255], [100, 51]], [[255, 0], [7, 200]]], np.uint8)
        data = files.encoded(la, "PNG")  # Pillow writes a (gray, alpha) array as mode LA
        gray = np.repeat(la[..., :1], 3, -1)
        return data, _composite(gray, la[..., 1])
    if kind == "gray":
        gray = np.array([[0, 128, 255]], np.uint8)
        return files.encoded(gray, "PNG"), np.repeat(gray[..., None], 3, -1)
    if kind == "bilevel":
        image = Image.fromarray(np.array([[0, 255, 0, 255]], np.uint8)).convert("1")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), np.repeat(np.array([[0, 255, 0, 255]], np.uint8)[..., None], 3, -1)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["gray16", "rgb16", "palette", "palette_transparent", "rgba",
                                  "gray_alpha", "gray", "bilevel"])
def test_odd_valid_images_decode_to_exact_rgb(kind, tmp_path):
    data, expected = _odd_image(kind)
    path = tmp_path / f"{kind}.png"
    path.write_bytes(data)
    for source in (data, path, str(path)):
        image = decode_image(source)
        assert image.dtype == np.uint8 and image.shape == expected.shape[:2] + (3,)
        np.testing.assert_array_equal(image, expected, err_msg=kind)


def test_jpeg_cmyk_and_exif_orientation():
    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red in CMYK
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG", quality=95)
    image = decode_image(buffer.getvalue())
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    assert image[..., 0].min() > 200 and image[..., 1:].max() < 60

    # A 20x10 landscape stored with EXIF orientation 6 ("rotate 90 clockwise to view").
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(files.ramp_image(20, 10)).save(buffer, format="JPEG", quality=95, exif=exif)
    assert decode_image(buffer.getvalue()).shape == (20, 10, 3)


@pytest.mark.parametrize("kind", files.BAD_KINDS)
def test_bad_images_raise_a_clear_error(kind, tmp_path):
    path = tmp_path / f"bad_{kind}.png"
    path.write_bytes(files.bad_file_bytes(kind))
    with pytest.raises(BadImageError) as info:
        decode_image(path)
    expected = {"empty": "empty file", "bomb": "data.max_image_pixels", "garbage": "identify",
                "text": "identify", "truncated_png": "truncated", "truncated_jpeg": "truncated"}
    assert expected.get(kind, "") in str(info.value)


def test_pixel_limit_is_configurable_and_checked_before_decoding(tmp_path, monkeypatch):
    data = files.encoded(files.ramp_image(40, 30), "PNG")
    assert decode_image(data, max_pixels=1200).shape == (30, 40, 3)
    with pytest.raises(BadImageError, match="1,201 pixels exceeds the limit of 1,200"):
        decode_image(files.encoded(files.ramp_image(1201, 1), "PNG"), max_pixels=1200)
    # The limit is checked from the header: a bomb is refused without decoding a pixel.
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(files.bomb_png())
    missing = tmp_path / "missing.png"
    with pytest.raises(BadImageError, match="cannot read file"):
        decode_image(missing)


def test_resize_and_crops():
    image = files.ramp_image(30, 20)  # red = 10 * column
    resized = resize_shorter_side(image, 10)
    assert resized.shape == (10, 15, 3)
    assert resize_shorter_side(image, 20) is image
    square = fit_square(files.ramp_image(24, 16), 16)
    assert square.shape == (16, 16, 3)
    np.testing.assert_array_equal(square[0, :, 0], np.arange(4, 20) * 10)  # centre columns
    np.testing.assert_array_equal(center_crop(image, 20)[0, :, 0], np.arange(5, 25) * 10)
    offsets = set()
    for seed in range(40):
        crop = random_square_crop(image, np.random.default_rng(seed))
        assert crop.shape == (20, 20, 3)
        offsets.add(int(crop[0, 0, 0]) // 10)
    assert offsets <= set(range(11)) and len(offsets) >= 6
    tall = np.zeros((30, 20, 3), np.uint8)
    assert random_square_crop(tall, np.random.default_rng(0)).shape == (20, 20, 3)


def test_jpeg_draft_decoding_keeps_both_sides_at_least_min_size():
    data = files.encoded(files.ramp_image(200, 120), "JPEG", quality=95)
    full = decode_image(data)
    small = decode_image(data, min_size=20)
    assert full.shape == (120, 200, 3) and small.shape == (30, 50, 3)  # 1/4 scale: 1/8 < 20
    np.testing.assert_array_equal(decode_image(files.encoded(files.ramp_image(200, 120), "PNG"),
                                               min_size=20).shape, (120, 200, 3))  # PNG: no draft
