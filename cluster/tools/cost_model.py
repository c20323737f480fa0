"""The planner's cost model: seconds of each kind of work on one TP group, from bytes, FLOPs and fixed costs.

One function per kind of work; each takes a `ModelShape` (cluster/tools/model_shapes.py) and a
`Hardware` profile (cluster/tools/hardware.py). Per rank of a TP group of `tp` ranks:

- `forward`: one forward over rows of (new tokens, context after the step): a pure-decode step (one
  new token per row) or a packed prefill round (prompt chunks and decode rows). Its time is
  max(bytes / (bandwidth x bandwidth_efficiency), FLOPs / (peak x flops_efficiency)) + all-reduces
  + a fixed cost per call and per layer (captured graph or eager). A matrix product of M >= 2 rows runs
  at M / (M + gemm_half_rows) of the peak (`rows_rate`; 0 on the accelerators: full rate).
  Bytes: the rank's weights (linear weights at 2 bytes in bf16, 1 in w8a8; embeddings, LM head at 2),
  each row's KV read over its whole context and the new tokens' KV written.
  FLOPs: 2 x tokens x linear weights, attention 4 x layers x heads/tp x head_dim x new x (past + (new+1)/2),
  and the LM head for every row; w8a8 runs the linear FLOPs at the int8 peak.
- `allreduce_s`: 2 all-reduces per layer (after o_proj and after down_proj) of tokens x hidden x 2 bytes,
  ring algorithm: latency + 2 (tp - 1) / tp x bytes / link bandwidth.
- `vision_image_s`: the vision tower over one image (or video) of `patches` patches: 2 x patches x block
  weights per block, attention over 64-patch windows in the windowed blocks and over all patches in
  the full-attention ones, the 2x2 merger, its weights read once; eager (a fixed cost per block).
- `coordinator_s`: the Coordinator's CPU time per call and per delivered token, from this project's
  measured figures (docs/coordinator_bench.md, docs/benchmarks.md "Ray call cost").

docs/simulator.md gives every constant's source and a worked example (the 72B at TP 8 on `a3`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.tools.hardware import Hardware
from cluster.tools.model_shapes import ModelShape

WEIGHTS = ("bf16", "w8a8", "fp32")  # fp32: a float32 run (cpu-here)
# The Coordinator's own time (docs/simulator.md "Constants"): a step call through the compiled graph from
# the Coordinator's round to its reply, 1.10 ms (bench_calls, 1 worker; docs/benchmarks.md "Ray call
# cost"), and 73 us of CPU per delivered token (bench_coordinator, Ray actor, multiplexed streams, 16 x 64;
# docs/coordinator_bench.md).
COORDINATOR_CALL_S = 1.10e-3
COORDINATOR_TOKEN_S = 73e-6


@dataclass(frozen=True)
class StepCost:
    """What one forward reads and computes on one rank, and the seconds each bound gives."""

    weight_bytes: float
    kv_bytes: float
    flops: float
    memory_s: float
    compute_s: float
    comm_s: float
    fixed_s: float

    @property
    def seconds(self) -> float:
        """max(memory, compute) + all-reduces + fixed costs."""
        return max(self.memory_s, self.compute_s) + self.comm_s + self.fixed_s


def check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"--weights={weights!r}: choose from {', '.join(WEIGHTS)}")


def element_bytes(weights: str) -> int:
    """Bytes of an activation, a KV entry, an embedding or LM head weight: 4 in fp32, else 2 (w8a8 keeps them bf16)."""
    check_weights(weights)
    return 4 if weights == "fp32" else 2


def kv_heads_per_rank(shape: ModelShape, tp: int) -> int:
    """KV heads each rank holds (replicated when tp exceeds the KV heads)."""
    return max(1, shape.kv_heads // tp)


def kv_bytes_per_token(shape: ModelShape, tp: int, weights: str = "bf16") -> int:
    """Keys and values of one token over every layer, on one rank: 2 x layers x kv heads/rank x head_dim x bytes."""
    return 2 * shape.layers * kv_heads_per_rank(shape, tp) * shape.head_dim * element_bytes(weights)


def linear_params_per_layer(shape: ModelShape) -> int:
    """Matrix weights of one decoder layer (q, k, v, o and the three MLP projections)."""
    kv = shape.kv_heads * shape.head_dim
    return shape.hidden * (shape.hidden + 2 * kv) + shape.hidden * shape.hidden + 3 * shape.hidden * shape.intermediate


def weight_bytes(shape: ModelShape, weights: str, tp: int) -> float:
    """Bytes of weights one rank reads per forward: its share of the layers' matrices and of the LM head."""
    per_weight = 1 if weights == "w8a8" else element_bytes(weights)
    lm_head = shape.lm_head_params() * element_bytes(weights)
    return (shape.layers * linear_params_per_layer(shape) * per_weight + lm_head) / tp


def allreduce_s(shape: ModelShape, hw: Hardware, tp: int, tokens: int, weights: str = "bf16") -> float:
    """2 ring all-reduces per layer of tokens x hidden x 2 bytes: layers x 2 x (latency + 2(tp-1)/tp x bytes / link)."""
    if tp == 1:
        return 0.0
    size = tokens * shape.hidden * element_bytes(weights)
    return shape.layers * 2 * (hw.link_latency_s + 2 * (tp - 1) / tp * size / hw.link_bandwidth)


