"""Scheduler benchmark: continuous vs static batching under Poisson arrivals, and the per-step cost of Ray.

`python -m cluster.tools.bench_scheduler [--checkpoint small|tiny] [--requests 32] [--rate R]
[--max-decode-stall 0.5,1,none] [--out DIR]`

1. Serving: `--requests` mixed requests (text prompts of different lengths, every third with an
   image, 8 to 64 output tokens, EOS ignored) arrive as a Poisson process at `--rate` requests/s
   (seeded) at one DP group of 4 KV slots, tp 1, in one run: the static policy once, then the
   continuous one once per `scheduler.max_decode_stall` value (default: the config's). Reported the way
   `cluster.launch` summarizes a run: TTFT, TPOT, ITL, E2E, queue time and output throughput, and
   each continuous run's TTFT p99, TPOT p99 and throughput over static's.
2. Per-step orchestration: one request decoding `--step-tokens` tokens through the Coordinator, at
   several `scheduler.decode_steps_per_call` values, against the same request in process
   (`ModelRunner.generate`, no Ray): TPOT medians and their ratio.

The worker holds every core; the numbers are ratios against baselines measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from cluster.config import load_config
from cluster.launch import serve_requests, start, stop
from cluster.report import summarize
from cluster.tools.bench import CACHE_DIR, CHECKPOINTS, bench_image, log, percentile
from cluster.tools.tiny_checkpoint import build_tiny_checkpoint
from model.processor import PromptBuilder
from model.runner import ModelRunner
from model.sampling import SamplingParams

WORDS = ("weather report model design team summary image story river mountain city light").split()


def serving_requests(count: int, image: Path, seed: int = 0) -> list[dict]:
    """Mixed requests: prompts of 5-80 words, every third with an image, 8-64 output tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        prompt = "Describe: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80)))
        out.append(
            {
                "id": f"s{i}",
                "prompt": prompt,
                "images": [str(image)] if i % 3 == 2 else [],
                "max_new_tokens": rng.choice((8, 16, 32, 48, 64)),
                "ignore_eos": True,
            }
        )
    return out


def engine_config(
    path: Path,
    policy: str,
    steps: int | str,
    slots: int,
    stall: str | None = None,
    exe_mode: str = "eager",
    extra: Sequence[str] = (),
) -> Any:
    """The run config of one engine; `stall` overrides scheduler.max_decode_stall (a number or 'null'), and the
    dotted key=value overrides in `extra` come last."""
    return load_config(
        None,
        [
            f"model_path={path}",
            "device=cpu",
            "world_size=1",
            "parallel_config.tp_size=1",
            f"data_config.batch_size={slots}",
            "data_config.max_new_tokens=64",
            "data_config.input_max_len=512",
            f"scheduler.policy={policy}",
            f"scheduler.decode_steps_per_call={steps}",
            f"exe_mode={exe_mode}",
            f"ray.num_cpus_per_worker={os.cpu_count() or 1}",
            "ray.log_to_driver=false",
            "ray.address=local",  # a private cluster: never join another one running on this machine
            f"ray.namespace=bench-{policy}",
            *([f"scheduler.max_decode_stall={stall}"] if stall is not None else []),
            *extra,
        ],
    )


def serve_and_summarize(cfg: Any, requests: list[dict], rate: float, label: str) -> dict:
    """Start an engine, send `requests` as Poisson arrivals at `rate`, stop it -> the run summary.

    RuntimeError when a request failed (a benchmark of failures measures nothing).
    """
    coordinator = start(cfg)
    try:
        t = time.perf_counter()
        records = serve_requests(coordinator, requests, rate, seed=0)
        wall = time.perf_counter() - t
    finally:
        stop(coordinator)
    failed = [r["error"] for r in records if r["error"]]
    if failed:
        raise RuntimeError(f"{label}: {len(failed)} requests failed, e.g. {failed[0]}")
    summary = summarize(records, wall)
    log(
        f"{label}: TTFT p50 {summary['ttft_ms']['median']:.0f} ms p99 {summary['ttft_ms']['p99']:.0f} ms, "
        f"TPOT p50 {summary['tpot_ms']['median']:.1f} ms, {summary['output_throughput_tok_s']:.1f} tok/s, "
        f"preemptions {summary['preemptions']}"
    )
    return summary


