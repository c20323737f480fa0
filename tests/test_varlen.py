"""Varlen attention (TND, cumulative lengths) against one SDPA per sequence, on cpu.

The NPU path runs through the torch_npu stand-in of tests/test_capture.py (npu_fusion_attention as
documented), the plain path through SDPA per run of equal sequences (and per decode token, or padded
decode tokens together); both must give what one SDPA per sequence gives for the vision tower's window
and full-attention blocks, for the text model's packed prefill, and for random packed layouts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import npu_ops
from model.npu_ops import PLAIN, FusedOps, check_cu_seqlens, equal_runs
from model.rotary import apply_rotary
from model.runner import ModelRunner
from model.text import PackedBatch
from model.vision import grouped_attention, run_offsets, vision_layout
from tests.test_capture import FakeTorchNpu

# Two images and a two-frame video: windows cut by the edges, frames of several sizes.
GRIDS = torch.tensor([[1, 20, 28], [1, 16, 16], [2, 12, 20]])


@pytest.fixture
def fused() -> FusedOps:
    return FusedOps(FakeTorchNpu())


@pytest.mark.parametrize("block", ["window", "full"])
@pytest.mark.parametrize("head_dim", [80, 16])  # 80 (the 72B's vision heads) is padded to 128 for the kernel
def test_vision_blocks(fused: FusedOps, block: str, head_dim: int) -> None:
    layout = vision_layout(GRIDS, spatial_merge_size=2, window_size=112, patch_size=14)
    runs = layout.window_runs if block == "window" else layout.frame_runs
    rows = int(GRIDS.prod(-1).sum())
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(rows, 3, 4, head_dim, generator=gen)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # strided views, as the tower passes them
    offsets = run_offsets(runs)
    expected = per_sequence(q, k, v, offsets, offsets, causal=False, scale=head_dim**-0.5)
    for ops in (PLAIN, fused):
        torch.testing.assert_close(grouped_attention(q, k, v, runs, ops), expected, atol=1e-5, rtol=1e-5)
    assert fused.npu.calls == {"npu_fusion_attention": 1}
    assert len(offsets) == 1 + sum(count for _, count, _ in runs)


def test_packed_prefill(tiny_checkpoint: Path, fused: FusedOps) -> None:
    """Layer 0's packed prefill (a first chunk, a later chunk over cached tokens, a decode token, another first
    chunk) through varlen attention, plain and fused, against per-piece SDPA over each sequence's keys."""
    runner = ModelRunner(tiny_checkpoint, max_batch_size=4, max_seq_len=64)
    attn = runner.model.model.layers[0].self_attn
    k_cache, v_cache = runner.cache.keys[0], runner.cache.values[0]
    gen = torch.Generator().manual_seed(1)
    for cache in (k_cache, v_cache):
        cache.copy_(torch.randn(cache.shape, generator=gen))
    saved = k_cache.clone(), v_cache.clone()
    layout = [(0, 5, runner.slot_table(0)), (7, 4, runner.slot_table(1)), (20, 1, runner.slot_table(2))]
    layout.append((0, 3, runner.slot_table(3)))  # (start, length, block table)
    total = sum(length for _, length, _ in layout)
    x = torch.randn(total, runner.config.text.hidden_size, generator=gen)
    positions = torch.randint(0, 30, (3, total), generator=gen)
    size = runner.block_size
    with torch.inference_mode():
        cos, sin = runner.model.model.rotary(positions, x.dtype)
        packed = PackedBatch.build(layout, size, "cpu")
        outs = {}
        for ops in (PLAIN, fused):
            k_cache.copy_(saved[0])
            v_cache.copy_(saved[1])
            outs[ops.name] = attn.prefill(x, cos, sin, k_cache, v_cache, packed, ops)
        # Reference: each piece's keys written at its positions, then SDPA over the sequence up to there.
        k_cache.copy_(saved[0])
        v_cache.copy_(saved[1])
        q, k, v = attn._qkv(x)
        q = apply_rotary(q.transpose(0, 1), cos, sin)  # (H, T, D)
        k = apply_rotary(k.transpose(0, 1), cos, sin).transpose(0, 1)  # (T, KVH, D)
        ref, offset = [], 0
        for start, length, table in layout:
            end = start + length
            flat = [table[i // size] * size + i % size for i in range(end)]
            for cache, new in ((k_cache, k), (v_cache, v)):
                cache.view(-1, *cache.shape[2:])[flat[start:]] = new[offset : offset + length]
            keys = k_cache.view(-1, *k_cache.shape[2:])[flat].transpose(0, 1)[None]  # (1, KVH, end, D)
            values = v_cache.view(-1, *v_cache.shape[2:])[flat].transpose(0, 1)[None]
            mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]  # (length, end)
            out = F.scaled_dot_product_attention(
                q[None, :, offset : offset + length], keys, values, attn_mask=mask, enable_gqa=True
            )
            ref.append(out[0].transpose(0, 1).reshape(length, -1))
            offset += length
        expected = attn.o_proj(torch.cat(ref))
    for name, out in outs.items():
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=name)
    assert fused.npu.calls == {"npu_fusion_attention": 1}


