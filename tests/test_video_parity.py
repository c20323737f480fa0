"""Videos through the engine's model against transformers' Qwen2_5_VLForConditionalGeneration, greedy, fp32.

The same frames (sampled and patched by model/video.py) go to both sides: transformers gets them as
pixel_values_videos / video_grid_thw / second_per_grid_ts with mm_token_type_ids. The cases keep the
last temporal position of each video within its spatial extent, where transformers 5.23's positions
and the authors' definition (text after a span at its largest position + 1) agree; where they differ
tests/test_video.py checks ours against a reference written from the authors' docstring.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from cluster.tools.greedy_check import decode_step_logits
from model.processor import PromptBuilder
from model.runner import ModelRunner
from model.sampling import SamplingParams
from tests.reference import assert_greedy_match, paired_steps
from tests.video_files import make_frames, write_video
from tests.video_reference import hf_greedy, hf_video_inputs

MAX_NEW_TOKENS = 8
SMALL = {"video_min_pixels": 28 * 28, "video_max_pixels": 112 * 168}  # frames kept at 112x168 (4x6 tokens)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for name, (count, fps, suffix, seed) in {
        "four_at_2fps": (4, 2, "mkv", 1),  # 2 s: all 4 frames kept at the default 2 fps
        "twelve_at_6fps": (12, 6, "mov", 2),  # 2 s: 6 of 12 frames at fps=3 (1.33 position steps)
        "six_at_4fps": (6, 4, "mkv", 3),
    }.items():
        out[name] = root / f"{name}.{suffix}"
        write_video(out[name], make_frames(count, 112, 168, seed), fps, suffix)
    return out


@pytest.fixture(scope="module")
def setup(tiny_checkpoint: Path) -> tuple[PromptBuilder, ModelRunner, Qwen2_5_VLForConditionalGeneration]:
    builder = PromptBuilder.from_pretrained(tiny_checkpoint)
    runner = ModelRunner(tiny_checkpoint, max_batch_size=4, max_seq_len=512)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    return builder, runner, hf


def requests(videos: dict[str, Path], image: Path) -> dict[str, tuple[dict, int, list[float]]]:
    """name -> (request, frames expected per video, second_per_grid_ts expected per vision input)."""
    return {
        "one_video": (
            {"prompt": "What happens in the video?", "videos": [str(videos["four_at_2fps"])]},
            [4],
            [1.0],
        ),
        "subset_at_3fps": (
            {
                "prompt": "Describe it.",
                "videos": [str(videos["twelve_at_6fps"])],
                "mm_processor_kwargs": {"fps": 3},
            },
            [6],
            [2 / 3],
        ),
        "image_and_video": (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": str(image)},
                            {"type": "video", "video": str(videos["six_at_4fps"])},
                            {"type": "text", "text": "Is the picture in the video?"},
                        ],
                    }
                ],
            },
            [4],
            [None, 0.75],  # 4 of 6 frames: 4 / 1.5 s
        ),
        "two_videos": (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "video_url", "video_url": {"url": str(videos["twelve_at_6fps"])}},
                            {"type": "text", "text": "and"},
                            {"type": "video", "video": str(videos["four_at_2fps"])},
                            {"type": "text", "text": "Which one is longer?"},
                        ],
                    }
                ],
                "mm_processor_kwargs": {"fps": 4},
            },
            [8, 4],
            [0.5, 1.0],  # the 2 fps video keeps its 4 frames: 2 frames/s
        ),
    }


@pytest.mark.parametrize("name", ["one_video", "subset_at_3fps", "image_and_video", "two_videos"])
def test_video_greedy_matches_transformers(
    setup: tuple, videos: dict[str, Path], sample_images: dict[str, Path], name: str
) -> None:
    builder, runner, hf = setup
    raw, frames, seconds = requests(videos, sample_images["wide"])[name]
    raw = {"id": name, **raw}
    raw.setdefault("mm_processor_kwargs", {}).update(SMALL)
    request = builder.build(raw)
    assert request.video_frames == frames
    got = request.second_per_grid_ts
    assert [s is None for s in got] == [s is None for s in seconds]
    assert [s for s in got if s is not None] == pytest.approx([s for s in seconds if s is not None])

    inputs = hf_video_inputs(request, hf.config.image_token_id, hf.config.video_token_id)
    theirs, _ = hf.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
        inputs.get("second_per_grid_ts"),
    )
    ours, _ = runner.prompt_positions(request)
    assert torch.equal(ours, theirs[:, 0]), f"{name}: positions differ from transformers'"

    [result] = runner.generate([request], [SamplingParams(max_new_tokens=MAX_NEW_TOKENS)], eos_token_ids=[])
    assert result.error is None, result.error
    ref, ref_logits = hf_greedy(hf, inputs, MAX_NEW_TOKENS)
    step = paired_steps(decode_step_logits(runner, request, ref), ref_logits)
    assert_greedy_match(result.output_token_ids, ref, step, name)


def test_video_prompt_logits_match_transformers(
    setup: tuple, videos: dict[str, Path], sample_images: dict[str, Path]
) -> None:
    """Prefill logits at every position of an image + video prompt, within the parity tolerance."""
    builder, runner, hf = setup
    raw, _, _ = requests(videos, sample_images["wide"])["image_and_video"]
    request = builder.build({"id": "logits", **raw, "mm_processor_kwargs": SMALL})
    embeds = runner.encode_images([request])[0]
    ours, _ = runner.prefill(request, embeds, 0, all_logits=True)
    inputs = hf_video_inputs(request, hf.config.image_token_id, hf.config.video_token_id)
    with torch.inference_mode():
        theirs = hf(**inputs).logits[0].float()
    assert (ours.float() - theirs).abs().max().item() <= 1e-4
