"""NPU decode attention through block tables (FIA's paged mode), checked on cpu with stand-ins.

- The paged decode step (FusedOps, paged) with a torch_npu stand-in that implements FIA's page-attention
  semantics and asserts its documented layouts gives the plain (gather) step's logits and KV cache on
  random block tables, for several batch sizes including a padded bucket.
- In graph mode one graph per batch bucket is captured with the longest lengths; a stand-in NPUGraph
  bakes each recorded FIA call's `actual_seq_lengths_kv` into the graph, as torch_npu does, and only
  `update` rewrites them: the replayed step must equal the eager step at every step's lengths.
- The engine's batch passes each row's KV length (host) and pads with length 1 over the null block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import model.npu_ops
from model.graph import GraphDecode
from model.kv_cache import NULL_BLOCK
from model.npu_ops import FusedOps, decode_ops
from model.processor import PreparedRequest
from model.runner import ModelRunner
from model.sampling import SamplingParams
from tests.test_capture import MAX_SEQ_LEN, FakeTorchNpu, _inputs, _restore, _runner, _snapshot, no_host_sync
from tests.test_graph import FakeBackend


class GraphRecordingNpu(FakeTorchNpu):
    """FakeTorchNpu whose FIA calls, made while a stand-in graph captures, are recorded in that graph; on
    replay each call reads `actual_seq_lengths_kv` from its record (the value baked in at capture, or what
    `update` wrote), not from the step's arguments: a host list is not an input of a captured graph."""

    def __init__(self) -> None:
        super().__init__()
        self.recording: FakeNpuGraph | None = None
        self.replaying: Iterator[dict[str, Any]] | None = None

    def npu_fused_infer_attention_score(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kw: Any):
        if self.recording is not None:
            self.recording.records.append({"actual_seq_lengths_kv": list(kw["actual_seq_lengths_kv"])})
        if self.replaying is not None:
            kw["actual_seq_lengths_kv"] = next(self.replaying)["actual_seq_lengths_kv"]
        return super().npu_fused_infer_attention_score(query, key, value, **kw)


class FakeNpuGraph:
    """torch.npu.NPUGraph as GraphDecode uses it: pool, replay, and update(list of dicts) as torch_npu 2.13's
    `_GraphDispatchMode.update_capture_record`: one dict applies to every recorded call, else one per call."""

    def __init__(self) -> None:
        self.call: tuple[Callable[..., torch.Tensor], tuple[Any, ...], torch.Tensor] | None = None
        self.records: list[dict[str, Any]] = []
        self.auto_dispatch = False
        self.updates: list[list[int]] = []
        self.npu: GraphRecordingNpu | None = None

    def pool(self) -> object:
        return ("pool", id(self))

    def update(self, cpu_update_input: list[dict[str, Any]]) -> None:
        if not self.auto_dispatch:
            raise RuntimeError("The current graph configuration does not support update")
        inputs = cpu_update_input * len(self.records) if len(cpu_update_input) == 1 else cpu_update_input
        if len(inputs) != len(self.records):
            raise RuntimeError(f"{len(self.records)} recorded operators, {len(inputs)} update inputs")
        for record, new in zip(self.records, inputs):
            record.update({k: v for k, v in new.items() if k in record})
        self.updates.append(list(cpu_update_input[0]["actual_seq_lengths_kv"]))

    def replay(self) -> None:
        assert self.call is not None and self.npu is not None, "replay before capture"
        fn, args, output = self.call
        self.npu.replaying = iter(self.records)
        try:
            output.copy_(fn(*args))
        finally:
            self.npu.replaying = None


class FakeNpuBackend(FakeBackend):
    """torch.npu's surface for GraphDecode, graph() taking auto_dispatch_capture as torch_npu 2.13 does."""

    NPUGraph = FakeNpuGraph

    def __init__(self, npu: GraphRecordingNpu) -> None:
        super().__init__()
        self.npu = npu

    @contextlib.contextmanager
    def graph(self, graph: FakeNpuGraph, pool: object = None, auto_dispatch_capture: bool = False) -> Iterator[None]:
        graph.auto_dispatch, graph.npu = auto_dispatch_capture, self.npu
        self.capturing, self.npu.recording = graph, graph
        try:
            yield
        finally:
            self.capturing, self.npu.recording = None, None


def captured(backend: FakeNpuBackend, decode: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`decode` as the stand-in captures it: the call is kept for replay, and runs without any host sync."""

    def step(*args: Any) -> torch.Tensor:
        if backend.capturing is None:
            return decode(*args)
        with no_host_sync():
            out = decode(*args)
        backend.capturing.call = (decode, args, out)
        return out

    return step


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


@pytest.mark.parametrize("batch, live", [(1, 1), (2, 2), (4, 3), (4, 4)])
def test_paged_step_gives_the_gather_step(
    tiny_checkpoint: Path, recording_npu: GraphRecordingNpu, batch: int, live: int
) -> None:
    """Fused paged decode vs plain decode: same logits and the same KV cache after the step."""
    plain, paged = _runner(tiny_checkpoint), _runner(tiny_checkpoint, fused=True)
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


def test_replay_sees_each_steps_lengths(tiny_checkpoint: Path, recording_npu: GraphRecordingNpu) -> None:
    """One graph per batch bucket, captured at max_seq_len; each replay equals the eager step at that step's
    lengths. Without `update` the replay would read max_seq_len positions of every row (and fail here)."""
    runner = _runner(tiny_checkpoint, fused=True)
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
    with pytest.raises(ValueError, match="decode_attention='ring' must be one of paged, gather"):
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
