"""Encoder budget benchmark: ITL of decoding requests while video requests arrive, budget off and on, interleaved.

`python -m cluster.tools.bench_encode [--checkpoint tiny|small] [--budgets 256,512] [--repeats 3] [--decoders 3]
[--videos 8] [--frames 8] [--size 448] [--gap-s 0.5] [--threads 1] [--json PATH]`

In process: a DP group's loop (actors/group_loop.py, async scheduling, one decode step a call, the step-cost
estimates and the 0.5 stall cap of the defaults) over one worker's round calls (actors/worker_phases.py, what
ShardWorker runs), the calls on a thread of their own in the order they were started; eager forwards on
the CPU, on the checkpoint's random weights. Each phase: `--decoders` text requests decode; `--warm-s` later
`--videos` video requests arrive `--gap-s` apart, each a clip of its own (`--frames` frames of `--size` pixels
square; 8 frames of 448: 4 temporal slices of 32 x 32 patches, 256 video tokens a slice, 1024 a clip; the
vision and prefix caches are off, so every clip is encoded); once every video request has its first token the
decoders are aborted. The requests are prepared before the phase (preparation is the Coordinator's, on
another thread). Phases cycle the scheduler's encoder budget through none (each admitted clip encoded
whole in front of its round's step) and each of `--budgets` (tokens), `--repeats` times, after a warm-up.

Reported per setting, pooled over its phases: the decoding requests' ITL as the loop's caller receives their
tokens, over the gaps that end while a video request waits for its first token (from its arrival): p50,
p90, p99 and max; and the video requests' TTFT median, what the budget costs them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from actors.group_loop import GroupLoop
from actors.scheduler import GroupScheduler, Sequence
from actors.worker_phases import WorkerPhases
from cluster.tools.bench import CACHE_DIR, CHECKPOINTS, log
from cluster.tools.tiny_checkpoint import build_tiny_checkpoint
from model.batch import RunningBatch, image_spans
from model.processor import PreparedRequest, PromptBuilder
from model.runner import ModelRunner
from model.sampling import SamplingParams
from model.vision_cache import image_key

DECODE_PROMPT = "Tell me a long story about a river, a mountain and a city of light."
MAX_SEQ_LEN = 4096


@dataclasses.dataclass
class Payload:
    prepared: PreparedRequest
    params: SamplingParams


class LocalGroup:
    """One worker's round calls as the group loop's worker group: they run one at a time, in the order they were
    started, on a thread of their own (as a worker runs beside the Coordinator's loop)."""

    dp_rank = 0

    def __init__(self, phases: WorkerPhases) -> None:
        self.phases = phases
        self.thread = ThreadPoolExecutor(max_workers=1)

    async def call(self, method: str, *args: Any) -> list[dict]:
        if method == "encode":
            work, inputs = self.phases.encode, args[:1]
        elif method == "step":
            work, inputs = self.phases.step, args[:7] + args[8:]  # the profile flag is ShardWorker's
        else:
            raise ValueError(f"no method {method!r}")
        return [await asyncio.get_running_loop().run_in_executor(self.thread, work, *inputs)]


def write_clips(root: Path, count: int, frames: int, size: int) -> list[list[str]]:
    """`count` clips of `frames` PNG frames each, `size` pixels square: smooth noise that differs frame to frame and
    clip to clip."""
    clips = []
    for c in range(count):
        rng = np.random.default_rng(c)
        coarse = rng.integers(0, 256, (frames, -(-size // 8), -(-size // 8), 3), dtype=np.uint8)
        pixels = coarse.repeat(8, axis=1).repeat(8, axis=2)[:, :size, :size]
        paths = []
        for f, frame in enumerate(pixels):
            paths.append(str(root / f"clip{c}-{f}.png"))
            Image.fromarray(np.ascontiguousarray(frame)).save(paths[-1])
        clips.append(paths)
    return clips


def sequence(runner: ModelRunner, prepared: PreparedRequest, request_id: str, max_new_tokens: int) -> Sequence:
    """The scheduler's view of a request, as the Coordinator's preparation builds it."""
    prepared = dataclasses.replace(prepared, request_id=request_id)
    grids = prepared.image_grid_thw if prepared.image_grid_thw is not None else []
    spans = image_spans(prepared.input_ids, runner.config.image_token_id, runner.config.video_token_id)
    images, offset = [], 0
    for (start, end), grid in zip(spans, grids):
        n = int(grid.prod())
        images.append((start, end, image_key(prepared.pixel_values[offset : offset + n], grid)))
        offset += n
    seq = Sequence(request_id, list(prepared.input_ids), max_new_tokens, images)
    seq.image_slices = [int(grid[0]) for grid in grids]
    seq.payload = Payload(prepared, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
    return seq


async def run_phase(
    loop: GroupLoop, runner: ModelRunner, decode: PreparedRequest, clips: list[PreparedRequest], args: Any, tag: str
) -> dict:
    """One phase -> the decoders' ITL gaps (ms) inside the video windows, and the videos' TTFT (ms)."""
    sched = loop.scheduler
    decoders = [sequence(runner, decode, f"{tag}-d{i}", MAX_SEQ_LEN - 256) for i in range(args.decoders)]
    videos = [sequence(runner, clip, f"{tag}-v{i}", 4) for i, clip in enumerate(clips)]
    receipts: dict[str, list[float]] = defaultdict(list)
    arrivals: dict[str, float] = {}
    for seq in decoders:
        sched.add(seq)
    start, aborted = time.perf_counter(), False
    while not loop.idle:
        due = start + args.warm_s + args.gap_s * len(arrivals)
        if len(arrivals) < len(videos) and time.perf_counter() >= due:
            seq = videos[len(arrivals)]
            sched.add(seq)
            arrivals[seq.request_id] = time.perf_counter()
        result = await loop.round()
        received = time.perf_counter()
        if result.failed:
            raise RuntimeError(f"{tag}: {result.failed[0][0].request_id} failed: {result.failed[0][1]}")
        for seq, out in result.outputs:
            sched.append(seq, out["tokens"])
            receipts[seq.request_id] += [received] * len(out["tokens"])
            if out["finish_reason"] is not None:
                sched.finish(seq, out["finish_reason"])
        if not aborted and len(arrivals) == len(videos) and all(receipts[v.request_id] for v in videos):
            for seq in decoders:
                sched.abort(seq.request_id)
            aborted = True
    windows = [(arrivals[v.request_id], receipts[v.request_id][0]) for v in videos]
    gaps = []
    for seq in decoders:
        times = receipts[seq.request_id]
        gaps += [(b - a) * 1e3 for a, b in zip(times, times[1:]) if any(lo < b <= hi for lo, hi in windows)]
    return {"itl_ms": gaps, "video_ttft_ms": [(hi - lo) * 1e3 for lo, hi in windows]}


def summary(phases: list[dict]) -> dict:
    gaps = sorted(g for p in phases for g in p["itl_ms"])
    return {
        "decode_itl_ms": {
            "p50": float(np.percentile(gaps, 50)),
            "p90": float(np.percentile(gaps, 90)),
            "p99": float(np.percentile(gaps, 99)),
            "max": gaps[-1],
            "gaps": len(gaps),
        },
        "video_ttft_ms_median": statistics.median(t for p in phases for t in p["video_ttft_ms"]),
    }


async def run(args: argparse.Namespace) -> dict:
    directory, spec = CHECKPOINTS[args.checkpoint]
    path = build_tiny_checkpoint(CACHE_DIR / directory, spec)
    video_tokens = args.frames // 2 * (args.size // 28) ** 2
    builder = PromptBuilder.from_pretrained(path, max_videos=1, max_input_len=video_tokens + 256)
    size = args.size * args.size
    with tempfile.TemporaryDirectory() as tmp:
        clips = [
            builder.build(
                {
                    "id": f"clip{i}",
                    "prompt": "What happens in this clip?",
                    "videos": [frames],
                    "mm_processor_kwargs": {"video_min_pixels": size, "video_max_pixels": size},
                }
            )
            for i, frames in enumerate(write_clips(Path(tmp), args.videos, args.frames, args.size))
        ]
    decode = builder.build({"id": "decode", "prompt": DECODE_PROMPT})
    runner = ModelRunner(path, max_batch_size=8, max_seq_len=MAX_SEQ_LEN, kv_block_size=16)
    runner.warmup()
    sched = GroupScheduler(
        8, runner.cache.num_blocks, 16, token_budget=2048, decode_steps_per_call=1, prefix_caching=False,
        max_decode_stall=0.5,
    )  # fmt: skip
    loop = GroupLoop(LocalGroup(WorkerPhases(RunningBatch(runner))), sched, [], lookahead=True)
    settings = {"off": None, **{str(tokens): tokens for tokens in args.budgets}}
    phases: dict[str, list[dict]] = {label: [] for label in settings}
    await run_phase(loop, runner, decode, clips[:1], args, "warm-up")
    for repeat in range(args.repeats):
        for label, tokens in settings.items():
            sched.encoder_budget = tokens
            phases[label].append(await run_phase(loop, runner, decode, clips, args, f"{label}{repeat}"))
            s = summary(phases[label][-1:])
            log(
                f"budget {tokens}: decode ITL p50 {s['decode_itl_ms']['p50']:.1f} ms, "
                f"p90 {s['decode_itl_ms']['p90']:.1f} ms, p99 {s['decode_itl_ms']['p99']:.1f} ms, "
                f"max {s['decode_itl_ms']['max']:.1f} ms; "
                f"video TTFT median {s['video_ttft_ms_median']:.0f} ms"
            )
    return {
        "machine": f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} intra-op thread(s)",
        "settings": {**vars(args), "video_tokens": video_tokens, "slice_tokens": (args.size // 28) ** 2},
        "results": {label: {"budget": settings[label], **summary(runs)} for label, runs in phases.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.bench_encode", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="tiny", choices=list(CHECKPOINTS))
    parser.add_argument("--budgets", default="256,512", help="comma-separated encoder budgets (tokens) to compare")
    parser.add_argument("--repeats", type=int, default=3, help="phases of each setting, alternating")
    parser.add_argument("--decoders", type=int, default=3)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8, help="frames a clip (an even count: 2 a temporal slice)")
    parser.add_argument("--size", type=int, default=448, help="a frame's side in pixels (a multiple of 28)")
    parser.add_argument("--gap-s", type=float, default=0.5, help="seconds between video arrivals")
    parser.add_argument("--warm-s", type=float, default=0.5, help="seconds the decoders run before the first video")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="write the report here too")
    args = parser.parse_args(argv)
    try:
        args.budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        parser.error(f"--budgets={args.budgets!r} must be comma-separated integers")
    if min(args.budgets) < 1:
        parser.error(f"--budgets={args.budgets} must all be >= 1")
    for name in ("repeats", "decoders", "videos", "frames", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    if args.frames % 2:
        parser.error(f"--frames={args.frames} must be even")
    if args.size < 56 or args.size % 28:
        parser.error(f"--size={args.size} must be a multiple of 28, at least 56")
    torch.set_num_threads(args.threads)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
