"""A static, preallocated KV cache: one slot per concurrent request, written in place."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Per layer, keys and values of shape (max_batch, kv_heads_per_rank, max_seq_len, head_dim)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        max_batch: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        shape = (max_batch, kv_heads, max_seq_len, head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @property
    def max_batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.keys[0].shape[2]

    def decode_rows(self, cache_lens: torch.Tensor) -> torch.Tensor:
        """Rows of a layer's cache viewed as (max_batch * kv_heads * max_seq_len, head_dim) that the step
        writes: slot b, head h, index cache_lens[b]; shape (B * kv_heads,), slot-major like the new keys."""
        _, heads, seq, _ = self.keys[0].shape
        batch = cache_lens.shape[0]
        base = torch.arange(batch * heads, device=cache_lens.device).view(batch, heads) * seq
        return (base + cache_lens[:, None]).flatten()


def write_rows(cache: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> None:
    """cache (max_batch, heads, S, D) <- new (B, heads, D) at `rows` (KVCache.decode_rows).

    One index_copy_ with indices computed on the device: no host sync, no data-dependent shape, one
    kernel per cache, so it captures into CUDA and ACL graphs on both backends.
    """
    cache.view(-1, cache.shape[-1]).index_copy_(0, rows, new.reshape(-1, new.shape[-1]))
