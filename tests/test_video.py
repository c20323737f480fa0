"""model/video.py and video requests: decoding, qwen-vl-utils' sampling, patches, positions, errors.

References: qwen-vl-utils 0.0.14 (vision_process.py: smart_nframes, smart_resize, fetch_video, the
torchvision reader) for sampling; transformers 5.23's Qwen2VLVideoProcessor for patches; its
get_rope_index for time positions; the authors' get_rope_index docstring for the text after a span.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

from cluster.datasets import DatasetError, load_requests
from model.processor import InvalidRequestError, PromptBuilder
from model.rotary import mrope_positions
from model.video import (
    VideoLoadError,
    VideoOptions,
    decode_video,
    frame_size,
    frames_video,
    sample_count,
    sample_indices,
    video_patches,
)
from tests.video_files import make_frames, write_video
from tests.video_reference import authors_positions

FRAMES = make_frames(20, 56, 84, seed=7)
EXACT = {"min_pixels": 28 * 28, "max_pixels": 56 * 84}  # keeps 56x84 frames at their size


# ------------------------------------------------------------------------------ qwen-vl-utils, copied
# From qwen-vl-utils 0.0.14, qwen_vl_utils/vision_process.py (the authors' code; it imports torchvision,
# which cannot be installed here, so the functions are copied as written there).
def _qvu_smart_nframes(ele: dict, total_frames: int, video_fps: float) -> int:
    def ceil_by_factor(n: float, f: int) -> int:
        return math.ceil(n / f) * f

    def floor_by_factor(n: float, f: int) -> int:
        return math.floor(n / f) * f

    fps = ele.get("fps", 2.0)
    min_frames = ceil_by_factor(ele.get("min_frames", 4), 2)
    max_frames = floor_by_factor(ele.get("max_frames", min(768, total_frames)), 2)
    nframes = total_frames / video_fps * fps
    nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
    nframes = floor_by_factor(nframes, 2)
    if not (2 <= nframes and nframes <= total_frames):
        raise ValueError(f"nframes should in interval [2, {total_frames}], but got {nframes}.")
    return nframes


def _qvu_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _qvu_frame_size(height: int, width: int, nframes: int, ele: dict) -> tuple[int, int]:
    """fetch_video's per-frame bounds (VIDEO_MIN/MAX_TOKEN_NUM 128/768, MODEL_SEQ_LEN 128000)."""
    min_pixels = ele.get("min_pixels", 128 * 28 * 28)
    total_pixels = ele.get("total_pixels", 128000 * 28 * 28 * 0.9)
    max_pixels = max(min(768 * 28 * 28, total_pixels / nframes * 2), int(min_pixels * 1.05))
    max_pixels = min(ele.get("max_pixels", max_pixels), max_pixels)
    return _qvu_smart_resize(height, width, 28, min_pixels, max_pixels)


@pytest.mark.parametrize(
    "total,video_fps,ele",
    [
        (20, 10.0, {}),
        (300, 30.0, {}),
        (300, 30.0, {"fps": 1.0}),
        (300, 30.0, {"fps": 4.0, "max_frames": 9}),
        (7, 25.0, {}),
        (5, 2.0, {"fps": 8.0}),
        (18000, 30.0, {}),
        (100000, 24.0, {"fps": 2.0}),
    ],
)
def test_sample_count_and_indices_follow_qwen_vl_utils(total: int, video_fps: float, ele: dict) -> None:
    options = VideoOptions(fps=ele.get("fps", 2.0), max_frames=ele.get("max_frames", 768))
    count = sample_count(total, video_fps, options)
    assert count == _qvu_smart_nframes(ele, total, video_fps)
    assert sample_indices(total, count) == torch.linspace(0, total - 1, count).round().long().tolist()


@pytest.mark.parametrize(
    "height,width,nframes,ele",
    [
        (720, 1280, 4, {}),
        (720, 1280, 768, {}),
        (1080, 1920, 200, {"total_pixels": 20000 * 28 * 28}),
        (56, 84, 4, {"min_pixels": 784, "max_pixels": 56 * 84}),
        (30, 3000, 8, {}),
        (480, 640, 16, {"max_pixels": 64 * 28 * 28, "min_pixels": 16 * 28 * 28}),
    ],
)
def test_frame_size_follows_qwen_vl_utils(height: int, width: int, nframes: int, ele: dict) -> None:
    options = VideoOptions(
        min_pixels=ele.get("min_pixels", 128 * 28 * 28),
        max_pixels=ele.get("max_pixels", 768 * 28 * 28),
        total_pixels=ele.get("total_pixels", int(128000 * 28 * 28 * 0.9)),
    )
    assert frame_size(height, width, nframes, options) == _qvu_frame_size(height, width, nframes, ele)


