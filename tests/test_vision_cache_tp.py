"""The vision cache at tp 2 over a real gloo group: ranks take the same hit/miss decisions, so the
collectives of vision dp mode (an all_gather per call with misses) and tp mode (all_reduces inside the
tower) stay matched, and every rank returns tp 1's embeddings. A mismatch would hang a rank: the
group's timeout and the parent's deadline turn that into a failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.parallel import ParallelContext, free_port
from model.processor import PreparedRequest
from model.runner import ModelRunner

TIMEOUT_S = 120
CACHE_BYTES = 16 << 20


def _calls(requests: dict[str, PreparedRequest]) -> list[list[PreparedRequest]]:
    """Three encode calls: all misses; one hit and one miss; only hits (one of them a repeat in the call)."""
    two, one, small = requests["two_images"], requests["one_image"], requests["small_image"]
    return [
        [two, requests["text"], one],
        [replace(one, request_id="again"), small],
        [two, replace(small, request_id="small_again"), small],
    ]


def _rank(rank: int, size: int, port: int, path: Path, calls: list[list[PreparedRequest]], out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=TIMEOUT_S // 2),
    )
    ctx = ParallelContext(rank, size, dist.group.WORLD)
    out: dict[str, Any] = {}
    try:
        for mode in ("dp", "tp"):
            runner = ModelRunner(
                path, ctx, max_batch_size=4, max_seq_len=256, vision_mode=mode, vision_cache_bytes=CACHE_BYTES
            )
            out[mode] = [(runner.encode_images(batch), runner.vision_cache_stats()) for batch in calls]
    finally:
        dist.destroy_process_group()
    torch.save(out, out_dir / f"rank{rank}.pt")


def test_ranks_take_the_same_cache_decisions(
    tiny_checkpoint: Path, prepared: Callable[[Path], dict[str, PreparedRequest]], tmp_path: Path
) -> None:
    calls = _calls(prepared(tiny_checkpoint))
    single = ModelRunner(tiny_checkpoint, max_batch_size=4, max_seq_len=256)
    expected = [single.encode_images(batch) for batch in calls]

    context = mp.start_processes(
        _rank, args=(2, free_port(), tiny_checkpoint, calls, tmp_path), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"tp=2 ranks did not finish within {TIMEOUT_S} s (mismatched collectives?)")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    hits_misses = [(0, 3), (1, 4), (5, 4)]  # cumulative after each call
    for mode in ("dp", "tp"):
        for call, (want, (hits, misses)) in enumerate(zip(expected, hits_misses)):
            stats = [r[mode][call][1] for r in ranks]
            assert stats[0] == stats[1], f"{mode} call {call}: ranks disagree {stats}"
            assert (stats[0]["hits"], stats[0]["misses"]) == (hits, misses), f"{mode} call {call}: {stats[0]}"
            for r in ranks:
                for ours, theirs in zip(r[mode][call][0], want):
                    assert (ours is None) == (theirs is None)
                    if ours is not None:
                        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
