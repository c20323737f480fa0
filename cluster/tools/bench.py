"""Decode benchmark: transformers vs our runner (eager, graph) vs our engine through Ray, on one machine.

`python -m cluster.tools.bench [--checkpoints tiny,small] [--batch-sizes 1,4] [--new-tokens N] [--out DIR]
[--skip-ray] [--quick]` builds random checkpoints into a cache directory (reused when present), runs
the same prompts (text-only and with one image, alternating) greedily for a fixed number of output
tokens (EOS ignored) on every engine, and writes bench.json, bench.png and a printed table.

Definitions: TTFT from the start of a generate call to its first token; TPOT median and p90 over
every inter-token interval of every request (ITL); output tokens/s = output tokens / wall time of
the generate calls. Each engine runs a warm-up pass, then `--repeats` timed passes of which the
one with the least wall time is kept (load from other processes only adds time). The roofline is
the time to read, once per decode step, the text weights that decode touches (layers, final norm,
LM head; the embedding table is only indexed) plus the KV entries actually attended, at the
machine's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cluster.tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint, preset
from model.processor import PreparedRequest, PromptBuilder
from model.runner import ModelRunner
from model.sampling import SamplingParams

CACHE_DIR = Path.home() / ".cache" / "qwen2_5_vl_ray"
# name -> (directory under CACHE_DIR, spec). "small" has the Qwen2.5-0.5B text shape (untied LM head)
# and a 2-block vision tower.
CHECKPOINTS: dict[str, tuple[str, TinySpec]] = {
    "tiny": ("tiny-qwen2.5-vl", preset("default")),
    "small": ("bench-small", preset("small")),
}
ENGINES = ("hf", "hf_static_compile", "ours_eager", "ours_graph", "ray_tp1", "ray_tp1_graph")
BASELINE = "hf"
TEXT_PROMPT = "Describe the weather today and tomorrow, then summarize the report in three sentences."
IMAGE_PROMPT = "What is in this photo? Describe it in detail."
IMAGE_SIZE = (224, 224)  # 64 image tokens after the 2x2 merge


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------- inputs
def bench_image(cache: Path) -> Path:
    path = cache / "bench-image.png"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0 : IMAGE_SIZE[1], 0 : IMAGE_SIZE[0]]
        base = np.stack([xx, yy, (xx + yy) / 2], axis=-1) * 255 / max(IMAGE_SIZE)
        Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)).save(path)
    return path


def bench_requests(count: int, image: Path) -> list[dict]:
    """`count` raw requests alternating text-only and one-image prompts, text first."""
    return [
        {"id": f"r{i}", "prompt": TEXT_PROMPT, "images": []}
        if i % 2 == 0
        else {"id": f"r{i}", "prompt": IMAGE_PROMPT, "images": [str(image)]}
        for i in range(count)
    ]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# --------------------------------------------------------------------------------- metrics
def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize_runs(runs: list[tuple[float, list[list[float]]]]) -> dict[str, float]:
    """runs: (wall seconds, per request token times in seconds from the call's start) per generate call."""
    ttfts = [times[0] for _, per_request in runs for times in per_request]
    itls = [b - a for _, per_request in runs for times in per_request for a, b in zip(times, times[1:])]
    tokens = sum(len(times) for _, per_request in runs for times in per_request)
    wall = sum(w for w, _ in runs)
    return {
        "ttft_ms_median": 1e3 * statistics.median(ttfts),
        "tpot_ms_median": 1e3 * statistics.median(itls),
        "tpot_ms_p90": 1e3 * percentile(itls, 90),
        "output_tokens_per_s": tokens / wall,
        "output_tokens": tokens,
        "wall_s": wall,
    }


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second, best of `repeats`) and read bandwidth (sum)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    copy, read = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        copy.append(2 * nbytes / (time.perf_counter() - t))
        t = time.perf_counter()
        src.sum()
        read.append(nbytes / (time.perf_counter() - t))
    return {"copy_gb_s": max(copy) / 1e9, "read_gb_s": max(read) / 1e9}


