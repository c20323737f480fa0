"""Video decoding: time and peak memory of model/video.py against the naive way, on a long 720p video.

The benchmark writes a 1280x720, 30 fps H.264 video (10 minutes by default, a few MB at a low bitrate:
ten seconds encoded once and their packets muxed again with later timestamps), then samples it in a
fresh process per method, so that each process's peak RSS is its own:

- ``naive``: decode every frame and convert each to RGB with the same library (PyAV), keep only the
  sampled frames (resized as ours are);
- ``ours``: ``model.video.decode_video`` (timestamps from the packets, every frame decoded, only the
  sampled frames converted and resized).

Both use the same sampling settings (``--fps``, ``--max-frames``, ``--max-pixels``). Each line
gives seconds, frames kept, and peak RSS above the process's RSS after its imports.

``--served CONFIG`` then serves the video with ``cluster.launch CONFIG`` (a fresh local Ray per run;
16 frames of at most 64x28x28 pixels, to fit the tiny preset's input_max_len) and, as the baseline,
the same prompt without the video, and reports each process's peak RSS (VmHWM, sampled every 0.1 s
over the launch's process tree) in both runs, by process title.

``--ttft`` measures the time to first token of a 32-frame video request (224x224 frames, 1024 video
tokens) in process on the "small" checkpoint (Qwen2.5-0.5B's text shape, cluster/tools/bench.py), ours
(ModelRunner.generate, eager) against transformers' generate on the same inputs, median of 3 after a
warm-up each.

    python -m cluster.tools.bench_video [--seconds 600] [--served conf/tiny_cpu.yaml] [--ttft] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from model.video import VideoOptions, decode_video, frame_size, sample_count, sample_indices


def write_long_video(path: Path, seconds: int, width: int = 1280, height: int = 720, fps: int = 30) -> int:
    """A `seconds`-long H.264 mp4 at `path`: 10 s of moving gradients encoded once, muxed repeatedly; its size."""
    segment = min(10, seconds)
    frames = segment * fps
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], -1).astype(np.uint8)
    time_base = Fraction(1, fps)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "38", "g": str(frames)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = time_base
        encoded = []  # (payload, pts, dts, keyframe) of the first segment, in the encoder's time base
        for i in range(frames + 1):
            frame = None
            if i < frames:
                frame = av.VideoFrame.from_ndarray(np.roll(base, 8 * i, axis=1), format="rgb24")
                frame.pts = i
            for packet in stream.encode(frame):
                encoded.append((bytes(packet), packet.pts, packet.dts, packet.is_keyframe))
        for repeat in range(seconds // segment):
            for payload, pts, dts, keyframe in encoded:
                packet = av.Packet(payload)
                packet.pts, packet.dts = pts + repeat * frames, dts + repeat * frames
                packet.time_base, packet.is_keyframe, packet.stream = time_base, keyframe, stream
                out.mux(packet)
    return path.stat().st_size


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def naive(path: str, options: VideoOptions) -> np.ndarray:
    """Every frame decoded and converted to RGB; the sampled ones kept, resized as ours are."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate)
        total = sum(1 for packet in container.demux(stream) if packet.size)
    count = sample_count(total, rate, options)
    wanted = set(sample_indices(total, count))
    height, width = frame_size(720, 1280, count, options)
    kept = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            rgb = frame.to_ndarray(format="rgb24")
            if i in wanted:
                kept.append(np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC)))
    return np.stack(kept)


def _process_tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            parents.setdefault(parent, []).append(int(entry))
    tree = [root]
    for pid in tree:
        tree += parents.get(pid, [])
    return tree


