"""The decode step keeps the contract graph capture needs, checked on cpu.

- At every (batch bucket, decode length) the step runs under a dispatch mode that fails on any host
  sync or data-dependent shape, on the plain path and on the fused path: decode attention through
  block tables (FIA's paged mode, the KV lengths handed in as host ints) and the gather form.
- The step traced once (make_fx) and replayed with other tokens, positions and lengths gives the
  eager logits and KV cache exactly.
- The fused path, with a stand-in for torch_npu written from the kernels' documented semantics
  (and asserting their documented layouts), gives the plain path's logits (decode attention through
  block tables by default; tests/test_npu_paged.py has the paged step's own checks); that includes the vision
  tower's fused varlen attention (npu_fusion_attention, TND) for image prompts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

import model.npu_ops
from cluster.tools.greedy_check import decode_step_logits
from model.processor import PreparedRequest
from model.runner import ModelRunner

aten = torch.ops.aten
MAX_SEQ_LEN = 512  # decode lengths 256 and 512 (cpu eager)

# Ops whose output shape depends on data, or that read a value back to the host.
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.is_nonzero.default,
    aten.equal.default,
}


class HostSyncError(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Fails on ops that sync with the host or have data-dependent output shapes (by tag or by name)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tags = set(func.tags)
        if func in SYNC_OPS or torch.Tag.data_dependent_output in tags or torch.Tag.dynamic_output_shape in tags:
            raise HostSyncError(f"{func} syncs with the host or has a data-dependent shape")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """NoHostSync, plus the reads-back that skip the dispatcher on cpu tensors (tolist, numpy, cpu)."""

    def refuse(name: str) -> Callable[..., None]:
        def method(*args: object, **kwargs: object) -> None:
            raise HostSyncError(f"Tensor.{name} copies to the host")

        return method

    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}
    try:
        for name in saved:
            setattr(torch.Tensor, name, refuse(name))
        with NoHostSync():
            yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_guard_catches_syncs() -> None:
    x = torch.arange(4)
    for bad in (
        lambda: x[0].item(),
        lambda: x.tolist(),
        lambda: x.nonzero(),
        lambda: x[x > 1],
        lambda: bool(x[1]),
        lambda: x.cpu(),
        lambda: torch.unique(x),
    ):
        with pytest.raises(HostSyncError), no_host_sync():
            bad()


# ------------------------------------------------------------------------- torch_npu stand-in
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms(x: torch.Tensor, gamma: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    assert gamma.shape == x.shape[-1:], f"gamma {tuple(gamma.shape)} must match x's last dim {x.shape[-1]}"
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
    return (x.float() * rstd * gamma.float()).to(x.dtype), rstd


class FakeTorchNpu(SimpleNamespace):
    """torch_npu's decode kernels as their documentation defines them, asserting the documented layouts.

    npu_rms_norm(x, gamma, epsilon) -> (y, rstd); npu_add_rms_norm(x1, x2, gamma, epsilon) ->
    (y, rstd, x1 + x2); npu_rotary_mul(x, r1, r2) = x * r1 + rotate_half(x) * r2 on x (1, T, N, D), r1/r2 (1, T, 1, D);
    npu_swiglu(x, dim) = silu(first half) * second half (vllm-ascend's SiluAndMul);
    npu_fused_infer_attention_score(q, k, v, atten_mask=True-masks, num_heads, num_key_value_heads,
    scale, input_layout) -> (out, lse), with BSND = (batch, seq, heads, head_dim), contiguous inputs;
    with block_table, its paged mode (`_paged_fia`).
    """

    def __init__(self) -> None:
        super().__init__(calls={}, rotary_shapes=[], kv_lens_seen=[])

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def npu_rms_norm(self, x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
        self._count("npu_rms_norm")
        return _rms(x, gamma, epsilon)

    def npu_add_rms_norm(self, x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
        self._count("npu_add_rms_norm")
        assert x1.shape == x2.shape and x1.dtype == x2.dtype
        total = x1 + x2
        return (*_rms(total, gamma, epsilon), total)

    def npu_rotary_mul(self, x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
        self._count("npu_rotary_mul")
        assert x.dim() == 4 and r1.dim() == 4 and r1.shape == r2.shape, "x, r1, r2 must be 4-D"
        # vllm-ascend's unambiguous form: the tokens as one sequence, x (1, T, N, D), r1/r2 (1, T, 1, D).
        tokens, dim = x.shape[1], x.shape[3]
        assert x.shape[0] == 1 and r1.shape == (1, tokens, 1, dim), f"x {tuple(x.shape)}, r1 {tuple(r1.shape)}"
        self.rotary_shapes.append((tuple(x.shape), tuple(r1.shape)))
        return x * r1 + _rotate_half(x) * r2

    def npu_swiglu(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        self._count("npu_swiglu")
        a, b = x.chunk(2, dim=dim)
        return F.silu(a) * b

    def npu_fused_infer_attention_score(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        atten_mask: torch.Tensor | None = None,
        num_heads: int = 1,
        scale: float = 1.0,
        input_layout: str = "BSH",
        num_key_value_heads: int = 0,
        block_table: torch.Tensor | None = None,
        **paged: Any,
    ):
        self._count("npu_fused_infer_attention_score")
        if block_table is not None:
            assert atten_mask is None, "decode through block tables runs without a mask"
            return self._paged_fia(
                query, key, value, block_table, num_heads, num_key_value_heads, scale, input_layout, **paged
            )
        assert not paged, f"unexpected arguments {sorted(paged)}"
        assert input_layout == "BSND" and query.dim() == key.dim() == 4 and key.shape == value.shape
        assert query.is_contiguous() and key.is_contiguous() and value.is_contiguous()
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # BNSD
        batch, heads, q_len, dim = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        assert (heads, kv_heads) == (num_heads, num_key_value_heads) and heads % kv_heads == 0
        assert key.shape[0] == batch and key.shape[3] == dim and q_len == 1
        assert atten_mask is not None and atten_mask.dtype == torch.bool
        assert atten_mask.shape == (batch, 1, 1, kv_len)
        k = key.repeat_interleave(heads // kv_heads, dim=1)
        v = value.repeat_interleave(heads // kv_heads, dim=1)
        scores = (query.float() @ k.float().transpose(-1, -2)) * scale  # (B, N, 1, S)
        scores = scores.masked_fill(atten_mask, float("-inf"))
        lse = scores.logsumexp(-1, keepdim=True)
        out = ((scores - lse).exp() @ v.float()).to(query.dtype)  # (B, N, 1, D)
        return out.transpose(1, 2).contiguous(), lse

    def _paged_fia(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        block_table: torch.Tensor,
        num_heads: int,
        num_key_value_heads: int,
        scale: float,
        input_layout: str,
        *,
        block_size: int,
        actual_seq_lengths: list[int],
        actual_seq_lengths_kv: list[int],
        sparse_mode: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FIA's page-attention mode in TND layout, as op-plugin documents it and vllm-ascend calls it.

        query (T, N, D) contiguous; key/value (num_blocks, block_size, KV_N * D) (the cache, BSH per block);
        block_table (B, max_blocks) int32; actual_seq_lengths: host list of cumulative query ends (last = T);
        actual_seq_lengths_kv: host list of each request's KV length, len B (= block_table rows), each
        covered by its table row. Request b's KV position i is block block_table[b, i // block_size] at
        offset i % block_size. sparse_mode 0: every query of a request sees its whole KV.
        """
        assert input_layout == "TND" and query.dim() == 3 and query.is_contiguous()
        tokens, heads, dim = query.shape
        num_blocks, size, hidden = key.shape
        assert key.shape == value.shape and key.dtype == value.dtype == query.dtype
        assert block_size == size and block_size % 16 == 0 and 16 <= block_size <= 512, f"block_size={block_size}"
        assert heads == num_heads and hidden == num_key_value_heads * dim and heads % num_key_value_heads == 0
        assert block_table.dtype == torch.int32 and block_table.dim() == 2, f"block_table {block_table.dtype}"
        assert sparse_mode == 0
        for name, lens in (
            ("actual_seq_lengths", actual_seq_lengths),
            ("actual_seq_lengths_kv", actual_seq_lengths_kv),
        ):
            assert isinstance(lens, list) and all(type(n) is int for n in lens), f"{name} must be a host int list"
        batch = len(actual_seq_lengths)
        assert actual_seq_lengths[-1] == tokens and len(actual_seq_lengths_kv) == batch == block_table.shape[0]
        assert all(1 <= n <= block_table.shape[1] * size for n in actual_seq_lengths_kv)
        self.kv_lens_seen.append(list(actual_seq_lengths_kv))
        groups = heads // num_key_value_heads
        out, lse = torch.zeros_like(query), torch.zeros(tokens, heads, 1)
        for b, (qs, qe, kv_len) in enumerate(zip([0] + actual_seq_lengths, actual_seq_lengths, actual_seq_lengths_kv)):
            blocks = block_table[b, : -(-kv_len // size)].long()
            k = key.index_select(0, blocks).reshape(-1, num_key_value_heads, dim)[:kv_len]  # (L, KV_N, D)
            v = value.index_select(0, blocks).reshape(-1, num_key_value_heads, dim)[:kv_len]
            k = k.float().transpose(0, 1).repeat_interleave(groups, dim=0)  # (N, L, D)
            v = v.float().transpose(0, 1).repeat_interleave(groups, dim=0)
            scores = (query[qs:qe].float().transpose(0, 1) @ k.transpose(-1, -2)) * scale  # (N, Lq, L)
            row_lse = scores.logsumexp(-1, keepdim=True)
            out[qs:qe] = ((scores - row_lse).exp() @ v).transpose(0, 1).to(query.dtype)
            lse[qs:qe] = row_lse.transpose(0, 1)
        return out, lse

    def npu_fusion_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        head_num: int,
        input_layout: str,
        *,
        atten_mask: torch.Tensor | None = None,
        scale: float = 1.0,
        actual_seq_qlen: list[int] | None = None,
        actual_seq_kvlen: list[int] | None = None,
        sparse_mode: int = 0,
        **unused: object,
    ):
        """TND: query (T1, N1, D), key/value (T2, N2, D), sequences ending at actual_seq_qlen / actual_seq_kvlen
        (host lists of cumulative ends). sparse_mode 0 without a mask: full attention in each sequence;
        sparse_mode 3 with the 2048 x 2048 upper-triangular mask (True = masked): causal, bottom-right aligned.
        Returns (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, mask numel)."""
        self._count("npu_fusion_attention")
        assert not unused, f"unexpected arguments {sorted(unused)}"
        assert input_layout == "TND" and query.dim() == key.dim() == 3 and key.shape == value.shape
        assert query.is_contiguous() and key.is_contiguous() and value.is_contiguous()
        assert head_num == query.shape[1] and head_num % key.shape[1] == 0 and query.shape[2] == key.shape[2]
        assert isinstance(actual_seq_qlen, list) and isinstance(actual_seq_kvlen, list)
        assert len(actual_seq_qlen) == len(actual_seq_kvlen) and all(isinstance(n, int) for n in actual_seq_qlen)
        assert actual_seq_qlen[-1] == query.shape[0] and actual_seq_kvlen[-1] == key.shape[0]
        if sparse_mode == 3:
            assert atten_mask is not None and atten_mask.dtype == torch.bool and atten_mask.shape == (2048, 2048)
            assert torch.equal(atten_mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1))
        else:
            assert sparse_mode == 0 and atten_mask is None
        groups = head_num // key.shape[1]
        out = torch.zeros_like(query)
        for qs, qe, ks, ke in zip([0] + actual_seq_qlen, actual_seq_qlen, [0] + actual_seq_kvlen, actual_seq_kvlen):
            q = query[qs:qe].float().transpose(0, 1)  # (N1, Lq, D)
            k = key[ks:ke].float().transpose(0, 1).repeat_interleave(groups, dim=0)  # (N1, Lk, D)
            v = value[ks:ke].float().transpose(0, 1).repeat_interleave(groups, dim=0)
            scores = (q @ k.transpose(-1, -2)) * scale  # (N1, Lq, Lk)
            if sparse_mode == 3:  # query i sees keys up to i + (Lk - Lq)
                lq, lk = qe - qs, ke - ks
                hidden = torch.arange(lk)[None, :] > torch.arange(lq)[:, None] + (lk - lq)  # (Lq, Lk)
                scores = scores.masked_fill(hidden, float("-inf"))
            out[qs:qe] = (scores.softmax(-1) @ v).transpose(0, 1).to(query.dtype)
        return out, None, None, None, 0, 0, 0


@pytest.fixture
def fake_npu(monkeypatch: pytest.MonkeyPatch) -> FakeTorchNpu:
    fake = FakeTorchNpu()
    monkeypatch.setattr(model.npu_ops, "torch_npu_module", lambda: fake)
    return fake


# ------------------------------------------------------------------------- helpers
def _runner(path: Path, fused: bool = False, attention: str | None = None) -> ModelRunner:
    runner = ModelRunner(path, max_batch_size=4, max_seq_len=MAX_SEQ_LEN, fused_ops=fused, decode_attention=attention)
    gen = torch.Generator().manual_seed(0)
    for cache in runner.cache.keys + runner.cache.values:  # some history in every slot
        cache.copy_(torch.randn(cache.shape, generator=gen))
    return runner


def _inputs(runner: ModelRunner, batch: int, seed: int, longest: int) -> tuple[torch.Tensor, ...]:
    """Tokens, positions, cache lengths and block tables of `batch` rows; each row's blocks drawn at random
    from the pool (no block twice), so the step reads and writes through arbitrary tables."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, longest, (batch,), generator=gen)
    tokens = torch.randint(0, 200, (batch,), generator=gen)
    width = runner.max_blocks_per_seq
    blocks = 1 + torch.randperm(runner.cache.num_blocks - 1, generator=gen)[: batch * width]
    tables = blocks.view(batch, width)
    return tokens, lens + torch.randint(0, 9, (batch,), generator=gen), lens, tables  # positions = lens + delta


def _snapshot(runner: ModelRunner) -> list[torch.Tensor]:
    return [t.clone() for t in runner.cache.keys + runner.cache.values]


def _restore(runner: ModelRunner, saved: list[torch.Tensor]) -> None:
    for t, s in zip(runner.cache.keys + runner.cache.values, saved):
        t.copy_(s)


# ------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "fused, attention", [(False, None), (True, "paged"), (True, "gather")], ids=["plain", "fused", "fused-gather"]
)
def test_decode_has_no_host_sync_at_any_bucket(tiny_checkpoint: Path, fused: bool, attention: str, request) -> None:
    """The paged step takes its KV lengths as host ints from the caller (RunningBatch knows them): no read-back."""
    if fused:
        request.getfixturevalue("fake_npu")
    runner = _runner(tiny_checkpoint, fused, attention)
    assert runner.paged_decode == (attention == "paged")
    assert runner.decode_lengths == ([MAX_SEQ_LEN] if runner.paged_decode else [256, MAX_SEQ_LEN])
    with torch.inference_mode():
        for batch in runner.buckets:
            for length in runner.decode_lengths:
                tokens, positions, lens, tables = _inputs(runner, batch, seed=batch, longest=length)
                kv_lens = (lens + 1).tolist()
                with no_host_sync():
                    logits = runner.decode(
                        tokens, positions, lens, max_len=length, block_tables=tables, kv_lens=kv_lens
                    )
                assert logits.shape == (batch, runner.config.text.vocab_size)


def test_traced_decode_replays_like_eager(tiny_checkpoint: Path) -> None:
    runner = _runner(tiny_checkpoint)
    saved = _snapshot(runner)
    batch, length = 2, 256
    with torch.no_grad():
        traced = make_fx(lambda t, p, n, b: runner.model.decode(t, p, n, b, length))(*_inputs(runner, batch, 1, length))
        for seed in (2, 3):  # other tokens, positions, lengths and block tables than at tracing
            inputs = _inputs(runner, batch, seed, length)
            _restore(runner, saved)
            eager = runner.model.decode(*inputs, length)
            eager_cache = _snapshot(runner)
            _restore(runner, saved)
            replay = traced(*inputs)
            assert torch.equal(replay, eager)
            assert all(torch.equal(a, b) for a, b in zip(_snapshot(runner), eager_cache))
    # The trace baked in no host value: nothing in it reads a tensor back.
    assert not [n for n in traced.graph.nodes if n.target in SYNC_OPS]


def test_fused_ops_give_the_plain_logits(
    tiny_checkpoint: Path, fake_npu: FakeTorchNpu, prepared: Callable[[Path], dict[str, PreparedRequest]]
) -> None:
    plain, fused = ModelRunner(tiny_checkpoint, max_seq_len=MAX_SEQ_LEN), _runner(tiny_checkpoint, fused=True)
    continuation = [5, 17, 250, 3, 99, 42]
    for name in ("text", "one_image"):
        request = prepared(tiny_checkpoint)[name]
        ours = decode_step_logits(fused, request, continuation)
        ref = decode_step_logits(plain, request, continuation)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    layers = plain.config.text.num_hidden_layers
    steps = 2 * (len(continuation) - 1)
    assert fake_npu.calls == {
        "npu_rms_norm": steps,
        "npu_add_rms_norm": steps * 2 * layers,
        "npu_rotary_mul": steps * 2 * layers,
        "npu_swiglu": steps * layers,
        "npu_fused_infer_attention_score": steps * layers,
        # The image's encode (one varlen call per vision block) and each prompt's prefill (one per layer).
        "npu_fusion_attention": plain.config.vision.depth + 2 * layers,
    }


def test_rotary_layout_is_one_sequence_of_tokens(fake_npu: FakeTorchNpu) -> None:
    """FusedOps.rotary hands npu_rotary_mul x (1, T, N, D) and cos/sin (1, T, 1, D), and gives the plain result."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim = 3, 4, 2, 8
    q, k = torch.randn(batch, heads, dim, generator=gen), torch.randn(batch, kv_heads, dim, generator=gen)
    cos, sin = torch.randn(batch, dim, generator=gen), torch.randn(batch, dim, generator=gen)
    fused = model.npu_ops.decode_ops(fused=True).rotary(q, k, cos, sin)
    plain = model.npu_ops.PLAIN.rotary(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))
    assert fake_npu.rotary_shapes == [
        ((1, batch, heads, dim), (1, batch, 1, dim)),
        ((1, batch, kv_heads, dim), (1, batch, 1, dim)),
    ]
