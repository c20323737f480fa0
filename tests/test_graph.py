"""Graph-mode decode: the same greedy tokens as eager at tp 1 and tp 2 (gloo), and GraphDecode's logic.

On cpu graph mode is torch.compile; cuda/npu graph capture cannot run here, so GraphDecode is
exercised with a stand-in backend that records the captured call and re-runs it on replay.
Compiles are the slow part (about 10-20 s each): each process compiles only the bucket it uses.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.tools.draft_checkpoint import cut_draft
from model.graph import (
    GraphDecode,
    capture_options,
    cpu_graph_lengths,
    decode_lengths,
    length_buckets,
    own_step,
    pick_bucket,
    pick_length,
    step_guards,
)
from model.parallel import ParallelContext, free_port
from model.processor import PreparedRequest
from model.runner import ModelRunner
from model.sampling import SamplingParams

NAMES = ["text_long", "one_image", "text"]  # a batch of 3: text and image prompts of different lengths
LIMITS = [8, 10, 6]
BUCKET = 3  # max_batch_size 3 -> buckets [1, 2, 3]; a batch of 3 uses the bucket of 3


def eager_then_graph(runner: ModelRunner, requests: list[PreparedRequest]) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy tokens of the batch in eager mode, then after capture_graphs of the batch's bucket."""
    params = [SamplingParams(max_new_tokens=n) for n in LIMITS]
    eager = [r.output_token_ids for r in runner.generate(requests, params, eos_token_ids=[])]
    runner.capture_graphs([BUCKET])
    graph = [r.output_token_ids for r in runner.generate(requests, params, eos_token_ids=[])]
    return eager, graph


def test_graph_matches_eager_tp1(tiny_checkpoint: Path, prepared: Callable[[Path], dict[str, PreparedRequest]]) -> None:
    requests = [prepared(tiny_checkpoint)[n] for n in NAMES]
    runner = ModelRunner(tiny_checkpoint, max_batch_size=BUCKET, max_seq_len=256)
    eager, graph = eager_then_graph(runner, requests)
    assert [len(t) for t in eager] == LIMITS
    assert graph == eager


def _tp_rank(rank: int, world: int, port: int, path: str, requests: list[PreparedRequest], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ctx = ParallelContext(rank=rank, size=world, group=dist.group.WORLD)
        runner = ModelRunner(path, ctx=ctx, max_batch_size=BUCKET, max_seq_len=256)
        eager, graph = eager_then_graph(runner, requests)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"eager": eager, "graph": graph}))
    except BaseException:
        dist.destroy_process_group()
        raise
    # Written: leave without the interpreter's teardown, in which torch has aborted a finished rank of a
    # compiled run ("terminate called without an active exception", SIGABRT, after both ranks wrote).
    os._exit(0)


def test_graph_matches_eager_tp2(
    tiny_checkpoint: Path, prepared: Callable[[Path], dict[str, PreparedRequest]], tmp_path: Path
) -> None:
    """Two gloo ranks in separate processes; the compiled step breaks its graph at each collective."""
    requests = [prepared(tiny_checkpoint)[n] for n in NAMES]
    mp.start_processes(
        _tp_rank,
        args=(2, free_port(), str(tiny_checkpoint), requests, str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(t) for t in ranks[0]["eager"]] == LIMITS
    assert ranks[0]["graph"] == ranks[0]["eager"]
    assert ranks[1] == ranks[0]  # every rank samples the same tokens


# --------------------------------------------------------------------------------- GraphDecode logic
def test_pick_bucket() -> None:
    assert pick_bucket([1, 2, 4, 6], 1) == 1
    assert pick_bucket([1, 2, 4, 6], 3) == 4
    assert pick_bucket([6, 1, 2, 4], 5) == 6
    with pytest.raises(ValueError, match="exceeds the largest decode bucket 6"):
        pick_bucket([1, 2, 4, 6], 7)


class FakeGraph:
    """Records the call made while capturing; replay re-runs it and writes into the captured output."""

    def __init__(self) -> None:
        self.call: tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...], torch.Tensor] | None = None
        self.replays = 0
        self.shared_pool: object = None

    def pool(self) -> object:
        """Like a real graph: the pool it was captured into, else its own."""
        return self.shared_pool if self.shared_pool is not None else ("pool", id(self))

    def replay(self) -> None:
        assert self.call is not None, "replay before capture"
        fn, args, output = self.call
        output.copy_(fn(*args))
        self.replays += 1


class FakeStream:
    def wait_stream(self, other: FakeStream) -> None:
        pass


