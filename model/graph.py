"""Decode as a graph: captured once per (batch bucket, decode length), replayed every step.

CUDA graphs on cuda, ACL graphs (torch.npu.NPUGraph, same API) on npu, torch.compile on cpu.
The decode step has static shapes (a preallocated paged KV cache, positions, lengths and block tables
as tensors), so one graph per bucket serves every step of every batch of that size. Attention reads
the first L positions of each row through its block table, L a decode length chosen per step from a
few buckets (`decode_lengths`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# (tokens (B,), positions (B,), cache lengths (B,), block tables (B, M), decode length) -> logits (B, vocab)
DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

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


def decode_lengths(device_type: str, graph: bool, max_seq_len: int, fused: bool = False) -> list[int]:
    """How many cache entries a decode step may read, per device and execution mode.

    - cuda (eager and CUDA graphs): length buckets; graph mode captures one graph per (batch bucket,
      length), all in one memory pool. Attention then reads about the live length, not max_seq_len.
    - cpu eager: length buckets (a strided view of the cache; matmul takes it as is).
    - cpu graph (torch.compile): max_seq_len only; each shape costs a compile of 10-20 s, and at the
      lengths CPU runs use, the KV read is small next to the weights.
    - npu (and wherever the fused ops run): length buckets too. The step gathers the first L positions
      of each row from its blocks into a contiguous BSND tensor for npu_fused_infer_attention_score,
      under a (B, 1, 1, L) mask; no host-side lengths, so each (bucket, length) captures as it is.
    """
    if device_type == "cpu" and graph:
        return [max_seq_len]
    return length_buckets(max_seq_len)


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
    """

    def __init__(self, decode: DecodeFn, shapes: int = 8) -> None:
        import torch._dynamo.config

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
        self.fn = torch.compile(decode, dynamic=False, fullgraph=False)

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache_lens: torch.Tensor,
        block_tables: torch.Tensor,
        kv_len: int,
    ) -> torch.Tensor:
        # Dynamo guards on dispatch keys, which differ between tensors made inside and outside
        # inference mode: cloning the inputs in inference mode gives every step the same kind.
        with torch.inference_mode():
            return self.fn(tokens.clone(), positions.clone(), cache_lens.clone(), block_tables.clone(), kv_len)


class GraphDecode:
    """One captured device graph per (batch bucket, length), with static input and output buffers.

    The graphs of a batch bucket share its input buffers; all graphs share one memory pool.
    `backend` is torch.cuda or torch.npu (after `import torch_npu`); tests pass a stand-in with the
    same surface (Stream, current_stream, stream, graph, CUDAGraph/NPUGraph, synchronize).
    """

    def __init__(
        self,
        decode: DecodeFn,
        buckets: Sequence[int],
        lengths: Sequence[int],
        device: torch.device,
        table_width: int,
        backend: Any = None,
    ) -> None:
        backend = getattr(torch, device.type) if backend is None else backend
        graph_class = backend.CUDAGraph if device.type == "cuda" else backend.NPUGraph
        self.lengths = sorted(lengths)
        self.inputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        pool = None
        for size in sorted(buckets, reverse=True):  # largest first so smaller graphs reuse its pool
            steps = tuple(torch.zeros(size, dtype=torch.long, device=device) for _ in range(3))
            inputs = (*steps, torch.zeros(size, table_width, dtype=torch.long, device=device))  # null-block tables
            self.inputs[size] = inputs
            for length in reversed(self.lengths):
                stream = backend.Stream()
                stream.wait_stream(backend.current_stream())
                with backend.stream(stream):
                    for _ in range(2):  # warm up kernels and collectives outside the capture
                        decode(*inputs, length)
                backend.current_stream().wait_stream(stream)
                graph = graph_class()
                with backend.graph(graph, pool=pool):
                    output = decode(*inputs, length)
                pool = graph.pool()
                self.graphs[size, length] = (graph, output)
        backend.synchronize()

    @property
    def buckets(self) -> list[int]:
        return sorted(self.inputs)

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache_lens: torch.Tensor,
        block_tables: torch.Tensor,
        kv_len: int,
    ) -> torch.Tensor:
        """Copy the step's inputs into the bucket's static buffers and replay; the output buffer is reused."""
        key = (tokens.shape[0], kv_len)
        if key not in self.graphs:
            raise ValueError(
                f"no graph captured for batch {key[0]} and length {kv_len}; batch buckets are "
                f"{self.buckets}, lengths {self.lengths}"
            )
        graph, output = self.graphs[key]
        for buffer, value in zip(self.inputs[key[0]], (tokens, positions, cache_lens, block_tables)):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        return output
