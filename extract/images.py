"""Decode real-world image files into RGB, or say exactly why not.

Datasets carry CMYK and grayscale JPEGs, 16-bit and palette PNGs, alpha channels, EXIF
rotations, truncated files, text files named .jpg and decompression bombs. Every odd-but-valid
file becomes a plain 8-bit RGB image; every broken one raises `BadImage` with a reason, which
the extractor records instead of stopping the run.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Refuse images above this many pixels (PIL's default bomb limit is 89.5 MP and only warns).
MAX_PIXELS = 89_478_485
# Transparent pixels are composited onto mid-grey, the least surprising colour for an encoder.
ALPHA_BACKGROUND = (128, 128, 128)


class BadImage(ValueError):
    """An image that cannot be decoded; `reason` is short and human-readable."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def load_image(path: str | Path) -> Image.Image:
    """Decode `path` fully into an 8-bit RGB image with EXIF orientation applied."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise BadImage(path, f"cannot read file ({err.strerror or err})") from err
    if size == 0:
        raise BadImage(path, "empty file (0 bytes)")
    # A truncated file must fail, not be silently padded with grey.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_size(path, img.size)
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(path, f"decompression bomb: {err}") from err
    except Image.UnidentifiedImageError as err:
        raise BadImage(path, "not an image (unrecognised format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(path, f"corrupt or truncated image ({err})") from err


def _check_size(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise BadImage(path, f"degenerate size {width}x{height}")
    if width * height > MAX_PIXELS:
        raise BadImage(path, f"decompression bomb: {width}x{height} pixels exceeds {MAX_PIXELS}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, scaling 16/32-bit data instead of clipping it."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _high_depth_to_rgb(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 65535.0 * 255.0  # 16-bit samples: rescale, do not clip at 255
    arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L").convert("RGB")
