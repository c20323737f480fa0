"""NPU decode attention through block tables (FIA's paged mode), checked on cpu with stand-ins.

- The paged decode step (FusedOps, paged, without a mask or with vllm-ascend's causal mask) with a torch_npu
  stand-in that implements FIA's page-attention semantics and asserts its documented layouts gives the plain
  (gather) step's logits and KV cache on random block tables, for several batch sizes including a padded
  bucket.
- In graph mode one graph per batch bucket is captured with the longest lengths; a stand-in NPUGraph
  bakes each recorded FIA call's `actual_seq_lengths_kv` into the graph, as torch_npu does, and only
  `update` rewrites them: the replayed step must equal the eager step at every step's lengths. Each update
  comes after a stream sync (the stand-in's replays run until one), and graphs that are never updated (the
  gather form) are captured without auto-dispatch (the stand-in's replay of an un-updated recorded call
  raises where a device would wait forever).
- The engine's batch passes each row's KV length (host) and pads with length 1 over the null block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import model.npu_ops
import tests.npu_stand_in as stand_in
from cluster.config import ConfigError, load_config
from model.graph import GraphDecode
from model.kv_cache import NULL_BLOCK
from model.npu_ops import FusedOps, decode_ops
from model.processor import PreparedRequest
from model.runner import ModelRunner
from model.sampling import SamplingParams
from tests.npu_stand_in import FakeNpuBackend, GraphRecordingNpu
from tests.test_capture import MAX_SEQ_LEN, _inputs, _restore, _runner, _snapshot, no_host_sync


def captured(backend: FakeNpuBackend, decode: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`decode` as the stand-in captures it: the call is kept for replay, and runs without any host sync."""
    return stand_in.captured(backend, decode, guard=no_host_sync)


@pytest.fixture
def recording_npu(monkeypatch: pytest.MonkeyPatch) -> GraphRecordingNpu:
    fake = GraphRecordingNpu()
    monkeypatch.setattr(model.npu_ops, "torch_npu_module", lambda: fake)
    return fake


def _pad(runner: ModelRunner, inputs: tuple[torch.Tensor, ...], live: int) -> tuple[torch.Tensor, ...]:
    """Rows from `live` on as RunningBatch pads a bucket: token 0, length 0, position 0, null-block table."""
    tokens, positions, lens, tables = (t.clone() for t in inputs)
    for t in (tokens, positions, lens):
        t[live:] = 0
    tables[live:] = NULL_BLOCK
    return tokens, positions, lens, tables


