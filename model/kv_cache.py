"""A paged KV cache: a pool of fixed-size blocks per layer, addressed through per-request block tables.

A request's KV lives in the blocks its block table lists, in order: token i sits in block
`table[i // block_size]` at offset `i % block_size`. Who owns which block is decided outside the model
(the scheduler's block pool, or `slot_tables` for in-process runs); the model only reads and writes
through the tables it is given. Block 0 is never given to a request: padding rows of a captured
decode step write there and nobody reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NULL_BLOCK = 0


@dataclass
class PagedKVCache:
    """Per layer, keys and values of shape (num_blocks, block_size, kv_heads, head_dim)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> PagedKVCache:
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"a KV pool needs num_blocks >= 2 and block_size >= 1, got {num_blocks} and {block_size}")
        shape = (num_blocks, block_size, kv_heads, head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Keys and values of one block over all layers, on one rank."""
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (source, destination) block's keys and values, every layer (copy-on-write of a block two
        requests would both write: the choices of an n > 1 request after their shared prompt)."""
        if not pairs:
            return
        device = self.keys[0].device
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=device)
        for cache in (*self.keys, *self.values):
            cache.index_copy_(0, dst, cache.index_select(0, src))

    @property
    def num_blocks(self) -> int:
        return self.keys[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.keys[0].shape[1]


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def slot_tables(num_slots: int, max_seq_len: int, block_size: int) -> list[list[int]]:
    """A fixed block table per slot, slot s owning blocks 1 + s*M .. (s+1)*M (M blocks of max_seq_len tokens).

    In-process runs (`ModelRunner.generate`, checks and tools) use these in place of a block pool.
    """
    per_slot = blocks_for(max_seq_len, block_size)
    return [list(range(1 + s * per_slot, 1 + (s + 1) * per_slot)) for s in range(num_slots)]


def cache_rows(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Rows of the cache viewed as (num_blocks * block_size, kv_heads, head_dim) that hold `positions`.

    block_tables (B, M), positions (B,) token indices -> (B,). Computed on the device (a gather, no host
    sync), so a captured decode step writes its new keys wherever the step's tables say.
    """
    blocks = torch.gather(block_tables, 1, (positions // block_size)[:, None])[:, 0]
    return blocks * block_size + positions % block_size


def write_rows(cache: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> None:
    """cache (num_blocks, block_size, heads, D) <- new (T, heads, D) at `rows` (T,).

    One index_copy_ with indices on the device: no host sync, no data-dependent shape, one kernel per
    cache, so it captures into CUDA and ACL graphs.
    """
    cache.view(-1, *cache.shape[2:]).index_copy_(0, rows, new)


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache (num_blocks, block_size, heads, D), block_tables (B, W) -> (B, W * block_size, heads, D).

    The first W * block_size positions of each row's sequence, contiguous (BSND).
    """
    batch, width = block_tables.shape
    _, size, heads, dim = cache.shape
    return cache.index_select(0, block_tables.reshape(-1)).view(batch, width * size, heads, dim)
