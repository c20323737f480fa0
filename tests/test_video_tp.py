"""Videos at tensor-parallel size 2 over gloo, vision modes "dp" and "tp": transformers' greedy tokens.

Two spawned ranks run the video prompts of tests/test_video_parity.py (one video, an image and a video,
two videos, and the three as one batch) in both vision modes; the parent checks every rank's tokens
against transformers' under the near-tie rule (transformers' own step logits, tp 2's decode-step logits),
and that each prompt's vision items (images, video slices) encoded apart in one call give the embeddings of
the prompt encoded whole, as the encoder budget splits them.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Qwen2_5_VLForConditionalGeneration

from actors.group_loop import items_request
from actors.vision_items import vision_items
from cluster.tools.greedy_check import decode_step_logits
from model.batch import image_spans
from model.parallel import ParallelContext, free_port
from model.processor import PreparedRequest, PromptBuilder
from model.runner import ModelRunner
from model.sampling import SamplingParams
from tests.reference import assert_greedy_match, paired_steps
from tests.test_video_parity import MAX_NEW_TOKENS, SMALL, requests
from tests.video_files import make_frames, write_video
from tests.video_reference import hf_greedy, hf_video_inputs

pytestmark = pytest.mark.slow  # two spawned ranks, both vision modes: about 40 s on 2 cores
NAMES = ("one_video", "image_and_video", "two_videos")
TIMEOUT_S = 300


def _ranks(rank: int, size: int, port: int, path: Path, prepared: dict, refs: dict, out_dir: Path) -> None:
    """Each spawned rank: both vision modes, every prompt alone and all as one batch."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=timedelta(seconds=TIMEOUT_S)
    )
    ctx = ParallelContext(rank, size, dist.group.WORLD)
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    out: dict[str, Any] = {}
    try:
        for mode in ("dp", "tp"):
            runner = ModelRunner(path, ctx, max_batch_size=4, max_seq_len=512, vision_mode=mode)
            for name in NAMES:
                request = prepared[name]
                spans = image_spans(request.input_ids, runner.config.image_token_id, runner.config.video_token_id)
                items = vision_items(spans, [int(grid[0]) for grid in request.image_grid_thw])
                [whole] = runner.encode_images([request])
                apart = runner.encode_images([items_request(request, [item]) for item in items])
                out[f"{mode}/{name}/items"] = (len(items), (torch.cat(apart) - whole).abs().max().item())
                [result] = runner.generate([request], [params], eos_token_ids=[])
                out[f"{mode}/{name}"] = result.output_token_ids
                out[f"{mode}/{name}/steps"] = decode_step_logits(runner, prepared[name], refs[name])
            batch = runner.generate([prepared[n] for n in NAMES], [params] * len(NAMES), eos_token_ids=[])
            out.update({f"{mode}/batch/{n}": r.output_token_ids for n, r in zip(NAMES, batch)})
    finally:
        dist.destroy_process_group()
    torch.save(out, out_dir / f"rank{rank}.pt")


def test_videos_at_tp2_match_transformers(
    tiny_checkpoint: Path, sample_images: dict[str, Path], tmp_path: Path
) -> None:
    videos = {}
    for name, (count, fps, suffix, seed) in {
        "four_at_2fps": (4, 2, "mkv", 1),
        "twelve_at_6fps": (12, 6, "mov", 2),
        "six_at_4fps": (6, 4, "mkv", 3),
    }.items():
        videos[name] = tmp_path / f"{name}.{suffix}"
        write_video(videos[name], make_frames(count, 112, 168, seed), fps, suffix)
    builder = PromptBuilder.from_pretrained(tiny_checkpoint)
    prepared: dict[str, PreparedRequest] = {}
    for name in NAMES:
        raw, _, _ = requests(videos, sample_images["wide"])[name]
        raw = {"id": name, **raw}
        raw.setdefault("mm_processor_kwargs", {}).update(SMALL)
        prepared[name] = builder.build(raw)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    refs, ref_logits = {}, {}
    for name in NAMES:
        inputs = hf_video_inputs(prepared[name], hf.config.image_token_id, hf.config.video_token_id)
        refs[name], ref_logits[name] = hf_greedy(hf, inputs, MAX_NEW_TOKENS)

    context = mp.start_processes(
        _ranks,
        args=(2, free_port(), tiny_checkpoint, prepared, refs, tmp_path),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"tp 2 ranks did not finish within {TIMEOUT_S} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for mode in ("dp", "tp"):
        for name in NAMES:
            what = f"tp2/{mode}/{name}"
            ours = ranks[0][f"{mode}/{name}"]
            assert all(r[f"{mode}/{name}"] == ours for r in ranks), f"{what}: ranks differ"
            assert ranks[0][f"{mode}/batch/{name}"] == ours, f"{what}: batched tokens differ"
            items, error = ranks[0][f"{mode}/{name}/items"]
            assert items > len(prepared[name].image_grid_thw) and error <= 1e-5, f"{what}: items apart {error}"
            step = paired_steps(ranks[0][f"{mode}/{name}/steps"], ref_logits[name])
            assert_greedy_match(ours, refs[name], step, what)