class FakeBackend:
    """The surface of torch.cuda / torch.npu that GraphDecode uses."""

    CUDAGraph = FakeGraph
    NPUGraph = FakeGraph

    def __init__(self) -> None:
        self.capturing: FakeGraph | None = None
        self.pools: list[object] = []
        self.synchronized = False

    def Stream(self) -> FakeStream:  # noqa: N802 - mirrors torch.cuda.Stream
        return FakeStream()

    def current_stream(self) -> FakeStream:
        return FakeStream()

    @contextlib.contextmanager
    def stream(self, stream: FakeStream) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def graph(self, graph: FakeGraph, pool: object = None) -> Iterator[None]:
        self.pools.append(pool)
        graph.shared_pool = pool
        self.capturing = graph
        try:
            yield
        finally:  # a capture that raised is over too
            self.capturing = None

    def synchronize(self) -> None:
        self.synchronized = True


def test_graph_decode_with_fake_backend() -> None:
    backend = FakeBackend()
    calls: list[tuple[int, int, bool]] = []  # (batch, length, captured)

    def step(
        tokens: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor, tables: torch.Tensor, length: int
    ) -> torch.Tensor:
        out = tokens * 100 + positions * 10 + cache_lens + length * 1000 + tables.sum(1) * 100000
        return out[:, None].float()  # (B, 1)

    def decode(
        tokens: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor, tables: torch.Tensor, length: int
    ) -> torch.Tensor:
        out = step(tokens, positions, cache_lens, tables, length)
        calls.append((tokens.shape[0], length, backend.capturing is not None))
        if backend.capturing is not None:
            backend.capturing.call = (lambda *a: step(*a, length), (tokens, positions, cache_lens, tables), out)
        return out

    # A cpu device with the stand-in backend takes the NPUGraph path.
    graphs = GraphDecode(decode, [1, 2], [256, 512], torch.device("cpu"), table_width=3, backend=backend)
    # Largest bucket and length first, two warm-up steps then one captured step each; later graphs
    # share the first one's pool; the graphs of a bucket share its input buffers.
    assert calls == [(b, n, captured) for b in (2, 1) for n in (512, 256) for captured in (False, False, True)]
    first = graphs.graphs[2, 512][0]
    assert backend.pools[0] is None and all(p == ("pool", id(first)) for p in backend.pools[1:])
    assert backend.synchronized and graphs.buckets == [1, 2] and graphs.lengths == [256, 512]

    no_blocks = torch.zeros(2, 3, dtype=torch.long)
    out = graphs(torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([5, 6]), no_blocks, 256)
    assert out.flatten().tolist() == [256135.0, 256246.0]
    graph, output = graphs.graphs[2, 256]
    assert out is output and graph.replays == 1 and graphs.inputs[2][0].tolist() == [1, 2]
    # A later step reuses the same buffers with new values; another length replays its own graph.
    tables = torch.tensor([[1, 0, 0], [2, 3, 0]])
    again = graphs(torch.tensor([7, 8]), torch.tensor([0, 1]), torch.tensor([2, 3]), tables, 512)
    assert again is graphs.graphs[2, 512][1] and again.flatten().tolist() == [612702.0, 1012813.0]
    with pytest.raises(ValueError, match="no graph captured for batch 3 and length 256"):
        graphs(*(torch.zeros(3, dtype=torch.long) for _ in range(3)), torch.zeros(3, 3, dtype=torch.long), 256)


class FakeNpuBackend(FakeBackend):
    """torch_npu 2.13's surface: graph() also takes auto_dispatch_capture."""

    def __init__(self) -> None:
        super().__init__()
        self.auto_dispatch: list[bool] = []

    @contextlib.contextmanager
    def graph(self, graph: FakeGraph, pool: object = None, auto_dispatch_capture: bool = False) -> Iterator[None]:
        self.auto_dispatch.append(auto_dispatch_capture)
        with super().graph(graph, pool):
            yield


def test_auto_dispatch_capture_only_where_lengths_are_updated() -> None:
    """auto_dispatch_capture puts an event wait that only `update` records in front of each FIA call: graphs that
    are never updated (no host lengths: the gather form, cuda) are captured without it."""
    assert capture_options(FakeBackend(), host_lengths=True) == {}
    assert capture_options(FakeNpuBackend(), host_lengths=True) == {"auto_dispatch_capture": True}
    assert capture_options(FakeNpuBackend(), host_lengths=False) == {}
    backend = FakeNpuBackend()

    def decode(
        tokens: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor, tables: torch.Tensor, length: int
    ) -> torch.Tensor:
        out = tokens[:, None].float() + length
        if backend.capturing is not None:
            backend.capturing.call = (lambda *a: a[0][:, None].float() + length, (tokens,), out)
        return out

    GraphDecode(decode, [1, 2], [256], torch.device("cpu"), table_width=1, backend=backend)
    assert backend.auto_dispatch == [False, False]


