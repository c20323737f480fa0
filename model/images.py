"""Loading request images from local files into upright RGB PIL images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageLoadError(ValueError):
    """An image file is missing, is not an image, or cannot be fully decoded."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent areas become white, 16-bit and float scale to 8-bit."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        data = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(data), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        data = np.asarray(image, dtype=np.float64)
        if data.size and data.max() <= 1.0:
            data = data * 255.0
        image = Image.fromarray(np.clip(np.rint(data), 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open a local image file as an upright RGB image, fully decoded.

    Applies the EXIF orientation, converts any mode (L, P, CMYK, RGBA, I;16, ...) to RGB and
    decodes every pixel, so that a truncated or corrupt file fails here rather than later.

    Raises:
        ImageLoadError: naming the path and saying whether the file is missing, is not an
            image, or is truncated/corrupt.
    """
    file = Path(path)
    if not file.exists():
        raise ImageLoadError(f"image file not found: {file}")
    if not file.is_file():
        raise ImageLoadError(f"image path is not a file: {file}")
    try:
        opened = Image.open(file)
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"not an image (unrecognised format): {file}") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"image too large to decode safely: {file}: {exc}") from exc
    except OSError as exc:
        raise ImageLoadError(f"cannot read image file {file}: {exc}") from exc
    with opened:
        try:
            opened.load()
            upright = ImageOps.exif_transpose(opened)  # always a new image unless in_place
            rgb = _to_rgb(upright if upright is not None else opened.copy())
            rgb.load()
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(f"image too large to decode safely: {file}: {exc}") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageLoadError(f"image is truncated or corrupt: {file}: {exc}") from exc
    return rgb