def _peak_mb(pid: int) -> tuple[str, float] | None:
    """(process title, peak RSS in MB) of a live process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            title = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/status") as status:
            peak = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return title, peak


def _role(title: str) -> str:
    if "cluster.launch" in title:
        return "driver (cluster.launch)"
    return title.split()[0] if title.startswith("ray::") else ""


def served_peaks(config: str, dataset: Path, out_dir: Path) -> dict[str, float]:
    """Run cluster.launch on `dataset`; the largest peak RSS (MB) per role (driver, ray::Coordinator, ...)."""
    command = [sys.executable, "-m", "cluster.launch", config, f"data_config.dataset={dataset}",
               f"output_path={out_dir / 'results.jsonl'}", f"ray.namespace=bench-video-{dataset.stem}"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": "local"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks: dict[int, tuple[str, float]] = {}
    while process.poll() is None:
        for pid in _process_tree(process.pid):
            seen = _peak_mb(pid)
            if seen is not None:
                title = seen[0] if _role(seen[0]) or pid not in peaks else peaks[pid][0]
                peaks[pid] = (title, max(seen[1], peaks.get(pid, ("", 0.0))[1]))
        time.sleep(0.1)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}")
    roles: dict[str, float] = {}
    for title, peak in peaks.values():
        role = _role(title)
        if role:
            roles[role] = max(roles.get(role, 0.0), peak)
    return roles


def _served(config: str, video: Path, tmp: Path) -> dict[str, dict[str, float]]:
    prompt = {"prompt": "What happens in this video?", "max_new_tokens": 8}
    kwargs = {"max_frames": 16, "video_min_pixels": 28 * 28, "video_max_pixels": 64 * 28 * 28}
    rows = {"text": {"id": "text", **prompt}, "video": {"id": "video", **prompt, "videos": [str(video)],
                                                         "mm_processor_kwargs": kwargs}}  # fmt: skip
    out = {}
    for name, row in rows.items():
        dataset = tmp / f"{name}.jsonl"
        dataset.write_text(json.dumps(row) + "\n")
        out[name] = served_peaks(config, dataset, tmp / f"out-{name}")
    print("served (peak RSS, MB):")
    for role in sorted(out["video"]):
        base = out["text"].get(role, 0.0)
        print(f"  {role:<34} text only {base:6.0f}  with the video {out['video'][role]:6.0f}  "
              f"(+{out['video'][role] - base:.0f})")  # fmt: skip
    return out


def ttft(repeats: int = 3) -> dict[str, float]:
    """Median TTFT (s) of a 32-frame video request: ours and transformers', on the "small" checkpoint."""
    import statistics

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from cluster.tools.bench import CACHE_DIR, CHECKPOINTS
    from cluster.tools.tiny_checkpoint import build_tiny_checkpoint
    from model.processor import PromptBuilder
    from model.runner import ModelRunner
    from model.sampling import SamplingParams

    directory, spec = CHECKPOINTS["small"]
    path = build_tiny_checkpoint(CACHE_DIR / directory, spec)
    frames = np.random.default_rng(0).integers(0, 256, (32, 224, 224, 3), dtype=np.uint8)
    data = io.BytesIO()
    with av.open(data, mode="w", format="matroska") as out:  # 32 frames at 2 fps: all of them sampled
        stream = out.add_stream("ffv1", rate=2)
        stream.width, stream.height, stream.pix_fmt = 224, 224, "bgr0"
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = i
            for packet in stream.encode(video_frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    builder = PromptBuilder.from_pretrained(path)
    request = builder.build(
        {
            "id": "ttft",
            "prompt": "What happens in this video?",
            "videos": [data.getvalue()],
            "mm_processor_kwargs": {"video_min_pixels": 28 * 28, "video_max_pixels": 224 * 224},
        }
    )
    assert request.video_frames == [32], request.video_frames
    seconds = request.second_per_grid_ts
    pieces = request.pixel_values
    ids = torch.tensor([request.input_ids])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": pieces,
        "video_grid_thw": request.image_grid_thw,
        "second_per_grid_ts": torch.tensor(seconds),
        "mm_token_type_ids": 2 * (ids == builder.video_token_id).int(),
    }
    runner = ModelRunner(path, max_batch_size=1, max_seq_len=len(request.input_ids) + 8)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()

    def ours() -> None:
        runner.generate([request], [SamplingParams(max_new_tokens=1)], eos_token_ids=[])

    def theirs() -> None:
        with torch.inference_mode():
            hf.generate(**inputs, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)

    out = {"prompt_tokens": len(request.input_ids), "video_tokens": request.video_tokens}
    for name, call in (("ours_s", ours), ("transformers_s", theirs)):
        call()
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            call()
            times.append(time.perf_counter() - began)
        out[name] = statistics.median(times)
    out["ratio"] = out["ours_s"] / out["transformers_s"]
    return out


def _child(method: str, path: str, options: VideoOptions) -> dict:
    base = _rss_mb()
    began = time.perf_counter()
    frames = naive(path, options) if method == "naive" else decode_video(path, options).frames
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "seconds": seconds, "frames": int(frames.shape[0]), "frame_hw": list(frames.shape[1:3]),
            "peak_rss_growth_mb": peak - base}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=600, help="video length (default 600: 10 minutes)")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--max-frames", type=int, default=32)
    parser.add_argument("--max-pixels", type=int, default=128 * 28 * 28)
    parser.add_argument("--served", metavar="CONFIG", default=None, help="also serve it with cluster.launch CONFIG")
    parser.add_argument("--ttft", action="store_true", help="also time a 32-frame request against transformers")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    options = VideoOptions(fps=args.fps, max_frames=args.max_frames, min_pixels=28 * 28, max_pixels=args.max_pixels)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], options)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.mp4"
        began = time.perf_counter()
        size = write_long_video(path, args.seconds)
        print(f"video: {args.seconds} s of 1280x720 at 30 fps, {size / 2**20:.1f} MiB, "
              f"written in {time.perf_counter() - began:.1f} s")  # fmt: skip
        flags = ["--fps", str(args.fps), "--max-frames", str(args.max_frames), "--max-pixels", str(args.max_pixels)]
        results = []
        for method in ("naive", "ours"):
            out = subprocess.run(
                [sys.executable, "-m", "cluster.tools.bench_video", *flags, "--child", method, str(path)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{method:>6}: {r['seconds']:7.2f} s, {r['frames']} frames of {r['frame_hw']}, "
                  f"peak RSS +{r['peak_rss_growth_mb']:.0f} MB")  # fmt: skip
        ratio = results[1]["seconds"] / results[0]["seconds"]
        print(f"ours / naive time: {ratio:.2f}x")
        served = _served(args.served, path, Path(tmp)) if args.served else None
    first_token = None
    if args.ttft:
        first_token = ttft()
        print(f"TTFT of a 32-frame video ({first_token['video_tokens']} video tokens) on the small checkpoint: "
              f"ours {first_token['ours_s']:.3f} s, transformers {first_token['transformers_s']:.3f} s "
              f"({first_token['ratio']:.2f}x)")  # fmt: skip
    if args.json:
        summary = {"seconds": args.seconds, "results": results, "ratio": ratio, "served_peak_rss_mb": served,
                   "ttft": first_token}  # fmt: skip
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
