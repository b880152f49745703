"""Robust image decoding for real datasets: any file becomes uint8 RGB, or a `BadImageError`.

Decisions, each one a failure seen in real image folders:
- A pixel limit checked from the header, before any pixel is decoded, raises an error
  (Pillow's own `MAX_IMAGE_PIXELS` only warns below twice its value, and is process-wide).
- Truncated files are errors. `ImageFile.LOAD_TRUNCATED_IMAGES` is never set: it would turn
  a half-downloaded photo into a grey-bottomed training image without a word.
- 16-bit images are scaled to 8 bits (65535 -> 255), not clipped; palette, grayscale and
  alpha images become RGB, with transparency composited on black.
- EXIF orientation is applied, so a phone photo is upright as its viewer shows it.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 8192 x 8192. Larger images cost seconds each to decode and are almost never wanted for
# training at 16-256 pixels; a crafted PNG of this size can be a few kilobytes on disk.
DEFAULT_MAX_PIXELS = 8192 * 8192
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# What a broken file raises inside Pillow: truncation is OSError, bad chunks SyntaxError,
# bad zlib streams zlib.error, unsupported conversions ValueError; mangled headers of some
# formats (TIFF, ICO, BMP) surface as struct.error, IndexError, KeyError or TypeError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error,
                  IndexError, KeyError, TypeError, Image.DecompressionBombError)


class BadImageError(ValueError):
    """A file that is not a usable image; the message says why."""


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scale_16bit(pixels: np.ndarray) -> np.ndarray:
    wide = np.clip(pixels.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _float_to_uint8(pixels: np.ndarray) -> np.ndarray:
    pixels = np.nan_to_num(pixels.astype(np.float64))
    # Float images (TIFF mode F) carry no range; [0, 1] is the common convention, else 0-255.
    if pixels.size and pixels.max() <= 1.0:
        pixels = pixels * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """A loaded Pillow image -> uint8 [H, W, 3]."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = _scale_16bit(np.asarray(image))
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        gray = _float_to_uint8(np.asarray(image))
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info) or (
            mode in ("L", "RGB") and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)
        alpha = rgba[..., 3:]
        # Composite on black: round(c * a / 255) in integers, so it is exact and portable.
        return ((rgba[..., :3] * alpha + 127) // 255).astype(np.uint8)
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def decode_image(source: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_size: int | None = None) -> np.ndarray:
    """Reads a file (path or bytes) as uint8 RGB [H, W, 3] at its own size.

    With `min_size`, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
    several times faster for photos) as long as both sides stay at least `min_size`.
    Raises `BadImageError` for an empty, unreadable, truncated or oversized file; never a
    warning, never a partial image. Animated images give their first frame.
    """
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadImageError(f"cannot read file: {e.strerror or e}") from e
    if not data:
        raise BadImageError("empty file")
    try:
        # Our explicit limit below is the one that decides; silence Pillow's softer warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            width, height = image.size
            if width < 1 or height < 1:
                raise BadImageError(f"image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise BadImageError(
                    f"{width}x{height} = {width * height:,} pixels exceeds the limit of "
                    f"{max_pixels:,} (data.max_image_pixels); possibly a decompression bomb"
                )
            if min_size and image.format == "JPEG":
                image.draft(None, (min_size, min_size))
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb_array(image)
    except BadImageError:
        raise
    except UnidentifiedImageError as e:
        raise BadImageError("not an image Pillow can identify") from e
    except Image.DecompressionBombError as e:
        raise BadImageError(f"decompression bomb: {e}") from e
    except _DECODE_ERRORS as e:
        raise BadImageError(f"cannot decode: {e}") from e


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes so the shorter side is `size`, keeping the aspect ratio (bicubic, antialiased
    when shrinking). The longer side is at least `size`."""
    height, width = image.shape[:2]
    if min(height, width) == size:
        return image
    scale = size / min(height, width)
    new_w = max(size, round(width * scale))
    new_h = max(size, round(height * scale))
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return image[top:top + size, left:left + size]


def random_square_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random square of side min(H, W): a crop along the longer side only (square images
    come back unchanged), the usual `Resize(S)` + `RandomCrop(S)` of image-text training."""
    height, width = image.shape[:2]
    size = min(height, width)
    top = int(rng.integers(height - size + 1))
    left = int(rng.integers(width - size + 1))
    return image[top:top + size, left:left + size]


def fit_square(image: np.ndarray, size: int, *, crop: bool = True) -> np.ndarray:
    """Shorter side to `size`, then (with `crop`) the centre `size` x `size` square."""
    image = resize_shorter_side(image, size)
    return center_crop(image, size) if crop else image
