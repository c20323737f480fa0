"""Capacity under latency targets: the highest request rate whose simulated TTFT p99 and TPOT p99 meet them.

`python -m cluster.tools.sim_capacity CONF [key=value ...] --model-shape NAME --hardware NAME --workload NAME
[--weights bf16|w8a8] [--requests N] [--seed S] [--policy P] [--ttft-ms 2000] [--tpot-ms 50] [--json OUT]`

Takes the arguments of `cluster.tools.simulate` (one run config, one target, one workload) and
searches the Poisson arrival rate: it doubles the rate from 0.25 req/s until a run misses a target,
then bisects between the last rate that met both and the first that did not, to within 2% (at most
12 halvings; 0 when even 0.25 req/s misses them and the bisection finds no rate that meets them).
Reports that rate and the request and output throughput served at it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cluster.tools import simulate

PRECISION = 0.02  # relative width of the final bracket


def meets(summary: dict, ttft_ms: float, tpot_ms: float) -> bool:
    """Every request served, TTFT p99 and TPOT p99 within their targets."""
    return (
        summary["requests_failed"] == 0
        and summary["ttft_ms"]["p99"] <= ttft_ms
        and (summary["tpot_ms"]["p99"] or 0.0) <= tpot_ms
    )


def search(plan: simulate.Plan, ttft_ms: float, tpot_ms: float, log: bool = True) -> dict:
    """The highest rate meeting both targets (see the module docstring) and the summary of the run at it."""
    runs: dict[float, dict] = {}

    def run(rate: float) -> bool:
        plan.rate = rate
        runs[rate] = simulate.simulate(plan)
        ok = meets(runs[rate], ttft_ms, tpot_ms)
        if log:
            s = runs[rate]
            print(
                f"  rate {rate:7.3f}: TTFT p99 {s['ttft_ms']['p99']:9.0f} ms, TPOT p99 {s['tpot_ms']['p99'] or 0:6.1f} "
                f"ms, {s['request_throughput']:.2f} req/s {'ok' if ok else 'missed'}",
                file=sys.stderr,
            )
        return ok

    low, high = 0.0, 0.25
    while run(high):
        low, high = high, high * 2
        if high > 4096:
            break
    for _ in range(12):
        if low > 0 and (high - low) / low <= PRECISION:
            break
        middle = (low + high) / 2
        if run(middle):
            low = middle
        else:
            high = middle
    best = runs.get(low)
    return {
        "rate": low,
        "ttft_ms_target": ttft_ms,
        "tpot_ms_target": tpot_ms,
        "summary": best,
        "runs": {
            str(rate): {k: s[k] for k in ("ttft_ms", "tpot_ms", "request_throughput")} for rate, s in runs.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = simulate.build_parser()
    parser.prog = "python -m cluster.tools.sim_capacity"
    parser.description = __doc__.split("\n")[0]
    parser.add_argument("--ttft-ms", type=float, default=2000.0, help="TTFT p99 target")
    parser.add_argument("--tpot-ms", type=float, default=50.0, help="TPOT p99 target")
    args = parser.parse_intermixed_args(argv)
    if args.ttft_ms <= 0 or args.tpot_ms <= 0:
        parser.error(f"--ttft-ms={args.ttft_ms} and --tpot-ms={args.tpot_ms} must be > 0")
    try:
        [plan] = simulate.plans(args)[:1]
    except ValueError as e:
        parser.error(str(e))
    found = search(plan, args.ttft_ms, args.tpot_ms)
    s = found["summary"]
    cfg = plan.cfg
    print(
        f"{plan.shape.name} {plan.weights} on {plan.hw.name} x {cfg.world_size} (TP {cfg.tp_size} x DP {cfg.dp_size}), "
        f"{plan.workload}: {found['rate']:.2f} req/s at TTFT p99 <= {args.ttft_ms:g} ms and TPOT p99 <= "
        f"{args.tpot_ms:g} ms"
        + (
            ""
            if s is None
            else f" (served {s['request_throughput']:.2f} req/s, {s['output_throughput_tok_s']:.0f} output tok/s; "
            f"TTFT p99 {s['ttft_ms']['p99']:.0f} ms, TPOT p99 {s['tpot_ms']['p99']:.1f} ms)"
        )
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(found, indent=2, default=simulate.json_default) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
