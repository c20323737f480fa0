"""The first script to run on an NPU: the calls most likely to fail there, one line per case.

`python -m cluster.tools.npu_first_run [--timeout S] [--cases a,b]` on one die (index 0 of the visible
ones). Each case runs in its own process with a timeout: a hung NPU op cannot be interrupted from Python in
the process that issued it, so a case that does not answer in time is killed and reported as TIMEOUT, and
the next case starts in a fresh process. The cases call the engine's own code (model/npu_ops.py,
model/graph.py, model/quant.py) with the shapes of the 72B at TP 8 and compare with plain PyTorch on cpu:

- gather_graph_replay: `decode_attention: gather` in graph mode; FIA over gathered blocks, captured per
  (batch bucket, length) and replayed with no `update` (captured without auto-dispatch).
- npu_quantize_dtypes: static W8A8 activations of a bfloat16 model (scales and zero points in bfloat16),
  and the whole static linear.
- w8a8_float16: a float16 model's static (int64 scale from npu_trans_quant_param) and dynamic (float32
  bias) linears.
- paged_fia, paged_fia_mask: paged FIA decode at batch 3 with unequal KV lengths (`decode_attention: paged`
  and `paged_mask`) against SDPA.
- fusion_attention_head_dim_80, fusion_attention_1025_sequences, fusion_attention_2049_sequences: the vision
  tower's varlen attention (head size 80 padded to 128; more sequences than one call takes) against SDPA.

A node that fails the launch's preflight (no torch_npu, no CANN environment: cluster/preflight.py) stops
before any case. Exit status 0 only when every case passes. `python -m cluster.tools.selfcheck --device npu`
runs this first.
`--stand-in MODULE` runs the cases on cpu against a module's stand-ins for torch_npu and torch.npu (the
tests' `tests.npu_stand_in`); those processes are forked, on a device they start fresh (spawn).
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import model.npu_ops as npu_ops
from cluster.preflight import node_problems
from model.graph import GraphDecode, pick_length
from model.kv_cache import gather_blocks
from model.npu_ops import PLAIN, FusedOps
from model.quant import DYNAMIC, STATIC, QuantLinear, dequantized_reference, npu_static_args, quantize_static

DEFAULT_TIMEOUT_S = 300.0  # one case, first kernel compilation included
# The text model's attention on one rank of the 72B at TP 8, and the vision tower's heads.
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 8, 1, 128, 128
VISION_HEADS, VISION_HEAD_DIM = 16, 80


@dataclass
class Env:
    """What a case runs on: torch_npu (or a stand-in), torch.npu's graph surface, the device, and how a decode
    step is wrapped to be captured (nothing to do on a device; the stand-in records the call to replay)."""

    npu: Any
    backend: Any
    device: torch.device
    capture: Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]
    dtype: torch.dtype = torch.bfloat16


def make_env(stand_in: str | None, device_index: int) -> Env:
    if stand_in is not None:
        fakes = importlib.import_module(stand_in).first_run()
        npu_ops.torch_npu_module = lambda: fakes.npu  # what FusedOps and the int8 layers get as torch_npu
        return Env(fakes.npu, fakes.backend, torch.device("cpu"), fakes.capture)
    npu = npu_ops.torch_npu_module()
    torch.npu.set_device(device_index)
    return Env(npu, torch.npu, torch.device("npu", device_index), lambda decode: decode)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _compare(ours: torch.Tensor, ref: torch.Tensor, what: str, rel: float = 2**-6) -> str:
    """max |ours - ref| against `rel` of max |ref| (bfloat16 keeps 8 bits); AssertionError naming `what`."""
    ours, ref = ours.detach().float().cpu(), ref.detach().float().cpu()
    diff, scale = float((ours - ref).abs().max()), max(float(ref.abs().max()), 1e-6)
    if not diff <= rel * scale:
        raise AssertionError(f"{what}: max |diff| {diff:.3g} exceeds {rel:.3g} x max |ref| {scale:.3g}")
    return f"max |diff| {diff:.2g} ({diff / scale:.2%} of max |ref|)"


# ----------------------------------------------------------------------------------------------- cases
def gather_graph_replay(env: Env) -> str:
    """FIA over gathered blocks under a mask, one graph per (bucket, length); replays equal the eager step."""
    gen = torch.Generator().manual_seed(0)
    rows, width = 4, 4  # 4 rows of up to 4 blocks (512 positions), plus the null block
    k_cache, v_cache = (
        _randn(gen, 1 + rows * width, BLOCK_SIZE, KV_HEADS, HEAD_DIM).to(env.device, env.dtype) for _ in range(2)
    )
    queries = _randn(gen, 64, HEADS, HEAD_DIM).to(env.device, env.dtype)  # one per token id
    ops = FusedOps(env.npu, paged=False)

    def decode(
        tokens: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor, tables: torch.Tensor, length: int
    ) -> torch.Tensor:
        reads = ops.decode_reads(tables, cache_lens, BLOCK_SIZE, -(-length // BLOCK_SIZE))
        return ops.paged_attention(queries[tokens], k_cache, v_cache, reads, HEAD_DIM**-0.5)

    graphs = GraphDecode(env.capture(decode), [rows], [256, 512], env.device, width, backend=env.backend)
    if graphs.eager:
        raise AssertionError(f"capture failed: {graphs.eager_buckets()}")
    details = []
    for step, longest in enumerate((200, 500, 60)):
        tokens = torch.randint(0, 64, (rows,), generator=gen)
        lens = torch.randint(0, longest, (rows,), generator=gen)
        tables = (1 + torch.randperm(rows * width, generator=gen)).view(rows, width)
        args = [t.to(env.device) for t in (tokens, lens, lens, tables)]
        length = pick_length(graphs.lengths, int(lens.max()) + 1)
        replayed = graphs(*args, length).clone()
        details.append(_compare(replayed, decode(*args, length), f"replay {step} (length {length})", rel=2**-8))
    return f"{len(graphs.graphs)} graphs, 3 replays = eager; last {details[-1]}"


def _quant_layer(scheme: str, gen: torch.Generator, k: int, n: int, dtype: torch.dtype) -> nn.Module:
    """A column-parallel W8A8 layer as the loader leaves it (cpu), its forward `QuantLinear`."""
    layer = nn.Module()
    params = {"weight": torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)}
    if scheme == STATIC:
        params.update(
            input_scale=torch.tensor([1 / 24]),
            input_offset=torch.tensor([3.0]),
            deq_scale=torch.rand(n, generator=gen) * 1e-3 + 1e-4,
            quant_bias=torch.randint(-5000, 5000, (n,), generator=gen, dtype=torch.int32),
        )
    else:
        params.update(weight_scale=torch.rand(n, 1, generator=gen) * 1e-2 + 1e-3, bias=_randn(gen, n).to(dtype))
    for name, value in params.items():
        layer.register_parameter(name, nn.Parameter(value, requires_grad=False))
    layer.compute_dtype = dtype
    layer.quant = QuantLinear(scheme, row_parallel=False, rank=0)
    return layer


def _quant_linear(env: Env, scheme: str, dtype: torch.dtype) -> str:
    gen = torch.Generator().manual_seed(1)
    layer = _quant_layer(scheme, gen, 512, 384, dtype)
    x = _randn(gen, 7, 512).to(dtype)
    ref = dequantized_reference(layer, x)  # float64, on cpu
    layer.to(env.device)
    layer.quant.prepare(layer, "npu")
    ours = layer.quant.apply(layer, x.to(env.device))
    if ours.dtype != dtype:
        raise AssertionError(f"{scheme} output is {ours.dtype}, not {dtype}")
    return _compare(ours, ref, f"{scheme} {dtype} linear", rel=2**-6 if dtype == torch.bfloat16 else 2**-9)


def npu_quantize_dtypes(env: Env) -> str:
    """npu_quantize with bfloat16 activations, scales and zero points (the doc's rule for div_mode=False)."""
    gen = torch.Generator().manual_seed(2)
    x = (_randn(gen, 7, 512) * 2).to(env.dtype)
    inv_scale, offset = torch.tensor([24.0]), torch.tensor([3.0])
    scales, zero_points = npu_static_args(inv_scale, offset, x.shape[1], env.dtype)
    xq = env.npu.npu_quantize(
        x.to(env.device), scales.to(env.device), zero_points.to(env.device), torch.qint8, -1, False
    )
    off = (xq.cpu().int() - quantize_static(x, inv_scale, offset).int()).abs()
    if xq.dtype != torch.int8 or int(off.max()) > 1 or float((off > 0).float().mean()) > 0.01:
        raise AssertionError(f"npu_quantize: {xq.dtype}, {int((off > 0).sum())} of {off.numel()} values off")
    linear = _quant_linear(env, STATIC, env.dtype)
    return f"int8, {int((off > 0).sum())}/{off.numel()} values off by 1; static linear {linear}"


def w8a8_float16(env: Env) -> str:
    """A float16 model: the static scale as npu_trans_quant_param's int64, the dynamic bias as float32."""
    static, dynamic = _quant_linear(env, STATIC, torch.float16), _quant_linear(env, DYNAMIC, torch.float16)
    return f"static {static}; dynamic {dynamic}"


def _paged_fia(env: Env, mask: bool) -> str:
    gen = torch.Generator().manual_seed(3)
    kv_lens, width = [1, 130, 300], 4  # unequal, one of them a single position; up to 4 blocks a row
    num_blocks = 1 + len(kv_lens) * width
    k_cache, v_cache = (_randn(gen, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM).to(env.dtype) for _ in range(2))
    tables = (1 + torch.randperm(num_blocks - 1, generator=gen)).view(len(kv_lens), width)
    q = _randn(gen, len(kv_lens), HEADS, HEAD_DIM).to(env.dtype)
    ops = FusedOps(env.npu, masked_decode=mask)
    lens = torch.tensor(kv_lens) - 1
    reads = ops.decode_reads(tables.to(env.device), lens.to(env.device), BLOCK_SIZE, width, kv_lens)
    dev = [t.to(env.device) for t in (q, k_cache, v_cache)]
    ours = ops.paged_attention(*dev, reads, HEAD_DIM**-0.5).view(len(kv_lens), HEADS, HEAD_DIM)
    keys, values = gather_blocks(k_cache.float(), tables), gather_blocks(v_cache.float(), tables)  # (B, L, KVH, D)
    ref = torch.stack(
        [
            F.scaled_dot_product_attention(
                q[b, :, None].float(),  # (H, 1, D)
                keys[b, :n].transpose(0, 1),  # (KVH, n, D)
                values[b, :n].transpose(0, 1),
                enable_gqa=True,
            )[:, 0]
            for b, n in enumerate(kv_lens)
        ]
    )
    return f"KV lengths {kv_lens}: " + _compare(ours, ref, "paged FIA")


def paged_fia(env: Env) -> str:
    """Paged FIA decode (TND, block tables, host KV lengths, no mask) at batch 3 against SDPA."""
    return _paged_fia(env, mask=False)


def paged_fia_mask(env: Env) -> str:
    """The same with vllm-ascend's sparse_mode 3 and its 2048 x 2048 int8 mask (`decode_attention: paged_mask`)."""
    return _paged_fia(env, mask=True)


def _vision_varlen(env: Env, lengths: Sequence[int], heads: int = VISION_HEADS) -> str:
    gen = torch.Generator().manual_seed(len(lengths))
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    q, k, v = (_randn(gen, cu[-1], heads, VISION_HEAD_DIM).to(env.dtype) for _ in range(3))
    scale = VISION_HEAD_DIM**-0.5
    ours = FusedOps(env.npu).varlen_attention(*(t.to(env.device) for t in (q, k, v)), cu, cu, scale, False)
    ref = PLAIN.varlen_attention(q.float(), k.float(), v.float(), cu, cu, scale, False)  # SDPA per sequence
    calls = -(-len(lengths) // npu_ops.MAX_VARLEN_SEQUENCES)
    return f"{len(lengths)} sequences, {cu[-1]} rows, {calls} call(s): " + _compare(ours, ref, "varlen attention")


def fusion_attention_head_dim_80(env: Env) -> str:
    """Windows of 64 patches and one 1,024-patch frame, 16 heads of 80 (padded to 128), TND."""
    return _vision_varlen(env, [64, 64, 64, 48, 1024])


def fusion_attention_1025_sequences(env: Env) -> str:
    """1,025 short sequences: one more than a varlen call takes, so two calls (what counts is the count)."""
    return _vision_varlen(env, [8 if i % 7 else 16 for i in range(1025)], heads=4)


def fusion_attention_2049_sequences(env: Env) -> str:
    """2,049 short sequences (2 images of 3,584 x 3,584 pixels give 2,048 windows per block): three calls."""
    return _vision_varlen(env, [8 if i % 5 else 16 for i in range(2049)], heads=4)


CASES: dict[str, Callable[[Env], str]] = {
    "gather_graph_replay": gather_graph_replay,
    "npu_quantize_dtypes": npu_quantize_dtypes,
    "w8a8_float16": w8a8_float16,
    "paged_fia": paged_fia,
    "paged_fia_mask": paged_fia_mask,
    "fusion_attention_head_dim_80": fusion_attention_head_dim_80,
    "fusion_attention_1025_sequences": fusion_attention_1025_sequences,
    "fusion_attention_2049_sequences": fusion_attention_2049_sequences,
}


# ----------------------------------------------------------------------------------------------- runner
@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or TIMEOUT
    seconds: float
    detail: str

    def line(self) -> str:
        return f"{self.name:<32} {self.status:<7} {self.seconds:6.1f}s  {self.detail}"


def _child(name: str, stand_in: str | None, device_index: int, conn: Any) -> None:
    """One case in this process; sends (status, detail) back."""
    if stand_in is not None:
        torch.set_num_threads(1)  # forked from a process that may have used torch's thread pool
    try:
        with torch.inference_mode():
            conn.send(("PASS", CASES[name](make_env(stand_in, device_index))))
    except BaseException as e:  # any failure is this case's result; the traceback goes to stderr
        traceback.print_exc()
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        conn.send(("FAIL", f"{type(e).__name__}: {first}"))
    finally:
        conn.close()


def run_case(name: str, timeout_s: float, stand_in: str | None = None, device_index: int = 0) -> Result:
    """Run one case in a process of its own; kill it at `timeout_s`."""
    context = multiprocessing.get_context("fork" if stand_in is not None else "spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(name, stand_in, device_index, send), daemon=True)
    started = time.perf_counter()
    process.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            process.kill()
            status, detail = "TIMEOUT", f"no answer in {timeout_s:g}s (a hung op?); its process was killed"
        else:
            status, detail = receive.recv()
    except EOFError:  # the process ended without an answer (a crash in native code)
        process.join(10)
        status, detail = "FAIL", f"the process died with exit code {process.exitcode} (see stderr)"
    finally:
        receive.close()
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join()
    return Result(name, status, time.perf_counter() - started, detail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.npu_first_run", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per case (default 300)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names (default: all)")
    parser.add_argument("--device-index", type=int, default=0, help="which visible NPU (default 0)")
    parser.add_argument("--stand-in", help="module with first_run() -> stand-ins for torch_npu (tests, on cpu)")
    args = parser.parse_args(argv)
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; the cases are {', '.join(CASES)}")
    problems = [] if args.stand_in else node_problems("npu", "graph", os.environ)
    if problems:  # every case would fail the same way
        print(f"npu first run: this node fails the preflight: {' / '.join(problems)}", flush=True)
        return 1
    results = []
    for name in names:
        results.append(run_case(name, args.timeout, args.stand_in, args.device_index))
        print(results[-1].line(), flush=True)
    passed = sum(r.status == "PASS" for r in results)
    print(f"npu first run: {passed}/{len(results)} cases passed", flush=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
