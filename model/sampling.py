"""Token selection: greedy, or temperature with nucleus (top-p) filtering from a seeded generator.

The filtering follows transformers' ``TemperatureLogitsWarper`` then ``TopPLogitsWarper``
(``min_tokens_to_keep=1``) operation for operation, so a request sees the distribution it would
see in ``generate(do_sample=True, temperature=..., top_p=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # as OpenAI's API
MAX_REPETITION_PENALTY = 2.0  # as vLLM


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. temperature 0 means greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False
    logprobs: bool = False  # return each sampled token's log-probability (model/logprobs.py)
    top_logprobs: int = 0  # and that many most likely tokens with theirs, at each step
    top_k: int = 0  # sample among the k most likely tokens; 0 (or -1, vLLM's) keeps all
    min_tokens: int = 0  # EOS is not sampled before this many tokens (model/penalties.py)
    presence_penalty: float = 0.0  # subtracted once from a generated token's logit
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides (multiplies, if negative) the logit of a prompt or generated token
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    grammar: str | None = None  # an llguidance grammar the output follows (model/grammar.py), compiled and checked

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs={self.top_logprobs!r} must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs=true")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 1, or 0 or -1 (all tokens)")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens={self.min_tokens!r} must be an integer in [0, max_new_tokens]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(
                f"repetition_penalty={self.repetition_penalty!r} must be in (0, {MAX_REPETITION_PENALTY:g}]"
            )
        for token, bias in self.logit_bias:
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{token}]={bias!r} must be in [-100, 100]")


def filter_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
    """logits (B, V) -> float32 scores (B, V): divided by temperature, tokens outside the top k (top_k >= 1:
    those below the k-th score, as transformers' TopKLogitsWarper) and then outside the nucleus at -inf.

    The nucleus: sort ascending, drop every token whose cumulative probability is <= 1 - top_p; the
    most probable token is always kept, so a tiny top_p keeps exactly one token (among tied maxima,
    the one the sort puts last). top_p 1 keeps every token.
    """
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Rows beyond len(params) are padding and take argmax."""
    tokens = logits.argmax(dim=-1)
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature > 0:
            probs = filter_logits(logits[row : row + 1], p.temperature, p.top_p, p.top_k).softmax(dim=-1)
            tokens[row] = torch.multinomial(probs, 1, generator=gen)[0, 0]
    return tokens


def make_generator(p: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with the request's seed, or None for greedy requests."""
    if p.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(p.seed)
    return gen