# ------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("suffix", ["mkv", "mov"])
def test_lossless_containers_give_the_sampled_frames_exactly(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"v.{suffix}"
    write_video(path, FRAMES, 10, suffix)
    video = decode_video(path, VideoOptions(**EXACT))
    wanted = torch.linspace(0, 19, 4).round().long().tolist()  # 2 s at 2 fps: 4 of 20 frames
    assert video.frames.shape == (4, 56, 84, 3)
    assert np.array_equal(video.frames, FRAMES[wanted])
    assert video.sample_fps == pytest.approx(2.0)


@pytest.mark.parametrize("suffix", ["mp4", "webm"])
def test_lossy_codecs_decode_close_to_the_frames(suffix: str) -> None:
    """H.264 in mp4, VP9 in webm (with an audio track in mp4): the sampled frames, up to coding loss."""
    data = write_video(None, FRAMES, 10, suffix, audio=suffix == "mp4")
    video = decode_video(data, VideoOptions(**EXACT))
    wanted = torch.linspace(0, 19, 4).round().long().tolist()
    error = np.abs(video.frames.astype(np.int16) - FRAMES[wanted].astype(np.int16)).mean()
    assert video.frames.shape == (4, 56, 84, 3)
    assert error < 12, f"{suffix}: mean abs error {error:.1f}"


@pytest.mark.parametrize("suffix,gop", [("mp4", 4), ("mp4", 50), ("webm", 6)])
def test_seeking_to_keyframes_gives_the_frames_a_full_decode_gives(suffix: str, gop: int) -> None:
    """Sampled frames (some reached by seeking to a keyframe, some by decoding on) equal the same frames of
    a decode of every frame, bit for bit (the same decoder either way)."""
    frames = make_frames(60, 56, 84, seed=4)
    data = write_video(None, frames, 10, suffix, gop=gop)
    with av.open(io.BytesIO(data)) as container:
        every = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    video = decode_video(data, VideoOptions(**EXACT, fps=1.0))
    wanted = torch.linspace(0, 59, 6).round().long().tolist()
    assert np.array_equal(video.frames, np.stack([every[i] for i in wanted]))


def test_clip_start_and_end_select_frames_by_time() -> None:
    """video_start 0.5 s and video_end 1.2 s of a 10 fps video: frames 5..12, 4 of them sampled."""
    video = decode_video(write_video(None, FRAMES, 10, "mkv"), VideoOptions(**EXACT, start=0.5, end=1.2))
    clip = list(range(5, 13))
    wanted = [clip[i] for i in torch.linspace(0, len(clip) - 1, 4).round().long().tolist()]
    assert np.array_equal(video.frames, FRAMES[wanted])
    assert video.sample_fps == pytest.approx(4 / 8 * 10)


def test_budget_scales_frames_down() -> None:
    """A total budget below the frames' size shrinks each frame, as fetch_video's max_pixels does."""
    options = VideoOptions(min_pixels=784, max_pixels=1000 * 784, total_pixels=4 * 28 * 56 // 2)
    video = decode_video(write_video(None, make_frames(8, 112, 224), 4, "mkv"), options)
    assert video.frames.shape[1:3] == frame_size(112, 224, 4, options) == (28, 56)


def test_frames_list_is_a_video_of_its_frames() -> None:
    images = [Image.fromarray(frame) for frame in FRAMES[:5]]
    video = frames_video(images, VideoOptions(**EXACT, fps=3.0))
    assert video.frames.shape == (6, 56, 84, 3)  # 5 frames, the last repeated to an even count
    assert np.array_equal(video.frames[:5], FRAMES[:5]) and np.array_equal(video.frames[5], FRAMES[4])
    assert video.sample_fps == 3.0


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: b"not a video at all" * 50, "cannot decode video"),
        (lambda: write_video(None, FRAMES[:0], 10, "mkv"), "no video stream"),
        (lambda: write_video(None, FRAMES[:1], 10, "mkv"), "at least 2"),
        (lambda: write_video(None, FRAMES, 10, "mkv").replace(b"V_FFV1", b"V_QQQQ"), "unsupported video codec"),
        (lambda: write_video(None, FRAMES, 10, "mp4")[:2000], "cannot decode video"),
    ],
    ids=["garbage", "audio_only", "one_frame", "unknown_codec", "truncated"],
)
def test_bad_videos_fail_with_a_clear_error(make, match: str) -> None:
    with pytest.raises(VideoLoadError, match=match):
        decode_video(make())


