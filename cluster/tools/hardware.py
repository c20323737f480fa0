"""Hardware profiles for the capacity planner: one device's memory bandwidth, peaks, link and fixed costs.

Each profile is one device (an NPU die, a GPU, this machine's CPU) from published specifications;
docs/simulator.md gives the source of every figure. The efficiency factors and fixed costs are the
cost model's assumptions (cluster/tools/cost_model.py says where each comes from); `cpu-here` is fitted
to this machine's measured figures.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

GB = 1e9
TFLOPS = 1e12


@dataclass(frozen=True)
class Hardware:
    """One device of a TP group.

    bandwidth: HBM (memory) read bandwidth, bytes/s; bf16_flops, int8_ops: dense matrix peaks per second;
    memory_bytes: device memory; link_bandwidth: all-reduce bus bandwidth per device, bytes/s;
    link_latency_s: fixed cost of one all-reduce; bandwidth_efficiency, flops_efficiency: the share of
    the peak a step reaches; call_s: a step call's fixed device-side cost (launch, sampling) with a
    captured graph (graph_call_s) or eager (eager_call_s); graph_layer_s, eager_layer_s: fixed cost per
    decoder layer (kernel launches) in each mode; device: the engine's device kind (KV block size);
    gemm_half_rows: the rows M at which a matrix product of M >= 2 rows runs at half its rate (the rate
    is peak x flops_efficiency x M / (M + gemm_half_rows)); 0, the accelerators' value: every product at
    the full rate (their few-row products are bound by the weight read, which the memory term prices).
    A single row is a matrix-vector product, bound by the weight read, at the full rate.
    """

    name: str
    device: str
    bandwidth: float
    bf16_flops: float
    int8_ops: float
    memory_bytes: float
    link_bandwidth: float
    link_latency_s: float
    bandwidth_efficiency: float
    flops_efficiency: float
    graph_call_s: float
    eager_call_s: float
    graph_layer_s: float
    eager_layer_s: float
    gemm_half_rows: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _accelerator(name: str, device: str, bw: float, bf16: float, int8: float, mem: float, link: float,
                 layer_eager_s: float) -> Hardware:  # fmt: skip
    # Efficiencies and fixed costs shared by the accelerators (docs/simulator.md, "Constants"):
    # 80% of HBM bandwidth (gpt-fast's batch-1 figure, FACTS.md section 2), 55% of the matrix peak in
    # prefill, 10 us per all-reduce, 0.3 ms per graph launch and 1 ms per eager call, 5 us per layer in a graph.
    return Hardware(name, device, bw, bf16, int8, mem, link, 10e-6, 0.80, 0.55, 0.3e-3, 1.0e-3, 5e-6, layer_eager_s)


PROFILES: dict[str, Hardware] = {
    # Atlas A3: one Ascend 910C die (half a chip): 1.6 TB/s of 3.2, ~390 of ~780 TFLOPS bf16, int8 twice that,
    # 64 GB, HCCS ~196 GB/s per die inside a node (FACTS.md sections 2 and 10).
    "a3": _accelerator("a3", "npu", 1.6e12, 390 * TFLOPS, 780 * TFLOPS, 64 * GB, 196 * GB, 150e-6),
    # Atlas 800T A2 (Ascend 910B3): 1.6 TB/s HBM2e, 313 TFLOPS fp16/bf16, 626 TOPS int8, 64 GB, HCCS 7 x 56 GB/s.
    "910b": _accelerator("910b", "npu", 1.6e12, 313 * TFLOPS, 626 * TFLOPS, 64 * GB, 392 * GB, 150e-6),
    # NVIDIA A100 SXM 80 GB: 2.039 TB/s, 312 TFLOPS bf16 dense, 624 TOPS int8, NVLink 600 GB/s.
    "a100-80g": _accelerator("a100-80g", "cuda", 2.039e12, 312 * TFLOPS, 624 * TFLOPS, 80 * GB, 600 * GB, 100e-6),
    # NVIDIA H100 SXM: 3.35 TB/s, 989 TFLOPS bf16 dense, 1979 TOPS int8, 80 GB, NVLink 900 GB/s.
    "h100": _accelerator("h100", "cuda", 3.35e12, 989 * TFLOPS, 1979 * TFLOPS, 80 * GB, 900 * GB, 100e-6),
    # NVIDIA H200: H100's compute, 4.8 TB/s HBM3e, 141 GB.
    "h200": _accelerator("h200", "cuda", 4.8e12, 989 * TFLOPS, 1979 * TFLOPS, 141 * GB, 900 * GB, 100e-6),
    # This machine's 2 cores, fp32, as `simulate --calibrate` fitted them on 2026-12-08 (docs/simulator.md,
    # "Validation against the real engine here"), with the few-row products of 4-64 rows on packed weights
    # (model/cpu_linear.py): 19.6 GB/s read (`bench.measure_bandwidth`), a batch-1 decode step of the 0.5B
    # shape at 89% of it; matrix products at 92% of 210 GFLOPS (the first token after 256 prompt tokens) and
    # at half that rate at 24 rows (a batch-4 decode step); the tiny shape's eager step is within the 2 ms
    # per call, so no cost per eager layer is left.
    "cpu-here": Hardware(
        "cpu-here",
        "cpu",
        19.6 * GB,
        210e9,
        210e9,
        32 * GB,
        20 * GB,
        50e-6,
        0.89,
        0.92,
        1e-3,
        2e-3,
        0.1e-3,
        0.0,
        gemm_half_rows=23.6,
    ),
}


def hardware(name: str) -> Hardware:
    """The profile called `name`, or one a `.json` file holds (what `simulate --calibrate --json` writes);
    ValueError naming the value otherwise."""
    if name.endswith(".json"):
        path = Path(name)
        try:
            data = json.loads(path.read_text())
            fields = {f.name for f in dataclasses.fields(Hardware)}
            return Hardware(**{k: v for k, v in data.items() if k in fields})
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"--hardware={name!r}: not a hardware profile ({e})") from e
    if name not in PROFILES:
        raise ValueError(f"--hardware={name!r}: choose from {', '.join(PROFILES)} or a .json profile")
    return PROFILES[name]
