"""`simulate --calibrate`: fit the `cpu-here` profile to this machine's real kernels.

`python -m cluster.tools.simulate --calibrate [--json OUT]` loads the tiny and the 0.5B-shaped
checkpoints of `cluster.tools.bench` with this engine's `ModelRunner` (fp32, eager, in process) and times:

- the read bandwidth (`bench.measure_bandwidth`, a `sum` over 512 MB);
- a decode step at each batch size of `BATCHES` (median gap between tokens, 16-token prompts);
- a first token after prompts of `PROMPTS` tokens (batch 1);
- the vision tower over the benchmarks' image (a check: not fitted).

Fitted (cluster/tools/cost_model.py's terms): the eager per-layer cost from the tiny shape's decode
step (its bytes and FLOPs are negligible: (step - eager call) / layers); the bandwidth efficiency from
the 0.5B shape's batch-1 step less that fixed cost, over its bytes; the rate of matrix products from the
largest batch's decode step and the longest prompt's first token, less the fixed cost (both bound by
arithmetic here): `gemm_half_rows` so that the model's ratio of the two equals the measured one, then
the FLOPs efficiency from the prompt (the peak is raised to the measured rate where that exceeds it).
The shorter prompt is modelled from the fitted figures, not fitted: it checks them. Prints the measured
and modelled seconds side by side; `--json` writes the fitted profile, which `--hardware OUT.json` then
uses. The figures are this machine's at the time: other processes on its cores show up in them.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from cluster.tools import cost_model
from cluster.tools.fake_workers import TOKEN_RANGE
from cluster.tools.hardware import Hardware, hardware
from cluster.tools.model_shapes import model_shape

BATCHES = (1, 4)
PROMPTS = (16, 256)
NEW_TOKENS = 8


def _requests(runner, count: int, length: int) -> list:
    """Text-only prompts of ordinary ids (none of the checkpoint's vision or EOS ids)."""
    from model.processor import PreparedRequest

    c = runner.config
    special = {c.image_token_id, c.video_token_id, c.vision_start_token_id, *c.eos_token_ids}
    ids = [t for t in range(*TOKEN_RANGE) if t not in special]
    return [PreparedRequest(f"c{i}", [ids[(i * 7 + j) % len(ids)] for j in range(length)], None, None)
            for i in range(count)]  # fmt: skip


def _runner(name: str):
    from cluster.tools.bench import CACHE_DIR, CHECKPOINTS
    from cluster.tools.tiny_checkpoint import build_tiny_checkpoint
    from model.runner import ModelRunner

    directory, spec = CHECKPOINTS[name]
    path = build_tiny_checkpoint(CACHE_DIR / directory, spec)
    return path, ModelRunner(path, max_batch_size=max(BATCHES), max_seq_len=max(PROMPTS) + NEW_TOKENS + 8)


def _times(runner, count: int, length: int, new_tokens: int) -> list[list[float]]:
    from model.sampling import SamplingParams

    params = [SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)] * count
    results = runner.generate(_requests(runner, count, length), params, eos_token_ids=[])
    return [r.token_times_s for r in results]


def _step_s(runner, batch: int) -> float:
    """Median gap between successive tokens of `batch` requests decoded together (after one warm-up run)."""
    _times(runner, batch, 16, 2)
    gaps = [b - a for times in _times(runner, batch, 16, NEW_TOKENS) for a, b in zip(times, times[1:])]
    return statistics.median(gaps)


def _first_token_s(runner, length: int) -> float:
    _times(runner, 1, length, 1)
    return statistics.median(_times(runner, 1, length, 1)[0][0] for _ in range(3))


def _vision_s(runner, path) -> tuple[int, float]:
    """(patches, median seconds) of the vision tower over the benchmarks' image (its cache off)."""
    from cluster.tools.bench import CACHE_DIR, bench_image
    from model.processor import PromptBuilder

    request = PromptBuilder.from_pretrained(path).build(
        {"id": "calibrate", "prompt": "Describe.", "images": [str(bench_image(CACHE_DIR))]}
    )
    runner.vision_cache = None
    runner.encode_images([request])
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        runner.encode_images([request])
        seconds.append(time.perf_counter() - start)
    return int(request.image_grid_thw.prod(-1).sum()), statistics.median(seconds)


