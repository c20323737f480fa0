"""Accelerator check without Ray: `python -m cluster.tools.gpu_check --out DIR [--device cuda] [--quick]`.

For a machine with torch and transformers but no Ray (and no network). Three parts, each writing
its figures into DIR/gpu_check.json as soon as it ends, and printing them:

(a) parity: tiny random checkpoints (cluster.tools.tiny_checkpoint), text and image requests in one batch;
    greedy tokens of our ModelRunner in eager mode and with graph decode (CUDA graphs on cuda)
    against transformers' Qwen2_5_VLForConditionalGeneration `generate`, tp 1, float32 with TF32
    off. A differing token is accepted only at a near tie (each side's token in the other side's
    top 5 at that step; the comparison of that request stops there). Also the largest difference
    of teacher-forced prompt logits.
(b) decode speed: a random bf16 checkpoint with Qwen2.5-VL-7B's text shape (hidden 3584, 28
    layers, 28 heads, 4 KV heads, MLP 18944, vocab 152064; a small vision tower), written straight
    from random device tensors; TPOT at batch 1, eager and graph, against the weights-read floor
    (bytes of weights a step reads / copy bandwidth measured here, and / the nominal HBM figure).
(c) the vision-tower bench (`python -m cluster.tools.bench_vision --device cuda --dtype bfloat16`) in a
    subprocess, when that module is present.

`--quick` shrinks (b) to a small shape and (a) to one batch bucket, for a cpu smoke run.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cluster.tools.greedy_check import TokenComparison, compare_greedy, decode_step_logits
from cluster.tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint, preset, to_layout
from model.processor import PreparedRequest
from model.runner import ModelRunner
from model.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[2]
NOMINAL_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s of HBM, by device name
SEVEN_B = {
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "vocab_size": 152064,
}
QUICK_SHAPE = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "vocab_size": 4096,
}
PROMPTS = [
    ("text", "Describe the weather today and tomorrow, then summarize the report.", []),
    ("one_image", "What is in this photo?", ["wide"]),
    ("two_images", "Compare the first image and the second image.", ["tall", "wide"]),
]


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Report:
    """Figures by part, rewritten to DIR/gpu_check.json after every part."""

    def __init__(self, out: Path) -> None:
        self.path = out / "gpu_check.json"
        self.data: dict[str, Any] = {}

    def put(self, part: str, figures: dict[str, Any]) -> None:
        self.data[part] = figures
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")
        print(json.dumps({part: figures}, indent=2), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- (a) parity
def verdict(result: TokenComparison) -> str:
    """'identical', 'near tie at step i', or 'DIFFERENT: ...'."""
    if not result.accepted:
        return f"DIFFERENT: {result.detail}"
    return "identical" if result.near_tie_step is None else f"near tie at step {result.near_tie_step}"


def make_images(directory: Path) -> dict[str, str]:
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = {}
    for name, (width, height) in {"wide": (150, 100), "tall": (90, 200)}.items():
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        paths[name] = str(directory / f"{name}.png")
        Image.fromarray(pixels).save(paths[name])
    return paths


def hf_inputs(request: PreparedRequest, image_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.tensor([request.input_ids], device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if request.pixel_values is not None:
        inputs.update(pixel_values=request.pixel_values.to(device), image_grid_thw=request.image_grid_thw.to(device))
        if _transformers_major() >= 5:  # 5.x builds 3-D positions only when told which tokens are image tokens
            inputs["mm_token_type_ids"] = (ids == image_token_id).int()
    return inputs


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def parity(path: Path, device: torch.device, images: dict[str, str], new_tokens: int, quick: bool) -> dict[str, Any]:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from model.processor import PromptBuilder

    builder = PromptBuilder.from_pretrained(path)
    requests = [
        builder.build({"id": name, "prompt": prompt, "images": [images[i] for i in imgs]})
        for name, prompt, imgs in PROMPTS
    ]
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(device).eval()
    image_token = int(hf.config.image_token_id)
    reference = {}
    with torch.inference_mode():
        for r in requests:
            out = hf.generate(
                **hf_inputs(r, image_token, device),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            reference[r.request_id] = out[0, len(r.input_ids) :].tolist()

    def hf_step_logits(request: PreparedRequest, tokens: list[int]) -> torch.Tensor:
        full = PreparedRequest(
            request.request_id, list(request.input_ids) + tokens, request.pixel_values, request.image_grid_thw
        )
        with torch.inference_mode():
            logits = hf(**hf_inputs(full, image_token, device)).logits[0].float().cpu()
        return logits[len(request.input_ids) - 1 :]

    batch = 1 if quick else 4
    runner = ModelRunner(path, device=device, dtype=torch.float32, max_batch_size=batch, max_seq_len=512)
    figures: dict[str, Any] = {"requests": [r.request_id for r in requests], "max_batch_size": batch}
    prompt_diff = 0.0
    for r in requests:
        with torch.inference_mode():
            ours, _ = runner.prefill(r, runner.encode_images([r])[0], 0, all_logits=True)
        with torch.inference_mode():
            full = hf(**hf_inputs(r, image_token, device)).logits[0].float().cpu()
        prompt_diff = max(prompt_diff, float((ours.float().cpu() - full).abs().max()))
    figures["prompt_logits_max_abs_diff"] = prompt_diff
    params = [SamplingParams(max_new_tokens=new_tokens)] * len(requests)
    for mode in ("eager", "graph"):
        if mode == "graph":
            start = time.perf_counter()
            runner.capture_graphs()
            figures["graph_capture_s"] = round(time.perf_counter() - start, 2)
        outs = runner.generate(requests, params, eos_token_ids=[])
        verdicts = {}
        for r, out in zip(requests, outs):
            ref = reference[r.request_id]

            def step_logits(
                step: int, r: PreparedRequest = r, ref: list[int] = ref
            ) -> tuple[torch.Tensor, torch.Tensor]:
                return decode_step_logits(runner, r, ref[: step + 1])[step], hf_step_logits(r, ref[:step])[step]

            verdicts[r.request_id] = out.error or verdict(compare_greedy(out.output_token_ids, ref, step_logits))
        figures[mode] = verdicts
    figures["ok"] = all(
        v == "identical" or v.startswith("near tie") for mode in ("eager", "graph") for v in figures[mode].values()
    )
    return figures


# ----------------------------------------------------------------------------- (b) decode speed
def write_random_checkpoint(out: Path, shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Path:
    """A checkpoint with `shape`'s text model and a small vision tower, random weights made on `device`.

    Tokenizer and processor files come from the default tiny checkpoint; the tensor names and shapes
    from transformers' model built on the meta device, so nothing the size of the model is
    initialised on the host. Weights are normal with std 1/sqrt(fan_in) (the LM head 4x), norms near 1.
    """
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tiny = build_tiny_checkpoint(out.parent / "tiny-files", preset("default"))
    out.mkdir(parents=True, exist_ok=True)
    for name in (
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
    ):
        (out / name).write_bytes((tiny / name).read_bytes())
    config = json.loads((tiny / "config.json").read_text())
    config.update(shape)
    config["max_window_layers"] = shape["num_hidden_layers"]
    section = TinySpec(hidden_size=shape["hidden_size"], num_attention_heads=shape["num_attention_heads"])
    config["rope_scaling"] = {"type": "mrope", "mrope_section": section.resolved_mrope_section()}
    config["vision_config"].update(depth=2, fullatt_block_indexes=[1], out_hidden_size=shape["hidden_size"])
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))

    with torch.device("meta"):
        meta = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**copy.deepcopy(config)))
    tensors = to_layout({k: v for k, v in meta.state_dict().items()}, "released")
    generator = torch.Generator(device=device).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    shards: list[str] = []
    weight_map: dict[str, str] = {}
    limit = 2 << 30

    def flush() -> None:
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shards.append(name)
        shard.clear()

    size = 0
    for key, meta_tensor in tensors.items():
        t = torch.empty(meta_tensor.shape, dtype=dtype, device=device)
        if key.endswith("embed_tokens.weight"):
            t.normal_(0.0, 1.0, generator=generator)
        elif key.endswith("bias"):
            t.normal_(0.0, 0.02, generator=generator)
        elif t.dim() == 1:
            t.normal_(1.0, 0.1, generator=generator)
        else:
            std = (4.0 if key == "lm_head.weight" else 1.0) / math.sqrt(math.prod(t.shape[1:]))
            t.normal_(0.0, std, generator=generator)
        shard[key] = t.cpu()
        size += t.numel() * t.element_size()
        if size >= limit:
            flush()
            size = 0
    if shard:
        flush()
    total = sum((out / s).stat().st_size for s in shards)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    return out


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of a few."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        for _ in range(4):
            dst.copy_(src)
        sync(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * nbytes / best


def step_bytes(runner: ModelRunner) -> dict[str, int]:
    """Bytes a decode step reads: decoder layers + final norm, and the LM head (one embedding row is noise)."""
    text = runner.model.model
    layers = sum(p.numel() * p.element_size() for p in text.layers.parameters())
    layers += sum(p.numel() * p.element_size() for p in text.norm.parameters())
    head = runner.model.lm_head.weight
    return {"layers": layers, "lm_head": head.numel() * head.element_size()}


def time_decode(runner: ModelRunner, prompt: list[int], steps: int) -> tuple[float, list[int]]:
    """Median of per-step times over `steps` greedy decode steps after a prefill (argmax on the device)."""
    device = runner.device
    request = PreparedRequest("speed", prompt, None, None)
    with torch.inference_mode():
        logits, delta = runner.prefill(request, None, 0)
        token = logits.argmax(-1).view(1)
        lens = torch.tensor([len(prompt)], device=device)
        tokens, times = [], []
        for step in range(steps):
            sync(device)
            start = time.perf_counter()
            token = runner.decode(token, lens + delta, lens, max_len=len(prompt) + step + 1).argmax(-1)
            lens += 1
            sync(device)
            times.append(time.perf_counter() - start)
            tokens.append(token)
    return statistics.median(times[3:]), [int(t) for t in torch.cat(tokens).tolist()]


def decode_speed(out: Path, device: torch.device, quick: bool, dtype: torch.dtype) -> dict[str, Any]:
    shape = QUICK_SHAPE if quick else SEVEN_B
    start = time.perf_counter()
    path = write_random_checkpoint(out / ("quick-shaped" if quick else "7b-shaped"), shape, dtype, device)
    figures: dict[str, Any] = {"shape": shape, "dtype": str(dtype), "write_s": round(time.perf_counter() - start, 1)}
    start = time.perf_counter()
    runner = ModelRunner(path, device=device, dtype=dtype, max_batch_size=1, max_seq_len=1024)
    figures["load_s"] = round(time.perf_counter() - start, 1)
    read = step_bytes(runner)
    figures["weights_read_per_step_gb"] = round(sum(read.values()) / 1e9, 3)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 1000, (128,), generator=gen).tolist()
    steps = 16 if quick else 64
    eager_s, eager_tokens = time_decode(runner, prompt, steps)
    start = time.perf_counter()
    runner.capture_graphs()
    figures["graph_capture_s"] = round(time.perf_counter() - start, 2)
    graph_s, graph_tokens = time_decode(runner, prompt, steps)  # prefills again: capture wrote dummy KV entries
    bandwidth = copy_bandwidth(device, 256 << 20 if quick else 2 << 30)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    nominal = next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)
    floor_s = sum(read.values()) / bandwidth
    figures.update(
        {
            "device_name": name,
            "decode_lengths": runner.decode_lengths,
            "steps": steps,
            "tpot_eager_ms": round(1e3 * eager_s, 3),
            "tpot_graph_ms": round(1e3 * graph_s, 3),
            "graph_same_tokens_as_eager": graph_tokens == eager_tokens,  # random bf16 weights: near ties happen
            "graph_first_different_step": next(
                (i for i, (x, y) in enumerate(zip(graph_tokens, eager_tokens)) if x != y), None
            ),
            "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
            "floor_measured_bw_ms": round(1e3 * floor_s, 3),
            "eager_fraction_of_floor": round(floor_s / eager_s, 3),
            "graph_fraction_of_floor": round(floor_s / graph_s, 3),
        }
    )
    if nominal:
        figures.update(
            {
                "nominal_bandwidth_gb_s": nominal / 1e9,
                "floor_nominal_bw_ms": round(1e3 * sum(read.values()) / nominal, 3),
            }
        )
    return figures


# ----------------------------------------------------------------------------- (c) vision bench
def vision_bench(device: torch.device, dtype: torch.dtype, timeout_s: float, quick: bool) -> dict[str, Any]:
    if importlib.util.find_spec("cluster.tools.bench_vision") is None:
        return {"skipped": "cluster/tools/bench_vision.py is not present"}
    cmd = [
        sys.executable,
        "-m",
        "cluster.tools.bench_vision",
        "--device",
        device.type,
        "--dtype",
        str(dtype).removeprefix("torch."),
    ]
    if quick:
        cmd += ["--image", "112", "--depth", "2", "--fullatt", "1", "--out-hidden", "256"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f}s", "command": " ".join(cmd[1:])}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    try:
        return {"command": " ".join(cmd[1:]), "result": json.loads(lines[-1])}
    except ValueError:
        return {"error": "no JSON line at the end of its output", "stdout_tail": proc.stdout[-2000:]}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="where checkpoints and gpu_check.json are written")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="small shapes and one batch bucket (cpu smoke run)")
    parser.add_argument("--parts", default="abc", help="which parts to run (default abc)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--vision-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # parity in float32 means float32 matmuls
        torch.backends.cudnn.allow_tf32 = False
    report = Report(args.out)
    report.put(
        "environment",
        {
            "torch": torch.__version__,
            "device": args.device,
            "quick": args.quick,
            "cuda_device": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "python": platform.python_version(),
        },
    )
    started = time.perf_counter()
    failed = False
    parts: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if "a" in args.parts:

        def run_parity() -> dict[str, Any]:
            images = make_images(args.out / "images")
            figures = {}
            specs = {"default": preset("default"), "odd": preset("odd_text")}
            for name, spec in list(specs.items())[: 1 if args.quick else 2]:
                path = build_tiny_checkpoint(args.out / f"tiny-{name}", spec)
                figures[name] = parity(path, device, images, args.new_tokens, args.quick)
            return figures

        parts.append(("a_parity", run_parity))
    if "b" in args.parts:
        dtype = torch.bfloat16
        parts.append(("b_decode_speed", lambda: decode_speed(args.out, device, args.quick, dtype)))
    if "c" in args.parts:
        parts.append(
            (
                "c_vision_bench",
                lambda: vision_bench(
                    device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.vision_timeout, args.quick
                ),
            )
        )
    for name, run in parts:
        log(f"{name} ...")
        start = time.perf_counter()
        try:
            figures = run()
        except Exception as e:  # report and go on to the next part: partial results beat none
            import traceback

            traceback.print_exc()
            figures = {"error": f"{type(e).__name__}: {e}"}
            failed = True
        figures["part_s"] = round(time.perf_counter() - start, 1)
        report.put(name, figures)
    report.put("total", {"seconds": round(time.perf_counter() - started, 1), "any_part_raised": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
