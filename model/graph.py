"""Decode as a graph: captured once per (batch bucket, decode length), replayed every step.

CUDA graphs on cuda, ACL graphs (torch.npu.NPUGraph, same API) on npu, torch.compile on cpu.
The decode step has static shapes (a preallocated paged KV cache, positions, lengths and block tables
as tensors), so one graph per bucket serves every step of every batch of that size. Attention reads
the first L positions of each row through its block table, L a decode length chosen per step from a
few buckets (`decode_lengths`). With the NPU's paged kernel (FusedOps paged) attention reads each row's live
length through its block table instead: one graph per batch bucket, and before each replay the step's KV
lengths are written into the captured FIA calls with `NPUGraph.update` (`GraphDecode(host_lengths=True)`).

A bucket whose warm-up or capture fails (ACL graph capture errors such as 107033 / 507009, or "Cannot run
aclop operators during NPU graph capture") costs only itself: that (batch, length) runs eager, with a log
line, and `GraphDecode.eager` says which ones do.

`auto_dispatch_capture` (torch_npu 2.13's `torch.npu.graph` keyword) is used only where `update` will be
called, i.e. with host lengths. Under it torch_npu records FIA in its `.out` form behind an ExternalEvent
wait, and only `update` records that event (`_GraphDispatchMode.__torch_dispatch__` and
`update_capture_record` in torch_npu/npu/graphs.py): a graph captured that way and replayed without an
update would wait forever. Before each update the current stream is synchronized, so the update (issued
on torch_npu's own update stream) cannot rewrite a captured call that the previous replay is still running.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

# (tokens (B,), positions (B,), cache lengths (B,), block tables (B, M), decode length[, kv_lens: host ints (B,)])
# -> logits (B, vocab)
DecodeFn = Callable[..., torch.Tensor]

SMALLEST_LENGTH = 256


def pick_bucket(buckets: Sequence[int], batch: int) -> int:
    """The smallest bucket that holds `batch` rows."""
    fitting = [b for b in buckets if b >= batch]
    if not fitting:
        raise ValueError(f"batch of {batch} exceeds the largest decode bucket {max(buckets)}")
    return min(fitting)


def length_buckets(max_seq_len: int, smallest: int = SMALLEST_LENGTH) -> list[int]:
    """Decode lengths: powers of two from `smallest` below max_seq_len, then max_seq_len itself."""
    sizes = []
    size = smallest
    while size < max_seq_len:
        sizes.append(size)
        size *= 2
    return sizes + [max_seq_len]


def decode_lengths(
    device_type: str, graph: bool, max_seq_len: int, fused: bool = False, paged: bool = False
) -> list[int]:
    """How many cache entries a decode step may read, per device and execution mode.

    - cuda (eager and CUDA graphs): length buckets; graph mode captures one graph per (batch bucket,
      length), all in one memory pool. Attention then reads about the live length, not max_seq_len.
    - cpu eager: length buckets (a strided view of the cache; matmul takes it as is).
    - cpu graph (torch.compile): few lengths (`cpu_graph_lengths`), each a compile of several seconds.
      Reading max_seq_len positions at every step costs what the weights cost on a small model (the tiny
      checkpoint's one-row step: 0.53 ms at 256 positions, 0.59 ms at 640, 0.69 ms at 1112).
    - npu with the paged kernel (`paged`, the default where the fused ops run): max_seq_len only. FIA reads
      each row's live length through its block table, so the length buckets buy nothing; one graph per
      batch bucket, its lengths rewritten per step (`GraphDecode(host_lengths=True)`).
    - npu with decode_attention=gather: length buckets too. The step gathers the first L positions of
      each row from its blocks into a contiguous BSND tensor for npu_fused_infer_attention_score, under a
      (B, 1, 1, L) mask; no host-side lengths, so each (bucket, length) captures as it is.
    """
    if paged:
        return [max_seq_len]
    if device_type == "cpu" and graph:
        return cpu_graph_lengths(max_seq_len)
    return length_buckets(max_seq_len)


def cpu_graph_lengths(max_seq_len: int, smallest: int = SMALLEST_LENGTH) -> list[int]:
    """Decode lengths of the cpu graph mode: powers of four from `smallest` up to half of max_seq_len, then
    max_seq_len. A step reads at most 4x its live length (or `smallest`), and a runner compiles
    log4(max_seq_len / smallest) + 1 lengths per batch bucket, not length_buckets' log2."""
    sizes = []
    size = smallest
    while size * 2 <= max_seq_len:
        sizes.append(size)
        size *= 4
    return sizes + [max_seq_len]


def pick_length(lengths: Sequence[int], max_len: int | None) -> int:
    """The shortest decode length that covers `max_len` (None: the longest, i.e. max_seq_len)."""
    if max_len is None:
        return max(lengths)
    fitting = [n for n in lengths if n >= max_len]
    if not fitting:
        raise ValueError(f"max_len={max_len} exceeds the longest decode length {max(lengths)}")
    return min(fitting)


class CompiledDecode:
    """torch.compile of the decode step (the cpu graph mode); shapes are static per (bucket, length).

    Dynamo compiles once per distinct input shape and decode length; the recompile limit is raised
    to cover every pair, so no shape falls back to eager. Collectives (gloo at tp > 1) may split the
    compiled step into several graphs; it still runs.

    `cpp_wrapper`: the wrapper inductor generates around the kernels (allocating buffers, reinterpreting
    views, launching each kernel) is C++, not Python. On a small model that wrapper is a large part of a
    step (about 15% of the tiny checkpoint's one-row step: docs/benchmarks.md, "TPOT at one step per
    call"); the first compile of each shape takes a few seconds longer. Only without collectives: torch
    2.13's C++ wrapper cannot call the collectives a tp > 1 step holds ("arg type Any is not yet supported
    by custom_op_wrapper").
    """

    def __init__(self, decode: DecodeFn, shapes: int = 8, cpp_wrapper: bool = False) -> None:
        import torch._dynamo.config

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
        options = {"cpp_wrapper": cpp_wrapper, "guard_filter_fn": step_guards}
        self.fn = torch.compile(own_step(decode), dynamic=False, fullgraph=False, options=options)

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache_lens: torch.Tensor,
        block_tables: torch.Tensor,
        kv_len: int,
        kv_lens: Sequence[int] | None = None,
    ) -> torch.Tensor:
        # kv_lens (the paged kernel's) stays None on cpu: a host list would make dynamo recompile per value.
        # Dynamo guards on dispatch keys, which differ between tensors made inside and outside
        # inference mode: cloning the inputs in inference mode gives every step the same kind.
        with torch.inference_mode():
            return self.fn(tokens.clone(), positions.clone(), cache_lens.clone(), block_tables.clone(), kv_len, kv_lens)


