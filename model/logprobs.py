"""Log-probabilities of sampled tokens, for the requests that ask (`SamplingParams.logprobs`).

The values are the model's raw log-probabilities, as vLLM v1's default (`raw_logprobs`) and OpenAI's
API give them: log-softmax of the logits in float32, before temperature and top-p. They are computed
on the device after the forward (outside any captured graph), only for the rows that ask, and read
back to the host after the sampled tokens, which every step reads already: no extra sync inside a step.

An entry per token is [logprob, [[token id, logprob], ...]]: the sampled token's value and the
`top_logprobs` most likely tokens in descending order (ties as `torch.topk` orders them). Lists, so that
they travel in a worker's step output as they are.
"""

from __future__ import annotations

import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from model.sampling import SamplingParams

Entry = list  # [logprob, [[token id, logprob], ...]]
FLOOR = -9999.0  # what OpenAI shows for a token of probability 0 (JSON has no -inf)


class LogprobRows:
    """The rows of a batch whose requests ask for log-probabilities, and how many top tokens each wants."""

    def __init__(self, params: list[SamplingParams], device: torch.device | str) -> None:
        self.asking = [i for i, p in enumerate(params) if p.logprobs]
        self.top = [params[i].top_logprobs for i in self.asking]
        self.k = max(self.top, default=0)
        self.index = torch.tensor(self.asking, dtype=torch.long, device=device) if self.asking else None

    def __bool__(self) -> bool:
        return bool(self.asking)

    def compute(self, logits: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """logits (B, V), chosen (B,) -> device tensors: the chosen tokens' logprobs (R,), top ids and logprobs
        (R, k), for the R asking rows. Queued on the device; `entries` reads them back."""
        logprobs = torch.log_softmax(logits.index_select(0, self.index).float(), dim=-1)  # (R, V)
        picked = logprobs.gather(1, chosen.index_select(0, self.index).unsqueeze(1)).squeeze(1)
        top_values, top_ids = logprobs.topk(self.k, dim=-1)  # (R, k); k may be 0
        return picked.clamp(min=FLOOR), top_ids, top_values.clamp(min=FLOOR)

    def entries(self, computed: tuple[torch.Tensor, ...]) -> dict[int, Entry]:
        """Row index -> its entry, from what `compute` queued."""
        picked, top_ids, top_values = (t.tolist() for t in computed)
        out: dict[int, Entry] = {}
        for j, (row, k) in enumerate(zip(self.asking, self.top)):
            out[row] = [picked[j], [[top_ids[j][i], top_values[j][i]] for i in range(k)]]
        return out


class TokenBytes:
    """A token id's bytes and text, as OpenAI's logprobs show them (`token`, `bytes`).

    A byte-level BPE token (Qwen's) maps back to its bytes through the byte-to-unicode table; an added
    token (control tokens such as <|im_end|>) is its own text. A token that is part of a multi-byte
    character shows its bytes escaped (``\\xe4``), as its text cannot be decoded alone. An id beyond the
    tokenizer's vocabulary (a model's padded rows) is '' with no bytes.
    """

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - a transformers tokenizer
        self.tokenizer = tokenizer
        self.byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self.added = {int(i): t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self.size = len(tokenizer)
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        """(text, bytes) of one token id."""
        known = self.cache.get(token_id)
        if known is not None:
            return known
        if token_id in self.added:
            raw = self.added[token_id].encode()
        elif 0 <= token_id < self.size:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            raw = b"".join(bytes([self.byte_of[c]]) if c in self.byte_of else c.encode() for c in piece)
        else:
            raw = b""
        known = (raw.decode("utf-8", errors="backslashreplace"), list(raw))
        self.cache[token_id] = known
        return known

    def record(self, token_id: int, entry: Entry) -> dict:
        """One token's OpenAI-shaped logprobs: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}."""
        logprob, top = entry
        text, raw = self(token_id)
        tops = []
        for other, value in top:
            other_text, other_raw = self(other)
            tops.append({"token": other_text, "logprob": value, "bytes": other_raw})
        return {"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": tops}
