"""The decode step's elementwise and attention ops: plain PyTorch, or NPU fused kernels.

`DecodeOps` is the plain path every backend runs. `FusedOps` calls the torch_npu kernels that
vllm-ascend uses for decode: npu_rms_norm / npu_add_rms_norm, npu_rotary_mul, npu_swiglu and
npu_fused_infer_attention_score. Both take and return the same shapes, so the decode step is
written once (model/text.py) and `ModelRunner(fused_ops=True)` swaps the implementation.

Shapes: x (B, hidden); q (B, H, D), k (B, KVH, D); cos/sin (B, D); keys/values (B, L, KVH, D) (BSND,
gathered from the paged cache through the step's block tables) with L the decode length; mask (B, L)
bool, True where a key is attended.

Decode attention over the paged cache (`paged_attention`, with `decode_reads` built once per step) comes in
two forms. Gather (the plain ops, and FusedOps with `paged=False`): copy the first L positions of every row
through its block table into a contiguous BSND tensor, then attend under the (B, L) mask. Paged (FusedOps,
the npu default): one npu_fused_infer_attention_score call per layer that reads the cache through the block
table (int32) itself, each row exactly its live KV length (`actual_seq_lengths_kv`, a host list), as
vllm-ascend's decode does; no copy, and no mask (`sparse_mode=0`), or with `masked_decode` vllm-ascend's
causal form of the same call (`sparse_mode=3` with its 2048 x 2048 int8 `triu(1)` mask).

`varlen_attention` is attention over sequences packed back to back in TND layout (tokens, heads,
head_dim), delimited by cumulative lengths: the vision tower's windows and full-attention frames,
and packed prefill. The plain path runs one SDPA per sequence; FusedOps calls npu_fusion_attention
with input_layout "TND" and actual_seq_qlen / actual_seq_kvlen, at most `MAX_VARLEN_SEQUENCES` sequences a
call (op-plugin's limit in varlen mode): the windows of a few large images are split over several calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from model.device import import_torch_npu
from model.kv_cache import gather_blocks
from model.rotary import apply_rotary

# How decode attention reads the paged cache with the fused ops (FusedOps): through the block tables in FIA
# without a mask, the same with vllm-ascend's causal mask, or gathered into a contiguous tensor first.
DECODE_ATTENTION = ("paged", "gather", "paged_mask")
# npu_fusion_attention takes at most this many sequences in varlen (TND) mode (op-plugin's API doc).
MAX_VARLEN_SEQUENCES = 1024
# Device types on which the plain varlen attention gives one-query sequences (decode tokens) one SDPA call
# each rather than one padded call together: on cpu the padded call's key gather and padding cost more than
# the calls it saves (docs/benchmarks.md, "Packed attention"); a launch per row is what costs elsewhere.
SINGLE_QUERY_LOOP = frozenset({"cpu"})


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm computed in float32, scaled by `weight` in the input dtype (as the reference model)."""
    dtype = x.dtype
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(dtype)


def check_cu_seqlens(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: Sequence[int], cu_seqlens_k: Sequence[int], causal: bool
) -> list[tuple[int, int, int, int]]:
    """(q start, q end, k start, k end) of each packed sequence; ValueError naming the bad list otherwise.

    cu_seqlens_*: host lists [0, end of sequence 0, end of sequence 1, ...] ending at the row count of
    q / k. With `causal`, no sequence may have more queries than keys (its queries are its last keys).
    """
    for name, cu, rows in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != rows or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{name}={list(cu)} must rise from 0 to the {rows} packed rows")
    if len(cu_seqlens_q) != len(cu_seqlens_k):
        raise ValueError(f"cu_seqlens_q={list(cu_seqlens_q)} and cu_seqlens_k={list(cu_seqlens_k)} differ in length")
    spans = [(qs, qe, ks, ke) for qs, qe, ks, ke in zip(cu_seqlens_q, cu_seqlens_q[1:], cu_seqlens_k, cu_seqlens_k[1:])]
    if causal and any(qe - qs > ke - ks for qs, qe, ks, ke in spans):
        raise ValueError(
            f"causal: a sequence has more queries than keys ({list(cu_seqlens_q)} vs {list(cu_seqlens_k)})"
        )
    return spans


