"""Int8 (W8A8) against float, in one run: `python -m cluster.tools.bench_quant [--checkpoint small] [--out DIR]`.

Builds the random checkpoint (`small`: the Qwen2.5-0.5B text shape, as cluster.tools.bench) and its
W8A8 copy with `model.quantize` (both cached), then, in process on cpu, for the float runner and the
int8 one:
- decode TPOT at batch 1 and 8: the median of `--steps` eager decode steps over a cache of 128
  tokens per row, float and int8 taking turns step by step (other load falls on both alike);
- the bytes one step reads (text weights, scales included, LM head and the attended KV entries),
  and that step's share of the copy-bandwidth roofline (bytes / TPOT against the copy bandwidth
  measured in the same run, read + written bytes per second as FACTS 2b counts it);
- prefill time of a 128-token text prompt (median of 3);
- teacher-forced accuracy against the float logits: top-1 agreement and mean KL(float || int8);
- batch-1 TPOT of the int8 model on each cpu kernel (int8pack, _int_mm, dequantized math), the
  measurement behind the kernel choice in model/quant.py.
Writes bench_quant.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cluster.tools.bench import CACHE_DIR, CHECKPOINTS, TEXT_PROMPT, decode_bytes, log, measure_bandwidth
from cluster.tools.greedy_check import decode_step_logits
from cluster.tools.tiny_checkpoint import build_tiny_checkpoint
from model.processor import PreparedRequest, PromptBuilder
from model.quant import DESCRIPTION_FILE, STATIC, use_backend
from model.quantize import quantize_checkpoint
from model.runner import ModelRunner
from model.sampling import SamplingParams

CONTEXT = 128  # cache entries per row at each timed decode step, and the prefill prompt's length
BATCHES = (1, 8)
ACCURACY_PROMPTS = (
    TEXT_PROMPT,
    "Explain how a bicycle gear works to a child, in four short sentences.",
)


def quantized_copy(path: Path, scheme: str = STATIC) -> Path:
    """`path`'s quantized copy beside it (written by model.quantize on first use)."""
    out = path.with_name(f"{path.name}-{scheme.lower()}")
    if not (out / DESCRIPTION_FILE).is_file():
        log(f"quantizing {path} -> {out} ({scheme})")
        quantize_checkpoint(path, out, scheme)
    return out


def quant_accuracy(
    float_runner: ModelRunner, quant_runner: ModelRunner, prompts: list[PreparedRequest], steps: int
) -> dict[str, float]:
    """Teacher-forced on the float runner's greedy tokens: top-1 agreement and mean KL(float || int8) per step."""
    params = [SamplingParams(max_new_tokens=steps, ignore_eos=True)] * len(prompts)
    continuations = [r.output_token_ids for r in float_runner.generate(prompts, params, [])]
    agree, kls = 0, []
    for prompt, continuation in zip(prompts, continuations):
        ref = decode_step_logits(float_runner, prompt, continuation)
        ours = decode_step_logits(quant_runner, prompt, continuation)
        agree += int((ref.argmax(-1) == ours.argmax(-1)).sum())
        kl = torch.nn.functional.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
        kls.extend(kl.sum(-1).tolist())
    return {"top1_agreement": agree / len(kls), "mean_kl": statistics.mean(kls), "steps": len(kls)}


@torch.inference_mode()
def decode_tpot_ms(runners: dict[str, ModelRunner], batch: int, steps: int) -> dict[str, float]:
    """Median ms of one eager decode step of `batch` rows attending CONTEXT cache entries, per runner.

    The runners take turns step by step, so that load from other processes falls on all of them alike.
    """
    tokens = torch.arange(batch) % 100 + 5
    lens = torch.full((batch,), CONTEXT)
    times: dict[str, list[float]] = {label: [] for label in runners}
    for step in range(steps + 1):  # the first step is a warm-up
        for label, runner in runners.items():
            start = time.perf_counter()
            runner.decode(tokens, lens, lens, max_len=CONTEXT + 1)
            if step:
                times[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(t) for label, t in times.items()}


@torch.inference_mode()
def prefill_ms(runners: dict[str, ModelRunner], repeats: int = 3) -> dict[str, float]:
    """Median ms of prefilling a CONTEXT-token text prompt, per runner, taking turns."""
    request = PreparedRequest("prefill", [(7 * i) % 1000 + 10 for i in range(CONTEXT)], None, None)
    times: dict[str, list[float]] = {label: [] for label in runners}
    for repeat in range(repeats + 1):
        for label, runner in runners.items():
            start = time.perf_counter()
            runner.prefill(request, None, slot=0)
            if repeat:
                times[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(t) for label, t in times.items()}