@pytest.mark.parametrize("attention", ["paged", "paged_mask"])
@pytest.mark.parametrize("batch, live", [(1, 1), (2, 2), (4, 3), (4, 4)])
def test_paged_step_gives_the_gather_step(
    tiny_checkpoint: Path, recording_npu: GraphRecordingNpu, batch: int, live: int, attention: str
) -> None:
    """Fused paged decode (no mask, or vllm-ascend's sparse_mode 3 with its 2048 x 2048 mask) vs plain decode:
    same logits and the same KV cache after the step."""
    plain, paged = _runner(tiny_checkpoint), _runner(tiny_checkpoint, fused=True, attention=attention)
    assert paged.paged_decode and not plain.paged_decode
    tokens, positions, lens, tables = _pad(paged, _inputs(paged, batch, seed=10 + batch, longest=MAX_SEQ_LEN), live)
    kv_lens = [n + 1 for n in lens.tolist()]
    with torch.inference_mode():
        ours = paged.decode(tokens, positions, lens, block_tables=tables, kv_lens=kv_lens)
        ref = plain.decode(tokens, positions, lens, max_len=max(kv_lens), block_tables=tables)
    torch.testing.assert_close(ours[:live], ref[:live], atol=1e-5, rtol=1e-5)
    for a, b in zip(_snapshot(paged), _snapshot(plain)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    layers = paged.config.text.num_hidden_layers
    assert recording_npu.kv_lens_seen == [kv_lens] * layers and kv_lens[live:] == [1] * (batch - live)
    assert recording_npu.sparse_modes == [3 if attention == "paged_mask" else 0] * layers


@pytest.mark.parametrize("attention", ["paged", "paged_mask"])
def test_replay_sees_each_steps_lengths(
    tiny_checkpoint: Path, recording_npu: GraphRecordingNpu, attention: str
) -> None:
    """One graph per batch bucket, captured at max_seq_len; each replay equals the eager step at that step's
    lengths. Without `update` the replay would read max_seq_len positions of every row (and fail here)."""
    runner = _runner(tiny_checkpoint, fused=True, attention=attention)
    saved = _snapshot(runner)
    backend = FakeNpuBackend(recording_npu)
    with torch.inference_mode():
        graphs = GraphDecode(
            captured(backend, runner.model.decode),
            [1, 4],
            runner.decode_lengths,
            torch.device("cpu"),
            table_width=runner.max_blocks_per_seq,
            backend=backend,
            host_lengths=True,
        )
        assert sorted(graphs.graphs) == [(1, MAX_SEQ_LEN), (4, MAX_SEQ_LEN)] and not graphs.eager  # one per bucket
        graph = graphs.graphs[4, MAX_SEQ_LEN][0]
        layers = runner.config.text.num_hidden_layers
        assert graph.records == [{"actual_seq_lengths_kv": [MAX_SEQ_LEN] * 4}] * layers  # captured at the longest
        for seed, live in ((1, 4), (2, 3), (3, 4)):
            inputs = _pad(runner, _inputs(runner, 4, seed, longest=100), live)
            kv_lens = [n + 1 for n in inputs[2].tolist()]
            _restore(runner, saved)
            eager = runner.model.decode(*inputs, MAX_SEQ_LEN, kv_lens).clone()
            eager_cache = _snapshot(runner)
            _restore(runner, saved)
            runner.decode_fn = graphs
            replay = runner.decode(*inputs[:3], block_tables=inputs[3], kv_lens=kv_lens)
            torch.testing.assert_close(replay, eager, atol=0, rtol=0)
            assert all(torch.equal(a, b) for a, b in zip(_snapshot(runner), eager_cache))
            assert graph.updates[-1] == kv_lens and graph.records == [{"actual_seq_lengths_kv": kv_lens}] * layers
        with pytest.raises(ValueError, match="kv_lens=None must give one host length per row"):
            graphs(*inputs, MAX_SEQ_LEN)


def test_gather_graphs_replay_without_updates(tiny_checkpoint: Path, recording_npu: GraphRecordingNpu) -> None:
    """decode_attention: gather captures one graph per (bucket, length) and never calls `update`: captured with
    auto-dispatch, each FIA call would wait on an event only `update` records, and the first replay would hang
    (torch_npu/npu/graphs.py); without it every replay equals the eager step."""
    runner = _runner(tiny_checkpoint, fused=True, attention="gather")
    saved = _snapshot(runner)
    backend = FakeNpuBackend(recording_npu)
    with torch.inference_mode():
        graphs = GraphDecode(
            captured(backend, runner.model.decode),
            [2],
            runner.decode_lengths,
            torch.device("cpu"),
            table_width=runner.max_blocks_per_seq,
            backend=backend,
        )
        assert sorted(graphs.graphs) == [(2, 256), (2, MAX_SEQ_LEN)] and not graphs.eager
        runner.decode_fn = graphs
        for seed, longest in ((1, 200), (2, 400)):  # one step at each length
            inputs = _inputs(runner, 2, seed, longest=longest)
            length = 256 if int(inputs[2].max()) < 256 else MAX_SEQ_LEN
            _restore(runner, saved)
            eager = runner.model.decode(*inputs, length).clone()
            _restore(runner, saved)
            replay = runner.decode(*inputs[:3], max_len=int(inputs[2].max()) + 1, block_tables=inputs[3])
            torch.testing.assert_close(replay, eager, atol=0, rtol=0)
    assert [graph.replays for graph, _ in graphs.graphs.values()] == [1, 1]
    assert not any(graph.auto_dispatch or graph.records for graph, _ in graphs.graphs.values())


def test_back_to_back_steps_sync_before_each_update(tiny_checkpoint: Path, recording_npu: GraphRecordingNpu) -> None:
    """Two steps with nothing between them that syncs: the second update must not run while the first replay
    may still run (the stand-in raises; on a device the update would rewrite the call being executed)."""
    runner = _runner(tiny_checkpoint, fused=True)
    backend = FakeNpuBackend(recording_npu)
    with torch.inference_mode():
        graphs = GraphDecode(
            captured(backend, runner.model.decode),
            [2],
            runner.decode_lengths,
            torch.device("cpu"),
            table_width=runner.max_blocks_per_seq,
            backend=backend,
            host_lengths=True,
        )
        graph = graphs.graphs[2, MAX_SEQ_LEN][0]
        for seed in (1, 2):
            inputs = _inputs(runner, 2, seed, longest=100)
            graphs(*inputs, MAX_SEQ_LEN, [n + 1 for n in inputs[2].tolist()])
            assert backend.in_flight == {graph}  # the replay runs on until the next sync
    assert graph.replays == 2 and len(graph.updates) == 2


def test_paged_graphs_need_auto_dispatch_capture(caplog: pytest.LogCaptureFixture) -> None:
    """A torch_npu whose graph() cannot update lengths on replay: every bucket runs eager, with the reason."""
    backend = FakeNpuBackend(GraphRecordingNpu())
    backend.graph = contextlib.contextmanager(lambda graph, pool=None: (yield))  # no auto_dispatch_capture keyword
    calls = []

    def decode(*args: Any) -> torch.Tensor:
        calls.append(args)
        return torch.zeros(args[0].shape[0], 1)

    with caplog.at_level("WARNING", logger="model.graph"):
        graphs = GraphDecode(
            decode, [1, 2], [64], torch.device("cpu"), table_width=4, backend=backend, host_lengths=True
        )
    assert not graphs.graphs and sorted(graphs.eager) == [(1, 64), (2, 64)] and not calls
    assert "auto_dispatch_capture" in graphs.eager_buckets()[0]["error"] and "runs eager" in caplog.text
    steps = (torch.zeros(2, dtype=torch.long),) * 3
    graphs(*steps, torch.zeros(2, 4, dtype=torch.long), 64, [3, 1])
    assert calls[-1][-1] == [3, 1]  # the eager step gets the lengths


def test_batch_passes_host_lengths(
    tiny_checkpoint: Path, recording_npu: GraphRecordingNpu, prepared: Callable[[Path], dict[str, PreparedRequest]]
) -> None:
    """generate through RunningBatch (a batch of 3 in the bucket of 4): the paged kernel gets lens + 1 per row and
    1 for the padded row, and the greedy tokens are the plain runner's."""
    requests = [prepared(tiny_checkpoint)[n] for n in ("text_long", "one_image", "text")]
    params = [SamplingParams(max_new_tokens=n) for n in (5, 3, 4)]
    runs = []
    for fused in (False, True):
        runner = ModelRunner(tiny_checkpoint, max_batch_size=4, max_seq_len=MAX_SEQ_LEN, fused_ops=fused)
        runs.append([r.output_token_ids for r in runner.generate(requests, params, eos_token_ids=[])])
    assert runs[0] == runs[1] and [len(t) for t in runs[1]] == [5, 3, 4]
    prompts = [len(r.input_ids) for r in requests]
    layers = runner.config.text.num_hidden_layers
    steps = recording_npu.kv_lens_seen[::layers]  # one FIA call per layer and decode step
    assert steps[0] == [n + 1 for n in prompts] + [1]  # the first decode step: each prompt and its first token
    assert all(row[3] == 1 for row in steps) and [row[0] for row in steps] == [prompts[0] + 1 + i for i in range(4)]


def test_decode_attention_choices() -> None:
    with pytest.raises(ValueError, match="decode_attention='paged' needs fused_ops"):
        decode_ops(False, "paged")
    with pytest.raises(ValueError, match="decode_attention='paged_mask' needs fused_ops"):
        decode_ops(False, "paged_mask")
    with pytest.raises(ValueError, match="decode_attention='ring' must be one of paged, gather, paged_mask"):
        decode_ops(False, "ring")
    assert decode_ops(False, "gather") is model.npu_ops.PLAIN
    ops = FusedOps(GraphRecordingNpu())
    tables = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"kv_lens=\[4\] must hold one length >= 1 per row of the 2-row batch"):
        ops.decode_reads(tables, torch.zeros(2, dtype=torch.long), 16, 3, [4])
    reads = ops.decode_reads(tables, torch.zeros(2, dtype=torch.long), 16, 3, [4, 1])
    assert reads.tables.dtype == torch.int32 and reads.kv_lens == [4, 1] and reads.mask is None
    gather = FusedOps(GraphRecordingNpu(), paged=False).decode_reads(tables, torch.tensor([0, 20]), 16, 2, [1, 21])
    assert gather.kv_lens is None and gather.tables.shape == (2, 2) and gather.mask.sum(1).tolist() == [1, 21]
    assert (
        load_config(None, ["model_path=/m", "device=npu", "decode_attention=paged_mask"]).decode_attention
        == "paged_mask"
    )
    with pytest.raises(ConfigError, match="decode_attention='paged_mask': needs the fused ops on npu"):
        load_config(None, ["model_path=/m", "device=cpu", "decode_attention=paged_mask"])
