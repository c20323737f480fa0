"""Paged KV bookkeeping of one DP group: fixed-size blocks, block tables and a prefix cache (pure Python).

A request's KV lives in blocks of `block_size` positions; its block table lists them in order, so
position p is row p % block_size of block table[p // block_size]. Blocks are reference counted: a
block that holds a prefix shared by several requests is in each of their tables.

Prefix cache: a full block whose KV has been computed is registered under a key that chains the
key of the block before it, the block's token ids and the images behind its image tokens
(`block_hashes`). A new request whose leading keys are registered takes those blocks instead of
computing them. A registered block nobody uses stays cached until the free list runs dry; then
the least recently freed one is evicted (its key forgotten, the block reused).

A request with n > 1 choices (`share`): each further choice takes the full blocks of the first
choice's prompt (reference counted, as a prefix-cache hit does) and a block of its own for the
partial last one, whose contents the caller copies (copy-on-write: every choice writes its next
positions there).

Block 0 (`NULL_BLOCK`) is never handed out: the padding rows of a captured decode step, and the
positions a finished row of a multi-step call may still write, point at it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence

NULL_BLOCK = 0


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    images: Sequence[tuple[int, int, bytes]] = (),
    start: int = 0,
    parent: bytes | None = None,
) -> list[bytes]:
    """Keys of the full blocks of `token_ids[start:]`.

    `start` is a multiple of `block_size`; `parent` is the key of the block before `start` (None
    at 0). key_i = sha256(parent key, the block's token ids, the (start, end, content hash) of
    every image whose token span [start, end) overlaps the block). An image's content hash is of its
    processed pixels and patch grid (`model.vision_cache.image_key`), so the same text with a
    different image, or the same image processed with other settings, never shares a key from the
    first block that holds its image tokens on.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if start < 0 or start % block_size:
        raise ValueError(f"start={start} must be a non-negative multiple of block_size={block_size}")
    if (parent is None) != (start == 0):
        raise ValueError(f"parent must be given exactly when start > 0 (start={start})")
    spans = sorted(images)
    keys: list[bytes] = []
    prev = parent or b""
    for lo in range(start, len(token_ids) - block_size + 1, block_size):
        hi = lo + block_size
        h = hashlib.sha256()
        h.update(len(prev).to_bytes(1, "little") + prev)
        h.update(array("q", token_ids[lo:hi]).tobytes())
        for s, e, content in spans:
            if s >= hi:
                break
            if e > lo:
                h.update(s.to_bytes(8, "little") + e.to_bytes(8, "little"))
                h.update(len(content).to_bytes(4, "little") + content)
        prev = h.digest()
        keys.append(prev)
    return keys