@dataclass
class DecodeReads:
    """What a decode step's attention reads, built once per step (`DecodeOps.decode_reads`) for every layer.

    tables: block tables, (B, W) long for the gather (the first W blocks), (B, M) int32 for the paged kernel.
    mask: (B, W * block_size) bool, True where a gathered position is attended (gather only).
    kv_lens: each row's KV length including this step's token, a host list (paged only).
    """

    tables: torch.Tensor
    mask: torch.Tensor | None = None
    kv_lens: list[int] | None = None


class DecodeOps:
    """Plain PyTorch ops; every backend runs them."""

    name = "plain"
    paged = False  # attention gathers the blocks it reads (see the module docstring)

    def decode_reads(
        self,
        block_tables: torch.Tensor,
        cache_lens: torch.Tensor,
        block_size: int,
        width: int,
        kv_lens: Sequence[int] | None = None,
    ) -> DecodeReads:
        """The gather form: the first `width` blocks of each row, positions up to cache_lens[b] attended.

        block_tables (B, M) long, cache_lens (B,) on the device; computed there (no host sync). kv_lens is
        not needed here (the paged form's).
        """
        span = torch.arange(width * block_size, device=block_tables.device)
        return DecodeReads(block_tables[:, :width], span[None, :] <= cache_lens[:, None])  # mask (B, W * block_size)

    def paged_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, reads: DecodeReads, scale: float
    ) -> torch.Tensor:
        """q (B, H, D) over each row's KV in the caches (num_blocks, block_size, KVH, D) -> (B, H * D)."""
        keys, values = gather_blocks(k_cache, reads.tables), gather_blocks(v_cache, reads.tables)  # (B, L, KVH, D)
        return self.attention(q, keys, values, reads.mask, scale)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual): the residual add fused with the next norm."""
        total = x + residual
        return rms_norm(total, weight, eps), total

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q (B, H, D) and k (B, KVH, D) rotated in one pass over their H + KVH heads
        qk = apply_rotary(torch.cat([q, k], dim=1), cos[:, None], sin[:, None])
        return qk[:, : q.shape[1]], qk[:, q.shape[1] :]

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(first half) * second half of the last dim ([gate | up])."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """One query per row over its slot's keys -> (B, H * D). Grouped heads share a KV head.

        q (B, H, D), keys/values (B, L, KVH, D), mask (B, L): the positions each row attends."""
        batch, heads, dim = q.shape
        out = F.scaled_dot_product_attention(
            q[:, :, None],  # (B, H, 1, D)
            keys.transpose(1, 2),  # (B, KVH, L, D)
            values.transpose(1, 2),
            attn_mask=mask[:, None, None, :],
            scale=scale,
            enable_gqa=True,
        )
        return out.reshape(batch, heads * dim)

    def varlen_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: Sequence[int],
        cu_seqlens_k: Sequence[int],
        scale: float,
        causal: bool,
    ) -> torch.Tensor:
        """Attention within each packed sequence: q (Tq, H, D), k/v (Tk, KVH, D) -> (Tq, H, D).

        Sequence i has queries cu_seqlens_q[i]:cu_seqlens_q[i + 1] and keys cu_seqlens_k[i]:cu_seqlens_k[i + 1].
        `causal` aligns the mask bottom right: query j of a sequence with Lq queries and Lk keys sees keys
        up to Lk - Lq + j (a prompt chunk that follows cached tokens). Grouped heads share a KV head.

        One SDPA call per run of consecutive sequences of equal (Lq, Lk), the run as the batch of a 4-D view
        (no copy): a frame's windows, a tower's frames of one size. Off the cpu (`SINGLE_QUERY_LOOP`), runs
        of single queries (a mixed round's decode tokens, each over its own keys) are one call together when
        there are several: keys gathered into (G, max Lk) rows and masked past each row's length.
        """
        runs = equal_runs(check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, causal))
        singles = [run for run in runs if run[3] == 1 and run[4] > 0]
        if len(singles) > 1 and q.device.type not in SINGLE_QUERY_LOOP:  # together in one call
            runs = [run for run in runs if run not in singles]
        else:
            singles = []
        out = torch.empty_like(q) if len(runs) > 1 or singles else None
        for qs, ks, count, q_len, k_len in runs:
            if q_len == 0:
                continue
            mask = None
            if causal and q_len != k_len:
                keys = torch.arange(k_len, device=q.device)
                mask = keys[None, :] <= (k_len - q_len + torch.arange(q_len, device=q.device))[:, None]  # (Lq, Lk)
            o = F.scaled_dot_product_attention(
                *(
                    t[a : a + count * n].view(count, n, *t.shape[1:]).transpose(1, 2)  # (count, N, L, D)
                    for t, a, n in ((q, qs, q_len), (k, ks, k_len), (v, ks, k_len))
                ),
                attn_mask=mask,
                is_causal=causal and q_len == k_len,
                scale=scale,
                enable_gqa=True,
            ).transpose(1, 2)  # (count, L, N, D)
            if out is None:  # one run holds every query
                return o.reshape(q.shape)
            out[qs : qs + count * q_len] = o.reshape(count * q_len, *q.shape[1:])
        if singles:
            _single_queries(q, k, v, singles, scale, out)
        return out if out is not None else q.new_zeros(q.shape)


def equal_runs(spans: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int, int]]:
    """Maximal runs of consecutive sequences with equal (Lq, Lk): (q start, k start, count, Lq, Lk) each."""
    runs: list[tuple[int, int, int, int, int]] = []
    for qs, qe, ks, ke in spans:
        if runs and runs[-1][3:] == (qe - qs, ke - ks):
            first_q, first_k, count, q_len, k_len = runs[-1]
            runs[-1] = (first_q, first_k, count + 1, q_len, k_len)
        else:
            runs.append((qs, ks, 1, qe - qs, ke - ks))
    return runs


def _single_queries(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    runs: list[tuple[int, int, int, int, int]],
    scale: float,
    out: torch.Tensor,
) -> None:
    """Runs of one-query sequences (`equal_runs`) in one SDPA call, written into `out`: each query over its
    keys, padded to the longest and masked after its own (causal or not, one query sees its whole sequence)."""
    ones = [(qs + i, ks + i * k_len, k_len) for qs, ks, count, _, k_len in runs for i in range(count)]
    rows, starts, lens = (torch.tensor(column, device=q.device) for column in zip(*ones))
    span = torch.arange(int(lens.max()), device=q.device)
    mask = span[None, :] < lens[:, None]  # (G, Lmax)
    index = starts[:, None] + torch.minimum(span[None, :], lens[:, None] - 1)  # (G, Lmax), padding repeats a key
    o = F.scaled_dot_product_attention(
        q[rows][:, :, None],  # (G, H, 1, D)
        k[index].transpose(1, 2),  # (G, KVH, Lmax, D)
        v[index].transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    out[rows] = o[:, :, 0]


class FusedOps(DecodeOps):
    """torch_npu's fused kernels, with argument layouts as documented by torch_npu (op-plugin).

    `npu` is the torch_npu module (tests pass a stand-in written from the documented semantics).
    paged=True (the default): decode attention is one FIA call over the block tables with the rows' KV
    lengths as a host list (a captured graph rewrites them with `NPUGraph.update`, model/graph.py), without
    a mask (`sparse_mode=0`), or with `masked_decode` as vllm-ascend's decode calls it (`sparse_mode=3`, its
    2048 x 2048 int8 `triu(1)` mask; for one query per row the same attention).
    paged=False: the gather form, FIA over the keys gathered in BSND layout (contiguous) under a
    (B, 1, 1, L) mask, with nothing on the host; the way back if a device refuses the paged call.
    """

    name = "fused"

    # The compressed causal mask of npu_fusion_attention and FIA (sparse_mode 3, bottom-right aligned):
    # 2048 x 2048, 1 (True) = masked.
    CAUSAL_MASK_SIZE = 2048
    # Head sizes strictly between these are zero-padded to the larger, as vllm-ascend's encoder attention does
    # (the vision tower's 80); zeros change neither the scores nor, after slicing, the output.
    PAD_HEAD_DIM = (64, 128)

    def __init__(self, npu: ModuleType | Any, paged: bool = True, masked_decode: bool = False) -> None:
        self.npu = npu
        self.paged = paged
        self.masked_decode = masked_decode
        self.causal_masks: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.npu.npu_rms_norm(x, weight, eps)[0]  # -> (y, rstd)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, _, total = self.npu.npu_add_rms_norm(x, residual, weight, eps)  # -> (y, rstd, x1 + x2)
        return y, total

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # npu_rotary_mul infers its layout from the shapes, and (B, 1, N, D) with (B, 1, 1, D) is ambiguous.
        # vllm-ascend's form: the B tokens as one sequence, x (1, T, N, D) with cos/sin (1, T, 1, D). q and k
        # are views into the fused qkv output (rows strided by its width); the op's doc promises nothing for
        # non-contiguous inputs, so they are made contiguous first, as vllm-ascend does.
        cos, sin = cos[None, :, None].contiguous(), sin[None, :, None].contiguous()  # (1, B, 1, D)
        q = self.npu.npu_rotary_mul(q.contiguous().unsqueeze(0), cos, sin).squeeze(0)  # (1, B, H, D) -> (B, H, D)
        k = self.npu.npu_rotary_mul(k.contiguous().unsqueeze(0), cos, sin).squeeze(0)
        return q, k

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.npu.npu_swiglu(gate_up, dim=-1)

    def attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        batch, heads, dim = q.shape
        out, _ = self.npu.npu_fused_infer_attention_score(
            q.reshape(batch, 1, heads, dim),
            keys,
            values,
            atten_mask=~mask[:, None, None, :],  # (B, 1, 1, L), True = not attended
            num_heads=heads,
            num_key_value_heads=keys.shape[2],
            scale=scale,
            input_layout="BSND",
        )
        return out.reshape(batch, heads * dim)

    def decode_reads(
        self,
        block_tables: torch.Tensor,
        cache_lens: torch.Tensor,
        block_size: int,
        width: int,
        kv_lens: Sequence[int] | None = None,
    ) -> DecodeReads:
        """Paged: the whole (B, M) tables as int32 and `kv_lens` (B host ints >= 1; padded rows 1, over the null
        block). Without kv_lens (a caller that has no host lengths), or with paged=False: the gather form."""
        if not self.paged or kv_lens is None:
            return super().decode_reads(block_tables, cache_lens, block_size, width)
        lens = [int(n) for n in kv_lens]
        if len(lens) != block_tables.shape[0] or min(lens) < 1:
            raise ValueError(f"kv_lens={lens} must hold one length >= 1 per row of the {len(block_tables)}-row batch")
        return DecodeReads(block_tables.to(torch.int32), kv_lens=lens)

    def paged_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, reads: DecodeReads, scale: float
    ) -> torch.Tensor:
        """Paged: FIA in TND layout as vllm-ascend's decode calls it (attention_v1.py, `_get_fia_params` and the
        `npu_fused_infer_attention_score` calls of `forward_fused_infer_attention`): query (B, H, D), one query per
        row (actual_seq_lengths = cumulative ends 1..B), the caches viewed as (num_blocks, block_size, KVH * D),
        block_table (B, M) int32, block_size, actual_seq_lengths_kv = each row's KV length; no mask (sparse_mode
        0, its non-causal call) or, with `masked_decode`, the causal call (sparse_mode 3, 2048 x 2048 int8 mask)."""
        if reads.kv_lens is None:
            return super().paged_attention(q, k_cache, v_cache, reads, scale)
        batch, heads, dim = q.shape
        num_blocks, block_size, kv_heads, _ = k_cache.shape
        masking: dict[str, Any] = {"sparse_mode": 0}
        if self.masked_decode:
            masking = {"atten_mask": self._causal_mask(q.device, torch.int8), "sparse_mode": 3}
        out, _ = self.npu.npu_fused_infer_attention_score(
            q.contiguous(),
            k_cache.view(num_blocks, block_size, kv_heads * dim),
            v_cache.view(num_blocks, block_size, kv_heads * dim),
            block_table=reads.tables,
            input_layout="TND",
            block_size=block_size,
            actual_seq_lengths=list(range(1, batch + 1)),
            actual_seq_lengths_kv=reads.kv_lens,
            num_heads=heads,
            num_key_value_heads=kv_heads,
            scale=scale,
            **masking,
        )
        return out.reshape(batch, heads * dim)  # (B, H, D) -> (B, H * D)

    def varlen_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: Sequence[int],
        cu_seqlens_k: Sequence[int],
        scale: float,
        causal: bool,
    ) -> torch.Tensor:
        """npu_fusion_attention in TND layout; actual_seq_qlen / actual_seq_kvlen are the cumulative ends.

        At most MAX_VARLEN_SEQUENCES sequences per call: more (the windows of several large images in one
        block) are split between sequences into several calls, each over its own rows of q and k/v.
        """
        spans = check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, causal)
        dim = q.shape[-1]
        low, high = self.PAD_HEAD_DIM
        pad = high - dim if low < dim < high else 0
        q, k, v = (F.pad(t, (0, pad)) if pad else t.contiguous() for t in (q, k, v))
        masking: dict[str, Any] = {}
        if causal:
            masking = {"atten_mask": self._causal_mask(q.device, torch.bool), "sparse_mode": 3}
        parts = []
        for first in range(0, len(spans), MAX_VARLEN_SEQUENCES):
            chunk = spans[first : first + MAX_VARLEN_SEQUENCES]
            q0, k0, q1, k1 = chunk[0][0], chunk[0][2], chunk[-1][1], chunk[-1][3]
            if q1 == q0:  # no queries in these sequences (the kernel takes at least one row)
                continue
            out = self.npu.npu_fusion_attention(
                q[q0:q1],
                k[k0:k1],
                v[k0:k1],
                head_num=q.shape[1],
                input_layout="TND",
                scale=scale,
                actual_seq_qlen=[qe - q0 for _, qe, _, _ in chunk],
                actual_seq_kvlen=[ke - k0 for _, _, _, ke in chunk],
                **masking,
            )[0]
            parts.append(out)
        if len(parts) != 1:  # several calls (or none: no query rows at all)
            parts = [torch.cat(parts) if parts else q.new_zeros(q.shape)]
        return parts[0][..., :dim] if pad else parts[0]

    def _causal_mask(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The compressed causal mask, one per device and dtype: bool for npu_fusion_attention (its doc's
        example), int8 for decode FIA (vllm-ascend's `get_splitfuse_attn_mask`)."""
        if (device, dtype) not in self.causal_masks:
            size = self.CAUSAL_MASK_SIZE
            mask = torch.ones(size, size, dtype=torch.bool, device=device).triu(1)
            self.causal_masks[device, dtype] = mask.to(dtype)
        return self.causal_masks[device, dtype]


PLAIN = DecodeOps()


def torch_npu_module() -> ModuleType:
    """The torch_npu module whose kernels FusedOps calls (imported on first use)."""
    return import_torch_npu()


def decode_ops(fused: bool, attention: str | None = None) -> DecodeOps:
    """The ops the decode step runs: FusedOps over torch_npu when `fused`, else the plain ones.

    attention: how decode attention reads the paged cache with the fused ops, "paged" (None: the default),
    "paged_mask" (the same FIA call with vllm-ascend's causal mask) or "gather"; the plain ops always gather,
    and a paged form without `fused` is a ValueError.
    """
    if attention is not None and attention not in DECODE_ATTENTION:
        raise ValueError(f"decode_attention={attention!r} must be one of {', '.join(DECODE_ATTENTION)} (or null)")
    if attention in ("paged", "paged_mask") and not fused:
        raise ValueError(f"decode_attention={attention!r} needs fused_ops: the paged kernel is the NPU's FIA")
    if not fused:
        return PLAIN
    return FusedOps(torch_npu_module(), paged=attention != "gather", masked_decode=attention == "paged_mask")
