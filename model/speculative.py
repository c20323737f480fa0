"""Speculative decoding on one rank: n-gram proposals, and the acceptance rule that keeps sampling exact.

A speculating row proposes up to k tokens after its last one; the target then computes all of them in one
decode step over up to k + 1 query rows per sequence (`verify_layout`), and `accept` keeps the longest prefix the
target agrees with, plus one token of its own:

- greedy: proposal i is kept while it equals the target's argmax at the position before it; the token
  after the kept ones is the target's argmax there. The output is the non-speculative greedy output.
- temperature: rejection sampling (Leviathan et al., 2023) with the proposal distribution one-hot on the
  proposed token (n-gram proposals, and the draft model's greedy proposals, as vLLM v1 treats both):
  proposal i is kept with probability p(d_i); on rejection the token is drawn from p with d_i's mass
  removed and renormalised; when all are kept, a bonus token is drawn from p at the last position. p is
  the row's filtered distribution (temperature, top-k, top-p: model/sampling.py), so each emitted token
  has exactly the distribution non-speculative sampling gives it. The draws come from the row's seeded
  generator, so a seed reproduces its output.

Every rank of a TP group makes the same proposals (same tokens, same draft outputs) and the same draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.sampling import SamplingParams, filter_logits

METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """What a rank needs to speculate (the keys are vLLM's; cluster/config.py validates them at the edge).

    min_acceptance / backoff_rounds: a request whose recent acceptance rate (an average over its last rounds)
    falls below min_acceptance stops proposing for backoff_rounds rounds, then tries again.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None  # the draft checkpoint (method "draft")
    draft_tensor_parallel_size: int = 1
    min_acceptance: float = 0.1
    backoff_rounds: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative.method={self.method!r} must be one of {', '.join(METHODS)}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 15:
            raise ValueError(f"speculative.num_speculative_tokens={k!r} must be an integer in [1, 15]")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not isinstance(lo, int) or not isinstance(hi, int) or not 1 <= lo <= hi:
            raise ValueError(
                f"speculative.prompt_lookup_min={lo!r} and prompt_lookup_max={hi!r} must be integers with "
                "1 <= prompt_lookup_min <= prompt_lookup_max"
            )
        if self.method == "draft" and not self.model:
            raise ValueError("speculative.method='draft' needs speculative.model, the draft checkpoint")
        if self.method == "ngram" and self.model:
            raise ValueError(f"speculative.model={self.model!r} is set but speculative.method is 'ngram'")
        if not 0 <= self.min_acceptance < 1:
            raise ValueError(f"speculative.min_acceptance={self.min_acceptance!r} must be in [0, 1)")
        if not isinstance(self.backoff_rounds, int) or self.backoff_rounds < 1:
            raise ValueError(f"speculative.backoff_rounds={self.backoff_rounds!r} must be an integer >= 1")


def verify_buckets(buckets: list[int], k: int) -> list[int]:
    """Decode batch sizes of verification: k + 1 query rows for each row of each batch bucket."""
    return [b * (k + 1) for b in buckets]


def ngram_propose(tokens: list[int] | np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the sequence's last n tokens (vLLM's rule).

    The longest n in [min_n, max_n] whose suffix occurs earlier wins; of its occurrences, the earliest;
    the proposal is what followed it, fewer than k tokens where the sequence ends first. [] when no
    suffix of those lengths occurs earlier.
    """
    arr = np.asarray(tokens, dtype=np.int64)
    total = len(arr)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = arr[total - n :]
        # windows starting at p with p + n < total: the occurrence is followed by at least one token
        windows = np.lib.stride_tricks.sliding_window_view(arr[: total - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[0]) + n
            return arr[start : start + k].tolist()
    return []


def verify_layout(
    last: list[int], proposals: list[list[int]], lengths: list[int], deltas: list[int], width: int
) -> tuple[list[int], list[int], list[int], list[bool]]:
    """The `width` query rows of each sequence for one verification step (1 + the most proposals any row
    made: at most k + 1): (tokens, cache lengths, positions, real) per query row, row b's queries at
    b * width + j.

    Query j of sequence b reads its KV up to position lengths[b] + j and writes its own there: the last
    token at j = 0, then the proposals. A query past the row's proposals is padding (`real` False): the
    caller points it at the null block, and its logits are never read.
    """
    tokens, lens, positions, real = [], [], [], []
    for b, (token, proposed) in enumerate(zip(last, proposals)):
        inputs = [token, *proposed]
        if len(inputs) > width:
            raise ValueError(f"row {b} has {len(proposed)} proposals, more than width {width} - 1")
        for j in range(width):
            live = j < len(inputs)
            tokens.append(inputs[j] if live else 0)
            lens.append(lengths[b] + j if live else 0)
            positions.append(lengths[b] + j + deltas[b] if live else 0)
            real.append(live)
    return tokens, lens, positions, real


def accept(
    logits: torch.Tensor, proposed: list[int], params: SamplingParams, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """logits (len(proposed) + 1, V): the target's at each query of one row -> (the tokens it emits, how many
    of them are accepted proposals). The emitted tokens are the accepted proposals and one more."""
    if params.temperature == 0:
        best = logits.argmax(dim=-1).tolist()
        n = 0
        while n < len(proposed) and proposed[n] == best[n]:
            n += 1
        return proposed[:n] + [best[n]], n
    probs = filter_logits(logits, params.temperature, params.top_p, params.top_k).softmax(dim=-1)
    for i, token in enumerate(proposed):
        p = probs[i, token]
        u = torch.rand((), generator=generator, device=probs.device)
        if u < p:
            continue
        residual = probs[i].clone()
        residual[token] = 0.0  # max(p - q, 0) with q one-hot on the proposed token
        return proposed[:i] + [int(torch.multinomial(residual, 1, generator=generator))], i
    bonus = int(torch.multinomial(probs[len(proposed)], 1, generator=generator))
    return proposed + [bonus], len(proposed)


@dataclass
class RowSpeculation:
    """One request's speculation state on a rank: its recent acceptance rate and any rounds it sits out."""

    rate: float = 1.0  # exponential average of accepted / proposed over its rounds with proposals
    resting: int = 0  # rounds left without proposals

    def wants(self) -> bool:
        if self.resting:
            self.resting -= 1
            return False
        return True

    def observe(self, proposed: int, accepted: int, config: SpeculativeConfig) -> None:
        if not proposed:
            return
        self.rate = 0.7 * self.rate + 0.3 * accepted / proposed
        if self.rate < config.min_acceptance:
            self.resting, self.rate = config.backoff_rounds, config.min_acceptance  # retry from the bound