def capturing_decode(backend: FakeBackend, decode: Callable[..., torch.Tensor], refuse_batch: int) -> Callable:
    """`decode` as the fake backend captures it; a capture of batch `refuse_batch` raises as ACL graph capture does."""

    def step(
        tokens: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor, tables: torch.Tensor, length: int
    ) -> torch.Tensor:
        if backend.capturing is not None and tokens.shape[0] == refuse_batch:
            raise RuntimeError("Cannot run aclop operators during NPU graph capture (error 507009)")
        out = decode(tokens, positions, cache_lens, tables, length)
        if backend.capturing is not None:
            backend.capturing.call = (lambda *a: decode(*a, length), (tokens, positions, cache_lens, tables), out)
        return out

    return step


def test_a_bucket_whose_capture_raises_runs_eager(caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend()

    def step(
        tokens: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor, tables: torch.Tensor, length: int
    ) -> torch.Tensor:
        return (tokens * 100 + positions * 10 + cache_lens + length * 1000)[:, None].float()

    with caplog.at_level("WARNING", logger="model.graph"):
        graphs = GraphDecode(
            capturing_decode(backend, step, 2), [1, 2], [256, 512], torch.device("cpu"), table_width=2, backend=backend
        )
    assert sorted(graphs.graphs) == [(1, 256), (1, 512)] and sorted(graphs.eager) == [(2, 256), (2, 512)]
    assert [e["batch"] for e in graphs.eager_buckets()] == [2, 2] and "507009" in graphs.eager_buckets()[0]["error"]
    assert "capture failed for batch bucket 2, length 512; that bucket runs eager" in caplog.text
    # The eager bucket computes the step itself; the captured one replays.
    tables = torch.zeros(2, 2, dtype=torch.long)
    out = graphs(torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([5, 6]), tables, 256)
    assert out.flatten().tolist() == [256135.0, 256246.0] and out is not graphs.inputs[2][0]
    one = graphs(torch.tensor([7]), torch.tensor([0]), torch.tensor([2]), tables[:1], 512)
    assert one.flatten().tolist() == [512702.0]
    assert graphs.graphs[1, 512][0].replays == 1


def test_a_bucket_whose_warm_up_raises_runs_eager(caplog: pytest.LogCaptureFixture) -> None:
    """A warm-up step (eager, on the side stream, before capture) that raises costs only its bucket, as a refused
    capture does: graph set-up goes on, the bucket is named in `eager` and runs the step itself."""
    backend = FakeBackend()

    def step(
        tokens: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor, tables: torch.Tensor, length: int
    ) -> torch.Tensor:
        out = (tokens * 100 + positions * 10 + cache_lens + length * 1000)[:, None].float()
        if backend.capturing is not None:
            backend.capturing.call = (lambda *a: step(*a, length), (tokens, positions, cache_lens, tables), out)
        return out

    refused = []

    def decode(*args: Any) -> torch.Tensor:
        if backend.capturing is None and args[0].shape[0] == 2 and not refused:  # the first warm-up step of bucket 2
            refused.append(args)
            raise RuntimeError("EZ9999: aicore error during warm-up")
        return step(*args)

    with caplog.at_level("WARNING", logger="model.graph"):
        graphs = GraphDecode(decode, [1, 2], [256], torch.device("cpu"), table_width=2, backend=backend)
    assert sorted(graphs.graphs) == [(1, 256)] and list(graphs.eager) == [(2, 256)] and backend.synchronized
    assert graphs.eager_buckets() == [
        {"batch": 2, "length": 256, "error": "RuntimeError: EZ9999: aicore error during warm-up"}
    ]
    assert "decode graph warm-up failed for batch bucket 2, length 256; that bucket runs eager" in caplog.text
    tables = torch.zeros(2, 2, dtype=torch.long)
    out = graphs(torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([5, 6]), tables, 256)
    assert out.flatten().tolist() == [256135.0, 256246.0]


def test_capture_failure_keeps_the_tokens(
    tiny_checkpoint: Path, prepared: Callable[[Path], dict[str, PreparedRequest]]
) -> None:
    """Graph decode with the batch-3 bucket refused at capture: that bucket runs eager, tokens as in eager mode."""
    runner = ModelRunner(tiny_checkpoint, max_batch_size=BUCKET, max_seq_len=512)
    requests = [prepared(tiny_checkpoint)[n] for n in NAMES]
    params = [SamplingParams(max_new_tokens=n) for n in LIMITS]
    eager = [r.output_token_ids for r in runner.generate(requests, params, eos_token_ids=[])]
    backend = FakeBackend()
    with torch.inference_mode():
        runner.decode_fn = GraphDecode(
            capturing_decode(backend, runner.model.decode, BUCKET),
            runner.buckets,
            runner.decode_lengths,
            torch.device("cpu"),
            table_width=runner.max_blocks_per_seq,
            backend=backend,
        )
    assert [e["batch"] for e in runner.eager_buckets()] == [BUCKET] * len(runner.decode_lengths)
    graph = [r.output_token_ids for r in runner.generate(requests, params, eos_token_ids=[])]
    assert graph == eager and [len(t) for t in graph] == LIMITS
    assert not [key for key in runner.decode_fn.graphs if key[0] == BUCKET]  # the batch of 3 ran eager


def test_lengths_and_picks() -> None:
    assert length_buckets(2048) == [256, 512, 1024, 2048]
    assert length_buckets(3000) == [256, 512, 1024, 2048, 3000]
    assert length_buckets(200) == [200]
    assert decode_lengths("cuda", True, 1024) == decode_lengths("cpu", False, 1024) == [256, 512, 1024]
    assert decode_lengths("npu", True, 1024) == decode_lengths("npu", False, 1024, fused=True) == [256, 512, 1024]
    # cpu graph: powers of four from 256 up to half of max_seq_len, then max_seq_len
    assert decode_lengths("cpu", True, 1024) == decode_lengths("cpu", True, 1024, fused=True) == [256, 1024]
    assert cpu_graph_lengths(511) == [511] and cpu_graph_lengths(512) == [256, 512]
    assert cpu_graph_lengths(1112) == [256, 1112] and cpu_graph_lengths(2048) == [256, 1024, 2048]
    assert decode_lengths("npu", True, 1024, fused=True, paged=True) == [1024]
    assert pick_length([256, 512, 1024], 257) == 512
    assert pick_length([256, 512, 1024], 256) == 256
    assert pick_length([256, 512, 1024], None) == 1024
    with pytest.raises(ValueError, match="max_len=1025 exceeds the longest decode length 1024"):
        pick_length([256, 512, 1024], 1025)


def test_cpu_graph_mode_compiles_once_per_bucket_and_length(tiny_checkpoint: Path) -> None:
    """Steps with other lengths, positions and max_len reuse the compiled steps of `capture_graphs` (no
    recompile)."""
    from torch._dynamo.utils import counters

    runner = ModelRunner(tiny_checkpoint, max_batch_size=2, max_seq_len=512)
    runner.capture_graphs([1])
    assert runner.decode_lengths == [256, 512]
    compiled = dict(counters["stats"])
    for step, max_len in enumerate([12, 300, None, 511, 40]):
        n = torch.tensor([max(0, (max_len or 512) - 1)])
        runner.decode(torch.tensor([step + 3]), n + step, n, max_len=max_len)
    assert dict(counters["stats"]) == compiled


def test_cpu_graphs_of_two_models_in_one_process_stay_apart(
    tiny_checkpoint: Path, prepared: Callable[[Path], dict[str, PreparedRequest]], tmp_path: Path
) -> None:
    """A compiled step checks only its own arguments on each call (model/graph.py, `step_guards`), not the
    model: a second model with fewer layers, compiled in the same process at the same shapes, must still
    run its own layers and weights."""
    requests = [prepared(tiny_checkpoint)[n] for n in NAMES]
    draft = cut_draft(tiny_checkpoint, tmp_path / "draft", layers=2)
    target = ModelRunner(tiny_checkpoint, max_batch_size=BUCKET, max_seq_len=256)
    small = ModelRunner(draft, max_batch_size=BUCKET, max_seq_len=256)
    eager_target, graph_target = eager_then_graph(target, requests)
    eager_small, graph_small = eager_then_graph(small, requests)
    assert eager_small != eager_target  # two different models
    assert graph_target == eager_target
    assert graph_small == eager_small


def test_a_compiled_step_guards_everything_its_arguments_hold() -> None:
    """`step_guards` keeps the guards on the step's arguments, also those on what an argument holds (a host
    list of KV lengths, a tensor's shape): other values must not reuse code compiled for the first ones."""

    def decode(tokens, positions, cache_lens, block_tables, kv_len, kv_lens):  # noqa: ANN001, ANN202
        return tokens * kv_len + (sum(kv_lens) if kv_lens is not None else 0)

    step = torch.compile(own_step(decode), dynamic=False, options={"guard_filter_fn": step_guards})
    two, one = torch.ones(2), torch.ones(1)
    assert step(two, two, two, two, 3, [1, 2]).tolist() == [6.0, 6.0]
    assert step(two, two, two, two, 3, [5, 7]).tolist() == [15.0, 15.0]
    assert step(two, two, two, two, 4, None).tolist() == [4.0, 4.0]
    assert step(one, one, one, one, 4, None).tolist() == [4.0]


def test_capture_graphs_rejects_unknown_bucket(tiny_checkpoint: Path) -> None:
    runner = ModelRunner(tiny_checkpoint, max_batch_size=4, max_seq_len=64)
    with pytest.raises(ValueError, match=r"buckets \[3\] are not decode buckets"):
        runner.capture_graphs([3])
