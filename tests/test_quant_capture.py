"""The quantized decode step keeps the capture contract (tests/test_capture.py's checks), plain and fused.

Plain: the cpu int8 kernel; fused: the NPU path (fused decode ops and npu_quantize / npu_dynamic_quant /
npu_quant_matmul) through a torch_npu stand-in written from the kernels' documented semantics.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import model.npu_ops
from cluster.tools.greedy_check import decode_step_logits
from model.processor import PromptBuilder
from model.quant import DYNAMIC, STATIC, use_backend
from model.quantize import quantize_checkpoint
from model.runner import ModelRunner
from tests.npu_stand_in import FakeQuantNpu
from tests.test_capture import SYNC_OPS, _inputs, _restore, _snapshot, no_host_sync

MAX_SEQ_LEN = 256


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized-capture")
    for name, scheme in (("static", STATIC), ("dynamic", DYNAMIC)):
        quantize_checkpoint(tiny_checkpoint, root / name, scheme)
    return {"static": root / "static", "dynamic": root / "dynamic"}


@pytest.fixture
def fake_npu(monkeypatch: pytest.MonkeyPatch) -> FakeQuantNpu:
    fake = FakeQuantNpu()
    monkeypatch.setattr(model.npu_ops, "torch_npu_module", lambda: fake)
    return fake


def _runner(path: Path, fused: bool) -> ModelRunner:
    runner = ModelRunner(path, max_batch_size=4, max_seq_len=MAX_SEQ_LEN, fused_ops=fused)
    if fused:
        use_backend(runner.model, "npu")
    gen = torch.Generator().manual_seed(0)
    for cache in runner.cache.keys + runner.cache.values:
        cache.copy_(torch.randn(cache.shape, generator=gen))
    return runner


@pytest.mark.parametrize("scheme", ["static", "dynamic"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_quantized_decode_has_no_host_sync(quantized: dict[str, Path], scheme: str, fused: bool, request) -> None:
    fake = request.getfixturevalue("fake_npu") if fused else None
    runner = _runner(quantized[scheme], fused)
    with torch.inference_mode():
        for batch in runner.buckets:
            for length in runner.decode_lengths:
                tokens, positions, lens, tables = _inputs(runner, batch, seed=batch, longest=length)
                kv_lens = (lens + 1).tolist()  # host lengths, as the batch passes them (the paged kernel's)
                with no_host_sync():
                    logits = runner.decode(
                        tokens, positions, lens, max_len=length, block_tables=tables, kv_lens=kv_lens
                    )
                assert logits.shape == (batch, runner.config.text.vocab_size)
    if fake is not None:
        layers = runner.config.text.num_hidden_layers
        quantize = "npu_quantize" if scheme == "static" else "npu_dynamic_quant"
        steps = len(runner.buckets) * len(runner.decode_lengths)
        assert fake.calls[quantize] == fake.calls["npu_quant_matmul"] == steps * 4 * layers


@pytest.mark.parametrize("scheme", ["static", "dynamic"])
def test_traced_quantized_decode_replays_like_eager(quantized: dict[str, Path], scheme: str) -> None:
    runner = _runner(quantized[scheme], fused=False)
    saved = _snapshot(runner)
    batch, length = 2, MAX_SEQ_LEN
    with torch.no_grad():
        traced = make_fx(lambda t, p, n, b: runner.model.decode(t, p, n, b, length))(*_inputs(runner, batch, 1, length))
        for seed in (2, 3):
            inputs = _inputs(runner, batch, seed, length)
            _restore(runner, saved)
            eager = runner.model.decode(*inputs, length)
            _restore(runner, saved)
            assert torch.equal(traced(*inputs), eager)
    assert not [n for n in traced.graph.nodes if n.target in SYNC_OPS]


@pytest.mark.parametrize("scheme", ["static", "dynamic"])
def test_npu_path_gives_the_dequantized_logits(quantized: dict[str, Path], scheme: str, fake_npu: FakeQuantNpu) -> None:
    """The NPU kernels (stand-in, exact) and the float arithmetic of the same int8 values agree."""
    path = quantized[scheme]
    plain = ModelRunner(path, max_seq_len=MAX_SEQ_LEN)
    use_backend(plain.model, "dequant")
    fused = _runner(path, fused=True)
    request = PromptBuilder.from_pretrained(path).build({"id": "a", "prompt": "Describe the weather."})
    continuation = [5, 17, 250, 3, 99, 42]
    ours, ref = decode_step_logits(fused, request, continuation), decode_step_logits(plain, request, continuation)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