def decode_bytes(runner: ModelRunner, prompt_lens: list[int], new_tokens: int) -> dict[str, float]:
    """Bytes one decode step must read: text weights (not the embedding table) + LM head + mean KV."""
    model = runner.model
    weights = sum(
        p.numel() * p.element_size() for n, p in model.model.named_parameters() if not n.startswith("embed_tokens")
    )
    lm_head = sum(p.numel() * p.element_size() for p in model.lm_head.parameters())
    cache = runner.cache
    per_token = sum(t[0, 0].numel() * t.element_size() for t in cache.keys + cache.values)  # one position
    mean_context = statistics.mean(n + new_tokens / 2 for n in prompt_lens)
    return {
        "weights_bytes": weights,
        "lm_head_bytes": lm_head,
        "kv_bytes_per_token": per_token,
        "mean_context": mean_context,
    }


# --------------------------------------------------------------------------------- engines
TokenTimes = tuple[float, list[list[float]], list[list[int]]]  # wall, per request times, per request tokens


def run_ours(runner: ModelRunner, batches: list[list[PreparedRequest]], new_tokens: int) -> list[TokenTimes]:
    out = []
    for batch in batches:
        params = [SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)] * len(batch)
        t = time.perf_counter()
        results = runner.generate(batch, params, eos_token_ids=[])
        wall = time.perf_counter() - t
        for r in results:
            if r.error:
                raise RuntimeError(r.error)
        out.append((wall, [r.token_times_s for r in results], [r.output_token_ids for r in results]))
    return out


