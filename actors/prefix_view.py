"""A router's approximate view of each DP group's prefix cache, from the requests it sent there.

With one Coordinator actor per DP group (actors/router.py), the router cannot ask each group's
scheduler how much of a prompt its KV pool holds without a Ray call per group per request, and it
does not tokenize (that is the groups' work, spread over their processes). Instead, as SGLang's
router does, it keeps per group the requests it routed there, as text: a request's canonical text
(its messages or prompt, each image as a hash of its source and the processor settings that change
its pixels) is cut into chunks of `CHUNK_CHARS` characters, and each full chunk is keyed by a hash
chain over the chunks before it. A group's view is an LRU set of such keys, bounded to about what
its KV pool can hold; a new request's hit on a group is how many of its leading keys the view has.

The view is a heuristic for routing only: it can be stale (a group evicts blocks the router still
counts), and it never decides what a group computes, which the group's own prefix cache does exactly.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

CHUNK_CHARS = 64  # about 16 tokens of English text: one CPU/CUDA KV block
CHARS_PER_TOKEN = 4  # to size a view from a pool's tokens


def request_text(request: Any) -> str:
    """A request's prompt as canonical text: what the group's prefix cache keys on, before tokenization."""
    if not isinstance(request, dict):
        return ""
    parts = [f"<mm {_ident(request.get('mm_processor_kwargs'))}>"]
    messages = request.get("messages")
    if messages is not None:
        for message in messages if isinstance(messages, list) else []:
            if not isinstance(message, dict):
                continue
            parts.append(f"<{message.get('role')}>")
            content = message.get("content")
            for part in content if isinstance(content, list) else [content]:
                if isinstance(part, str):
                    parts.append(part)
                elif isinstance(part, dict) and part.get("type") == "text":
                    parts.append(str(part.get("text")))
                elif isinstance(part, dict):  # an image part
                    parts.append(f"<img {_ident(part.get('image_url', part.get('image')))}>")
    else:  # one user turn: the images, then the prompt
        images = request.get("images") or []
        parts.extend(f"<img {_ident(image)}>" for image in (images if isinstance(images, list) else [images]))
        parts.append(str(request.get("prompt")))
    return "".join(parts)


def _ident(value: Any) -> str:
    """A short stable identity of an image source or setting: its text, or a hash of its bytes."""
    if isinstance(value, (bytes, bytearray)):
        return hashlib.blake2b(value, digest_size=8).hexdigest()
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_ident(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(value, str) and len(value) > 256:  # a data: URL: its hash, not the whole text
        return hashlib.blake2b(value.encode(), digest_size=8).hexdigest()
    return repr(value) if value is None or isinstance(value, (str, int, float, bool)) else type(value).__name__


def chunk_keys(text: str) -> list[int]:
    """One key per full chunk of `text`, each a hash of the previous key and the chunk."""
    keys, key = [], 0
    for start in range(0, len(text) - CHUNK_CHARS + 1, CHUNK_CHARS):
        key = hash((key, text[start : start + CHUNK_CHARS]))
        keys.append(key)
    return keys


class PrefixView:
    """One group's recently routed chunk keys, least recently used first, at most `capacity` of them."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.keys: OrderedDict[int, None] = OrderedDict()

    @classmethod
    def for_pool(cls, num_blocks: int, block_size: int) -> PrefixView:
        """A view sized to a KV pool of `num_blocks` blocks of `block_size` tokens."""
        return cls(max(1, num_blocks * block_size * CHARS_PER_TOKEN // CHUNK_CHARS))

    def hit(self, keys: list[int]) -> int:
        """How many of `keys`, from the first, the view holds."""
        n = 0
        for key in keys:
            if key not in self.keys:
                break
            n += 1
        return n

    def add(self, keys: list[int]) -> None:
        """Record a request sent to this group (its keys become the most recently used)."""
        for key in keys:
            self.keys[key] = None
            self.keys.move_to_end(key)
        while len(self.keys) > self.capacity:
            self.keys.popitem(last=False)