def test_too_long_and_too_large_videos_are_refused(tmp_path: Path) -> None:
    data = write_video(tmp_path / "v.mkv", FRAMES, 10, "mkv")
    with pytest.raises(VideoLoadError, match="more than the limit of 1.5 s"):
        decode_video(data, max_seconds=1.5)
    with pytest.raises(VideoLoadError, match="more than the limit of 100 bytes"):
        decode_video(tmp_path / "v.mkv", max_bytes=100)
    with pytest.raises(VideoLoadError, match="not found"):
        decode_video(tmp_path / "missing.mp4")


# ------------------------------------------------------------------------------ patches
def _transformers_video_patches(frames: np.ndarray, mean: list, std: list, factor: float) -> torch.Tensor:
    """transformers 5.23 Qwen2VLVideoProcessor on already-sized frames, its arithmetic reproduced.

    Read in transformers/image_processing_backends.py (_fuse_mean_std_and_rescale_factor: mean and
    std times 1/rescale_factor; rescale_and_normalize: normalize(images.to(float32), mean, std), i.e.
    (x - mean) / std per channel) and transformers/models/qwen2_vl/video_processing_qwen2_vl.py
    (patchify: pad with the last frame to a multiple of temporal_patch_size, view as (B, grid_t, tp,
    C, gh/m, m, p, gw/m, m, p), permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9), reshape). torchvision, which
    those files call, cannot be installed here.
    """
    videos = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # (B, T, C, H, W) uint8
    m = torch.tensor(mean) * (1.0 / factor)
    s = torch.tensor(std) * (1.0 / factor)
    videos = (videos.to(torch.float32) - m[None, None, :, None, None]) / s[None, None, :, None, None]
    if pad := -videos.shape[1] % 2:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
    b, t, c, h, w = videos.shape
    patches = videos.view(b, t // 2, 2, c, h // 28, 2, 14, w // 28, 2, 14)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(b, (t // 2) * (h // 14) * (w // 14), c * 2 * 14 * 14)[0]


@pytest.mark.parametrize("count", [4, 5])
def test_patches_equal_transformers_video_processor(count: int) -> None:
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    frames = make_frames(count, 56, 84, seed=count)
    ours, grid = video_patches(frames, mean, std, 1 / 255, 14, 2, 2)
    assert grid.tolist() == [math.ceil(count / 2), 4, 6]
    assert torch.equal(ours, _transformers_video_patches(frames, mean, std, 1 / 255))


# ------------------------------------------------------------------------------ positions
@pytest.fixture(scope="module")
def hf_rope(tiny_checkpoint: Path) -> Qwen2_5_VLModel:
    """transformers' model for its get_rope_index (random weights: only the config matters)."""
    config = Qwen2_5_VLConfig.from_pretrained(tiny_checkpoint)
    return Qwen2_5_VLModel(config).eval()


def _video_prompt(before: int, grid: tuple[int, int, int], after: int, video: int) -> list[int]:
    return [5] * before + [video] * (grid[0] * grid[1] * grid[2] // 4) + [6] * after


@pytest.mark.parametrize("fps", [1.0, 2.0, 4.0, 3.0])
def test_time_positions_equal_transformers(hf_rope: Qwen2_5_VLModel, fps: float) -> None:
    """Videos sampled at 1, 2, 4 (and 3: non-integer steps, truncated) fps: the video tokens' positions."""
    video = hf_rope.config.video_token_id
    grid = (5, 8, 12)  # 10 frames, 4x6 tokens a frame
    seconds = 2 / fps
    ids = _video_prompt(3, grid, 4, video)
    ours, _ = mrope_positions(ids, torch.tensor([grid]), hf_rope.config.image_token_id, 2, video, [seconds], 2.0)
    types = (torch.tensor([ids]) == video).int() * 2
    theirs, _ = hf_rope.get_rope_index(torch.tensor([ids]), types, None, torch.tensor([grid]), torch.tensor([seconds]))
    span = slice(3, 3 + 5 * 4 * 6)
    assert torch.equal(ours[:, span], theirs[:, 0, span])
    expected = [int(i * torch.tensor(2.0) * torch.tensor(seconds, dtype=torch.float32)) + 3 for i in range(5)]
    assert ours[0, span].reshape(5, -1)[:, 0].tolist() == expected


def test_text_after_a_video_follows_the_authors_definition(hf_rope: Qwen2_5_VLModel) -> None:
    """Where the video's time outruns its width, transformers 5.23 resumes text at start + max(h, w);
    the authors' docstring (and this engine) at the span's largest position + 1."""
    cfg = hf_rope.config
    video = cfg.video_token_id
    grids = [(6, 4, 4), (1, 4, 6), (3, 8, 8)]  # a long thin video, an image, a short wide video
    token = [video, cfg.image_token_id, video]
    seconds = [1.0, None, 0.5]
    ids = [5] * 3
    for g, t in zip(grids, token):
        ids += [t] * (g[0] * g[1] * g[2] // 4) + [6] * 2
    ours, delta = mrope_positions(ids, torch.tensor(grids), cfg.image_token_id, 2, video, seconds, 2.0)
    reference = authors_positions(ids, grids, seconds, {video, cfg.image_token_id}, 2, 2.0)
    assert torch.equal(ours, reference)
    assert delta == int(reference.max()) + 1 - len(ids)
    first_text = 3 + 6 * 2 * 2
    assert ours[:, first_text].tolist() == [3 + 10 + 1] * 3  # the video's time reaches 3 + 5 * 2
    types = (torch.tensor([ids]) == cfg.image_token_id).int() + 2 * (torch.tensor([ids]) == video).int()
    theirs, _ = hf_rope.get_rope_index(
        torch.tensor([ids]),
        types,
        torch.tensor([grids[1]]),
        torch.tensor([grids[0], grids[2]]),
        torch.tensor([1.0, 0.5]),
    )
    assert theirs[0, 0, first_text] == 3 + 2  # transformers 5.23: start + max(h, w) of the merged grid


# ------------------------------------------------------------------------------ requests
@pytest.fixture(scope="module")
def builder(tiny_checkpoint: Path) -> PromptBuilder:
    return PromptBuilder.from_pretrained(tiny_checkpoint, max_videos=2)


def test_video_request_forms(builder: PromptBuilder, tmp_path: Path) -> None:
    """A path, a data URL, bytes and a list of frames give one <|video_pad|> span each, sized by the grid."""
    data = write_video(tmp_path / "v.mkv", FRAMES, 10, "mkv")
    url = "data:video/x-matroska;base64," + base64.b64encode(data).decode()
    kwargs = {"video_min_pixels": 784, "video_max_pixels": 56 * 84}
    by_path = builder.build(
        {"id": "a", "prompt": "hi", "videos": [str(tmp_path / "v.mkv")], "mm_processor_kwargs": kwargs}
    )
    for source in (url, data):
        other = builder.build({"id": "b", "prompt": "hi", "videos": [source], "mm_processor_kwargs": kwargs})
        assert other.input_ids == by_path.input_ids and torch.equal(other.pixel_values, by_path.pixel_values)
    assert by_path.input_ids.count(builder.video_token_id) == 2 * 2 * 3
    assert by_path.video_frames == [4] and by_path.second_per_grid_ts == [1.0]
    pngs = []
    for i, frame in enumerate(FRAMES[:4]):
        pngs.append(str(tmp_path / f"f{i}.png"))
        Image.fromarray(frame).save(pngs[-1])
    listed = builder.build({"id": "c", "prompt": "hi", "videos": [pngs], "mm_processor_kwargs": kwargs})
    assert listed.video_frames == [4] and listed.second_per_grid_ts == [1.0]  # 2 frames/s by default
    assert listed.input_ids == by_path.input_ids


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"fps": 0}, "mm_processor_kwargs.fps"),
        ({"fps": "2"}, "mm_processor_kwargs.fps"),
        ({"max_frames": 2}, "mm_processor_kwargs.max_frames"),
        ({"video_max_pixels": 10**9}, "mm_processor_kwargs.video_max_pixels"),
        ({"video_min_pixels": 5000, "video_max_pixels": 4000}, "mm_processor_kwargs.video_min_pixels"),
        ({"video_total_pixels": 1.5}, "mm_processor_kwargs.video_total_pixels"),
        ({"nframes": 4}, "mm_processor_kwargs.nframes"),
    ],
)
def test_bad_video_kwargs_name_the_field(builder: PromptBuilder, tmp_path: Path, kwargs: dict, field: str) -> None:
    path = tmp_path / "v.mkv"
    write_video(path, FRAMES, 10, "mkv")
    with pytest.raises(InvalidRequestError) as err:
        builder.build({"id": "x", "prompt": "hi", "videos": [str(path)], "mm_processor_kwargs": kwargs})
    assert err.value.param == field and field in str(err.value)