STEP_ARGS = ("tokens", "positions", "cache_lens", "block_tables", "kv_len", "kv_lens")


def own_step(decode: DecodeFn) -> DecodeFn:
    """`decode` behind a function whose code object is its own.

    Dynamo keeps compiled code and its guards per code object, so this function's cache only ever holds
    code traced through this one `decode` (one model instance): that is what lets `step_guards` drop the
    guards on the model.
    """

    def step(tokens, positions, cache_lens, block_tables, kv_len, kv_lens):  # noqa: ANN001, ANN202
        return decode(tokens, positions, cache_lens, block_tables, kv_len, kv_lens)

    return types.FunctionType(step.__code__.replace(), step.__globals__, "decode_step", None, step.__closure__)


def step_guards(entries: Sequence[Any]) -> list[bool]:
    """Which of dynamo's guards a compiled step checks on every call: those on the step's own arguments
    (their shapes, dtypes and strides, and the decode length) and the global torch state.

    Dropped: the guards on the model behind the step (its modules, weights and KV cache: about 450 on the
    tiny checkpoint, 60 us of a 520 us step) and on module globals. None of those changes once a runner
    has loaded and attached its cache, and `own_step` keeps other models out of this step's cache.
    """
    return [_root(entry.name) in STEP_ARGS or (not entry.name and not entry.is_global) for entry in entries]


def _root(source: str) -> str:
    """The local a guard's source starts from: `kv_lens` for `kv_lens[0]`, `tokens` for `tokens`."""
    return source.split("[", 1)[0].split(".", 1)[0]


def takes_auto_dispatch(backend: Any) -> bool:
    """Whether `backend.graph(...)` takes auto_dispatch_capture (torch_npu 2.13)."""
    try:
        parameters = inspect.signature(backend.graph).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return "auto_dispatch_capture" in parameters


def capture_options(backend: Any, host_lengths: bool) -> dict[str, Any]:
    """Keywords for `backend.graph(...)`: auto_dispatch_capture=True only for graphs whose KV lengths `update`
    rewrites (host_lengths) and where the backend takes it. Elsewhere it must stay off: each FIA call it records
    waits on an event that only `update` records, so a graph never updated would hang at its first replay."""
    return {"auto_dispatch_capture": True} if host_lengths and takes_auto_dispatch(backend) else {}


