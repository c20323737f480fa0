"""Self-check of a device backend: `python -m cluster.tools.selfcheck --device npu|cuda|cpu [--tp 2]`.

Builds the tiny checkpoint (cached), computes reference tokens with an in-process cpu runner at
tp 1, then checks through Ray on the given device: that Ray sees enough devices, that this node passes
the launch's preflight (torch_npu, CANN's environment, graph-mode variables), that a pair of
Ray tasks forms a process group with the device's backend and gets all_reduce/all_gather right,
that the engine serves the prompts at tp N in eager and in graph mode (`cluster.start`) with the
reference tokens, and reports capture time and TPOT. Where the device has fused decode kernels (npu),
one Ray task runs the plain and the fused decode on one device and compares their logits. Another
quantizes the tiny checkpoint (W8A8, `model.quantize`) and compares its teacher-forced logits on the
device with the float model's: top-1 agreement and mean KL. Prints a pass/fail table; exit status 0
only when every row passes.

On npu two steps come first, on this node and before Ray starts: the node preflight in this process (a
node without torch_npu or CANN's environment stops here, with the preflight's message), then the first-run
cases (`cluster.tools.npu_first_run`, each in its own process with a timeout, one line per case), whose
result is the table's first row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch

from cluster.devices import DeviceSpec, get_device_spec
from cluster.launch import eager_decode_buckets, format_eager
from cluster.preflight import node_problems, probe
from cluster.tools.bench import CACHE_DIR, CHECKPOINTS, bench_image, bench_requests
from cluster.tools.bench_quant import quant_accuracy, quantized_copy
from cluster.tools.npu_first_run import DEFAULT_TIMEOUT_S
from cluster.tools.tiny_checkpoint import build_tiny_checkpoint
from model.parallel import free_port
from model.processor import PromptBuilder
from model.runner import ModelRunner
from model.sampling import SamplingParams

ROWS = (
    "devices visible to Ray",
    "node preflight",
    "process-group init",
    "all_reduce/all_gather",
    "graph capture",
    "token parity",
    "TPOT",
    "fused vs plain decode",
    "int8 (W8A8) vs float",
)
FUSED_RTOL = 0.05  # largest |fused - plain| logit over the largest |logit|, bf16
# Int8 against float on the tiny model: tests/test_quant.py bounds the cpu float32 KL by 0.02 (measured
# 0.006); on an accelerator both sides run in bfloat16, whose own rounding adds to it.
QUANT_MAX_KL = 0.05
QUANT_MIN_TOP1 = 0.75
FIRST_RUN_ROW = "npu first-run cases"


@dataclass
class Row:
    name: str
    ok: bool
    detail: str


def log(message: str) -> None:
    print(f"[selfcheck {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def collective_probe(rank: int, world: int, address: str, device: str, timeout_s: float) -> dict:
    """One rank of the probe: init the process group, all_reduce and all_gather small tensors."""
    import torch.distributed as dist

    from model.device import bind_device

    spec = get_device_spec(device)
    dev = bind_device(spec.name, ray.get_runtime_context().get_accelerator_ids(), os.environ)
    t = time.perf_counter()
    dist.init_process_group(
        spec.dist_backend, init_method=address, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    init_s = time.perf_counter() - t
    try:
        x = torch.full((4,), float(rank + 1), device=dev)
        dist.all_reduce(x)
        parts = [torch.empty(2, device=dev) for _ in range(world)]
        dist.all_gather(parts, torch.full((2,), float(rank), device=dev))
        return {
            "rank": rank,
            "init_s": init_s,
            "all_reduce": x.cpu().tolist(),
            "all_gather": torch.cat(parts).cpu().tolist(),
        }
    finally:
        dist.destroy_process_group()


def device_task_options(spec: DeviceSpec) -> dict[str, Any]:
    """Ray options for a task holding one device of the driver's node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {
        "num_cpus": 1 if spec.name == "cpu" else 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    }
    if spec.name == "cuda":
        options["num_gpus"] = 1
    elif spec.name != "cpu":
        options["resources"] = {spec.ray_resource: 1}
    return options


