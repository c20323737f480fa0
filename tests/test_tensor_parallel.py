"""Tensor parallelism over real gloo process groups: tp 2 and 4 give tp 1's and transformers' tokens.

Each tp size runs once, in spawned processes (one thread each) that play every scenario in turn:
two checkpoints x vision modes "dp" and "tp", each with a text prompt, a one-image prompt, a
two-image prompt and the three together as one batch. The "tp_odd" checkpoint has one KV head
(replicated over ranks), vocabulary 1001 (not divisible by tp) and 3 vision heads (vision_mode
"tp" falls back to a replicated tower). The parent compares what the ranks return.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.tools.greedy_check import decode_step_logits
from model.parallel import ParallelContext, free_port
from model.processor import PreparedRequest
from model.runner import ModelRunner
from model.sampling import SamplingParams
from tests.reference import (
    LOGITS_ATOL,
    HFReference,
    assert_greedy_match,
    our_logits,
    paired_steps,
    step_rows,
)

CHECKPOINTS = ("default", "tp_odd")
VISION_MODES = ("dp", "tp")
SINGLES = ("text", "one_image", "two_images")
MAX_NEW_TOKENS = 8
TIMEOUT_S = 300


@dataclass
class Job:
    """One scenario for the ranks: a checkpoint, a vision mode, prompts and the continuations to teacher-force."""

    name: str
    path: Path
    vision_mode: str
    requests: dict[str, PreparedRequest]
    continuations: dict[str, list[int]]


def _run_jobs(rank: int, size: int, port: int, jobs: list[Job], out_dir: Path) -> None:
    """Entry point of each spawned rank: run every job, save what the parent checks."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=timedelta(seconds=TIMEOUT_S)
    )
    ctx = ParallelContext(rank, size, dist.group.WORLD)
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    results: dict[str, dict[str, Any]] = {}
    try:
        for job in jobs:
            runner = ModelRunner(job.path, ctx, max_batch_size=4, max_seq_len=256, vision_mode=job.vision_mode)
            out: dict[str, Any] = {
                "loaded": runner.loaded,
                "parameters": {name for name, _ in runner.model.named_parameters()},
                "kv_heads": runner.model.model.layers[0].self_attn.num_kv_heads,
                "vision_qkv_rows": runner.model.visual.blocks[0].attn.qkv.weight.shape[0],
            }
            for name in SINGLES:
                [result] = runner.generate([job.requests[name]], [params], eos_token_ids=[])
                out[name] = result.output_token_ids
            batch = runner.generate([job.requests[n] for n in SINGLES], [params] * len(SINGLES), eos_token_ids=[])
            out["batch"] = [r.output_token_ids for r in batch]
            out["logits"] = {n: our_logits(runner, job.requests[n], job.continuations[n]) for n in SINGLES}
            out["step_logits"] = {n: decode_step_logits(runner, job.requests[n], job.continuations[n]) for n in SINGLES}
            results[job.name] = out
    finally:
        dist.destroy_process_group()
    torch.save(results, out_dir / f"rank{rank}.pt")


def run_tp(size: int, jobs: list[Job], out_dir: Path) -> list[dict[str, dict[str, Any]]]:
    """Run the jobs on `size` spawned ranks; returns each rank's results."""
    context = mp.start_processes(
        _run_jobs, args=(size, free_port(), jobs, out_dir), nprocs=size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"tp={size} ranks did not finish within {TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(size)]


@dataclass
class Baseline:
    """tp = 1 and transformers' outputs for one checkpoint."""

    path: Path
    requests: dict[str, PreparedRequest]
    hf_tokens: dict[str, list[int]]
    tp1_tokens: dict[str, list[int]]  # also "batch:<name>" for the batch run
    tp1_logits: dict[str, torch.Tensor]  # prefill, teacher-forced on prompt + hf_tokens
    tp1_step_logits: dict[str, torch.Tensor]  # decode path, teacher-forced on hf_tokens
    hf_step_logits: dict[str, torch.Tensor]  # teacher-forced on prompt + hf_tokens, one row per step


@pytest.fixture(scope="module")
def baselines(
    checkpoint: Callable[[str], Path], prepared: Callable[[Path], dict[str, PreparedRequest]], hf_reference: HFReference
) -> dict[str, Baseline]:
    out = {}
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    for name in CHECKPOINTS:
        path = checkpoint(name)
        requests = {n: prepared(path)[n] for n in SINGLES}
        runner = ModelRunner(path, max_batch_size=4, max_seq_len=256)
        hf_tokens = {n: hf_reference.generate(path, requests[n], MAX_NEW_TOKENS, []) for n in SINGLES}
        tp1 = {n: runner.generate([requests[n]], [params], eos_token_ids=[])[0].output_token_ids for n in SINGLES}
        batch = runner.generate([requests[n] for n in SINGLES], [params] * len(SINGLES), eos_token_ids=[])
        tp1.update({f"batch:{n}": r.output_token_ids for n, r in zip(SINGLES, batch)})
        logits = {n: our_logits(runner, requests[n], hf_tokens[n]) for n in SINGLES}
        steps = {n: decode_step_logits(runner, requests[n], hf_tokens[n]) for n in SINGLES}
        hf_steps = {
            n: step_rows(hf_reference.logits(path, requests[n], hf_tokens[n]), len(requests[n].input_ids))
            for n in SINGLES
        }
        out[name] = Baseline(path, requests, hf_tokens, tp1, logits, steps, hf_steps)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda size: f"tp{size}")
