"""Small test videos written with PyAV: known frames, several containers and codecs."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# container suffix -> (codec, pixel format); ffv1 and png are lossless (exact pixels), h264 and vp9 are not.
CODECS = {
    "mkv": ("ffv1", "bgr0"),
    "mov": ("png", "rgb24"),
    "mp4": ("libx264", "yuv420p"),
    "webm": ("libvpx-vp9", "yuv420p"),
}


def make_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(count, height, width, 3) uint8: smooth random images that differ frame to frame."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (count, -(-height // 8), -(-width // 8), 3), dtype=np.uint8)
    frames = small.repeat(8, axis=1).repeat(8, axis=2)[:, :height, :width]
    return np.ascontiguousarray(frames)


def write_video(
    path: Path | None, frames: np.ndarray, fps: int, suffix: str = "mkv", audio: bool = False, gop: int | None = None
) -> bytes:
    """Encode `frames` at `fps` into a `suffix` container (to `path`, or in memory); the file's bytes.

    audio=True adds a short silent AAC track; an empty `frames` writes an audio-only file; gop: the
    keyframe interval of a lossy codec.
    """
    codec, pix_fmt = CODECS[suffix]
    buffer = io.BytesIO()
    with av.open(
        buffer, mode="w", format={"mkv": "matroska", "mov": "mov", "mp4": "mp4", "webm": "webm"}[suffix]
    ) as out:
        video = None
        if len(frames):
            video = out.add_stream(codec, rate=fps, options={} if gop is None else {"g": str(gop)})
            video.height, video.width = frames.shape[1:3]
            video.pix_fmt = pix_fmt
            video.time_base = Fraction(1, fps)
        sound = out.add_stream("aac", rate=8000) if audio or not len(frames) else None
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                out.mux(packet)
        if video is not None:
            for packet in video.encode():
                out.mux(packet)
        if sound is not None:
            samples = np.zeros((1, 8000), dtype=np.float32)
            chunk = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            chunk.sample_rate = 8000
            for packet in sound.encode(chunk):
                out.mux(packet)
            for packet in sound.encode():
                out.mux(packet)
    data = buffer.getvalue()
    if path is not None:
        path.write_bytes(data)
    return data
