"""Loopback HTTP servers for the media-fetch tests: an image source, a trap, a redirector, a slow
drip and an oversized body. Each records the paths it was asked for; tests reach nothing else."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

DRIP_INTERVAL_S = 0.05


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = png_bytes(120, 90, seed=7)


class MediaServer(ThreadingHTTPServer):
    """GET /image.png (IMAGE), /redirect?to=URL (302), /drip (a byte every DRIP_INTERVAL_S until the
    client leaves), /big (more than `big_bytes`, no Content-Length), anything else 200 "trap"."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, big_bytes: int = 0) -> None:
        super().__init__((host, 0), _Handler)
        self.requests: list[str] = []
        self.big_bytes = big_bytes
        self.closing = threading.Event()

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.server_address[0]}:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: MediaServer

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.requests.append(self.path)
        route = urlsplit(self.path)
        if route.path == "/image.png":
            self._send(200, IMAGE, "image/png")
        elif route.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(route.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif route.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**6))
            self.end_headers()
            try:
                while not self.server.closing.is_set():
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(DRIP_INTERVAL_S)
            except OSError:
                pass  # the client gave up
        elif route.path == "/big":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                self.wfile.write(b"\0" * (self.server.big_bytes + 1))
            except OSError:
                pass
            self.close_connection = True
        else:
            self._send(200, b"trap", "text/plain")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def media_server(host: str = "127.0.0.1", big_bytes: int = 0) -> Iterator[MediaServer]:
    """A MediaServer on `host` (a loopback address) and a free port, serving in a thread."""
    server = MediaServer(host, big_bytes)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.closing.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
