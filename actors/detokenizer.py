"""Incremental detokenization: each delivery's new token ids -> its new text, at a cost set by the new tokens.

As vLLM's incremental detokenizer does, only a window of ids is decoded at each delivery: from
`prefix` (the ids of the previous settled delivery, as context) to the end. Ids before `read` are
settled: the window's text up to there (`done_len` characters) was delivered before, and the text
of the ids that follow begins after it. This holds for a byte-level BPE tokenizer such as Qwen's,
whose text is the UTF-8 decoding of its tokens' bytes (with no clean-up of tokenization spaces,
as Qwen's tokenizer_config sets), cut at a character boundary.

A decoded text that ends in U+FFFD may end in a multi-byte character split over tokens: that last
character is held back until the next tokens complete it, or until the request ends (`flush`).
Only the last U+FFFD can still change (UTF-8 decoding replaces an earlier broken sequence as soon as
the next byte shows it broken), so all text before it is delivered at once; the pieces put together
are exactly ``decode(all ids)``. So that a run of tokens ending mid-character cannot make the window
grow without end, past MAX_HELD_TOKENS held tokens `read` moves to the last token boundary whose text
is settled.

`ids_for` says how many of a delivery's ids its first characters need (where a stop string ends): it
decodes the delivery's window once per id, so it costs what the delivery costs times its length, and
is asked once per request at most.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what decoding puts for an incomplete or invalid UTF-8 sequence
MAX_HELD_TOKENS = 8  # a UTF-8 character has at most 4 bytes; byte-level tokens carry at least one each


class IncrementalDetokenizer:
    """Turns a request's output ids into text, delivery by delivery.

    `decode` maps token ids to text (``PromptBuilder.decode``: special tokens skipped, ids beyond the
    tokenizer's vocabulary decode to ''). Each `add` decodes one window: the previous settled
    delivery's ids, the held ones (at most MAX_HELD_TOKENS and a delivery) and the new ones.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # the window's first id
        self.read = 0  # ids before this are settled
        self.done_len = 0  # characters of the window's text that ids[prefix:read] give
        self.sent = 0  # characters of the window's text delivered
        self.last = (0, 0, 0)  # the last `add`'s first id, and `prefix` and `sent` before it

    def add(self, new_ids: Sequence[int]) -> str:
        """The text `new_ids` complete: everything but a last character that may still be incomplete."""
        self.last = (len(self.ids), self.prefix, self.sent)
        self.ids.extend(new_ids)
        text = self._decode(self.ids[self.prefix :])
        held = text.endswith(REPLACEMENT)
        settled = text[:-1] if held else text
        out = settled[self.sent :]
        self.sent = max(self.sent, len(settled))
        if not held:
            self._settle(len(self.ids), len(text))
        elif len(self.ids) - self.read > MAX_HELD_TOKENS:
            for end in range(len(self.ids) - 1, self.read, -1):
                cut = self._decode(self.ids[self.prefix : end])
                if len(cut) >= self.done_len and settled.startswith(cut):
                    self._settle(end, len(cut))
                    break
        return out

    def ids_for(self, chars: int) -> int:
        """How many of the last `add`'s ids give the first `chars` characters of its text: the text of
        that many ids (added alone) would hold them, that of one fewer would not."""
        start, prefix, sent = self.last
        for n in range(1, len(self.ids) - start):
            text = self._decode(self.ids[prefix : start + n])
            if len(text) - text.endswith(REPLACEMENT) - sent >= chars:
                return n
        return len(self.ids) - start

    def flush(self) -> str:
        """The text still held back, once no more ids will come (U+FFFD for a character left incomplete)."""
        text = self._decode(self.ids[self.prefix :])
        out = text[self.sent :]
        self.sent = len(text)
        self._settle(len(self.ids), len(text))
        return out

    def _settle(self, end: int, end_len: int) -> None:
        """Ids up to `end` (whose text in the window has `end_len` characters) are settled; the window
        moves on to start at the old `read`."""
        self.prefix, self.read = self.read, end
        self.sent -= self.done_len
        self.done_len = end_len - self.done_len