class GraphDecode:
    """One captured device graph per (batch bucket, length), with static input and output buffers.

    The graphs of a batch bucket share its input buffers; all graphs share one memory pool.
    `backend` is torch.cuda or torch.npu (after `import torch_npu`); tests pass a stand-in with the
    same surface (Stream, current_stream, stream, graph, CUDAGraph/NPUGraph, synchronize).
    A (batch, length) whose warm-up or capture raises runs `decode` eagerly instead; `eager` maps it to the
    error.

    host_lengths: the decode step takes each row's KV length as host ints (the paged FIA call). Each graph
    is captured with every row at `length` (the longest, so FIA's fixed workspace covers every later step),
    under `auto_dispatch_capture` (without it every bucket runs eager); each call then synchronizes the
    current stream (the previous replay must be over) and passes the step's lengths to `graph.update`
    (torch_npu rewrites `actual_seq_lengths_kv` of every recorded FIA call) before it copies the inputs and
    replays. Without host_lengths nothing is updated, and capture runs without auto-dispatch.
    """

    def __init__(
        self,
        decode: DecodeFn,
        buckets: Sequence[int],
        lengths: Sequence[int],
        device: torch.device,
        table_width: int,
        backend: Any = None,
        host_lengths: bool = False,
    ) -> None:
        backend = getattr(torch, device.type) if backend is None else backend
        graph_class = backend.CUDAGraph if device.type == "cuda" else backend.NPUGraph
        options = capture_options(backend, host_lengths)
        self.backend = backend
        self.decode = decode
        self.host_lengths = host_lengths
        self.lengths = sorted(lengths)
        self.inputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self.eager: dict[tuple[int, int], str] = {}
        pool = None
        for size in sorted(buckets, reverse=True):  # largest first so smaller graphs reuse its pool
            steps = tuple(torch.zeros(size, dtype=torch.long, device=device) for _ in range(3))
            inputs = (*steps, torch.zeros(size, table_width, dtype=torch.long, device=device))  # null-block tables
            self.inputs[size] = inputs
            for length in reversed(self.lengths):
                lens = ([length] * size,) if host_lengths else ()  # the longest: FIA's workspace covers any step
                if host_lengths and "auto_dispatch_capture" not in options:
                    self.eager[size, length] = (
                        "graph(...) takes no auto_dispatch_capture: KV lengths cannot be updated on replay"
                    )
                    logger.warning("decode graph for batch bucket %d runs eager: %s", size, self.eager[size, length])
                    continue
                graph = graph_class()
                phase = "warm-up"
                try:
                    stream = backend.Stream()
                    stream.wait_stream(backend.current_stream())
                    with backend.stream(stream):
                        for _ in range(2):  # warm up kernels and collectives outside the capture
                            decode(*inputs, length, *lens)
                    backend.current_stream().wait_stream(stream)
                    phase = "capture"
                    with backend.graph(graph, pool=pool, **options):
                        output = decode(*inputs, length, *lens)
                except RuntimeError as e:  # what torch raises for a step or a capture the device refuses
                    self.eager[size, length] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                    logger.warning(
                        "decode graph %s failed for batch bucket %d, length %d; that bucket runs eager: %s",
                        phase,
                        size,
                        length,
                        self.eager[size, length],
                    )
                    backend.synchronize()
                    continue
                pool = graph.pool()
                self.graphs[size, length] = (graph, output)
        backend.synchronize()

    @property
    def buckets(self) -> list[int]:
        return sorted(self.inputs)

    def eager_buckets(self) -> list[dict[str, Any]]:
        """The (batch, length) pairs that run eager because their capture failed, with the error."""
        return [{"batch": b, "length": n, "error": error} for (b, n), error in sorted(self.eager.items())]

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache_lens: torch.Tensor,
        block_tables: torch.Tensor,
        kv_len: int,
        kv_lens: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Copy the step's inputs into the bucket's static buffers and replay; the output buffer is reused.

        With host_lengths, `kv_lens` (each row's KV length, host ints) is required and is written into the
        graph's FIA calls first (`graph.update`). A bucket whose capture failed runs the decode step eagerly
        on the inputs as given.
        """
        key = (tokens.shape[0], kv_len)
        if self.host_lengths and (kv_lens is None or len(kv_lens) != key[0]):
            raise ValueError(f"kv_lens={kv_lens} must give one host length per row of the {key[0]}-row batch")
        lens = (list(kv_lens),) if self.host_lengths else ()
        if key in self.eager:
            return self.decode(tokens, positions, cache_lens, block_tables, kv_len, *lens)
        if key not in self.graphs:
            raise ValueError(
                f"no graph captured for batch {key[0]} and length {kv_len}; batch buckets are "
                f"{self.buckets}, lengths {self.lengths}"
            )
        graph, output = self.graphs[key]
        if self.host_lengths:
            # The update re-issues each recorded FIA call on another stream: the previous replay must be over
            # (vllm-ascend synchronizes the current stream before its attention-parameter update too).
            self.backend.current_stream().synchronize()
            # One dict in a list: torch_npu applies it to every FIA call the capture recorded (one per layer).
            graph.update([{"actual_seq_lengths_kv": lens[0]}])
        for buffer, value in zip(self.inputs[key[0]], (tokens, positions, cache_lens, block_tables)):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        return output