def tp_results(
    request: pytest.FixtureRequest, baselines: dict[str, Baseline], tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, list[dict[str, dict[str, Any]]]]:
    size = request.param
    jobs = [
        Job(f"{name}-{mode}", b.path, mode, b.requests, b.hf_tokens)
        for name, b in baselines.items()
        for mode in VISION_MODES
    ]
    start = time.perf_counter()
    ranks = run_tp(size, jobs, tmp_path_factory.mktemp(f"tp{size}"))
    print(f"tp={size}: {len(jobs)} scenarios on {size} ranks in {time.perf_counter() - start:.1f} s")
    return size, ranks


SCENARIOS = [(name, mode) for name in CHECKPOINTS for mode in VISION_MODES]


@pytest.mark.parametrize(("name", "mode"), SCENARIOS, ids=[f"{n}-{m}" for n, m in SCENARIOS])
def test_every_rank_loads_all_its_parameters(tp_results, name: str, mode: str) -> None:
    _, ranks = tp_results
    for rank, results in enumerate(ranks):
        out = results[f"{name}-{mode}"]
        assert out["loaded"] == out["parameters"], (
            f"rank {rank}: loaded but not a parameter {sorted(out['loaded'] - out['parameters'])}, "
            f"parameter not loaded {sorted(out['parameters'] - out['loaded'])}"
        )


@pytest.mark.parametrize(("name", "mode"), SCENARIOS, ids=[f"{n}-{m}" for n, m in SCENARIOS])
def test_sharding_layout(tp_results, name: str, mode: str) -> None:
    """KV heads replicate past their count; the vision tower shards only in mode tp and when it divides."""
    size, ranks = tp_results
    out = ranks[0][f"{name}-{mode}"]
    if name == "tp_odd":
        assert out["kv_heads"] == 1  # one KV head, replicated on every rank
    full_qkv_rows = 3 * (64 if name == "default" else 48)
    sharded = mode == "tp" and name == "default"
    assert out["vision_qkv_rows"] == (full_qkv_rows // size if sharded else full_qkv_rows)


@pytest.mark.parametrize(("name", "mode"), SCENARIOS, ids=[f"{n}-{m}" for n, m in SCENARIOS])
def test_tokens_match_tp1_and_reference(tp_results, baselines: dict[str, Baseline], name: str, mode: str) -> None:
    size, ranks = tp_results
    base = baselines[name]
    outs = [results[f"{name}-{mode}"] for results in ranks]
    for rank, out in enumerate(outs[1:], start=1):
        for key in (*SINGLES, "batch"):
            assert out[key] == outs[0][key], f"rank {rank} disagrees with rank 0 on {key}"
    out = outs[0]
    for i, prompt in enumerate(SINGLES):
        hf = base.hf_tokens[prompt]
        what = f"tp={size} {name}-{mode} {prompt}"
        for kind, tp1_kind in (("logits", base.tp1_logits), ("step_logits", base.tp1_step_logits)):
            diff = (out[kind][prompt] - tp1_kind[prompt]).abs().max().item()
            assert diff <= LOGITS_ATOL, f"{what}: teacher-forced {kind} differ from tp=1 by {diff:.3g}"
        steps = out["step_logits"][prompt]
        for label, ours in ((prompt, out[prompt]), (f"batch:{prompt}", out["batch"][i])):
            what = f"tp={size} {name}-{mode} {label}"
            assert_greedy_match(ours, hf, paired_steps(steps, base.hf_step_logits[prompt]), f"{what} vs HF")
            tp1 = base.tp1_tokens[label]
            # The teacher-forced logits follow the reference tokens: valid while tp 1 agrees with them.
            first_difference = next((j for j, (a, b) in enumerate(zip(ours, tp1)) if a != b), len(tp1))
            assert tp1[:first_difference] == hf[:first_difference], f"{what}: tp 1 left the reference earlier"
            assert_greedy_match(ours, tp1, paired_steps(steps, base.tp1_step_logits[prompt]), f"{what} vs tp=1")