def check_preflight(spec: DeviceSpec) -> Row:
    """The launch's node preflight (cluster/preflight.py) on the driver's node, holding one device."""
    task = ray.remote(probe).options(**device_task_options(spec))
    try:
        report = ray.get(task.remote(spec.name, "graph", {}), timeout=300)
    except Exception as e:
        return Row(ROWS[1], False, f"the preflight task failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if report["problems"]:
        return Row(ROWS[1], False, " / ".join(report["problems"]))
    return Row(ROWS[1], True, f"node {report['node_ip']}: imports, versions and environment as workers need them")


def check_collectives(spec: DeviceSpec, tp: int, timeout_s: float) -> tuple[Row, Row]:
    """A pair (or more) of Ray tasks on the driver's node, one device each, forming a process group."""
    address = f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"
    task = ray.remote(collective_probe).options(**device_task_options(spec))
    refs = [task.remote(r, tp, address, spec.name, timeout_s) for r in range(tp)]
    try:
        out = ray.get(refs, timeout=timeout_s + 30)
    except Exception as e:
        for ref in refs:
            ray.cancel(ref, force=True)
        detail = f"{spec.dist_backend} at {address}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return Row(ROWS[2], False, detail), Row(ROWS[3], False, "no process group")
    init = Row(ROWS[2], True, f"{spec.dist_backend}, {tp} ranks, init {max(o['init_s'] for o in out):.2f}s")
    want_sum = [float(sum(range(1, tp + 1)))] * 4
    want_gather = [float(r) for r in range(tp) for _ in range(2)]
    bad = [o["rank"] for o in out if o["all_reduce"] != want_sum or o["all_gather"] != want_gather]
    return init, Row(ROWS[3], not bad, "all ranks agree" if not bad else f"wrong results on ranks {bad}")


def fused_probe(path: str, device: str, requests: list[dict], new_tokens: int) -> dict:
    """On one device, in bf16: the prompts' decode-step logits with plain ops and with fused kernels.

    Teacher-forced on the plain path's greedy tokens, so both sides see the same inputs at every step.
    """
    from cluster.tools.greedy_check import decode_step_logits
    from model.device import bind_device

    dev = bind_device(device, ray.get_runtime_context().get_accelerator_ids(), os.environ)
    builder = PromptBuilder.from_pretrained(path)
    prepared = [builder.build(r) for r in requests]
    params = [SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)] * len(prepared)
    logits: dict[bool, list[torch.Tensor]] = {}
    continuations = None
    for fused in (False, True):
        runner = ModelRunner(
            path, device=dev, dtype="bfloat16", max_batch_size=1, max_seq_len=256 + new_tokens, fused_ops=fused
        )
        if continuations is None:
            continuations = [r.output_token_ids for r in runner.generate(prepared, params, [])]
        logits[fused] = [decode_step_logits(runner, p, c) for p, c in zip(prepared, continuations)]
    diff = max(float((a - b).abs().max()) for a, b in zip(logits[False], logits[True]))
    scale = max(float(a.abs().max()) for a in logits[False])
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits[False], logits[True]))
    return {
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "top1_agree": agree,
        "steps": sum(a.shape[0] for a in logits[False]),
    }