def test_bad_cumulative_lengths() -> None:
    q, k = torch.zeros(6, 2, 4), torch.zeros(8, 1, 4)
    assert check_cu_seqlens(q, k, [0, 2, 6], [0, 4, 8], causal=True) == [(0, 2, 0, 4), (2, 6, 4, 8)]
    with pytest.raises(ValueError, match=r"cu_seqlens_q=\[0, 2, 5\] must rise from 0 to the 6 packed rows"):
        check_cu_seqlens(q, k, [0, 2, 5], [0, 4, 8], causal=False)
    with pytest.raises(ValueError, match=r"cu_seqlens_k=\[1, 8\]"):
        check_cu_seqlens(q, k, [0, 6], [1, 8], causal=False)
    with pytest.raises(ValueError, match="differ in length"):
        check_cu_seqlens(q, k, [0, 2, 6], [0, 8], causal=False)
    with pytest.raises(ValueError, match="more queries than keys"):
        check_cu_seqlens(q, k, [0, 5, 6], [0, 4, 8], causal=True)


def per_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    causal: bool,
    scale: float = 0.125,
) -> torch.Tensor:
    """The reference: one SDPA per sequence, the causal mask built bottom right as a full (Lq, Lk) matrix."""
    out = torch.zeros_like(q)
    for qs, qe, ks, ke in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        if qe == qs:
            continue
        q_len, k_len = qe - qs, ke - ks
        mask = torch.arange(k_len)[None, :] <= (k_len - q_len + torch.arange(q_len))[:, None] if causal else None
        o = F.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1)[None] for t, a, b in ((q, qs, qe), (k, ks, ke), (v, ks, ke))),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[qs:qe] = o[0].transpose(0, 1)
    return out


# (Lq, Lk) per sequence: equal runs (windows), a chunk over cached tokens, empty pieces, decode tokens of
# different lengths between and after longer pieces, equal decode tokens side by side.
LAYOUTS = {
    "windows": [(16, 16)] * 6 + [(8, 8)] * 3 + [(12, 12)],
    "one_run": [(16, 16)] * 4,
    "unequal": [(5, 5), (3, 9), (7, 7), (2, 2), (4, 11)],
    "empty": [(0, 0), (6, 6), (0, 3), (0, 0), (4, 4), (4, 4)],
    "mixed_round": [(24, 24), (6, 14), (1, 9), (1, 30), (1, 30), (1, 2), (3, 3), (1, 17), (1, 1)],
    "decode_only": [(1, 5), (1, 12), (1, 7), (1, 7)],
    "one_decode": [(9, 9), (1, 20)],
}


@pytest.mark.parametrize("padded", [False, True])  # decode tokens one call each (cpu), or padded together
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])  # (H, KVH): plain and grouped-query heads
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_plain_against_per_sequence(
    layout: str, causal: bool, heads: tuple[int, int], padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain path (runs of equal sequences batched, decode tokens one call each or padded into one call)
    equals one SDPA per sequence on random packed inputs."""
    if padded:
        monkeypatch.setattr(npu_ops, "SINGLE_QUERY_LOOP", frozenset())
    lengths = LAYOUTS[layout]
    cu_q, cu_k = [0], [0]
    for q_len, k_len in lengths:
        cu_q.append(cu_q[-1] + q_len)
        cu_k.append(cu_k[-1] + k_len)
    gen = torch.Generator().manual_seed(len(lengths) + 10 * causal + heads[0])
    q = torch.randn(cu_q[-1], heads[0], 16, generator=gen)
    k, v = (torch.randn(cu_k[-1], heads[1], 16, generator=gen) for _ in range(2))
    expected = per_sequence(q, k, v, cu_q, cu_k, causal)
    torch.testing.assert_close(
        PLAIN.varlen_attention(q, k, v, cu_q, cu_k, 0.125, causal), expected, atol=1e-5, rtol=1e-5
    )


def test_runs_of_equal_sequences() -> None:
    spans = check_cu_seqlens(
        torch.zeros(10, 1, 1), torch.zeros(16, 1, 1), [0, 2, 4, 5, 6, 10], [0, 2, 4, 7, 10, 16], True
    )
    assert equal_runs(spans) == [(0, 0, 2, 2, 2), (4, 4, 2, 1, 3), (6, 10, 1, 4, 6)]
