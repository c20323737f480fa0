"""The Qwen2 text decoder with M-RoPE, reading and writing a static KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import TextConfig
from model.kv_cache import KVCache, write_rows
from model.layers import GatedMLP, RMSNorm
from model.npu_ops import PLAIN, DecodeOps
from model.parallel import (
    ParallelContext,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from model.rotary import MRotaryEmbedding, apply_rotary

Segment = tuple[int, int, int]  # (KV slot, first prompt position, length) of one packed prefill piece


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
        segments: list[Segment],
    ) -> torch.Tensor:
        """x (T, hidden): prompt pieces packed back to back, one per segment (slot, start, length).

        Each piece is written to its slot's cache at [start, start + length) and attends causally
        to everything its slot holds up to there, so a prompt may arrive in several chunks.
        """
        q, k, v = self._qkv(x)
        q = apply_rotary(q.transpose(0, 1), cos, sin)  # (H, T, D)
        k = apply_rotary(k.transpose(0, 1), cos, sin)  # (KVH, T, D)
        v = v.transpose(0, 1)
        outs = []
        offset = 0
        for slot, start, length in segments:
            rows = slice(offset, offset + length)
            offset += length
            end = start + length
            k_cache[slot, :, start:end] = k[:, rows]
            v_cache[slot, :, start:end] = v[:, rows]
            if start == 0:
                out = F.scaled_dot_product_attention(
                    q[None, :, rows], k[None, :, rows], v[None, :, rows], is_causal=True, enable_gqa=True
                )
            else:  # a later chunk: its queries see the slot's earlier tokens too
                keys = torch.arange(end, device=x.device)
                mask = keys[None, :] <= (start + torch.arange(length, device=x.device))[:, None]  # (length, end)
                out = F.scaled_dot_product_attention(
                    q[None, :, rows],
                    k_cache[None, slot, :, :end],
                    v_cache[None, slot, :, :end],
                    attn_mask=mask,
                    enable_gqa=True,
                )
            outs.append(out[0].transpose(0, 1).reshape(length, -1))  # (length, H * D)
        return self.o_proj(torch.cat(outs))

    def decode(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: torch.Tensor,
        mask: torch.Tensor,
        ops: DecodeOps = PLAIN,
    ) -> torch.Tensor:
        """x (B, hidden): one new token per slot 0..B-1, written at cache `rows` (KVCache.decode_rows).

        mask (B, L): which of the first L cache entries each row attends; only those L are read.
        """
        batch, length = mask.shape
        q, k, v = self._qkv(x)
        q, k = ops.rotary(q, k, cos, sin)
        write_rows(k_cache, rows, k)
        write_rows(v_cache, rows, v)
        keys, values = k_cache[:batch, :, :length], v_cache[:batch, :, :length]  # (B, KVH, L, D)
        return self.o_proj(ops.attention(q, keys, values, mask, self.head_dim**-0.5))


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
        self.cache: KVCache | None = None

    def attach_cache(self, cache: KVCache) -> None:
        self.cache = cache

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """embeds (T, hidden), positions (3, T) of packed prompt pieces -> final hidden states (T, hidden)."""
        assert self.cache is not None, "attach_cache() before prefill"
        cos, sin = self.rotary(positions, embeds.dtype)
        x = embeds
        for layer, k_cache, v_cache in zip(self.layers, self.cache.keys, self.cache.values):
            x = x + layer.self_attn.prefill(layer.input_layernorm(x), cos, sin, k_cache, v_cache, segments)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    decode_ops: DecodeOps = PLAIN  # ModelRunner(fused_ops=True) sets model/npu_ops.FusedOps

    def decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor, kv_len: int | None = None
    ) -> torch.Tensor:
        """input_ids, positions, cache_lens: (B,) -> final hidden states (B, hidden). Static shapes only.

        kv_len: how many cache entries attention reads (> every cache_lens[b]); None reads all of
        max_seq_len. Each residual add is fused with the norm after it (`add_rms_norm`), as the NPU
        kernels do; on the plain path that is the same arithmetic as add, then norm.
        """
        assert self.cache is not None, "attach_cache() before decode"
        ops = self.decode_ops
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.text_only(positions, x.dtype)
        span = torch.arange(self.cache.max_seq_len if kv_len is None else kv_len, device=x.device)
        mask = span[None, :] <= cache_lens[:, None]  # (B, L)
        rows = self.cache.decode_rows(cache_lens)
        residual = x
        h = ops.rms_norm(x, self.layers[0].input_layernorm.weight, self.layers[0].input_layernorm.eps)
        for i, (layer, k_cache, v_cache) in enumerate(zip(self.layers, self.cache.keys, self.cache.values)):
            if i:
                h, residual = ops.add_rms_norm(x, residual, layer.input_layernorm.weight, layer.input_layernorm.eps)
            x = layer.self_attn.decode(h, cos, sin, k_cache, v_cache, rows, mask, ops)
            norm = layer.post_attention_layernorm
            h, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
            x = layer.mlp(h, ops.silu_and_mul)
        return ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]
