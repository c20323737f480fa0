"""Videos through the real engine (Coordinator + a Ray worker, tiny checkpoint): tokens, records, prefix cache.

One engine with prefix caching, blocks of 4 tokens and an encoder budget of one temporal slice a round (the
workers encode the video over two rounds and join its embeddings) serves a video request, then a second turn about
the same video (the first answer as the assistant turn, a follow-up question). The first turn's greedy
tokens are transformers' (near-tie rule); the second turn reuses the KV of the whole video span
(`cached_tokens` past its end) and its tokens are transformers' greedy tokens for the full chat; records
carry video_frames, video_decode_s and video_tokens; a corrupt video, too many videos and a bad fps are
error records naming the part.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from cluster import start, stop
from model.batch import image_spans
from model.processor import PromptBuilder
from tests.ray_helpers import tiny_config
from tests.reference import NEAR_TIE_MARGIN
from tests.video_files import make_frames, write_video
from tests.video_reference import hf_greedy, hf_video_inputs

NEW_TOKENS = 6
KWARGS = {"video_min_pixels": 28 * 28, "video_max_pixels": 112 * 168}


@pytest.fixture(scope="module")
def engine(local_ray, tiny_checkpoint: Path) -> Iterator[Any]:
    cfg = tiny_config(
        tiny_checkpoint,
        "world_size=1",
        "parallel_config.tp_size=1",
        "data_config.input_max_len=256",
        "data_config.max_videos_per_prompt=1",
        "kv_cache.block_size=4",
        "scheduler.encoder_budget_tokens=24",  # one slice of the 2-slice video a round
        "ray.namespace=video-engine",
    )
    coordinator = start(cfg)
    try:
        yield coordinator
    finally:
        stop(coordinator)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("video") / "clip.mov"
    write_video(path, make_frames(12, 112, 168, seed=5), 6, "mov")
    return str(path)


def _hf_greedy(model: Qwen2_5_VLForConditionalGeneration, builder: PromptBuilder, raw: dict) -> tuple[list, Any]:
    request = builder.build(raw)
    return hf_greedy(model, hf_video_inputs(request, builder.image_token_id, builder.video_token_id), NEW_TOKENS)


def _assert_reference_greedy(ours: list[int], ref: list[int], logits: torch.Tensor, what: str) -> None:
    """Equal, or equal up to a step where the reference's own best beats our token by less than the margin."""
    for step, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            gap = float(logits[step, b] - logits[step, a])
            assert gap < NEAR_TIE_MARGIN, f"{what}: step {step}: ours {a}, reference {b} ({gap:.3g} above)"
            return
    assert len(ours) == len(ref), what


def test_second_turn_about_a_video_hits_the_prefix_cache(engine: Any, tiny_checkpoint: Path, video: str) -> None:
    builder = PromptBuilder.from_pretrained(tiny_checkpoint)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    question = [{"type": "video", "video": video}, {"type": "text", "text": "What happens?"}]
    first = {
        "id": "turn-1",
        "messages": [{"role": "user", "content": question}],
        "mm_processor_kwargs": KWARGS,
        "max_new_tokens": NEW_TOKENS,
        "ignore_eos": True,
    }
    [one] = ray.get(engine.generate.remote([first]), timeout=180)
    assert one["error"] is None, one["error"]
    assert one["video_frames"] == [4] and one["video_decode_s"] > 0
    assert one["video_tokens"] == builder.build(first).input_ids.count(builder.video_token_id) == 2 * 4 * 6
    ref, logits = _hf_greedy(model, builder, first)
    _assert_reference_greedy(one["output_token_ids"], ref, logits, "turn 1")

    second = {
        **first,
        "id": "turn-2",
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": one["output_text"]},
            {"role": "user", "content": "And then?"},
        ],
    }
    [two] = ray.get(engine.generate.remote([second]), timeout=180)
    assert two["error"] is None, two["error"]
    ids = builder.build(second).input_ids
    ((_, end),) = image_spans(ids, builder.image_token_id, builder.video_token_id)
    assert two["cached_tokens"] >= end, (two["cached_tokens"], end)
    ref, logits = _hf_greedy(model, builder, second)
    _assert_reference_greedy(two["output_token_ids"], ref, logits, "turn 2")


def test_bad_videos_are_error_records_naming_the_part(engine: Any, video: str) -> None:
    bad = [
        {"id": "corrupt", "prompt": "hi", "videos": [b"\x00" * 4096]},
        {"id": "two", "prompt": "hi", "videos": [video, video]},
        {"id": "kwargs", "prompt": "hi", "videos": [video], "mm_processor_kwargs": {"fps": -1}},
    ]
    records = {r["id"]: r for r in ray.get(engine.generate.remote(bad), timeout=180)}
    assert "videos[0]" in records["corrupt"]["error"] and "cannot decode" in records["corrupt"]["error"]
    assert "max_videos_per_prompt=1" in records["two"]["error"]
    assert "mm_processor_kwargs.fps" in records["kwargs"]["error"]