class BlockPool:
    """Fixed-size KV blocks of one DP group: reference counts, a prefix cache of full blocks by key, LRU eviction.

    Blocks 1..num_blocks-1 are handed out (capacity = num_blocks - 1). A block is in exactly one
    of three places: held (reference count > 0, in the tables of its owners), evictable (cached,
    no user, in the LRU list) or free (uncached, no user, in the free list). With `caching=False`
    nothing is registered or reused. Counters (`hit_tokens`, `query_tokens`, `evictions`) are
    cumulative over the pool's life, `reset` included.
    """

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block {NULL_BLOCK} is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.capacity = num_blocks - 1
        self.caching = caching
        self.hit_tokens = 0
        self.query_tokens = 0
        self.evictions = 0
        self.reset()

    def reset(self) -> None:
        """Every block free, no table, nothing cached (the workers' caches were lost); counters kept."""
        self._ref = [0] * self.num_blocks
        self._free: deque[int] = deque(range(1, self.num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()  # evictable: oldest first
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._tables: dict[str, list[int]] = {}
        self._registered: dict[str, int] = {}  # owner -> leading blocks already offered to the cache

    # ----------------------------------------------------------------------------- queries
    def num_free(self) -> int:
        """Blocks that can be handed out now: free plus cached with no user."""
        return len(self._free) + len(self._lru)

    def cached_prefix(self, hashes: Sequence[bytes]) -> int:
        """How many leading `hashes` are in the cache (changes nothing)."""
        if not self.caching:
            return 0
        n = 0
        for key in hashes:
            if key not in self._by_key:
                break
            n += 1
        return n

    def table(self, owner: str) -> list[int]:
        """A copy of `owner`'s block table."""
        if owner not in self._tables:
            raise KeyError(f"no blocks held by {owner!r}")
        return list(self._tables[owner])

    def held(self, owner: str) -> int:
        """Blocks in `owner`'s table (0 when it holds none)."""
        return len(self._tables.get(owner, ()))

    def stats(self) -> dict[str, int]:
        """used, free (free + evictable), cached (registered, used or not) and the cumulative counters."""
        return {
            "used": self.capacity - self.num_free(),
            "free": self.num_free(),
            "cached": len(self._key_of),
            "hit_tokens": self.hit_tokens,
            "query_tokens": self.query_tokens,
            "evictions": self.evictions,
        }

    # ----------------------------------------------------------------------------- changes
    def allocate(self, owner: str, num_tokens: int, hashes: Sequence[bytes], reserve: int = 0) -> int | None:
        """Give a new owner blocks for `num_tokens`, reusing the longest cached prefix of `hashes`.

        At least one token is left to compute (a hit that would cover all of `num_tokens` drops its
        last block). Returns the tokens taken from the cache (a multiple of block_size), or None,
        with nothing changed, when there are not enough blocks, `reserve` more left free (the blocks
        the owner's choices then take through `share`).
        """
        if reserve < 0:
            raise ValueError(f"reserve must be >= 0, got {reserve}")
        if owner in self._tables:
            raise ValueError(f"{owner!r} already holds blocks")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        need = _blocks_for(num_tokens, self.block_size)
        limit = (num_tokens - 1) // self.block_size
        hits = [self._by_key[key] for key in hashes[: self.cached_prefix(hashes[:limit])]]
        idle_hits = sum(1 for b in hits if self._ref[b] == 0)
        if need - len(hits) + reserve > self.num_free() - idle_hits:
            return None
        for b in hits:
            if self._ref[b] == 0:
                del self._lru[b]
            self._ref[b] += 1
        table = hits + [self._take() for _ in range(need - len(hits))]
        self._tables[owner] = table
        self._registered[owner] = len(hits)
        self.query_tokens += num_tokens
        self.hit_tokens += len(hits) * self.block_size
        return len(hits) * self.block_size

    def share(self, owner: str, source: str, num_tokens: int) -> int | None:
        """Give a new owner the blocks of `source` that hold its first `num_tokens` positions: the full ones
        shared (reference counted), and for a partial last one a fresh block of its own, returned (None: no
        partial block) for the caller to copy `source`'s into. ValueError when no block is free for it."""
        if owner in self._tables:
            raise ValueError(f"{owner!r} already holds blocks")
        table = self._tables[source]
        full, need = num_tokens // self.block_size, _blocks_for(num_tokens, self.block_size)
        if need > len(table):
            raise ValueError(f"{source!r} holds {len(table)} blocks, not the {need} of {num_tokens} tokens")
        if need > full and not self.num_free():
            raise ValueError(f"{owner!r}: no free block for the copy of {source!r}'s partial block")
        for b in table[:full]:
            self._ref[b] += 1  # held by `source`, so never in the LRU list
        fresh = self._take() if need > full else None
        self._tables[owner] = table[:full] + ([] if fresh is None else [fresh])
        self._registered[owner] = 0
        return fresh

    def grow(self, owner: str, num_tokens: int) -> bool:
        """Make `owner`'s table cover `num_tokens`; False (nothing changed) when blocks are short."""
        table = self._tables[owner]
        need = _blocks_for(num_tokens, self.block_size) - len(table)
        if need <= 0:
            return True
        if need > self.num_free():
            return False
        table.extend(self._take() for _ in range(need))
        return True

    def cache(self, owner: str, hashes: Sequence[bytes]) -> None:
        """Register `owner`'s blocks[i] under hashes[i] for every i < len(hashes) not yet offered.

        Only full blocks whose KV has been computed may be passed. A key another block already holds
        keeps that block; the owner's copy stays unregistered (freed to the free list later).
        """
        if not self.caching:
            return
        table = self._tables[owner]
        if len(hashes) > len(table):
            raise ValueError(f"{owner!r}: {len(hashes)} keys for a table of {len(table)} blocks")
        for i in range(self._registered[owner], len(hashes)):
            b, key = table[i], hashes[i]
            if b in self._key_of:
                if self._key_of[b] != key:
                    raise ValueError(f"{owner!r}: block {b} is cached under another key")
                continue
            if key not in self._by_key:
                self._by_key[key] = b
                self._key_of[b] = key
        self._registered[owner] = max(self._registered[owner], len(hashes))

    def free(self, owner: str) -> None:
        """Drop `owner`'s references (no-op if it holds none).

        A block with no user left goes to the LRU list if cached, else to the free list; the table
        is walked from its tail, so a request's tail blocks are evicted before its head blocks.
        """
        table = self._tables.pop(owner, None)
        self._registered.pop(owner, None)
        for b in reversed(table or ()):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._key_of:
                    self._lru[b] = None
                else:
                    self._free.append(b)

    def _take(self) -> int:
        """One block for a new use: from the free list, else the least recently freed cached block."""
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._lru.popitem(last=False)
            del self._by_key[self._key_of.pop(b)]
            self.evictions += 1
        self._ref[b] = 1
        return b

    # ----------------------------------------------------------------------------- checks
    def check(self) -> None:
        """Raise AssertionError naming the block if any block is lost, double-held, both free and
        cached, or has a wrong reference count, or if the key maps disagree."""
        holders: Counter[int] = Counter()
        for owner, table in self._tables.items():
            if len(set(table)) != len(table):
                raise AssertionError(f"{owner!r} holds a block twice: {table}")
            holders.update(table)
        free = Counter(self._free)
        for b in (*free, *self._lru, *holders):
            if not 0 < b < self.num_blocks:
                raise AssertionError(f"block {b} is handed out or listed (only 1..{self.num_blocks - 1} may be)")
        for b in range(1, self.num_blocks):
            places = free[b] + (b in self._lru) + (holders[b] > 0)
            if places == 0:
                raise AssertionError(f"block {b} is lost: not free, not cached, not held")
            if places > 1:
                raise AssertionError(
                    f"block {b} is double-held: free list x{free[b]}, evictable {b in self._lru}, held by {holders[b]}"
                )
            if self._ref[b] != holders[b]:
                raise AssertionError(f"block {b} has reference count {self._ref[b]} but {holders[b]} holders")
            if free[b] and b in self._key_of:
                raise AssertionError(f"block {b} is both free and cached")
            if b in self._lru and b not in self._key_of:
                raise AssertionError(f"block {b} is evictable but not cached")
        for key, b in self._by_key.items():
            if self._key_of.get(b) != key:
                raise AssertionError(f"block {b}: the key maps disagree")
        if len(self._by_key) != len(self._key_of):
            raise AssertionError("the key maps disagree in size")
