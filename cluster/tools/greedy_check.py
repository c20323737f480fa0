"""Judging our greedy tokens against a reference's: teacher-forced step logits and the near-tie rule.

Random tiny models have near-tied logits, so greedy sequences are compared with the rule of vLLM's
tests: at the first step where the tokens differ, the difference is accepted only if each side's
token is among the other side's top-k logits at that step; the comparison of that sequence stops
there. Used by the test suite (tests/reference.py), the accelerator check (cluster.tools.gpu_check) and the
self-check (cluster.tools.selfcheck).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model.processor import PreparedRequest
from model.runner import ModelRunner

NEAR_TIE_TOP_K = 5


def decode_step_logits(runner: ModelRunner, request: PreparedRequest, continuation: Sequence[int]) -> torch.Tensor:
    """Logits (len(continuation), vocab) of each generation step, on the host, teacher-forced.

    Row 0 comes from prefilling the prompt, row i from the decode step fed continuation[i - 1]: the
    same code that picks generated tokens (eager or graph), so the near-tie rule judges the logits
    that chose them.
    """
    device = runner.device
    embeds = runner.encode_images([request])[0]
    logits, delta = runner.prefill(request, embeds, 0)
    rows = [logits]
    length = len(request.input_ids)
    for step, token in enumerate(continuation[:-1]):
        cache_len = torch.tensor([length + step], device=device)
        logits = runner.decode(
            torch.tensor([token], device=device), cache_len + delta, cache_len, max_len=length + step + 1
        )
        rows.append(logits[0].clone())  # a graph's output buffer is overwritten by the next replay
    return torch.stack(rows).float().cpu()


@dataclass
class TokenComparison:
    """Outcome of comparing two greedy sequences under the near-tie rule."""

    accepted: bool
    near_tie_step: int | None  # the step where the rule accepted a difference
    detail: str


def compare_greedy(
    ours: Sequence[int],
    ref: Sequence[int],
    step_logits: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    k: int = NEAR_TIE_TOP_K,
) -> TokenComparison:
    """Compare greedy outputs; `step_logits(i)` gives (our, reference) logits (vocab,) at step i.

    Both sides share the prefix ref[:i] at the first differing step i, so the logits there are
    those of teacher forcing on the reference tokens.
    """
    ours, ref = list(ours), list(ref)
    step = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    if step is None:
        if len(ours) == len(ref):
            return TokenComparison(True, None, "identical")
        return TokenComparison(False, None, f"same prefix but lengths differ: ours {ours} vs reference {ref}")
    our_row, ref_row = step_logits(step)
    ours_in_ref = ours[step] in ref_row.topk(k).indices.tolist()
    ref_in_ours = ref[step] in our_row.topk(k).indices.tolist()
    detail = (
        f"step {step}: ours {ours[step]} (reference logit {ref_row[ours[step]]:.4f}), reference "
        f"{ref[step]} (reference logit {ref_row[ref[step]]:.4f}); ours {ours} vs reference {ref}"
    )
    if ours_in_ref and ref_in_ours:
        return TokenComparison(True, step, f"near tie accepted at {detail}")
    return TokenComparison(False, step, f"tokens differ beyond top-{k} at {detail}")