def check_fused(spec: DeviceSpec, path: Path, requests: list[dict], new_tokens: int) -> Row:
    """Fused decode kernels against the plain ops on the device (npu; elsewhere there are none to check)."""
    if not spec.fused_ops:
        return Row(ROWS[7], True, f"not used on {spec.name} (the fused decode kernels are npu-only)")
    task = ray.remote(fused_probe).options(**device_task_options(spec))
    try:
        out = ray.get(task.remote(str(path), spec.name, requests, new_tokens), timeout=600)
    except Exception as e:
        log(traceback.format_exc())
        return Row(ROWS[7], False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    relative = out["max_abs_diff"] / max(out["max_abs_logit"], 1e-6)
    detail = (
        f"bf16 logits: max |fused - plain| {out['max_abs_diff']:.3g} ({relative:.2%} of max |logit|), "
        f"same top-1 at {out['top1_agree']}/{out['steps']} steps"
    )
    return Row(ROWS[7], relative <= FUSED_RTOL, detail)


def quant_probe(path: str, quant_path: str, device: str, requests: list[dict], new_tokens: int) -> dict:
    """On one device (float32 on cpu, bfloat16 elsewhere): int8 against float, teacher-forced."""
    from model.device import bind_device

    dev = bind_device(device, ray.get_runtime_context().get_accelerator_ids(), os.environ)
    dtype = "float32" if device == "cpu" else "bfloat16"
    builder = PromptBuilder.from_pretrained(path)
    prepared = [builder.build(r) for r in requests]
    runners = [
        ModelRunner(p, device=dev, dtype=dtype, max_batch_size=1, max_seq_len=256 + new_tokens)
        for p in (path, quant_path)
    ]
    return quant_accuracy(*runners, prepared, new_tokens)


def check_quant(spec: DeviceSpec, path: Path, requests: list[dict], new_tokens: int) -> Row:
    """The W8A8 copy of the tiny checkpoint against the float one, on the device."""
    try:
        quant_path = quantized_copy(path)
        task = ray.remote(quant_probe).options(**device_task_options(spec))
        out = ray.get(task.remote(str(path), str(quant_path), spec.name, requests, new_tokens), timeout=600)
    except Exception as e:
        log(traceback.format_exc())
        return Row(ROWS[8], False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    ok = out["mean_kl"] <= QUANT_MAX_KL and out["top1_agreement"] >= QUANT_MIN_TOP1
    detail = (
        f"teacher-forced: top-1 {out['top1_agreement']:.0%} of {out['steps']} steps (need {QUANT_MIN_TOP1:.0%}), "
        f"mean KL {out['mean_kl']:.4f} (need <= {QUANT_MAX_KL})"
    )
    return Row(ROWS[8], ok, detail)


def check_first_run(case_timeout_s: float) -> Row:
    """`python -m cluster.tools.npu_first_run` in a process of its own; its lines are printed as they come."""
    command = [sys.executable, "-m", "cluster.tools.npu_first_run", "--timeout", f"{case_timeout_s:g}"]
    log("npu first-run cases: " + " ".join(command[1:]))
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.strip())
    summary = lines[-1] if lines else f"no output (exit code {proc.returncode})"
    failed = [line.split()[0] for line in lines[:-1] if len(line.split()) > 1 and line.split()[1] != "PASS"]
    detail = summary + (f"; failed: {', '.join(failed)}" if failed else "")
    return Row(FIRST_RUN_ROW, proc.returncode == 0, detail)


def run_engine(
    path: Path, spec: DeviceSpec, tp: int, mode: str, requests: list[dict], new_tokens: int, batch: int
) -> tuple[list[dict], dict]:
    """Serve `requests` through `cluster.start` at tp `tp`; returns the records and the Coordinator's stats."""
    from cluster import load_config, start, stop

    cfg = load_config(
        None,
        [
            f"model_path={path}",
            f"device={spec.name}",
            f"world_size={tp}",
            f"parallel_config.tp_size={tp}",
            f"exe_mode={mode}",
            f"data_config.batch_size={batch}",
            f"data_config.max_new_tokens={new_tokens}",
            "data_config.ignore_eos=true",
            "data_config.input_max_len=256",
            "ray.num_cpus_per_worker=1",
            "ray.log_to_driver=false",
            "ray.namespace=selfcheck",
            "ray.worker_timeout_s=300",
        ],
    )
    coordinator = start(cfg)
    try:
        records = ray.get(coordinator.generate.remote(requests), timeout=300)
        stats = ray.get(coordinator.stats.remote(), timeout=30)
    finally:
        stop(coordinator)
    errors = [r["error"] for r in records if r["error"]]
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]}")
    return records, stats


def parity(records: list[dict], reference: list[list[int]]) -> str | None:
    """None when every request's tokens equal the reference, else where the first one differs."""
    for r, ref in zip(records, reference):
        ours = r["output_token_ids"]
        if ours != ref:
            step = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
            return f"{r['id']} differs at step {step}: {ours} vs {ref}"
    return None


