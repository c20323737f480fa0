"""Bounds on one HTTP chat request, checked in the ingress before the engine sees it: the body's
size (413, before it is parsed), the images' total pixels, and the field names errors quote.

The body limit lives here because neither of Serve's ingresses can enforce one: Serve's HTTP
options have no body-size setting, and the HAProxy configuration Serve writes (Ray 2.60) has no
hook for `http-request deny if { req.body_size gt N }`.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from starlette.requests import Request

from cluster.openai_api import HTTP_SCHEMES, APIError, ChatCompletionRequest, image_urls
from model.images import ImageLoadError, local_image_path

# Engine request fields as the OpenAI API names them.
API_FIELDS = {"max_new_tokens": "max_tokens"}


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body; 413 when its Content-Length, or what arrives, exceeds `max_bytes` (the
    body is then not read further)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise _too_large(f"request body of {int(length)} bytes", max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large("request body", max_bytes)
    return bytes(body)


def _too_large(what: str, max_bytes: int) -> APIError:
    return APIError(
        413,
        f"{what} is larger than serve.max_request_bytes={max_bytes}",
        code="request_too_large",
        type_="invalid_request_error",
    )


def image_sources(request: ChatCompletionRequest, fetched: dict[str, bytes]) -> Iterator[tuple[str, bytes | Path]]:
    """(field, bytes or file) of each image part whose data the ingress can read: fetched http(s)
    URLs, data URLs that decode and local files (only those the media policy let through are left)."""
    for field, url in image_urls(request):
        if url.startswith(HTTP_SCHEMES):
            if url in fetched:
                yield field, fetched[url]
        elif url.startswith("data:"):
            try:
                yield field, base64.b64decode(url.partition(",")[2], validate=True)
            except (binascii.Error, ValueError):
                continue  # the engine reports the malformed data URL
        else:
            try:
                yield field, local_image_path(url)
            except ImageLoadError:
                continue


def check_pixels(sources: Iterator[tuple[str, bytes | Path]], max_pixels: int) -> None:
    """400 naming the image part at which the request's images exceed `max_pixels` in total.

    Only each image's header is read (width x height), nothing is decoded; a source that is not an
    image is left to the engine, which names it."""
    total = 0
    for field, source in sources:
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                width, height = image.size
        except Image.DecompressionBombError as e:
            raise APIError(400, f"{field}: image too large to decode safely: {e}", param=field) from None
        except (UnidentifiedImageError, OSError):
            continue
        total += width * height
        if total > max_pixels:
            raise APIError(
                400,
                f"{field}: the request's images have {total} pixels in total, more than "
                f"serve.max_request_pixels={max_pixels}",
                param=field,
                code="too_many_pixels",
            )


def with_api_names(error: APIError, request: ChatCompletionRequest) -> APIError:
    """`error` with the engine's field names (max_new_tokens) replaced by those the client sent."""
    if error.status != 400:
        return error
    names = dict(API_FIELDS)
    if request.max_completion_tokens is not None:
        names["max_new_tokens"] = "max_completion_tokens"
    message, param = error.message, error.param
    for engine, api in names.items():
        message = message.replace(engine, api)
        if param is not None and (param == engine or param.startswith(f"{engine}.")):
            param = api + param[len(engine) :]
    if (message, param) == (error.message, error.param):
        return error
    return APIError(error.status, message, param=param, code=error.code, type_=error.type)