def bench(name: str, steps: int, cache: Path) -> dict[str, Any]:
    directory, spec = CHECKPOINTS[name]
    path = build_tiny_checkpoint(cache / directory, spec)
    qpath = quantized_copy(path)
    bandwidth = measure_bandwidth()
    builder = PromptBuilder.from_pretrained(path)
    prompts = [builder.build({"id": f"a{i}", "prompt": p}) for i, p in enumerate(ACCURACY_PROMPTS)]
    report: dict[str, Any] = {
        "checkpoint": str(path),
        "quantized": str(qpath),
        "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
        "bandwidth": bandwidth,
        "runs": {},
    }
    runners = {}
    for label, p in (("float", path), ("int8", qpath)):
        log(f"{name}/{label}: loading {p}")
        runners[label] = ModelRunner(p, max_batch_size=max(BATCHES), max_seq_len=2 * CONTEXT + 64)
    prefill = prefill_ms(runners)
    tpots = {batch: decode_tpot_ms(runners, batch, steps) for batch in BATCHES}
    for label, runner in runners.items():
        size = decode_bytes(runner, [CONTEXT] * max(BATCHES), 0)
        entry: dict[str, Any] = {"prefill_ms": prefill[label], "batches": {}}
        for batch in BATCHES:
            tpot = tpots[batch][label]
            step_bytes = size["weights_bytes"] + size["lm_head_bytes"] + batch * CONTEXT * size["kv_bytes_per_token"]
            entry["batches"][str(batch)] = {
                "tpot_ms": tpot,
                "bytes_per_step": step_bytes,
                "roofline_share": step_bytes / (tpot / 1e3) / (bandwidth["copy_gb_s"] * 1e9),
            }
            log(f"{name}/{label}/batch {batch}: TPOT {tpot:.1f} ms, {step_bytes / 1e6:.0f} MB per step")
        log(f"{name}/{label}: prefill of {CONTEXT} tokens {entry['prefill_ms']:.0f} ms")
        report["runs"][label] = entry
    report["accuracy"] = quant_accuracy(runners["float"], runners["int8"], prompts, steps=16)
    log(f"{name}: accuracy {report['accuracy']}")
    kernels = {}
    for backend in ("int8pack", "int_mm", "dequant"):
        use_backend(runners["int8"].model, backend)
        kernels[backend] = decode_tpot_ms({backend: runners["int8"]}, 1, max(2, steps // 4))[backend]
        log(f"{name}/int8 kernel {backend}: batch-1 TPOT {kernels[backend]:.1f} ms")
    report["cpu_kernels_batch1_tpot_ms"] = kernels
    report["load_average_at_end"] = os.getloadavg()[0]
    return report


def format_table(report: dict[str, Any]) -> str:
    runs = report["runs"]
    lines = [
        f"copy bandwidth {report['bandwidth']['copy_gb_s']:.1f} GB/s (read + write), {report['threads']} thread(s), "
        f"load average {report['load_average_at_start']:.1f} at start, {report['load_average_at_end']:.1f} at end",
        f"{'path':<6} {'batch':>5} {'TPOT ms':>8} {'MB/step':>8} {'roofline':>8}",
    ]
    for label, entry in runs.items():
        for batch, b in entry["batches"].items():
            mb = b["bytes_per_step"] / 1e6
            lines.append(f"{label:<6} {batch:>5} {b['tpot_ms']:>8.1f} {mb:>8.0f} {b['roofline_share']:>8.0%}")
    for batch in runs["float"]["batches"]:
        ratio = runs["int8"]["batches"][batch]["tpot_ms"] / runs["float"]["batches"][batch]["tpot_ms"]
        lines.append(f"int8 / float TPOT at batch {batch}: {ratio:.2f}x")
    fp, q = runs["float"]["prefill_ms"], runs["int8"]["prefill_ms"]
    lines.append(f"prefill {CONTEXT} tokens: float {fp:.0f} ms, int8 {q:.0f} ms ({q / fp:.2f}x)")
    acc = report["accuracy"]
    lines.append(
        f"teacher-forced vs float: top-1 {acc['top1_agreement']:.1%} of {acc['steps']}, mean KL {acc['mean_kl']:.4f}"
    )
    kernels = ", ".join(f"{k} {v:.1f} ms" for k, v in report["cpu_kernels_batch1_tpot_ms"].items())
    lines.append(f"int8 batch-1 TPOT per cpu kernel: {kernels}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.bench_quant", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="small", choices=sorted(CHECKPOINTS))
    parser.add_argument("--steps", type=int, default=12, help="timed decode steps per batch size")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR))
    parser.add_argument("--out", default="outputs/bench", help="output directory")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = bench(args.checkpoint, args.steps, Path(args.cache_dir).expanduser())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quant.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"wrote {out / 'bench_quant.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
