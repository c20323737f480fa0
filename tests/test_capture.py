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

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

import model.npu_ops
from cluster.tools.greedy_check import decode_step_logits
from model.processor import PreparedRequest
from model.runner import ModelRunner
from tests.npu_stand_in import FakeTorchNpu

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
    "fused, attention",
    [(False, None), (True, "paged"), (True, "paged_mask"), (True, "gather")],
    ids=["plain", "fused", "fused-mask", "fused-gather"],
)
def test_decode_has_no_host_sync_at_any_bucket(tiny_checkpoint: Path, fused: bool, attention: str, request) -> None:
    """The paged step takes its KV lengths as host ints from the caller (RunningBatch knows them): no read-back."""
    if fused:
        request.getfixturevalue("fake_npu")
    runner = _runner(tiny_checkpoint, fused, attention)
    assert runner.paged_decode == (attention in ("paged", "paged_mask"))
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


def test_rotary_gets_contiguous_inputs(fake_npu: FakeTorchNpu) -> None:
    """q and k are views into the fused qkv output, their rows strided by its width (Attention._qkv): the fused
    rotary hands npu_rotary_mul contiguous tensors (the stand-in asserts it) and gives the plain result."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim = 3, 4, 2, 8
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(batch, heads, dim), k.view(batch, kv_heads, dim)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = torch.randn(batch, dim, generator=gen), torch.randn(batch, dim, generator=gen)
    fused = model.npu_ops.decode_ops(fused=True).rotary(q, k, cos, sin)
    plain = model.npu_ops.PLAIN.rotary(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(fused, plain)) and fake_npu.calls["npu_rotary_mul"] == 2


@pytest.mark.parametrize("sequences, causal, calls", [(2049, False, 3), (1025, True, 2), (1024, False, 1)])
def test_varlen_calls_take_at_most_1024_sequences(
    fake_npu: FakeTorchNpu, sequences: int, causal: bool, calls: int
) -> None:
    """npu_fusion_attention takes at most 1K sequences in varlen mode (op-plugin's doc; the stand-in asserts
    it). The vision tower's windows of several images in one block go over that (8 images of 1,344 x 1,344
    pixels: 1,152 windows): FusedOps splits between sequences and gives per-sequence SDPA's result."""
    gen = torch.Generator().manual_seed(sequences)
    q_lens = torch.randint(1, 9, (sequences,), generator=gen)
    k_lens = q_lens + (torch.randint(0, 4, (sequences,), generator=gen) if causal else 0)  # a cached prefix
    cu_q = [0] + q_lens.cumsum(0).tolist()
    cu_k = [0] + k_lens.cumsum(0).tolist()
    heads, kv_heads, dim = 2, 1, 80  # the vision tower's head size, padded to 128 by the fused path
    q = torch.randn(cu_q[-1], heads, dim, generator=gen)
    k, v = torch.randn(2, cu_k[-1], kv_heads, dim, generator=gen)
    ours = model.npu_ops.decode_ops(fused=True).varlen_attention(q, k, v, cu_q, cu_k, dim**-0.5, causal)
    ref = model.npu_ops.PLAIN.varlen_attention(q, k, v, cu_q, cu_k, dim**-0.5, causal)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert fake_npu.calls["npu_fusion_attention"] == calls