def test_bad_video_parts_name_the_part(builder: PromptBuilder, tmp_path: Path) -> None:
    path = tmp_path / "v.mkv"
    write_video(path, FRAMES, 10, "mkv")
    cases = [
        ({"prompt": "hi", "videos": [str(tmp_path / "nope.mp4")]}, "videos[0]", "not found"),
        ({"prompt": "hi", "videos": [b"junk" * 100]}, "videos[0]", "cannot decode"),
        ({"prompt": "hi", "videos": [str(path)] * 3}, "videos", "max_videos_per_prompt=2"),
        ({"prompt": "hi", "videos": [{"video": str(path), "video_end": -1}]}, "videos[0].video_end", ">= 0"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}],
                    }
                ]
            },
            "messages[0].content[0]",
            "cannot decode",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "video", "video": str(path)}]}]},
            "messages[0].content[0]",
            "user messages only",
        ),
    ]
    for request, param, match in cases:
        with pytest.raises(InvalidRequestError, match=match) as err:
            builder.build({"id": "x", **request})
        assert err.value.param == param, (request, err.value)


def test_default_budget_fits_input_max_len(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Without video_total_pixels, a video gets what input_max_len leaves beside the text: scaled down."""
    path = tmp_path / "v.mkv"
    write_video(path, make_frames(8, 224, 336), 4, "mkv")
    kwargs = {"video_min_pixels": 784}
    free = PromptBuilder.from_pretrained(tiny_checkpoint).build(
        {"id": "a", "prompt": "hi", "videos": [str(path)], "mm_processor_kwargs": kwargs}
    )
    bounded = PromptBuilder.from_pretrained(tiny_checkpoint, max_input_len=100).build(
        {"id": "a", "prompt": "hi", "videos": [str(path)], "mm_processor_kwargs": kwargs}
    )
    assert len(free.input_ids) > 100 >= len(bounded.input_ids)
    assert bounded.video_frames == free.video_frames == [4]


def test_dataset_rows_carry_videos_with_paths_resolved(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "prompt": "hi", "videos": ["clips/a.mp4", {"video": "b.mkv", "video_end": 3}]},
        {"id": "b", "prompt": "hi", "videos": [["f0.png", "https://x/f1.png"]]},
        {"id": "c", "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "c.mov"}}]}]},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    a, b, c = load_requests(str(path), None, 1, 1, None, tmp_path)
    assert a["videos"] == [str(tmp_path / "clips/a.mp4"), {"video": str(tmp_path / "b.mkv"), "video_end": 3}]
    assert b["videos"] == [[str(tmp_path / "f0.png"), "https://x/f1.png"]]
    assert c["messages"][0]["content"][0]["video_url"]["url"] == str(tmp_path / "c.mov")
    path.write_text(json.dumps({"id": "d", "prompt": "hi", "videos": "a.mp4"}))
    with pytest.raises(DatasetError, match="videos"):
        load_requests(str(path), None, 1, 1, None, tmp_path)


def test_video_kwargs_are_checked_without_a_video(builder: PromptBuilder) -> None:
    with pytest.raises(InvalidRequestError) as err:
        builder.build({"id": "x", "prompt": "hi", "mm_processor_kwargs": {"fps": "fast"}})
    assert err.value.param == "mm_processor_kwargs.fps"
