"""The planner against the real engine here: `bench_scheduler`'s serving run and the simulator on the same requests.

`python -m cluster.tools.sim_validate [--hardware cpu-here] [--calibrate] [--json OUT]`

The real run is `bench_scheduler`'s serving workload (the 0.5B-shaped checkpoint, 32 mixed requests of
`serving_requests`, Poisson arrivals at 1 request/s with seed 0, one DP group of 4 slots, 4 decode
steps per call), static then continuous, through Ray on this machine. The same requests, written as a
`cluster.launch` request file, then go through `simulate` with the same settings and `--hardware`
(default `cpu-here`); with `--calibrate`, also with a profile `simulate --calibrate` fits right after
the real runs. Prints, per policy, each figure real against simulated with its error, and whether it
is within the targets: 25% on the TTFT and TPOT means and medians and on output throughput, 50% on
their p99s. Writes every figure as JSON. Needs a quiet machine: other work on the cores shows up in
the real run, not in the simulation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

SETTINGS = [
    "world_size=1",
    "parallel_config.tp_size=1",
    "data_config.batch_size=4",
    "data_config.max_new_tokens=64",
    "data_config.input_max_len=512",
    "scheduler.decode_steps_per_call=4",
]
RATE, REQUESTS, SEED = 1.0, 32, 0
# (figure, statistic, target): the largest relative error allowed
FIGURES = [
    ("ttft_ms", "mean", 0.25),
    ("ttft_ms", "median", 0.25),
    ("ttft_ms", "p99", 0.50),
    ("tpot_ms", "mean", 0.25),
    ("tpot_ms", "median", 0.25),
    ("tpot_ms", "p99", 0.50),
    ("output_throughput_tok_s", None, 0.25),
]


def figure(summary: dict, name: str, stat: str | None) -> float:
    return summary[name] if stat is None else summary[name][stat]


def compare(real: dict, simulated: dict) -> list[dict]:
    """Each figure of FIGURES: real, simulated, relative error, and whether it is within its target."""
    rows = []
    for name, stat, target in FIGURES:
        r, s = figure(real, name, stat), figure(simulated, name, stat)
        error = s / r - 1 if r else float("inf")
        rows.append(
            {"figure": name if stat is None else f"{name} {stat}", "real": r, "simulated": s,
             "error": error, "target": target, "within": abs(error) <= target}
        )  # fmt: skip
    return rows


def real_runs(path: Path, requests: list[dict]) -> dict[str, dict]:
    """bench_scheduler's static and continuous serving runs of `requests` on the checkpoint at `path`."""
    import ray

    from cluster.tools.bench_scheduler import run_serving

    ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace="sim_validate")
    try:
        return {policy: run_serving(path, requests, RATE, policy, None) for policy in ("static", "continuous")}
    finally:
        ray.shutdown()


def simulated(path: Path, requests_file: Path, hardware: str, policy: str) -> dict:
    from cluster.tools import simulate

    args = simulate.build_parser().parse_intermixed_args(
        ["conf/tiny_cpu.yaml", *SETTINGS, "--model-shape", str(path),
         "--workload", str(requests_file), "--rate", str(RATE), "--requests", str(REQUESTS), "--seed", str(SEED),
         "--policy", policy, "--hardware", hardware]
    )  # fmt: skip
    (plan,) = simulate.plans(args)
    return simulate.simulate(plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.sim_validate", description=__doc__.splitlines()[0])
    parser.add_argument("--hardware", default="cpu-here", help="a profile name or a .json profile (default cpu-here)")
    parser.add_argument("--calibrate", action="store_true", help="also a profile fitted right after the real runs")
    parser.add_argument("--json", type=Path, default=Path("outputs/simulate/validate_cpu_here.json"))
    args = parser.parse_args(argv)
    from cluster.tools import sim_calibrate
    from cluster.tools.bench import CACHE_DIR, CHECKPOINTS, bench_image
    from cluster.tools.bench_scheduler import serving_requests
    from cluster.tools.hardware import hardware
    from cluster.tools.tiny_checkpoint import build_tiny_checkpoint

    try:
        hardware(args.hardware)
    except ValueError as e:
        parser.error(str(e))
    requests = serving_requests(REQUESTS, bench_image(CACHE_DIR), SEED)
    work = Path(tempfile.mkdtemp(prefix="sim_validate_"))
    requests_file = work / "requests.jsonl"
    requests_file.write_text("".join(json.dumps(r) + "\n" for r in requests))
    directory, spec = CHECKPOINTS["small"]
    path = build_tiny_checkpoint(CACHE_DIR / directory, spec)
    real = real_runs(path, requests)
    profiles = {args.hardware: args.hardware}
    if args.calibrate:
        fitted, _ = sim_calibrate.calibrate()
        fitted_file = work / "calibrated.json"
        fitted_file.write_text(json.dumps(fitted.to_dict()) + "\n")
        profiles["calibrated"] = str(fitted_file)
    report: dict = {"settings": SETTINGS, "rate": RATE, "requests": REQUESTS, "seed": SEED, "policies": {}}
    ok = True
    for policy, summary in real.items():
        report["policies"][policy] = {"real": summary, "simulated": {}}
        for name, profile in profiles.items():
            rows = compare(summary, simulated(path, requests_file, profile, policy))
            report["policies"][policy]["simulated"][name] = rows
            print(f"\n{policy}, {name}:")
            print(f"{'figure':<32}{'real':>12}{'simulated':>12}{'error':>9}  target")
            for row in rows:
                mark = "ok" if row["within"] else "MISSED"
                print(f"{row['figure']:<32}{row['real']:>12.1f}{row['simulated']:>12.1f}{row['error']:>+9.0%}  "
                      f"{row['target']:.0%} {mark}")  # fmt: skip
            if name == args.hardware:
                ok = ok and all(row["within"] for row in rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.hardware}: {'every figure within its target' if ok else 'targets missed'}; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