def fit_products(
    shape, base: Hardware, few: tuple[list[tuple[int, int]], float], many: tuple[list[tuple[int, int]], float]
) -> tuple[float, float]:
    """(gemm_half_rows, flops_efficiency) with which the cost model gives the measured arithmetic seconds of two
    forwards, each (rows of `cost_model.forward`, seconds): one of few rows (a batch's decode step), one of
    many (a long first prompt). The half-rate rows from the ratio of the two (bisection; 0 when the few-row
    forward runs no slower than the model's full rate gives), then the efficiency from the second. An
    efficiency above 1 means the measured rate exceeds the profile's peak."""

    def model(half_rows: float, rows: list[tuple[int, int]]) -> float:
        profile = dataclasses.replace(base, flops_efficiency=1.0, gemm_half_rows=half_rows)
        return cost_model.forward(shape, profile, 1, "fp32", rows, graph=False).compute_s

    (few_rows, few_s), (many_rows, many_s) = few, many
    target = few_s / many_s
    low, high = 0.0, 4096.0
    if model(low, few_rows) / model(low, many_rows) >= target:
        high = 0.0
    elif model(high, few_rows) / model(high, many_rows) <= target:
        low = high
    while high - low > 0.01:
        mid = (low + high) / 2
        low, high = (mid, high) if model(mid, few_rows) / model(mid, many_rows) < target else (low, mid)
    half_rows = (low + high) / 2
    return half_rows, model(half_rows, many_rows) / many_s


def calibrate() -> tuple[Hardware, list[dict]]:
    """The fitted cpu-here profile and the rows (what, measured s, modelled s) behind it."""
    from cluster.tools.bench import measure_bandwidth

    base = hardware("cpu-here")
    bandwidth = measure_bandwidth()["read_gb_s"] * 1e9
    tiny_path, tiny = _runner("tiny")
    tiny_shape = model_shape(str(tiny_path))
    tiny_step = _step_s(tiny, 1)
    layer_s = max(0.0, (tiny_step - base.eager_call_s) / tiny_shape.layers)
    del tiny
    small_path, small = _runner("small")
    shape = model_shape(str(small_path))
    fixed = base.eager_call_s + shape.layers * layer_s
    steps = {b: _step_s(small, b) for b in BATCHES}
    one = cost_model.decode_step(shape, base, 1, "fp32", [24], graph=False)
    bandwidth_efficiency = (one.weight_bytes + one.kv_bytes) / (bandwidth * max(steps[1] - fixed, 1e-6))
    firsts = {p: _first_token_s(small, p) for p in PROMPTS}
    patches, vision_s = _vision_s(small, small_path)
    batch, prompt = max(BATCHES), max(PROMPTS)
    half_rows, flops_efficiency = fit_products(
        shape,
        base,
        ([(1, 16 + NEW_TOKENS // 2)] * batch, max(steps[batch] - fixed, 1e-6)),
        ([(prompt, prompt)], max(firsts[prompt] - fixed, 1e-6)),
    )
    peak = base.bf16_flops * max(1.0, flops_efficiency)
    fitted = dataclasses.replace(
        base,
        bandwidth=bandwidth,
        bf16_flops=peak,
        int8_ops=peak,
        bandwidth_efficiency=min(1.0, bandwidth_efficiency),
        flops_efficiency=min(1.0, flops_efficiency),
        eager_layer_s=layer_s,
        gemm_half_rows=half_rows,
    )
    rows = [{"what": "tiny decode step, batch 1", "measured_s": tiny_step,
             "modelled_s": cost_model.decode_step(tiny_shape, fitted, 1, "fp32", [24], False).seconds}]  # fmt: skip
    for b, seconds in steps.items():
        model = cost_model.decode_step(shape, fitted, 1, "fp32", [16 + NEW_TOKENS // 2] * b, False).seconds
        rows.append({"what": f"0.5B decode step, batch {b}", "measured_s": seconds, "modelled_s": model})
    for p, seconds in firsts.items():
        model = cost_model.prefill_step(shape, fitted, 1, "fp32", [(p, p)], []).seconds
        rows.append({"what": f"0.5B first token after {p} prompt tokens", "measured_s": seconds, "modelled_s": model})
    model = cost_model.vision_image_s(shape, fitted, patches, "fp32")
    rows.append({"what": f"0.5B vision tower, {patches} patches", "measured_s": vision_s, "modelled_s": model})
    return fitted, rows


def main(argv: list[str]) -> int:
    out = None
    if "--json" in argv:
        index = argv.index("--json")
        if index + 1 >= len(argv):
            print("simulate --calibrate: --json needs a path", file=sys.stderr)
            return 2
        out = Path(argv[index + 1])
    fitted, rows = calibrate()
    print(f"{'kernel':<44}{'measured ms':>12}{'modelled ms':>12}")
    for row in rows:
        print(f"{row['what']:<44}{1e3 * row['measured_s']:>12.2f}{1e3 * row['modelled_s']:>12.2f}")
    print(json.dumps(fitted.to_dict(), indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**fitted.to_dict(), "calibration": rows}, indent=2) + "\n")
        print(f"profile: {out} (use it as --hardware {out})")
    return 0
