"""Vision-tower benchmark: our tower vs transformers' on the same weights and image, time and peak memory.

`python -m cluster.tools.bench_vision [--device cpu|cuda] [--dtype float32|bfloat16] [--threads 2]
[--image 1344] [--depth 4] [--fullatt 3] [--out-hidden 8192] [--repeats N] [--warmup N]`
builds random weights for a tower at the 72B's widths (hidden 1280, 16 heads, MLP 3456, window
112 px, patch 14, merge 2; `--depth` blocks of which `--fullatt` use full attention), writes them
once as a safetensors file, then runs each engine in its own subprocess on one square image:
ours (model/vision.py, loaded by model/loader.py) and transformers'
(Qwen2_5_VisionTransformerPretrainedModel, sdpa), both after one small warm-up image.

Time: the best of `--repeats` timed forwards after `--warmup` untimed ones, and the process CPU
time (all threads) of the fastest, which other processes on a shared machine disturb less than
wall time. Within each forward, the attention part: the time spent in the blocks' attention modules
(qkv projection, rotary, attention, output projection; forward hooks) and, of that, in
scaled_dot_product_attention calls (both engines call torch's function; wrapped for the run), so
that the attention can be compared apart from the MLPs, which run the same kernels on both sides.
Memory: on cuda, torch.cuda.max_memory_allocated over the timed forwards and its rise
above the allocation before them; on cpu, a second process per engine runs one forward with a
fixed malloc mmap threshold (MEMORY_ENV) and reports its peak resident set (VmHWM, reset through
/proc/self/clear_refs after loading, so it covers the forward only) and the rise above the resident
set before it. The parent compares the two outputs and prints a table and one JSON line. No Ray.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ENGINES = ("ours", "transformers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so the resident set
# of a plain process over-counts live tensors by a varying amount. With a fixed 1 MiB threshold
# every tensor of note is its own mapping, returned on free, and VmHWM tracks the live peak; the
# page faults this costs are why it is set only for the memory pass, not for timing.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def log(message: str) -> None:
    print(f"[bench_vision {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# The 72B's vision tower, one field set for both engines' configs.
TOWER_72B = dict(
    hidden_size=1280,
    num_heads=16,
    intermediate_size=3456,
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
    window_size=112,
)


def hf_vision_config(args: argparse.Namespace) -> Any:
    from transformers import Qwen2_5_VLVisionConfig

    config = Qwen2_5_VLVisionConfig(
        depth=args.depth,
        out_hidden_size=args.out_hidden,
        in_channels=3,
        hidden_act="silu",
        fullatt_block_indexes=list(args.fullatt),
        **TOWER_72B,
    )
    config._attn_implementation = "sdpa"
    return config


def our_vision_config(args: argparse.Namespace) -> Any:
    from model.config import VisionConfig

    return VisionConfig(
        depth=args.depth, out_hidden_size=args.out_hidden, fullatt_block_indexes=tuple(args.fullatt), **TOWER_72B
    )


def write_inputs(args: argparse.Namespace, workdir: Path) -> None:
    """Random weights (std 1/sqrt(fan_in), norms near 1) under transformers' names, and one image's patches."""
    from safetensors.torch import save_file
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    with torch.device("meta"):
        shapes = {
            n: p.shape for n, p in Qwen2_5_VisionTransformerPretrainedModel(hf_vision_config(args)).named_parameters()
        }
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if name.endswith("bias"):
            weights[name] = 0.02 * noise
        elif len(shape) == 1:
            weights[name] = 1.0 + 0.1 * noise
        else:
            weights[name] = noise / math.sqrt(math.prod(shape[1:]))
    (workdir / "weights").mkdir()
    save_file(weights, str(workdir / "weights" / "model.safetensors"))
    side = args.image // 14
    torch.save(
        {"pixels": torch.randn(side * side, 3 * 2 * 14 * 14, generator=gen), "grid": torch.tensor([[1, side, side]])},
        workdir / "image.pt",
    )


def build_engine(engine: str, args: argparse.Namespace, workdir: Path, device: torch.device) -> torch.nn.Module:
    dtype = DTYPES[args.dtype]
    if engine == "ours":
        from model.loader import load_weights
        from model.parallel import SINGLE
        from model.vision import Qwen2_5_VisionTransformer

        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Qwen2_5_VisionTransformer(our_vision_config(args), SINGLE)
        finally:
            torch.set_default_dtype(old)
        load_weights(model, workdir / "weights")
    else:
        from safetensors.torch import load_file
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        model = Qwen2_5_VisionTransformerPretrainedModel(hf_vision_config(args))
        model.load_state_dict(load_file(str(workdir / "weights" / "model.safetensors")))
        model = model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def time_attention(model: torch.nn.Module, sync: Callable[[], None]) -> dict[str, float]:
    """Seconds spent, from now on, in the blocks' attention modules ("module") and in SDPA ("sdpa").

    Both engines name their blocks `blocks` and each block's attention `attn`; both call
    torch.nn.functional.scaled_dot_product_attention through the module attribute, which is wrapped here.
    """
    spent = {"module": 0.0, "sdpa": 0.0}
    started = [0.0]

    def before(module: torch.nn.Module, inputs: Any) -> None:
        sync()
        started[0] = time.perf_counter()

    def after(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        sync()
        spent["module"] += time.perf_counter() - started[0]

    for block in model.blocks:
        block.attn.register_forward_pre_hook(before)
        block.attn.register_forward_hook(after)
    sdpa = F.scaled_dot_product_attention

    def timed_sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        sync()
        start = time.perf_counter()
        out = sdpa(*args, **kwargs)
        sync()
        spent["sdpa"] += time.perf_counter() - start
        return out

    F.scaled_dot_product_attention = timed_sdpa
    return spent


def run_worker(engine: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One engine in this process: load, warm up, time the forwards, measure their peak memory."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_engine(engine, args, workdir, device)
    image = torch.load(workdir / "image.pt")
    pixels, grid = image["pixels"].to(device), image["grid"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward(px: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if engine == "ours":
            return model(px, g)
        return model(px.to(DTYPES[args.dtype]), grid_thw=g.to(device)).pooler_output

    with torch.inference_mode():
        # One small image first, so one-time library set-up is not counted as the forward's memory.
        forward(torch.zeros(16, pixels.shape[1], device=device), torch.tensor([[1, 4, 4]]))
        for _ in range(args.warmup):
            forward(pixels, grid)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
            before = _status_mb("VmRSS")
        times, cpu_times, attention = [], [], []
        spent = time_attention(model, sync)
        for _ in range(args.repeats):
            out = None  # the previous output is not part of this forward's peak
            spent.update(module=0.0, sdpa=0.0)
            start, cpu_start = time.perf_counter(), time.process_time()
            out = forward(pixels, grid)
            sync()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            attention.append(dict(spent))
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _status_mb("VmHWM")
    torch.save(out.float().cpu(), workdir / f"{engine}.pt")
    fastest = times.index(min(times))
    return {
        "engine": engine,
        "seconds": min(times),
        "attention_seconds": attention[fastest]["module"],
        "sdpa_seconds": attention[fastest]["sdpa"],
        "all_seconds": times,
        "cpu_seconds": min(cpu_times),
        "memory_before_mb": round(before, 1),
        "peak_mb": round(peak, 1),
        "peak_rise_mb": round(peak - before, 1),
        "memory_kind": "cuda_allocated" if device.type == "cuda" else "rss",
    }


def _worker(
    engine: str, args: argparse.Namespace, workdir: Path, repeats: int, warmup: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "cluster.tools.bench_vision",
        "--worker",
        engine,
        "--workdir",
        str(workdir),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--image",
        str(args.image),
        "--depth",
        str(args.depth),
        "--fullatt",
        *map(str, args.fullatt),
        "--out-hidden",
        str(args.out_hidden),
        "--repeats",
        str(repeats),
        "--warmup",
        str(warmup),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=os.environ | (env or {}))
    if proc.returncode:
        raise RuntimeError(f"{engine} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_parent(args: argparse.Namespace) -> dict[str, Any]:
    """Time each engine; on cpu, measure memory in a second process per engine (see MEMORY_ENV)."""
    cpu = args.device == "cpu"
    with tempfile.TemporaryDirectory(prefix="bench_vision_") as tmp:
        workdir = Path(tmp)
        write_inputs(args, workdir)
        results = {}
        for engine in args.engines:
            log(f"timing {engine} (load {os.getloadavg()[0]:.2f})")
            results[engine] = _worker(engine, args, workdir, args.repeats, args.warmup)
            log(f"{engine}: {results[engine]['seconds']:.3f} s")
        for engine in args.engines if cpu else ():
            log(f"memory pass: {engine} (load {os.getloadavg()[0]:.2f})")
            memory = _worker(engine, args, workdir, 1, 0, MEMORY_ENV)
            results[engine].update({k: memory[k] for k in ("memory_before_mb", "peak_mb", "peak_rise_mb")})
        for engine, r in results.items():
            log(f"{engine}: peak {r['peak_mb']:.0f} MB (+{r['peak_rise_mb']:.0f} MB during the forward)")
        outputs = {e: torch.load(workdir / f"{e}.pt") for e in args.engines}
    side = args.image // 14
    summary: dict[str, Any] = {
        "bench": "vision",
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "image_px": args.image,
        "patches": side * side,
        "depth": args.depth,
        "fullatt": list(args.fullatt),
        "out_hidden": args.out_hidden,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    for engine, r in results.items():
        summary[f"{engine}_s"] = round(r["seconds"], 4)
        summary[f"{engine}_cpu_s"] = round(r["cpu_seconds"], 3)
        summary[f"{engine}_attention_s"] = round(r["attention_seconds"], 4)
        summary[f"{engine}_sdpa_s"] = round(r["sdpa_seconds"], 4)
        summary[f"{engine}_all_s"] = [round(t, 4) for t in r["all_seconds"]]
        summary[f"{engine}_peak_mb"] = r["peak_mb"]
        summary[f"{engine}_peak_rise_mb"] = r["peak_rise_mb"]
    if len(outputs) == 2:
        ours, theirs = outputs["ours"], outputs["transformers"]
        summary["time_ratio"] = round(results["ours"]["seconds"] / results["transformers"]["seconds"], 3)
        summary["cpu_time_ratio"] = round(results["ours"]["cpu_seconds"] / results["transformers"]["cpu_seconds"], 3)
        for part in ("attention", "sdpa"):
            ours_s, theirs_s = results["ours"][f"{part}_seconds"], results["transformers"][f"{part}_seconds"]
            summary[f"{part}_ratio"] = round(ours_s / theirs_s, 3)
        summary["max_abs_diff"] = float((ours - theirs).abs().max())
        summary["max_abs_ref"] = float(theirs.abs().max())
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each engine's process")
    parser.add_argument("--image", type=int, default=1344, help="image side in pixels (a multiple of 28)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--fullatt", type=int, nargs="*", default=[3], help="full-attention block indexes")
    parser.add_argument("--out-hidden", type=int, default=8192, help="merger output width (the 72B's: 8192)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards (default 1 on cpu, 5 on cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forwards first (default 0 cpu, 2 cuda)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.image % 28:
        parser.error(f"--image {args.image} must be a multiple of 28 (patch 14 x merge 2)")
    if any(not 0 <= i < args.depth for i in args.fullatt):
        parser.error(f"--fullatt {args.fullatt} must be block indexes below --depth {args.depth}")
    cuda = args.device == "cuda"
    args.repeats = args.repeats if args.repeats is not None else (5 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 0)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args, args.workdir)))
        return 0
    summary = run_parent(args)
    for key, value in summary.items():
        print(f"{key:>26}: {value}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
