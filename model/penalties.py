"""Penalties, bias and min_tokens on the device, for the rows of a batch whose requests set them.

In vLLM's order, after a grammar's mask and before temperature, top-k and top-p:

- `min_tokens`: the end-of-sequence tokens are at -inf while fewer tokens were generated (transformers'
  MinNewTokensLengthLogitsProcessor);
- `logit_bias`: {token id: bias} added to the logits (OpenAI's field; ids checked at the request);
- `repetition_penalty` r over the prompt and the generated tokens: a token seen there has its logit
  divided by r when positive, multiplied by r when not (transformers' RepetitionPenaltyLogitsProcessor,
  vLLM's);
- `frequency_penalty` f and `presence_penalty` p over the generated tokens only: logit - f * count -
  p * (count > 0) (OpenAI's definition, vLLM's).

`Penalties` is built once per call for its rows: per-row counts of the generated tokens (R, V) and a
mask of the prompt's tokens stay on the device, and each step's sampled tokens are added there
(`advance`), so a multi-step call needs nothing from the host but which rows are still short of
their min_tokens.
"""

from __future__ import annotations

import torch

from model.sampling import SamplingParams


def penalized(p: SamplingParams) -> bool:
    """Whether a request needs `Penalties` (top-k is the sampler's: model/sampling.py)."""
    return bool(
        p.logit_bias or p.min_tokens or p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
    )


class Penalties:
    """The penalty state of the penalized rows of one call."""

    def __init__(
        self,
        params: list[SamplingParams],
        prompts: list[list[int]],
        outputs: list[list[int]],
        eos: list[frozenset[int]],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        """Row i of the batch has params[i], its prompt and output tokens so far, and its EOS ids."""
        self.rows = [i for i, p in enumerate(params) if penalized(p)]
        self.params = [params[i] for i in self.rows]
        self.generated = [len(outputs[i]) for i in self.rows]
        self.eos = [sorted(eos[i]) for i in self.rows]
        self.index = torch.tensor(self.rows, dtype=torch.long, device=device)
        n = len(self.rows)
        self.counts = torch.zeros(n, vocab_size, device=device)  # (R, V) generated tokens per row
        self.seen_in_prompt = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
        self.bias = torch.zeros(n, vocab_size, device=device)
        for j, i in enumerate(self.rows):
            if outputs[i]:
                tokens = torch.tensor(outputs[i], dtype=torch.long, device=device)
                self.counts[j].scatter_add_(0, tokens, torch.ones_like(tokens, dtype=self.counts.dtype))
            if self.params[j].repetition_penalty != 1.0:
                self.seen_in_prompt[j, torch.tensor(prompts[i], dtype=torch.long, device=device)] = True
            for token, value in self.params[j].logit_bias:
                self.bias[j, token] += value

        def column(name: str) -> torch.Tensor:  # (R, 1) of a per-row setting
            return torch.tensor([[getattr(p, name)] for p in self.params], dtype=torch.float32, device=device)

        self.repetition = column("repetition_penalty")
        self.frequency = column("frequency_penalty")
        self.presence = column("presence_penalty")

    def __bool__(self) -> bool:
        return bool(self.rows)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> a float32 copy with the penalized rows changed (the others as they were)."""
        scores = logits.float().index_select(0, self.index)  # (R, V)
        for j, p in enumerate(self.params):
            if self.generated[j] < p.min_tokens:
                scores[j, self.eos[j]] = float("-inf")
        scores = scores + self.bias
        seen = self.seen_in_prompt | (self.counts > 0)
        penalized_scores = torch.where(scores > 0, scores / self.repetition, scores * self.repetition)
        scores = torch.where(seen, penalized_scores, scores)
        scores = scores - self.frequency * self.counts - self.presence * (self.counts > 0).float()
        out = logits.float().clone()
        out[self.index] = scores
        return out

    def advance(self, chosen: torch.Tensor, live: list[bool]) -> None:
        """Count each penalized row's sampled token (chosen (B,)); `live[i]`: row i took it (it had not ended)."""
        taken = torch.tensor([live[i] for i in self.rows], dtype=self.counts.dtype, device=self.counts.device)
        self.counts.scatter_add_(1, chosen.index_select(0, self.index).unsqueeze(1), taken.unsqueeze(1))
        for j, i in enumerate(self.rows):
            self.generated[j] += int(live[i])
