"""Video inputs for Qwen2.5-VL: decoding, frame sampling and patches, Ray-free.

Sampling follows the model authors' qwen-vl-utils (vision_process.py): by default 2 frames per
second of the clip, at least 4 and at most 768 frames, an even count, frames at
``linspace(0, n - 1, k)`` rounded; each frame resized to multiples of 28 with between 128x28x28 and
768x28x28 pixels, the upper bound lowered so that all frames together stay within a total budget
(128000x28x28x0.9 pixels by default). The seconds per temporal patch of the frames actually sampled,
``temporal_patch_size / sample_fps``, drive the time axis of M-RoPE (model/rotary.py).

Decoding is a stream (PyAV, whose wheel ships its own FFmpeg): a first pass reads packets only (no
decoding) for the clip's frame timestamps and keyframes, and chooses the sampled frames; the second
pass decodes towards each sampled frame, seeking to the keyframe before it when that keyframe lies
ahead (frames of skipped groups of pictures are never decoded), and converts to RGB and resizes only
the sampled frames, so memory holds the sampled frames at their final size, never the whole video.

Patches are laid out as transformers' Qwen2VLVideoProcessor lays them out (fused rescale/normalize,
temporal patches of `temporal_patch_size` frames, the last frame repeated to fill the last patch).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import io
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image

from model.images import ImageLoadError, ImageSource, describe_source, fetch_image_bytes, load_image, local_image_path

FACTOR = 28  # patch_size * merge_size
FRAME_FACTOR = 2  # temporal_patch_size
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
MAX_RATIO = 200
MAX_VIDEO_SECONDS = 3600.0
MAX_VIDEO_BYTES = 256 * 1024 * 1024

# mm_processor_kwargs keys that apply to videos (min_pixels / max_pixels keep meaning images).
VIDEO_KWARGS = ("fps", "max_frames", "video_min_pixels", "video_max_pixels", "video_total_pixels")

VideoSource = ImageSource | list  # a file (path, URL, bytes) or a list of frame images


class VideoLoadError(ValueError):
    """A video is missing, cannot be fetched or decoded, has no video frames, or exceeds a bound."""


class VideoOptionError(ValueError):
    """A video sampling option is out of range; `field` names it (``mm_processor_kwargs.fps``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class VideoOptions:
    """Sampling settings of one video: qwen-vl-utils' keys and defaults.

    fps: frames sampled per second of the clip. max_frames: most frames kept (at least 4 are kept).
    min_pixels / max_pixels: bounds on each frame's pixels. total_pixels: bound on all frames' pixels
    together. start / end: the clip, in seconds from the start of the video (None: to the end).
    """

    fps: float = FPS
    max_frames: int = FPS_MAX_FRAMES
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    total_pixels: int = VIDEO_TOTAL_PIXELS
    start: float = 0.0
    end: float | None = None

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], prefix: str = "mm_processor_kwargs") -> VideoOptions:
        """Options from a request's mm_processor_kwargs (other keys ignored); VideoOptionError names a bad one."""
        values: dict[str, Any] = {}
        fps = kwargs.get("fps")
        if fps is not None:
            if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 60:
                raise VideoOptionError(f"'{prefix}.fps'={fps!r} must be a number in (0, 60]", f"{prefix}.fps")
            values["fps"] = float(fps)
        limits = {
            "max_frames": ("max_frames", FPS_MIN_FRAMES, FPS_MAX_FRAMES),
            "video_min_pixels": ("min_pixels", FACTOR * FACTOR, VIDEO_MAX_PIXELS),
            "video_max_pixels": ("max_pixels", FACTOR * FACTOR, VIDEO_MAX_PIXELS),
            "video_total_pixels": ("total_pixels", FPS_MIN_FRAMES * FACTOR * FACTOR, VIDEO_TOTAL_PIXELS),
        }
        for key, (name, low, high) in limits.items():
            value = kwargs.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise VideoOptionError(
                    f"'{prefix}.{key}'={value!r} must be an integer in [{low}, {high}]", f"{prefix}.{key}"
                )
            values[name] = value
        options = cls(**values)
        if options.min_pixels > options.max_pixels:
            raise VideoOptionError(
                f"'{prefix}.video_min_pixels'={options.min_pixels} exceeds video_max_pixels={options.max_pixels}",
                f"{prefix}.video_min_pixels",
            )
        return options

    def clip(self, start: Any, end: Any, field: str) -> VideoOptions:
        """These options for the clip [start, end] seconds of a content part (None: the defaults)."""
        for name, value in (("video_start", start), ("video_end", end)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise VideoOptionError(
                    f"'{field}.{name}'={value!r} must be a number of seconds >= 0", f"{field}.{name}"
                )
        start = 0.0 if start is None else float(start)
        end = None if end is None else float(end)
        if end is not None and end <= start:
            raise VideoOptionError(f"'{field}.video_end'={end} must be after video_start={start}", f"{field}.video_end")
        return VideoOptions(self.fps, self.max_frames, self.min_pixels, self.max_pixels, self.total_pixels, start, end)

    def key(self) -> bytes:
        """The settings as bytes, for cache keys: the same source with other settings gives other frames."""
        return repr(
            (self.fps, self.max_frames, self.min_pixels, self.max_pixels, self.total_pixels, self.start, self.end)
        ).encode()


@dataclass
class SampledVideo:
    """The frames kept from a video, resized: frames (T, H, W, 3) uint8, T even; their rate in frames/s."""

    frames: np.ndarray
    sample_fps: float
    decode_s: float

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


# ---------------------------------------------------------------------------------- qwen-vl-utils' rules
def _round_by(n: float, factor: int) -> int:
    return round(n / factor) * factor


def _ceil_by(n: float, factor: int) -> int:
    return math.ceil(n / factor) * factor


def _floor_by(n: float, factor: int) -> int:
    return math.floor(n / factor) * factor


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """(height, width), multiples of `factor`, with pixels in [min_pixels, max_pixels] and the aspect kept."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise VideoLoadError(f"aspect ratio of {width}x{height} is more than {MAX_RATIO}")
    h_bar = max(factor, _round_by(height, factor))
    w_bar = max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, _floor_by(height / beta, factor))
        w_bar = max(factor, _floor_by(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    return h_bar, w_bar


def sample_count(total_frames: int, video_fps: float, options: VideoOptions) -> int:
    """How many frames to keep from a clip of `total_frames` at `video_fps` (qwen-vl-utils' smart_nframes)."""
    min_frames = _ceil_by(FPS_MIN_FRAMES, FRAME_FACTOR)
    max_frames = _floor_by(min(options.max_frames, total_frames), FRAME_FACTOR)
    wanted = total_frames / video_fps * options.fps
    count = _floor_by(min(max(wanted, min_frames), max_frames, total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= count <= total_frames:
        raise VideoLoadError(f"the clip has {total_frames} frames; at least {FRAME_FACTOR} are needed")
    return count


def sample_indices(total_frames: int, count: int) -> list[int]:
    """The kept frames: `count` indices spread evenly over [0, total_frames - 1], rounded half to even."""
    return torch.linspace(0, total_frames - 1, count).round().long().tolist()


def frame_size(
    height: int, width: int, num_frames: int, options: VideoOptions, factor: int = FACTOR
) -> tuple[int, int]:
    """Each kept frame's size, multiples of `factor`: within the per-frame bounds, lowered to share the total budget."""
    max_pixels = max(
        min(options.max_pixels, options.total_pixels / num_frames * FRAME_FACTOR), int(options.min_pixels * 1.05)
    )
    return smart_resize(height, width, options.min_pixels, max_pixels, factor)


# ---------------------------------------------------------------------------------- sources and decoding
def _video_input(source: ImageSource, max_bytes: int) -> str | io.BytesIO:
    """What av.open reads: a local file's path, or the bytes of a data URL, an http(s) URL or a bytes source."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if isinstance(source, str) and source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or not header.startswith("data:video/") or not header.endswith(";base64"):
            raise VideoLoadError(
                f"a data URL must look like data:video/<type>;base64,<data>: {describe_source(source)}"
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise VideoLoadError(f"data URL is not valid base64: {describe_source(source)}") from exc
        if len(data) > max_bytes:
            raise VideoLoadError(f"video of {len(data)} bytes is more than the limit of {max_bytes} bytes")
        return io.BytesIO(data)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        try:
            return io.BytesIO(fetch_image_bytes(source, max_bytes=max_bytes))
        except ImageLoadError as exc:
            raise VideoLoadError(str(exc).replace("image", "video")) from exc
    try:
        file = local_image_path(source)
    except ImageLoadError as exc:
        raise VideoLoadError(str(exc)) from exc
    if not file.is_file():
        raise VideoLoadError(f"video file not found: {file}")
    if file.stat().st_size > max_bytes:
        raise VideoLoadError(f"video file {file} is more than the limit of {max_bytes} bytes")
    return str(file)


@dataclass
class _Index:
    """What the packets say of a clip, read without decoding: its frames' pts (sorted) and times (s from
    the stream's start), and the pts of the stream's keyframes (sorted)."""

    pts: list[int]
    times: list[float]
    keyframes: list[int]


def _index(container: Any, stream: Any, options: VideoOptions, max_seconds: float) -> _Index:
    base = stream.time_base
    start = stream.start_time or 0
    pts, keyframes = [], []
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:
            continue
        pts.append(packet.pts)
        if packet.is_keyframe:
            keyframes.append(packet.pts)
    if not pts:
        raise VideoLoadError("the video stream has no frames")
    pts.sort()
    keyframes.sort()
    last = float((pts[-1] - start) * base)
    if last > max_seconds:
        raise VideoLoadError(f"video lasts more than {last:.1f} s, more than the limit of {max_seconds:g} s")
    end = math.inf if options.end is None else options.end
    clip = [(p, float((p - start) * base)) for p in pts]
    clip = [(p, t) for p, t in clip if options.start <= t <= end]
    return _Index([p for p, _ in clip], [t for _, t in clip], keyframes)


def decode_video(
    source: ImageSource,
    options: VideoOptions = VideoOptions(),
    max_seconds: float = MAX_VIDEO_SECONDS,
    max_bytes: int = MAX_VIDEO_BYTES,
    factor: int = FACTOR,
) -> SampledVideo:
    """Decode a video file and keep its sampled frames, resized to multiples of `factor` (see the module docstring).

    Raises:
        VideoLoadError: naming what is wrong: a missing, unreadable or corrupt file, no video stream
            (audio only), no frames, an unsupported codec, more than `max_seconds` or `max_bytes`,
            or a clip (video_start / video_end) with fewer than 2 frames.
    """
    began = time.perf_counter()
    data = _video_input(source, max_bytes)
    name = describe_source(source)
    try:
        with av.open(data, mode="r") as container:
            streams = container.streams.video
            if not streams:
                raise VideoLoadError(f"no video stream (audio only?): {name}")
            stream = streams[0]
            if stream.codec_context is None:
                raise VideoLoadError(f"unsupported video codec: {name}")
            if not stream.codec_context.height or not stream.codec_context.width:
                raise VideoLoadError(f"the video stream has no frame size: {name}")
            duration = None if container.duration is None else container.duration / av.time_base
            if duration is not None and duration > max_seconds:
                raise VideoLoadError(f"video lasts {duration:.1f} s, more than the limit of {max_seconds:g} s: {name}")
            index = _index(container, stream, options, max_seconds)
            total = len(index.pts)
            if total < FRAME_FACTOR:
                raise VideoLoadError(f"the clip has {total} frames; at least {FRAME_FACTOR} are needed: {name}")
            video_fps = float(stream.average_rate or stream.guessed_rate or 0) or (total / max(index.times[-1], 1e-6))
            count = sample_count(total, video_fps, options)
            wanted = [index.pts[i] for i in sample_indices(total, count)]
            height, width = frame_size(stream.codec_context.height, stream.codec_context.width, count, options, factor)
        if isinstance(data, io.BytesIO):
            data.seek(0)
        frames = _decode_sampled(data, name, wanted, index.keyframes, (height, width))
    except av.error.FFmpegError as exc:
        raise VideoLoadError(f"cannot decode video {name}: {exc}") from exc
    sample_fps = count / total * video_fps
    return SampledVideo(frames, sample_fps, time.perf_counter() - began)


def _decode_sampled(
    data: str | io.BytesIO, name: str, wanted: list[int], keyframes: list[int], size: tuple[int, int]
) -> np.ndarray:
    """Decode the frames at pts `wanted` (sorted), converted and resized to `size`; no other frame is converted.

    Before each wanted frame, when the last keyframe at or before it lies past the decoder's position,
    the decoder seeks to that keyframe (the frames between are never decoded); otherwise it decodes on.
    A wanted frame is the first decoded frame at or after its pts.
    """
    height, width = size
    out = np.empty((len(wanted), height, width, 3), dtype=np.uint8)
    kept = None
    with av.open(data, mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = None
        position = None  # pts of the last frame decoded
        for slot, target in enumerate(wanted):
            k = bisect.bisect_right(keyframes, target) - 1
            if frames is None or (k >= 0 and keyframes[k] > position):
                if k >= 0:
                    container.seek(keyframes[k], stream=stream, backward=True)
                frames = container.decode(stream)
            for frame in frames:
                if frame.pts is None:
                    continue
                position = frame.pts
                if frame.pts >= target:
                    kept = out[slot] = _resized(frame, width, height)
                    break
            else:  # the stream ended first: repeat the last frame kept
                if kept is None:
                    raise VideoLoadError(f"no frame of the clip could be decoded: {name}")
                out[slot:] = kept
                break
    return out


def _resized(frame: Any, width: int, height: int) -> np.ndarray:
    image = frame.to_image()  # RGB
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image)


def frames_video(
    frames: Sequence[ImageSource | Image.Image],
    options: VideoOptions = VideoOptions(),
    field: str = "video",
    factor: int = FACTOR,
) -> SampledVideo:
    """A video given as its frames (images, in order): all kept, the last repeated to an even count.

    Each frame is sized by the same per-frame bounds and total budget as a decoded video's; the
    frames' rate is `options.fps`.

    Raises:
        VideoLoadError: for an empty list, more than `options.max_frames` frames, or a frame that
            fails to load (naming its index).
    """
    began = time.perf_counter()
    if not frames:
        raise VideoLoadError("a video given as frames needs at least one frame")
    if len(frames) > options.max_frames:
        raise VideoLoadError(f"{len(frames)} frames, more than max_frames={options.max_frames}")
    images = []
    for i, frame in enumerate(frames):
        try:
            images.append(frame.convert("RGB") if isinstance(frame, Image.Image) else load_image(frame))
        except ImageLoadError as exc:
            raise VideoLoadError(f"{field}[{i}]: {exc}") from exc
    count = _ceil_by(len(images), FRAME_FACTOR)
    images += [images[-1]] * (count - len(images))
    height, width = frame_size(images[0].height, images[0].width, count, options, factor)
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(
            image.resize((width, height), Image.Resampling.BICUBIC) if image.size != (width, height) else image
        )
    return SampledVideo(out, options.fps, time.perf_counter() - began)


def load_video(
    source: VideoSource,
    options: VideoOptions = VideoOptions(),
    max_seconds: float = MAX_VIDEO_SECONDS,
    max_bytes: int = MAX_VIDEO_BYTES,
    factor: int = FACTOR,
) -> SampledVideo:
    """A video file (path, file://, data:video/...;base64, http(s) URL or bytes) or a list of frames, sampled."""
    if isinstance(source, list):
        return frames_video(source, options, factor=factor)
    if not isinstance(source, (str, bytes, os.PathLike, Path)):
        raise VideoLoadError(f"a video must be a path, URL, bytes or a list of frames, got {type(source).__name__}")
    return decode_video(source, options, max_seconds, max_bytes, factor)


# ---------------------------------------------------------------------------------- patches
def video_patches(
    frames: np.ndarray,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    rescale_factor: float,
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """frames (T, H, W, 3) uint8 -> (pixel_values_videos (grid_t*grid_h*grid_w, 3*tp*p*p) float32, grid (3,)).

    The arithmetic of transformers' Qwen2VLVideoProcessor: mean and std scaled by 1/rescale_factor,
    (x - mean) / std in float32, the last frame repeated to a multiple of temporal_patch_size, and the
    patches ordered merge-block-major as the vision tower expects.
    """
    mean = torch.tensor(image_mean) * (1.0 / rescale_factor)
    std = torch.tensor(image_std) * (1.0 / rescale_factor)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).to(torch.float32)  # (T, C, H, W)
    video = video.sub_(mean[:, None, None]).div_(std[:, None, None])
    if pad := -video.shape[0] % temporal_patch_size:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    frames_n, channel, height, width = video.shape
    grid_t, grid_h, grid_w = frames_n // temporal_patch_size, height // patch_size, width // patch_size
    patches = video.view(
        grid_t, temporal_patch_size, channel, grid_h // merge_size, merge_size, patch_size,
        grid_w // merge_size, merge_size, patch_size,
    )  # fmt: skip
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, bh, bw, mh, mw, C, tp, p, p)
    flat = patches.reshape(grid_t * grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size)
    return flat.contiguous(), torch.tensor([grid_t, grid_h, grid_w], dtype=torch.int64)