def selfcheck(device: str, tp: int, new_tokens: int, cache: Path = CACHE_DIR) -> list[Row]:
    spec = get_device_spec(device)
    directory, tiny = CHECKPOINTS["tiny"]
    path = build_tiny_checkpoint(cache / directory, tiny)
    requests = bench_requests(2, bench_image(cache))  # a text-only and a one-image prompt
    batch = 1  # one decode bucket: graph mode then compiles a single step per worker

    log("cpu reference: in-process runner, tp 1, eager")
    builder = PromptBuilder.from_pretrained(path)
    runner = ModelRunner(path, max_batch_size=batch, max_seq_len=256 + new_tokens)
    params = [SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)] * len(requests)
    reference = [r.output_token_ids for r in runner.generate([builder.build(q) for q in requests], params, [])]
    runner = None

    rows: list[Row] = []
    available = ray.cluster_resources().get(spec.ray_resource, 0.0)
    rows.append(Row(ROWS[0], available >= tp, f"{spec.ray_resource}: {available:g} in the cluster, need {tp}"))
    if not rows[0].ok:
        return rows + [Row(name, False, "skipped: not enough devices") for name in ROWS[1:]]
    log("node preflight: one Ray task on this node")
    rows.append(check_preflight(spec))
    if not rows[1].ok:
        return rows + [Row(name, False, "skipped: the node preflight failed") for name in ROWS[2:]]

    log(f"collective probe: {tp} Ray tasks, backend {spec.dist_backend}")
    rows.extend(check_collectives(spec, tp, timeout_s=60))

    runs: dict[str, tuple[list[dict], dict] | str] = {}
    for mode in ("eager", "graph"):
        log(f"engine: tp {tp} on {spec.name}, exe_mode {mode}")
        try:
            runs[mode] = run_engine(path, spec, tp, mode, requests, new_tokens, batch)
        except Exception as e:
            log(traceback.format_exc())
            runs[mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"

    graph = runs["graph"]
    if isinstance(graph, str):
        rows.append(Row(ROWS[4], False, f"exe_mode graph failed: {graph}"))
    else:
        capture = graph[1]["phases"]["graph_capture_s"]
        eager = eager_decode_buckets(graph[1]["workers"])
        detail = f"{spec.graph_mode}, capture {capture:.1f}s"
        if eager:  # the run went on with those buckets eager; the row says which
            detail += f"; capture failed, these run eager: {format_eager(eager)}"
        rows.append(Row(ROWS[4], capture > 0 and not eager, detail))

    details, ok = [], True
    for mode, run in runs.items():
        problem = run if isinstance(run, str) else parity(run[0], reference)
        ok = ok and problem is None
        details.append(f"{mode}: {'same as cpu reference' if problem is None else problem}")
    rows.append(Row(ROWS[5], ok, "; ".join(details)))

    details, ok = [], True
    for mode, run in runs.items():
        tpots = [] if isinstance(run, str) else [r["tpot_s"] for r in run[0] if r["tpot_s"] is not None]
        ok = ok and len(tpots) == len(requests)
        details.append(f"{mode} {1e3 * statistics.median(tpots):.2f} ms" if tpots else f"{mode} n/a")
    rows.append(Row(ROWS[6], ok, "median " + ", ".join(details)))

    log(f"fused decode kernels vs plain ops on {spec.name}")
    rows.append(check_fused(spec, path, requests, new_tokens))
    log(f"int8 (W8A8) against float on {spec.name}")
    rows.append(check_quant(spec, path, requests, max(new_tokens, 8)))
    return rows


def format_rows(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'check':<{width}}  result  detail", "-" * (width + 40)]
    lines += [f"{r.name:<{width}}  {'PASS' if r.ok else 'FAIL':<6}  {r.detail}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True, choices=("cpu", "cuda", "npu"))
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the Ray runs (default 2)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--cache-dir", default=str(CACHE_DIR), help="where the tiny checkpoint is built and reused")
    parser.add_argument("--case-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="npu: seconds per first-run case")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    first: list[Row] = []
    if args.device == "npu":
        problems = node_problems("npu", "graph", os.environ)
        if problems:
            print(f"selfcheck: preflight for device npu failed on this node: {' / '.join(problems)}")
            print("selfcheck FAILED on npu: stopped at the preflight")
            return 1
        first.append(check_first_run(args.case_timeout))
    if not ray.is_initialized():
        ray.init(address="local", namespace="selfcheck", log_to_driver=False)
    try:
        rows = first + selfcheck(args.device, args.tp, args.new_tokens, Path(args.cache_dir).expanduser())
    finally:
        ray.shutdown()
    print(format_rows(rows))
    passed = all(r.ok for r in rows)
    print(f"selfcheck {'PASSED' if passed else 'FAILED'} on {args.device} in {time.perf_counter() - started:.0f}s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