def run_serving(
    path: Path, requests: list[dict], rate: float, label: str, stall: str | None, extra: Sequence[str] = ()
) -> dict:
    """`label` is the policy, with ' stall=X' for a continuous run at max_decode_stall X."""
    cfg = engine_config(path, label.split()[0], steps=4, slots=4, stall=stall, extra=extra)
    return serve_and_summarize(cfg, requests, rate, f"serving/{label}")


def run_step_cost(
    path: Path, request: dict, steps_list: list[int | str], repeats: int, exe_mode: str, extra: Sequence[str] = ()
) -> dict:
    """TPOT of one request through the Coordinator per decode_steps_per_call, and in process (same exe_mode).

    The in-process run and the Coordinator's alternate, one of each per repeat, so that each ratio is of
    two runs next to each other in time (this machine's speed drifts more than the orchestration costs);
    the figures are the medians of the TPOTs and of the per-repeat ratios.
    """
    builder = PromptBuilder.from_pretrained(path)
    runner = ModelRunner(path, max_batch_size=1, max_seq_len=512 + 64)
    runner.warmup()
    if exe_mode == "graph":
        runner.capture_graphs([1])
    prepared = builder.build({**request, "id": "inproc"})
    params = [SamplingParams(max_new_tokens=request["max_new_tokens"], ignore_eos=True)]

    def in_process_tpot_ms() -> float:
        times = runner.generate([prepared], params, eos_token_ids=[])[0].token_times_s
        return (times[-1] - times[0]) / (len(times) - 1) * 1e3

    out: dict[str, Any] = {"coordinator": {}, "in_process_runs": {}, "ratio": {}, "exe_mode": exe_mode}
    for steps in steps_list:
        coordinator = start(engine_config(path, "continuous", steps, slots=1, exe_mode=exe_mode, extra=extra))
        try:
            tpots, local, ratios, itl_ratios = [], [], [], []
            for i in range(repeats + 1):  # the first is a warm-up
                record = ray.get(coordinator.generate.remote([{**request, "id": f"step-{i}"}]), timeout=600)[0]
                base = in_process_tpot_ms()
                if i:
                    tpots.append(record["tpot_s"] * 1e3)
                    local.append(base)
                    ratios.append(tpots[-1] / base)
                    # delivered ITL p99 over the step time (the worker's median gap between tokens)
                    itl_ratios.append(percentile(record["itl_s"], 99) / statistics.median(record["device_itl_s"]))
        finally:
            stop(coordinator)
        key = str(steps)
        out["coordinator"][key] = statistics.median(tpots)
        out["in_process_runs"][key] = statistics.median(local)
        out["ratio"][key] = statistics.median(ratios)
        out.setdefault("itl_p99_over_step", {})[key] = statistics.median(itl_ratios)
        log(
            f"per-step: decode_steps_per_call={steps}: TPOT {out['coordinator'][key]:.2f} ms, in process "
            f"{out['in_process_runs'][key]:.2f} ms, ratio {out['ratio'][key]:.3f} (per repeat: "
            f"{', '.join(f'{r:.3f}' for r in ratios)}); delivered ITL p99 / step "
            f"{out['itl_p99_over_step'][key]:.2f}x"
        )
    out["in_process"] = statistics.median(out["in_process_runs"].values())
    return out


