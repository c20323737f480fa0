"""A byte-bounded LRU cache of image embeddings, keyed by the processed pixels and the grid.

The same image sent again (the same processed pixels at the same grid) reuses the embeddings the
vision tower computed for it. The key hashes the exact pixel bytes, so an image resized or
processed differently is a different entry. The cache is deterministic: ranks that see the same
sequence of images make the same hit/miss decisions and hold the same entries, which keeps the
collectives of data-parallel vision matched across a tensor-parallel group.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


def image_key(pixels: torch.Tensor, grid: torch.Tensor) -> bytes:
    """SHA-256 over one image's grid (t, h, w), its pixel dtype and shape, and its pixel bytes."""
    h = hashlib.sha256()
    h.update(repr((tuple(int(v) for v in grid.tolist()), str(pixels.dtype), tuple(pixels.shape))).encode())
    data = pixels.detach().to("cpu").contiguous().reshape(-1)
    h.update(memoryview(data.view(torch.uint8).numpy()))
    return h.digest()


class VisionCache:
    """Embeddings by image key, least recently used evicted first, at most `max_bytes` held.

    `get` and `put` move an entry to the most recent end. An embedding larger than the whole
    budget is not stored. Stored tensors must not be modified by the caller afterwards.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"vision cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> torch.Tensor | None:
        """The embeddings stored under `key` (counted as a hit), or None (counted as a miss)."""
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def record_hit(self) -> None:
        """Count a hit served without a lookup (the same image met twice in one batch)."""
        self.hits += 1

    def put(self, key: bytes, value: torch.Tensor) -> None:
        """Store `value` under `key`, evicting least recently used entries to stay within the budget."""
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        while self._entries and self.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
        self._entries[key] = value
        self.bytes += size

    def stats(self) -> dict[str, int]:
        """Cumulative hits and misses, and the bytes and entries held now."""
        return {"hits": self.hits, "misses": self.misses, "bytes": self.bytes, "entries": len(self._entries)}
