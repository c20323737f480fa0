"""Decode as a graph: captured once per batch-size bucket, replayed every step.

CUDA graphs on cuda, ACL graphs (torch.npu.NPUGraph, same API) on npu, torch.compile on cpu.
The decode step has static shapes (preallocated KV cache, positions and lengths as tensors), so
one graph per bucket serves every step of every batch of that size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pick_bucket(buckets: Sequence[int], batch: int) -> int:
    """The smallest bucket that holds `batch` rows."""
    fitting = [b for b in buckets if b >= batch]
    if not fitting:
        raise ValueError(f"batch of {batch} exceeds the largest decode bucket {max(buckets)}")
    return min(fitting)


class CompiledDecode:
    """torch.compile of the decode step (the cpu graph mode); shapes are static per bucket.

    Collectives (gloo at tp > 1) may split the compiled step into several graphs; it still runs.
    """

    def __init__(self, decode: DecodeFn) -> None:
        self.fn = torch.compile(decode, dynamic=False, fullgraph=False)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor) -> torch.Tensor:
        return self.fn(tokens, positions, cache_lens)


class GraphDecode:
    """One captured device graph per bucket, with static input and output buffers.

    `backend` is torch.cuda or torch.npu (after `import torch_npu`); tests pass a stand-in with the
    same surface (Stream, current_stream, stream, graph, CUDAGraph/NPUGraph, synchronize).
    """

    def __init__(self, decode: DecodeFn, buckets: Sequence[int], device: torch.device, backend: Any = None) -> None:
        backend = getattr(torch, device.type) if backend is None else backend
        graph_class = backend.CUDAGraph if device.type == "cuda" else backend.NPUGraph
        self.graphs: dict[int, tuple[Any, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        pool = None
        for size in sorted(buckets, reverse=True):  # largest first so smaller graphs reuse its pool
            inputs = tuple(torch.zeros(size, dtype=torch.long, device=device) for _ in range(3))
            stream = backend.Stream()
            stream.wait_stream(backend.current_stream())
            with backend.stream(stream):
                for _ in range(2):  # warm up kernels and collectives outside the capture
                    decode(*inputs)
            backend.current_stream().wait_stream(stream)
            graph = graph_class()
            with backend.graph(graph, pool=pool):
                output = decode(*inputs)
            pool = graph.pool()
            self.graphs[size] = (graph, inputs, output)
        backend.synchronize()

    @property
    def buckets(self) -> list[int]:
        return sorted(self.graphs)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor) -> torch.Tensor:
        """Copy the step's inputs into the bucket's static buffers and replay; the output buffer is reused."""
        if tokens.shape[0] not in self.graphs:
            raise ValueError(f"no graph captured for batch {tokens.shape[0]}; buckets are {self.buckets}")
        graph, inputs, output = self.graphs[tokens.shape[0]]
        for buffer, value in zip(inputs, (tokens, positions, cache_lens)):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        return output
