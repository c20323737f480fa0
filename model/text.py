"""The Qwen2 text decoder with M-RoPE, reading and writing a paged KV cache through block tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from model.config import TextConfig
from model.kv_cache import PagedKVCache, cache_rows, gather_blocks, write_rows
from model.layers import GatedMLP, RMSNorm
from model.npu_ops import PLAIN, DecodeOps, DecodeReads
from model.parallel import (
    ParallelContext,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from model.rotary import MRotaryEmbedding, apply_rotary


@dataclass
class Piece:
    """One sequence's tokens in a packed forward: `length` tokens after its first `start` ones.

    table: the sequence's blocks covering its first start + length tokens (device, long).
    """

    start: int
    length: int
    table: torch.Tensor


@dataclass
class PackedBatch:
    """Where a packed forward's tokens go: their pieces in order, the cache row of every token (T,), and the
    cumulative query and key lengths of the pieces (host lists, for varlen attention)."""

    pieces: list[Piece]
    rows: torch.Tensor
    cu_q: list[int]
    cu_k: list[int]

    @classmethod
    def build(
        cls, pieces: list[tuple[int, int, list[int]]], block_size: int, device: torch.device | str
    ) -> PackedBatch:
        """From (start, length, block table) per piece, the table covering at least start + length tokens."""
        out, rows, cu_q, cu_k = [], [], [0], [0]
        for start, length, table in pieces:
            end = start + length
            blocks = torch.tensor(table[: -(-end // block_size)], dtype=torch.long)
            index = torch.arange(start, end)
            rows.append(blocks[index // block_size] * block_size + index % block_size)
            out.append(Piece(start, length, blocks.to(device)))
            cu_q.append(cu_q[-1] + length)
            cu_k.append(cu_k[-1] + end)
        return cls(out, torch.cat(rows).to(device), cu_q, cu_k)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=True,
            ctx=ctx,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim, config.hidden_size, bias=False, ctx=ctx
        )

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        n = x.shape[0]
        return (
            q.view(n, self.num_heads, self.head_dim),
            k.view(n, self.num_kv_heads, self.head_dim),
            v.view(n, self.num_kv_heads, self.head_dim),
        )

    def prefill(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        packed: PackedBatch,
        ops: DecodeOps = PLAIN,
    ) -> torch.Tensor:
        """x (T, hidden): pieces of several sequences packed back to back (see `PackedBatch`).

        Each piece's keys and values are written to its blocks; each piece attends causally to its
        sequence up to there (earlier chunks and cached prefix blocks included), through one varlen
        attention over all pieces (`ops.varlen_attention`: per-piece SDPA, or the NPU's fused kernel).
        A decode token in a mixed round is a piece of length 1.
        """
        q, k, v = self._qkv(x)
        q = apply_rotary(q.transpose(0, 1), cos, sin).transpose(0, 1)  # (T, H, D)
        k = apply_rotary(k.transpose(0, 1), cos, sin).transpose(0, 1)  # (T, KVH, D)
        write_rows(k_cache, packed.rows, k)
        write_rows(v_cache, packed.rows, v)
        keys, values = [], []
        offset = 0
        for piece in packed.pieces:
            if piece.start == 0:  # the whole sequence so far is in this piece: no cache read
                keys.append(k[offset : offset + piece.length])
                values.append(v[offset : offset + piece.length])
            else:  # earlier tokens too, read through its blocks
                end = piece.start + piece.length
                keys.append(gather_blocks(k_cache, piece.table[None])[0, :end])  # (end, KVH, D)
                values.append(gather_blocks(v_cache, piece.table[None])[0, :end])
            offset += piece.length
        scale = self.head_dim**-0.5
        out = ops.varlen_attention(q, torch.cat(keys), torch.cat(values), packed.cu_q, packed.cu_k, scale, True)
        return self.o_proj(out.reshape(x.shape[0], -1))  # (T, H * D)

    def decode(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: torch.Tensor,
        reads: DecodeReads,
        ops: DecodeOps = PLAIN,
    ) -> torch.Tensor:
        """x (B, hidden): one new token per row, written at cache `rows` (`cache_rows`).

        reads: the blocks and lengths attention reads (`DecodeOps.decode_reads`: gathered under a mask, or
        through the block tables in the kernel).
        """
        q, k, v = self._qkv(x)
        q, k = ops.rotary(q, k, cos, sin)
        write_rows(k_cache, rows, k)
        write_rows(v_cache, rows, v)
        return self.o_proj(ops.paged_attention(q, k_cache, v_cache, reads, self.head_dim**-0.5))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.self_attn = Attention(config, ctx)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=False, ctx=ctx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen2Model(nn.Module):
    """Embedding, decoder layers and final norm; the KV cache is attached with `attach_cache`."""

    def __init__(self, config: TextConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.layers = nn.ModuleList(DecoderLayer(config, ctx) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = MRotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section)
        self.cache: PagedKVCache | None = None
        self.decode_ops: DecodeOps = PLAIN  # ModelRunner(fused_ops=True) sets model/npu_ops.FusedOps

    def attach_cache(self, cache: PagedKVCache) -> None:
        self.cache = cache

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
        """embeds (T, hidden), positions (3, T) of packed pieces -> final hidden states (T, hidden)."""
        assert self.cache is not None, "attach_cache() before prefill"
        cos, sin = self.rotary(positions, embeds.dtype)
        x = embeds
        ops = self.decode_ops
        for layer, k_cache, v_cache in zip(self.layers, self.cache.keys, self.cache.values):
            x = x + layer.self_attn.prefill(layer.input_layernorm(x), cos, sin, k_cache, v_cache, packed, ops)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache_lens: torch.Tensor,
        block_tables: torch.Tensor,
        kv_len: int | None = None,
        kv_lens: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions, cache_lens: (B,); block_tables (B, M) -> final hidden states (B, hidden).

        Static shapes only. Row b's new token goes to position cache_lens[b] of its sequence. kv_len:
        how many positions the gather form of attention reads (> every cache_lens[b]; rounded up to whole
        blocks); None reads all M blocks. kv_lens: cache_lens + 1 as host ints, for the paged kernel (FusedOps
        with paged=True; ignored by the gather form). Each residual add is fused with the norm after it
        (`add_rms_norm`), as the NPU kernels do; on the plain path that is the same arithmetic as add, then norm.
        """
        assert self.cache is not None, "attach_cache() before decode"
        ops = self.decode_ops
        size = self.cache.block_size
        width = block_tables.shape[1] if kv_len is None else min(-(-kv_len // size), block_tables.shape[1])
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.text_only(positions, x.dtype)
        reads = ops.decode_reads(block_tables, cache_lens, size, width, kv_lens)
        rows = cache_rows(block_tables, cache_lens, size)
        residual = x
        h = ops.rms_norm(x, self.layers[0].input_layernorm.weight, self.layers[0].input_layernorm.eps)
        for i, (layer, k_cache, v_cache) in enumerate(zip(self.layers, self.cache.keys, self.cache.values)):
            if i:
                h, residual = ops.add_rms_norm(x, residual, layer.input_layernorm.weight, layer.input_layernorm.eps)
            x = layer.self_attn.decode(h, cos, sin, k_cache, v_cache, rows, reads, ops)
            norm = layer.post_attention_layernorm
            h, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
            x = layer.mlp(h, ops.silu_and_mul)
        return ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]
