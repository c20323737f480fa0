"""Constrained decoding on the rank that samples: one llguidance matcher per constrained request.

A request's `SamplingParams.grammar` is an llguidance grammar (JSON text), compiled and checked once
per distinct schema by the Coordinator (actors/grammars.py). Here each rank keeps, per request, a
matcher of that grammar over the checkpoint's tokenizer: before a row samples, the matcher's bitmask
of allowed tokens sets every other logit to -inf; the sampled token then advances the matcher. Every
rank of a TP group samples the same token from the same logits, so their matchers stay in step
without a collective (docs/architecture.md, "Where the grammar matcher lives").

The mask covers the model's whole vocabulary (`vocab_size`, the logits' width): ids the tokenizer
does not have are never allowed, and the end-of-sequence tokens only where the grammar may end.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from pathlib import Path

import llguidance
import llguidance.hf
import torch
from transformers import AutoTokenizer

TEMPLATE_CACHE_SIZE = 256  # compiled matchers kept per rank (a new request copies one: no recompile)


class GrammarMatchers:
    """Matchers of one checkpoint's tokenizer; a compiled template per distinct grammar, copied per request."""

    def __init__(self, model_path: str | Path, vocab_size: int, eos_token_ids: list[int]) -> None:
        hf_tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    def matcher(self, grammar: str, tokens: list[int] = ()) -> llguidance.LLMatcher:
        """A fresh matcher of `grammar` that has consumed `tokens` (a resumed request's output so far).

        ValueError with the engine's message when the grammar does not compile or the tokens break it.
        """
        template = self.templates.get(grammar)
        if template is None:
            template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            if template.is_error():
                raise ValueError(f"grammar rejected: {template.get_error()}")
            self.templates[grammar] = template
            if len(self.templates) > TEMPLATE_CACHE_SIZE:
                self.templates.popitem(last=False)
        else:
            self.templates.move_to_end(grammar)
        matcher = template.deep_copy()
        if tokens and not matcher.consume_tokens(list(tokens)):
            raise ValueError(f"the generated tokens do not follow the grammar: {matcher.get_error()}")
        return matcher

    def allowed(self, matchers: list[llguidance.LLMatcher], device: torch.device) -> torch.Tensor:
        """(R, vocab_size) bool on `device`: the tokens each matcher allows next.

        The bitmasks are filled on the host (the matchers' work, which overlaps a forward already queued on
        an accelerator), copied once, and unpacked on the device. A matcher in an error state (it cannot be,
        as every sampled token is one it allowed) allows only the end-of-sequence tokens: its request ends.
        """
        words = (self.vocab_size + 31) // 32
        bits = torch.empty(len(matchers), words, dtype=torch.int32)
        for i, matcher in enumerate(matchers):
            row = bits[i]
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), words * 4)
            if matcher.is_error() or not row.any():
                row.zero_()
                for token in self.eos_token_ids:
                    bit = 1 << (token % 32)
                    row[token // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # as a signed int32
        packed = bits.to(device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        unpacked = (packed.unsqueeze(-1) >> shifts) & 1  # (R, words, 32): bit j of word w is token 32 w + j
        return unpacked.reshape(len(matchers), words * 32)[:, : self.vocab_size].bool()


@functools.cache
def matchers_for(model_path: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> GrammarMatchers:
    """The process's GrammarMatchers of a checkpoint (its tokenizer is converted once, ~1 s for Qwen's)."""
    return GrammarMatchers(model_path, vocab_size, list(eos_token_ids))


def mask_logits(logits: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> a copy with the tokens `allowed` (R, V) forbids at -inf in the rows `rows` (R,)."""
    masked = logits.clone()
    masked[rows] = logits.index_select(0, rows).masked_fill(~allowed, float("-inf"))
    return masked