def rows_rate(hw: Hardware, rows: int) -> float:
    """The share of the peak a matrix product of `rows` rows runs at: rows / (rows + gemm_half_rows) from 2 rows
    up, 1 for a single row (a matrix-vector product, bound by the weight read)."""
    return 1.0 if rows < 2 or hw.gemm_half_rows <= 0 else rows / (rows + hw.gemm_half_rows)


def forward(
    shape: ModelShape, hw: Hardware, tp: int, weights: str, rows: list[tuple[int, int]], graph: bool
) -> StepCost:
    """One forward on one rank over `rows` of (new tokens, context after the step), e.g. (1, 812) for a decode
    row at length 812, (512, 512) for a first prompt chunk; `graph`: a captured decode graph, else eager."""
    tokens = sum(n for n, _ in rows)
    weight = weight_bytes(shape, weights, tp)
    kv = kv_bytes_per_token(shape, tp, weights) * (
        sum(c for _, c in rows) + tokens
    )  # read every row's context, write new
    linear = 2 * tokens * shape.layers * linear_params_per_layer(shape) / tp
    heads = shape.heads / tp
    attention = sum(4 * shape.layers * heads * shape.head_dim * n * (c - n + (n + 1) / 2) for n, c in rows)
    lm_head = 2 * len(rows) * shape.lm_head_params() / tp
    linear_peak = (hw.int8_ops if weights == "w8a8" else hw.bf16_flops) * rows_rate(hw, tokens)
    lm_head_peak = hw.bf16_flops * rows_rate(hw, len(rows))
    compute = (linear / linear_peak + lm_head / lm_head_peak + attention / hw.bf16_flops) / hw.flops_efficiency
    memory = (weight + kv) / (hw.bandwidth * hw.bandwidth_efficiency)
    fixed = (
        hw.graph_call_s + shape.layers * hw.graph_layer_s
        if graph
        else hw.eager_call_s + shape.layers * hw.eager_layer_s
    )
    return StepCost(
        weight, kv, linear + attention + lm_head, memory, compute, allreduce_s(shape, hw, tp, tokens, weights), fixed
    )


def decode_step(shape: ModelShape, hw: Hardware, tp: int, weights: str, contexts: list[int], graph: bool) -> StepCost:
    """One pure-decode step: one new token per row; `contexts` are the rows' lengths after the step."""
    return forward(shape, hw, tp, weights, [(1, c) for c in contexts], graph)


def prefill_step(
    shape: ModelShape, hw: Hardware, tp: int, weights: str, chunks: list[tuple[int, int]], decode: list[int]
) -> StepCost:
    """One packed round (eager): prompt chunks of (tokens, context after) and decode rows at their lengths."""
    return forward(shape, hw, tp, weights, list(chunks) + [(1, c) for c in decode], graph=False)


def vision_image_flops(shape: ModelShape, patches: int) -> float:
    """FLOPs of the vision tower over one image of `patches` patches (before the 2x2 merge)."""
    h, i = shape.vision_hidden, shape.vision_intermediate
    embed = 2 * patches * 3 * 2 * shape.patch * shape.patch * h
    blocks = 2 * patches * shape.vision_depth * (4 * h * h + 3 * h * i)
    windowed = shape.vision_depth - shape.full_attention_blocks
    attention = (
        4 * patches * h * (windowed * min(patches, shape.window_patches()) + shape.full_attention_blocks * patches)
    )
    width = h * shape.spatial_merge**2
    merger = 2 * (patches / shape.spatial_merge**2) * (width * width + width * shape.vision_out_hidden)
    return embed + blocks + attention + merger


def vision_image_s(shape: ModelShape, hw: Hardware, patches: int, weights: str = "bf16") -> float:
    """Seconds of the whole vision tower over one image on one device (bf16, fp32 in an fp32 run; eager: a fixed
    cost per block)."""
    compute = vision_image_flops(shape, patches) / (hw.bf16_flops * hw.flops_efficiency * rows_rate(hw, patches))
    memory = shape.vision_params() * element_bytes(weights) / (hw.bandwidth * hw.bandwidth_efficiency)
    return max(compute, memory) + shape.vision_depth * hw.eager_layer_s


def vision_call_s(
    shape: ModelShape, hw: Hardware, tp: int, mode: str, images: list[int], weights: str = "bf16"
) -> float:
    """One encode call of a TP group over images of these patch counts: `dp` mode gives each rank whole
    images (largest first, to the least loaded rank) and waits for the busiest; `tp` splits each image's
    FLOPs over the ranks, with 2 all-reduces per block of patches x vision hidden x 2 bytes."""
    if not images:
        return 0.0
    if mode == "dp":
        loads = [0.0] * tp
        for patches in sorted(images, reverse=True):
            loads[loads.index(min(loads))] += vision_image_s(shape, hw, patches, weights)
        return hw.eager_call_s + max(loads)
    total = 0.0
    for patches in images:
        compute = vision_image_flops(shape, patches) / (
            hw.bf16_flops * hw.flops_efficiency * rows_rate(hw, patches) * tp
        )
        reduce = 0.0
        if tp > 1:
            size = patches * shape.vision_hidden * element_bytes(weights)
            reduce = shape.vision_depth * 2 * (hw.link_latency_s + 2 * (tp - 1) / tp * size / hw.link_bandwidth)
        total += compute + reduce + shape.vision_depth * hw.eager_layer_s
    return hw.eager_call_s + total


def coordinator_s(calls: int, tokens: int) -> float:
    """The Coordinator's time around `calls` step calls delivering `tokens` tokens (measured constants above)."""
    return calls * COORDINATOR_CALL_S + tokens * COORDINATOR_TOKEN_S