def format_table(report: dict) -> str:
    lines = [
        f"Serving: {report['settings']['requests']} requests, Poisson {report['settings']['rate']}/s, "
        f"{report['settings']['checkpoint']} checkpoint, 4 KV slots, tp 1"
    ]
    lines.append(
        f"{'policy':<24}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}{'ITL p99':>10}"
        f"{'E2E p99':>10}{'queue p99':>10}{'tok/s':>8}"
    )
    for label, s in report["serving"].items():
        lines.append(
            f"{label:<24}{s['ttft_ms']['median']:>10.0f}{s['ttft_ms']['p99']:>10.0f}"
            f"{s['tpot_ms']['median']:>10.1f}{s['tpot_ms']['p99']:>10.1f}{s['itl_ms']['p99']:>10.0f}"
            f"{s['e2e_ms']['p99']:>10.0f}{s['queue_ms']['p99']:>10.0f}{s['output_throughput_tok_s']:>8.1f}"
        )
    st = report["serving"].get("static")
    for label, c in report["serving"].items():
        if st and label != "static":
            lines.append(
                f"{label} / static: TTFT p99 {c['ttft_ms']['p99'] / st['ttft_ms']['p99']:.2f}x, "
                f"TPOT p99 {c['tpot_ms']['p99'] / st['tpot_ms']['p99']:.2f}x, "
                f"throughput {c['output_throughput_tok_s'] / st['output_throughput_tok_s']:.2f}x"
            )
    step = report.get("step_cost")
    if step:
        lines.append(
            f"Per-step orchestration (one request, TPOT ms): in process {step['in_process']:.2f}; "
            + ", ".join(f"{k} step(s)/call {v:.2f} ({step['ratio'][k]:.3f}x)" for k, v in step["coordinator"].items())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.tools.bench_scheduler", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--checkpoint", default="small", choices=list(CHECKPOINTS))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument(
        "--rate", type=float, default=None, help="arrivals per second (default: 1.0 on small, 20 on tiny)"
    )
    parser.add_argument(
        "--max-decode-stall",
        default=None,
        help="comma-separated scheduler.max_decode_stall values of the continuous runs ('null': no cap; "
        "default: the config's)",
    )
    parser.add_argument("--exe-mode", default="eager", choices=("eager", "graph"), help="for the per-step figure")
    parser.add_argument(
        "--steps", default="1,4,auto", help="decode_steps_per_call values (integers or auto) for the per-step figure"
    )
    parser.add_argument("--step-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--skip-step-cost", action="store_true")
    parser.add_argument("--out", default="outputs/bench_scheduler")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every engine run"
    )
    args = parser.parse_args(argv)
    directory, spec = CHECKPOINTS[args.checkpoint]
    path = build_tiny_checkpoint(CACHE_DIR / directory, spec)
    rate = args.rate or (1.0 if args.checkpoint == "small" else 20.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace="bench")
    report: dict[str, Any] = {
        "machine": f"{os.cpu_count()}-core CPU",
        "serving": {},
        "settings": {
            "checkpoint": args.checkpoint,
            "requests": args.requests,
            "rate": rate,
            "slots": 4,
            "decode_steps_per_call": 4,
            "overrides": args.set,
        },
    }
    try:
        if not args.skip_serving:
            requests = serving_requests(args.requests, bench_image(CACHE_DIR))
            stalls = args.max_decode_stall.split(",") if args.max_decode_stall else [None]
            runs = [(f"continuous stall={s}" if s is not None else "continuous", s) for s in stalls]
            for label, stall in [("static", None), *runs]:
                report["serving"][label] = run_serving(path, requests, rate, label, stall, args.set)
                (out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
        if not args.skip_step_cost:
            request = {
                "prompt": "Describe the weather today and tomorrow.",
                "max_new_tokens": args.step_tokens,
                "ignore_eos": True,
            }
            steps = [s if s == "auto" else int(s) for s in args.steps.split(",")]
            report["step_cost"] = run_step_cost(path, request, steps, args.repeats, args.exe_mode, args.set)
    finally:
        ray.shutdown()
    (out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"wrote {out / 'serving.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