def hf_batch_inputs(batch: list[PreparedRequest], image_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded batch inputs for transformers' generate."""
    width = max(len(r.input_ids) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(batch):
        ids[i, width - len(r.input_ids) :] = torch.tensor(r.input_ids)
        mask[i, width - len(r.input_ids) :] = 1
    inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    images = [r for r in batch if r.pixel_values is not None]
    if images:
        inputs.update(
            pixel_values=torch.cat([r.pixel_values for r in images]),
            image_grid_thw=torch.cat([r.image_grid_thw for r in images]),
            mm_token_type_ids=(ids == image_token_id).int(),
        )
    return inputs


def run_hf(
    model: Any, batches: list[list[PreparedRequest]], new_tokens: int, **generate_kwargs: Any
) -> list[TokenTimes]:
    """transformers generate; a logits processor stamps the time each step's logits are ready."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    out = []
    for batch in batches:
        stamp = Stamp()
        inputs = hf_batch_inputs(batch, int(model.config.image_token_id))
        t = time.perf_counter()
        with torch.inference_mode():
            generated = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
                logits_processor=LogitsProcessorList([stamp]),
                **generate_kwargs,
            )
        wall = time.perf_counter() - t
        times = [s - t for s in stamp.times]
        tokens = generated[:, inputs["input_ids"].shape[1] :].tolist()
        out.append((wall, [times] * len(batch), tokens))
    return out


def run_ray(
    path: Path, mode: str, max_batch: int, input_max_len: int, new_tokens: int, batches: list[list[dict]]
) -> tuple[list[TokenTimes], dict]:
    """Our engine through `cluster.start` (tp 1, one worker holding every core), one call per batch."""
    import ray

    from cluster import load_config, start, stop

    cfg = load_config(
        None,
        [
            f"model_path={path}",
            "device=cpu",
            "world_size=1",
            "parallel_config.tp_size=1",
            f"exe_mode={mode}",
            f"data_config.batch_size={max_batch}",
            f"data_config.max_new_tokens={new_tokens}",
            "data_config.ignore_eos=true",
            f"data_config.input_max_len={input_max_len}",
            f"ray.num_cpus_per_worker={os.cpu_count() or 1}",
            "ray.address=local",
            "ray.log_to_driver=false",
            "ray.namespace=bench",
        ],
    )
    coordinator = start(cfg)
    try:
        out = []
        for batch in batches:
            t = time.perf_counter()
            records = ray.get(coordinator.generate.remote(batch))
            wall = time.perf_counter() - t
            for r in records:
                if r["error"]:
                    raise RuntimeError(r["error"])
            # Records hold ttft/e2e from the call's start; rebuild token times from ttft and the ITLs.
            times = [list(np.cumsum([r["ttft_s"], *r["itl_s"]])) for r in records]
            out.append((wall, times, [r["output_token_ids"] for r in records]))
        stats = ray.get(coordinator.stats.remote())["phases"]
    finally:
        stop(coordinator)
        ray.shutdown()
    return out, stats


# --------------------------------------------------------------------------------- one checkpoint
def bench_checkpoint(
    name: str,
    batch_sizes: list[int],
    new_tokens: int,
    skip_ray: bool,
    quick: bool,
    bandwidth: dict[str, float],
    cache: Path = CACHE_DIR,
    repeats: int = 1,
) -> dict:
    """Every engine on one checkpoint: a warm-up pass, then the best (least wall time) of `repeats` passes."""
    directory, spec = CHECKPOINTS[name]
    path = cache / directory
    log(f"{name}: checkpoint at {path} (building if missing)")
    t = time.perf_counter()
    build_tiny_checkpoint(path, spec)
    builder = PromptBuilder.from_pretrained(path)
    raw = bench_requests(max(max(batch_sizes), 2), bench_image(cache))
    prepared = [builder.build(r) for r in raw]
    input_max_len = -(-max(len(p.input_ids) for p in prepared) // 64) * 64
    max_batch = max(batch_sizes)
    log(
        f"{name}: ready in {time.perf_counter() - t:.1f}s; prompts of {[len(p.input_ids) for p in prepared]} "
        f"tokens, {new_tokens} new tokens each"
    )
    results: dict[str, Any] = {"path": str(path), "spec": asdict(spec), "engines": {}, "notes": []}
    engines: dict[str, dict] = results["engines"]
    tokens: dict[str, dict[int, list[list[int]]]] = {}

    def record(engine: str, batch: int, passes: list[list[TokenTimes]], extra: dict | None = None) -> None:
        runs = min(passes, key=lambda p: sum(w for w, _, _ in p))  # other load on the machine only adds time
        entry = summarize_runs([(w, times) for w, times, _ in runs])
        entry["passes"] = len(passes)
        engines.setdefault(engine, {"batches": {}})["batches"][str(batch)] = {**entry, **(extra or {})}
        tokens.setdefault(engine, {})[batch] = [t for _, _, ts in runs for t in ts]
        log(
            f"{name}/{engine}/batch {batch}: TTFT {entry['ttft_ms_median']:.1f} ms, "
            f"TPOT {entry['tpot_ms_median']:.2f} ms (p90 {entry['tpot_ms_p90']:.2f}), "
            f"{entry['output_tokens_per_s']:.1f} tok/s"
        )

    def timed(engine: str, fn: Callable[[int], list[TokenTimes]]) -> None:
        for b in batch_sizes:
            fn(b)  # warm-up pass (allocations, lazy inits), not recorded
            record(engine, b, [fn(b) for _ in range(repeats)])

    # transformers, eager
    from transformers import Qwen2_5_VLForConditionalGeneration

    log(f"{name}: loading transformers model")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    timed("hf", lambda b: run_hf(hf, chunks(prepared[: max(b, 2)], b), new_tokens))
    hf = None  # release its memory before the next engine loads
    gc.collect()

    # our runner in-process, eager then graph
    log(f"{name}: loading our runner")
    runner = ModelRunner(path, max_batch_size=max_batch, max_seq_len=input_max_len + new_tokens)
    t = time.perf_counter()
    runner.warmup()
    warmup_s = time.perf_counter() - t
    timed("ours_eager", lambda b: run_ours(runner, chunks(prepared[: max(b, 2)], b), new_tokens))
    engines["ours_eager"]["warmup_s"] = warmup_s
    log(f"{name}: compiling decode for buckets {batch_sizes}")
    t = time.perf_counter()
    runner.capture_graphs(sorted({next(x for x in runner.buckets if x >= b) for b in batch_sizes}))
    engines.setdefault("ours_graph", {"batches": {}})["capture_s"] = time.perf_counter() - t
    log(f"{name}: compiled in {engines['ours_graph']['capture_s']:.1f}s")
    timed("ours_graph", lambda b: run_ours(runner, chunks(prepared[: max(b, 2)], b), new_tokens))
    bytes_info = decode_bytes(runner, [len(p.input_ids) for p in prepared], new_tokens)
    runner = None
    gc.collect()

    # our engine through the Coordinator, eager and (except in --quick mode) graph
    for engine, mode in (("ray_tp1", "eager"), ("ray_tp1_graph", "graph")):
        if skip_ray:
            engines[engine] = {"skipped": "--skip-ray"}
            continue
        if quick and mode == "graph":
            engines[engine] = {"skipped": "not run in --quick mode"}
            continue
        log(f"{name}: starting the Ray engine (tp 1, exe_mode {mode})")
        t = time.perf_counter()
        calls = [(b, chunks(raw[: max(b, 2)], b)) for b in batch_sizes]
        flat = [batch for _, batches in calls for batch in batches * (1 + repeats)]  # warm-up pass, then timed
        runs, stats = run_ray(path, mode, max_batch, input_max_len, new_tokens, flat)
        engines[engine] = {
            "batches": {},
            "start_and_run_s": time.perf_counter() - t,
            "exe_mode": mode,
            "worker_phases": stats,
        }
        for b, batches in calls:
            n = len(batches)
            record(engine, b, [runs[n * (1 + i) : n * (2 + i)] for i in range(repeats)])
            runs = runs[n * (1 + repeats) :]

    # transformers, static cache + torch.compile; last, so that its compiled state cannot affect ours
    if quick:
        engines["hf_static_compile"] = {"skipped": "not run in --quick mode (compiles for minutes)"}
    else:
        try:
            log(f"{name}: transformers with cache_implementation='static' + torch.compile (compiles first)")
            from transformers import CompileConfig

            hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()

            # transformers compiles the decode forward itself, but only on cuda unless told otherwise.
            compile_config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
            compile_config._compile_all_devices = True
            static = {"cache_implementation": "static", "compile_config": compile_config}
            t = time.perf_counter()
            for b in batch_sizes:
                run_hf(hf, chunks(prepared[: max(b, 2)], b), new_tokens, **static)
            compile_s = time.perf_counter() - t
            for b in batch_sizes:
                record(
                    "hf_static_compile",
                    b,
                    [run_hf(hf, chunks(prepared[: max(b, 2)], b), new_tokens, **static) for _ in range(repeats)],
                    {"compile_and_first_run_s": compile_s},
                )
        except Exception as e:  # transformers' compiled path does not support every model/backend
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"{name}: hf_static_compile skipped: {reason}")
            engines["hf_static_compile"] = {"skipped": reason}
        hf = None
        gc.collect()

    # ratios, token agreement, roofline
    step_bytes = {
        b: bytes_info["weights_bytes"]
        + bytes_info["lm_head_bytes"]
        + b * bytes_info["kv_bytes_per_token"] * bytes_info["mean_context"]
        for b in batch_sizes
    }
    results["decode_bytes"] = {**bytes_info, "per_step": {str(b): v for b, v in step_bytes.items()}}
    for engine, entry in engines.items():
        for b_text, m in entry.get("batches", {}).items():
            b = int(b_text)
            base = engines[BASELINE]["batches"][b_text]
            m["tpot_ratio_vs_hf"] = m["tpot_ms_median"] / base["tpot_ms_median"]
            m["ttft_ratio_vs_hf"] = m["ttft_ms_median"] / base["ttft_ms_median"]
            m["throughput_ratio_vs_hf"] = m["output_tokens_per_s"] / base["output_tokens_per_s"]
            roofline_ms = 1e3 * step_bytes[b] / (bandwidth["copy_gb_s"] * 1e9)
            m["roofline_ms"] = roofline_ms
            m["roofline_fraction"] = roofline_ms / m["tpot_ms_median"]
            m["tokens_match_hf"] = tokens[engine][b] == tokens[BASELINE][b]
    for engine, in_process in (("ray_tp1", "ours_eager"), ("ray_tp1_graph", "ours_graph")):
        for b_text, m in engines[engine].get("batches", {}).items():
            m["tpot_ratio_vs_in_process"] = (
                m["tpot_ms_median"] / engines[in_process]["batches"][b_text]["tpot_ms_median"]
            )
    return results


# --------------------------------------------------------------------------------- output
def format_table(report: dict) -> str:
    header = (
        f"{'checkpoint':<10} {'engine':<18} {'batch':>5} {'TTFT ms':>9} {'TPOT ms':>9} {'p90 ms':>9} "
        f"{'tok/s':>8} {'TPOT/hf':>8} {'roofline':>8} {'=hf':>4}"
    )
    lines = [header, "-" * len(header)]
    for name, ckpt in report["checkpoints"].items():
        for engine, entry in ckpt["engines"].items():
            if "skipped" in entry:
                lines.append(f"{name:<10} {engine:<18} skipped: {entry['skipped'][:80]}")
                continue
            for b, m in entry["batches"].items():
                lines.append(
                    f"{name:<10} {engine:<18} {b:>5} {m['ttft_ms_median']:>9.1f} {m['tpot_ms_median']:>9.2f} "
                    f"{m['tpot_ms_p90']:>9.2f} {m['output_tokens_per_s']:>8.1f} "
                    f"{m['tpot_ratio_vs_hf']:>8.2f} {m['roofline_fraction']:>8.1%} "
                    f"{'yes' if m['tokens_match_hf'] else 'no':>4}"
                )
    bw = report["bandwidth"]
    lines.append(
        f"copy bandwidth {bw['copy_gb_s']:.1f} GB/s (read+write), read {bw['read_gb_s']:.1f} GB/s; "
        f"roofline = decode bytes / copy bandwidth, as a fraction of the measured TPOT"
    )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["checkpoints"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        engines = {e: v for e, v in report["checkpoints"][name]["engines"].items() if "batches" in v}
        batches = sorted({int(b) for v in engines.values() for b in v["batches"]})
        width = 0.8 / max(len(engines), 1)
        for i, (engine, entry) in enumerate(engines.items()):
            values = [entry["batches"].get(str(b), {}).get("tpot_ms_median", 0.0) for b in batches]
            ax.bar([x + i * width for x in range(len(batches))], values, width, label=engine)
        ax.set_xticks([x + width * (len(engines) - 1) / 2 for x in range(len(batches))])
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_ylabel("TPOT median (ms)")
        ax.set_title(f"{name} checkpoint")
        ax.legend(fontsize=8)
    fig.suptitle(f"Decode TPOT per engine ({report['machine']['description']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoints", default=None, help="comma-separated: tiny,small (default both; tiny with --quick)"
    )
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4; 1,2 with --quick)")
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="output tokens per request (default 32; 4 with --quick)"
    )
    parser.add_argument("--out", default="outputs/bench", help="output directory")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR), help="where checkpoints are built and reused")
    parser.add_argument("--skip-ray", action="store_true", help="skip the Ray engine")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed passes per engine, best kept (default 3 on tiny, 1 on small)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny defaults; skip transformers+torch.compile")
    args = parser.parse_args(argv)
    names = (args.checkpoints or ("tiny" if args.quick else "tiny,small")).split(",")
    unknown = [n for n in names if n not in CHECKPOINTS]
    if unknown:
        parser.error(f"unknown checkpoint(s) {unknown}; choose from {list(CHECKPOINTS)}")
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if args.quick else "1,4")).split(",")]
    new_tokens = args.new_tokens or (4 if args.quick else 32)
    if new_tokens < 2 or min(batch_sizes) < 1:
        parser.error("--new-tokens must be >= 2 and batch sizes >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    log("measuring memory bandwidth")
    bandwidth = measure_bandwidth()
    log(f"copy {bandwidth['copy_gb_s']:.1f} GB/s, read {bandwidth['read_gb_s']:.1f} GB/s")
    report: dict[str, Any] = {
        "machine": {
            "description": f"{os.cpu_count()}-core CPU, torch {torch.__version__}, {torch.get_num_threads()} threads",
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "settings": {
            "batch_sizes": batch_sizes,
            "new_tokens": new_tokens,
            "quick": args.quick,
            "repeats": args.repeats,
            "dtype": "float32",
            "greedy": True,
            "ignore_eos": True,
        },
        "bandwidth": bandwidth,
        "engines": list(ENGINES),
        "checkpoints": {},
    }
    for name in names:
        report["checkpoints"][name] = bench_checkpoint(
            name,
            batch_sizes,
            new_tokens,
            args.skip_ray,
            args.quick,
            bandwidth,
            Path(args.cache_dir).expanduser(),
            args.repeats or (3 if name == "tiny" else 1),
        )
        (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")  # after each checkpoint
    plot(report, out / "bench.png")
    print(format_table(report))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
