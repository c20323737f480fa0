"""Parity with transformers at tp = 1, fp32: greedy tokens, EOS handling, teacher-forced logits.

Runs on the default tiny checkpoint, a 3-shard one, one in the layout transformers 5 writes, and one
with other shapes (3 heads, one KV head, vocab 1001, other vision windows and full-attention blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cluster.tools.greedy_check import decode_step_logits
from model.processor import PreparedRequest
from model.runner import GenerationResult, ModelRunner
from model.sampling import SamplingParams
from tests.reference import (
    LOGITS_ATOL,
    HFReference,
    assert_greedy_match,
    our_logits,
    paired_steps,
    step_rows,
)

MAX_NEW_TOKENS = 10


@dataclass
class Case:
    name: str
    path: Path
    runner: ModelRunner
    requests: dict[str, PreparedRequest]


@pytest.fixture(scope="module", params=["default", "sharded", "transformers5", "odd"])
def case(
    request: pytest.FixtureRequest,
    checkpoint: Callable[[str], Path],
    prepared: Callable[[Path], dict[str, PreparedRequest]],
) -> Case:
    path = checkpoint(request.param)
    return Case(request.param, path, ModelRunner(path, max_batch_size=4, max_seq_len=512), prepared(path))


def check_result(
    case: Case, hf: HFReference, request: PreparedRequest, result: GenerationResult, max_new_tokens: int, eos: list[int]
) -> None:
    """One result against transformers' generate with the same limit and EOS ids."""
    ref = hf.generate(case.path, request, max_new_tokens, eos)

    def step_logits(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ours = decode_step_logits(case.runner, request, ref)
        theirs = step_rows(hf.logits(case.path, request, ref), len(request.input_ids))
        return paired_steps(ours, theirs)(step)

    what = f"{case.name}/{request.request_id}"
    assert result.error is None, f"{what}: {result.error}"
    assert_greedy_match(result.output_token_ids, ref, step_logits, what)
    if result.output_token_ids == ref:
        stopped = bool(ref) and ref[-1] in eos
        assert result.finish_reason == ("stop" if stopped else "length"), what
        assert len(result.token_times_s) == len(ref)


def test_loads_every_parameter(case: Case) -> None:
    assert case.runner.loaded == {name for name, _ in case.runner.model.named_parameters()}


@pytest.mark.parametrize("name", ["text", "one_image", "two_images"])
def test_greedy_matches_reference(case: Case, hf_reference: HFReference, name: str) -> None:
    request = case.requests[name]
    [result] = case.runner.generate([request], [SamplingParams(max_new_tokens=MAX_NEW_TOKENS)], eos_token_ids=[])
    check_result(case, hf_reference, request, result, MAX_NEW_TOKENS, [])


def test_batch_of_mixed_requests_matches_reference(case: Case, hf_reference: HFReference) -> None:
    """Three prompts of different lengths and limits, text and images, in one generate call."""
    names, limits = ["text_long", "small_image", "two_images"], [6, MAX_NEW_TOKENS, 8]
    requests = [case.requests[n] for n in names]
    assert len({len(r.input_ids) for r in requests}) == 3
    results = case.runner.generate(requests, [SamplingParams(max_new_tokens=n) for n in limits], eos_token_ids=[])
    for request, result, limit in zip(requests, results, limits):
        check_result(case, hf_reference, request, result, limit, [])


def pick_eos(tokens: list[int], step: int = 2) -> tuple[int, int]:
    """A (token, step) such that the token first occurs at that step, at or after `step`."""
    for i in range(step, len(tokens)):
        if tokens[i] not in tokens[:i]:
            return tokens[i], i
    raise AssertionError(f"no token first generated at step >= {step} in {tokens}")


def test_eos_stops_like_reference(case: Case, hf_reference: HFReference) -> None:
    request = case.requests["one_image"]
    free_run = hf_reference.generate(case.path, request, MAX_NEW_TOKENS, [])
    eos, step = pick_eos(free_run)
    ref = hf_reference.generate(case.path, request, MAX_NEW_TOKENS, [eos])
    assert ref == free_run[: step + 1], "transformers did not stop at the chosen EOS"

    [result] = case.runner.generate([request], [SamplingParams(max_new_tokens=MAX_NEW_TOKENS)], eos_token_ids=[eos])
    assert result.output_token_ids == ref
    assert result.finish_reason == "stop"
    assert result.output_token_ids[-1] == eos


def test_eos_in_a_batch_stops_only_its_request(case: Case, hf_reference: HFReference) -> None:
    """One request meets EOS early while the others of its batch go on to their limit."""
    requests = [case.requests[n] for n in ("text", "one_image", "two_images")]
    eos, _ = pick_eos(hf_reference.generate(case.path, requests[1], MAX_NEW_TOKENS, []))
    params = [SamplingParams(max_new_tokens=MAX_NEW_TOKENS)] * 3
    results = case.runner.generate(requests, params, eos_token_ids=[eos])
    assert results[1].finish_reason == "stop"
    for request, result in zip(requests, results):
        check_result(case, hf_reference, request, result, MAX_NEW_TOKENS, [eos])


@pytest.mark.parametrize("name", ["text", "one_image", "two_images"])
def test_teacher_forced_logits(case: Case, hf_reference: HFReference, name: str) -> None:
    """Prefill logits over prompt + reference continuation, every position."""
    request = case.requests[name]
    ref = hf_reference.generate(case.path, request, MAX_NEW_TOKENS, [])
    ours = our_logits(case.runner, request, ref)
    theirs = hf_reference.logits(case.path, request, ref)
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= LOGITS_ATOL, f"{case.name}/{name}: max |logit diff| {diff:.3g}"


@pytest.mark.parametrize("name", ["text", "two_images"])
def test_decode_step_logits(case: Case, hf_reference: HFReference, name: str) -> None:
    """Decode steps fed the reference tokens give transformers' teacher-forced logits (KV cache, rope delta)."""
    request = case.requests[name]
    ref = hf_reference.generate(case.path, request, MAX_NEW_TOKENS, [])
    ours = decode_step_logits(case.runner, request, ref)
    theirs = step_rows(hf_reference.logits(case.path, request, ref), len(request.input_ids))
    diffs = (ours - theirs).abs().amax(dim=-1).tolist()
    assert max(diffs) <= LOGITS_ATOL, f"{case.name}/{name}: max |logit diff| per step {diffs}"
