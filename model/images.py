"""Loading request images into upright RGB PIL images.

An image source is a local path, a ``file://`` URL, a ``data:image/...;base64,`` URL, an
``http(s)://`` URL (fetched with a timeout and a size cap) or the image file's bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | os.PathLike | bytes

FETCH_TIMEOUT_S = 10.0
MAX_IMAGE_BYTES = 32 * 1024 * 1024

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageLoadError(ValueError):
    """An image is missing, cannot be fetched, is not an image, or cannot be fully decoded."""


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
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def describe_source(source: ImageSource) -> str:
    """A short name for an image source in error messages (a data URL or bytes are not echoed)."""
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    text = str(source)
    if text.startswith("data:"):
        return f"{text.split(',', 1)[0]},... ({len(text)} chars)"
    return text if len(text) <= 200 else text[:200] + "..."


def fetch_image_bytes(url: str, timeout_s: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """GET an http(s) URL: its body, at most `max_bytes`, within `timeout_s` per socket operation.

    Raises:
        ImageLoadError: on a scheme other than http/https, an HTTP or network error, a timeout,
            or a body larger than `max_bytes`.
    """
    if urlparse(url).scheme not in ("http", "https"):
        raise ImageLoadError(f"not an http(s) URL: {describe_source(url)}")
    request = urllib.request.Request(url, headers={"User-Agent": "qwen2_5_vl_ray"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageLoadError(f"image at {url} is {int(length)} bytes, more than the limit {max_bytes}")
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise ImageLoadError(f"cannot fetch image {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageLoadError(f"cannot fetch image {url}: {reason}") from exc
    if len(data) > max_bytes:
        raise ImageLoadError(f"image at {url} is more than the limit of {max_bytes} bytes")
    return data


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageLoadError(f"a data URL must look like data:image/<type>;base64,<data>: {describe_source(url)}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageLoadError(f"data URL is not valid base64: {describe_source(url)}") from exc


def local_image_path(source: str | os.PathLike[str]) -> Path:
    """The file a local path or file:// URL names (ImageLoadError for a file URL of another host)."""
    text = os.fspath(source)
    if text.startswith("file://"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise ImageLoadError(f"file URL names another host: {text}")
        return Path(unquote(parsed.path))
    return Path(text)


def load_image(
    source: ImageSource, timeout_s: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES
) -> Image.Image:
    """Open an image source as an upright RGB image, fully decoded.

    Applies the EXIF orientation, converts any mode (L, P, CMYK, RGBA, I;16, ...) to RGB and
    decodes every pixel, so that a truncated or corrupt image fails here rather than later.
    http(s) URLs are fetched with `timeout_s` and `max_bytes` (see fetch_image_bytes).

    Raises:
        ImageLoadError: naming the source and saying whether it is missing, cannot be fetched,
            is not an image, or is truncated/corrupt.
    """
    name = describe_source(source)
    if isinstance(source, bytes):
        return _decode(io.BytesIO(source), name)
    if isinstance(source, str) and source.startswith("data:"):
        return _decode(io.BytesIO(_data_url_bytes(source)), name)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return _decode(io.BytesIO(fetch_image_bytes(source, timeout_s, max_bytes)), name)
    file = local_image_path(source)
    if not file.exists():
        raise ImageLoadError(f"image file not found: {file}")
    if not file.is_file():
        raise ImageLoadError(f"image path is not a file: {file}")
    return _decode(file, str(file))


def _decode(file: Path | IO[bytes], name: str) -> Image.Image:
    try:
        opened = Image.open(file)
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"not an image (unrecognised format): {name}") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"image too large to decode safely: {name}: {exc}") from exc
    except OSError as exc:
        raise ImageLoadError(f"cannot read image file {name}: {exc}") from exc
    with opened:
        try:
            opened.load()
            upright = ImageOps.exif_transpose(opened)  # always a new image unless in_place
            rgb = _to_rgb(upright if upright is not None else opened.copy())
            rgb.load()
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(f"image too large to decode safely: {name}: {exc}") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageLoadError(f"image is truncated or corrupt: {name}: {exc}") from exc
    return rgb
