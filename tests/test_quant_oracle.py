"""Static W8A8 with a non-zero activation offset, against an oracle written from msmodelslim and vllm-ascend sources.

The other W8A8 tests compare the layer with `model.quant.dequantized_reference`, which quantizes activations
with the layer's own `quantize_static`, on checkpoints from `model.quantize`, which always writes
input_offset 0. Here one layer's tensors are made as msmodelslim makes them, from a random float weight,
bias and calibration activations that are not centred on zero (so input_offset is far from 0), saved
under msmodelslim's names, loaded by `load_weights`, and the layer's output on fresh activations compared
with:

(a) the arithmetic the format defines, computed here in int64: equal up to float32 rounding on the
    backends that accumulate exactly (dequant, int_mm, int8pack's float GEMM for prefill-sized calls),
    and up to the bfloat16 rounding of the int32 accumulation on int8pack's decode kernel; at tp 1 and 2,
    column-parallel (rows gathered) and row-parallel (partial sums added, quant_bias on rank 0 only);
(b) the float layer x @ W^T + b: every output within the worst-case quantization error, and the RMS error
    within 1.5x of what independent uniform rounding errors predict (`_quantization_error`; measured: the
    worst output at 0.23 of its worst case, the RMS error 0.75% of the output's).

Where each formula was read:
- msmodelslim (Ascend/msmodelslim), `calculate_int_qparam` in msmodelslim/ir/api/impl/int_quantization.py:
  activations per tensor, asymmetric: lo = min(x_min, 0), hi = max(x_max, 0), input_scale = (hi - lo) / 255,
  input_offset = round(-lo / input_scale) - 128 (an integer); weights per output channel, symmetric:
  weight_scale = max|W_n| / 127. `int_quantize`: q = clamp(round(v / scale + offset), -128, 127).
- msmodelslim, `AscendV1Saver.on_w8a8_static` in msmodelslim/core/quant_service/modelslim_v1/save/ascendv1.py:
  deq_scale = input_scale * weight_scale, correction = (sum over k of W_q[n, k]) * input_offset,
  quant_bias = round(bias / deq_scale - correction) as int32; input_scale and input_offset float32 (1,);
  deq_scale float32, or for float16 models its float32 bits as int64 (`deqscale2int64`); the float bias
  written as well, as `P.bias` marked FLOAT.
- The arithmetic at inference: msmodelslim's format page (docs/en/feature_guide/traditional_quantization_v0/
  quantized_weight_format.md): input_quant = input / input_scale + input_offset, output_quant =
  input_quant * weight + quant_bias, output = output_quant * deq_scale. vllm-ascend's
  `AscendW8A8LinearMethod.apply` (vllm_ascend/quantization/w8a8.py) runs it as `quant_per_tensor`
  (npu_quantize with 1 / input_scale and input_offset), then npu_quant_matmul(x_q, weight, deq_scale,
  bias=quant_bias), the bias on tp rank 0 only.

W8A8_DYNAMIC has no activation offset (npu_dynamic_quant is symmetric per token; a non-zero weight_offset
is refused), so it has nothing offset-specific to check here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from model.loader import load_weights
from model.parallel import ColumnParallelLinear, ParallelContext, RowParallelLinear
from model.quant import DEQUANT_ROWS, DESCRIPTION_FILE, STATIC

IN, OUT = 64, 48
COLUMN, ROW = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
# Backend and rows per call: int8pack runs its bfloat16 kernel below DEQUANT_ROWS rows, a float GEMM from there.
CALLS = {
    "dequant": ("dequant", 5),
    "int_mm": ("int_mm", 5),
    "int8pack-decode": ("int8pack", 5),
    "int8pack-prefill": ("int8pack", DEQUANT_ROWS + 3),
}
# Relative rounding of what the kernels return: float32 for exact int32 accumulation, bfloat16 for int8pack's kernel.
FLOAT32_ROUNDING = 2.0**-21  # a few ulps of float32 (2^-24), over the products and sums of one output
BF16_ROUNDING = 2.0**-8
RMS_MARGIN = 1.5


def _msmodelslim_w8a8(
    weight: torch.Tensor, bias: torch.Tensor, calibration: torch.Tensor, int64_deq_scale: bool
) -> dict[str, torch.Tensor]:
    """One linear's W8A8 tensors as msmodelslim computes and saves them (leaf name -> tensor)."""
    lo = torch.clamp(calibration.min(), max=0.0)
    hi = torch.clamp(calibration.max(), min=0.0)
    input_scale = ((hi - lo) / 255).reshape(1)
    input_offset = (torch.round(-lo / input_scale) - 128).reshape(1)
    weight_scale = weight.abs().amax(1, keepdim=True) / 127  # (out, 1)
    weight_q = torch.clamp(torch.round(weight / weight_scale), -128, 127).to(torch.int8)
    deq_scale = input_scale * weight_scale[:, 0]  # (out,) float32
    correction = weight_q.float().sum(1) * input_offset
    quant_bias = torch.round(bias / deq_scale - correction).to(torch.int32)
    stored_deq = deq_scale.view(torch.int32).to(torch.int64) if int64_deq_scale else deq_scale
    return {
        "weight": weight_q,
        "input_scale": input_scale,
        "input_offset": input_offset,
        "deq_scale": stored_deq,
        "quant_bias": quant_bias,
        "bias": bias,
    }


def _write_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The same layer under a column-parallel and a row-parallel name, with msmodelslim's description."""
    weights = {f"{prefix}.{leaf}": t.clone() for prefix in (COLUMN, ROW) for leaf, t in tensors.items()}
    description = {"model_quant_type": STATIC, "version": "1.0.0"}
    description.update({k: "FLOAT" if k.endswith(".bias") else STATIC for k in weights})
    save_file(weights, str(path / "model.safetensors"))
    (path / DESCRIPTION_FILE).write_text(json.dumps(description))


def _load(path: Path, ctx: ParallelContext) -> nn.Module:
    """A model of one column-parallel (with bias) and one row-parallel linear, loaded from `path` for `ctx`'s rank."""
    attn, mlp, block, decoder, root = nn.Module(), nn.Module(), nn.Module(), nn.Module(), nn.Module()
    attn.q_proj = ColumnParallelLinear(IN, OUT, True, ctx)
    mlp.down_proj = RowParallelLinear(IN, OUT, True, ctx)
    block.self_attn, block.mlp = attn, mlp
    decoder.layers = nn.ModuleList([block])
    root.model = decoder
    load_weights(root, path)
    return root.eval().requires_grad_(False)


def _stored_deq_scale(stored: torch.Tensor) -> torch.Tensor:
    """deq_scale as float64 from either stored form (int64 holding the float32 bits, or float32)."""
    if stored.dtype == torch.int64:
        return stored.to(torch.int32).view(torch.float32).double()
    return stored.double()


def _oracle(t: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, the size of what a kernel rounds) by the format's arithmetic: integers in int64, float64 only to scale.

    A kernel rounds x_q @ W_q^T (as float32, or bfloat16 on int8pack's kernel) and quant_bias * deq_scale;
    the size is |quant_bias| plus |x_q @ W_q^T| over each half of the input (the row-parallel shards at tp 2,
    and at tp 1 no less than the whole sum), times deq_scale.
    """
    scale, offset = t["input_scale"].double(), t["input_offset"].double()
    x_q = torch.clamp(torch.round(x.double() / scale + offset), -128, 127).long()
    w_q = t["weight"].long()
    deq = _stored_deq_scale(t["deq_scale"])
    y = (x_q @ w_q.t() + t["quant_bias"].long()).double() * deq  # (T, out)
    half = IN // 2
    size = (x_q[:, :half] @ w_q[:, :half].t()).abs() + (x_q[:, half:] @ w_q[:, half:].t()).abs()
    return y, (size + t["quant_bias"].long().abs()).double() * deq


def _away_from_ties(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Move each activation whose x / input_scale + input_offset lies within 0.01 of a rounding tie by 0.02 steps.

    Computing x * (1 / input_scale) (vllm-ascend, the layer) or x / input_scale (msmodelslim), fused or not, in
    float32 or float64 then rounds every element the same way: those differ by under 1e-4 here, not 0.01.
    """
    frac = torch.frac((x.double() / scale.double() + offset.double()).abs())
    near = (frac - 0.5).abs() < 0.01
    return torch.where(near, x + 0.02 * scale, x)


def _quantization_error(
    t: dict[str, torch.Tensor], weight_scale: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """|quantized layer - float layer| for activations inside the calibrated range: (worst case per output, RMS).

    x_dq = (x_q - offset) * s errs from x by e_x, |e_x| <= s / 2 (no clamping inside the range), W_dq = W_q * w_s
    from W by e_w, |e_w| <= w_s / 2; as the offset and so the correction are integers,
    (quant_bias + correction) * deq_scale = round(bias / deq_scale) * deq_scale errs from the bias by e_b,
    |e_b| <= deq_scale / 2. Since (x_q @ W_q^T + quant_bias) * deq_scale = x_dq @ W_dq^T + (quant_bias +
    correction) * deq_scale, y_q - y = sum_k (e_x[k] W_dq[n, k] + x[k] e_w[n, k]) + e_b[n], so
    |y_q - y| <= s / 2 * sum_k |W_dq[n, k]| + w_s[n] / 2 * sum_k |x[k]| + deq_scale[n] / 2. Taking the rounding
    errors as independent and uniform (variance step^2 / 12) gives the RMS:
    sqrt(mean(s^2 / 12 * sum_k W_dq[n, k]^2 + w_s[n]^2 / 12 * sum_k x[k]^2 + deq_scale[n]^2 / 12)).
    """
    s, w_s = t["input_scale"].double(), weight_scale.double()[:, 0]
    w_dq = t["weight"].double() * w_s[:, None]
    deq = _stored_deq_scale(t["deq_scale"])
    x = x.double()
    worst = s / 2 * w_dq.abs().sum(1) + w_s / 2 * x.abs().sum(1, keepdim=True) + deq / 2
    variance = s**2 / 12 * (w_dq**2).sum(1) + w_s**2 / 12 * (x**2).sum(1, keepdim=True) + deq**2 / 12
    return worst, variance.mean().sqrt()


def _layer_output(path: Path, tp: int, name: str, backend: str, x: torch.Tensor) -> torch.Tensor:
    """The full output of layer `name` at tensor parallelism `tp`: column rows gathered, row partial sums added."""
    parts = []
    for rank in range(tp):
        root = _load(path, ParallelContext(rank, tp))
        layer = root.get_submodule(name)
        layer.quant.prepare(layer, backend)
        if name == ROW:
            shard = x[:, rank * layer.in_per_rank : (rank + 1) * layer.in_per_rank]
            parts.append(layer.quant.apply(layer, shard).double())
        else:
            parts.append(layer(x).double() if tp == 1 else layer.quant.apply(layer, x).double())
    return torch.cat(parts, dim=-1) if name == COLUMN else sum(parts)


@pytest.mark.parametrize("deq_form", ["float32", "int64"])
@pytest.mark.parametrize("call", list(CALLS))
def test_static_w8a8_with_an_offset_matches_the_format_and_the_float_layer(
    tmp_path: Path, call: str, deq_form: str
) -> None:
    backend, rows = CALLS[call]
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(OUT, IN, generator=gen) / IN**0.5
    bias = torch.randn(OUT, generator=gen) * 0.5
    # Skewed activations (as after SiLU or a residual with a mean): the asymmetric range gives a large offset.
    calibration = torch.randn(512, IN, generator=gen) * 0.8 + 1.2
    t = _msmodelslim_w8a8(weight, bias, calibration, int64_deq_scale=deq_form == "int64")
    offset = float(t["input_offset"])
    assert offset == round(offset) and offset <= -30, "the calibration must give a large integer offset"
    assert not torch.equal(t["quant_bias"], torch.round(bias / _stored_deq_scale(t["deq_scale"]).float()).int())
    _write_checkpoint(tmp_path, t)

    # Fresh activations inside the calibrated range for (b); for (a) also rows 4x wider, clamped at both ends.
    fresh = torch.randn(rows, IN, generator=gen) * 0.8 + 1.2
    fresh = torch.clamp(fresh, float(calibration.min()), float(calibration.max()))
    wide = (torch.randn(3, IN, generator=gen) * 0.8 + 1.2) * 4
    x = _away_from_ties(torch.cat([fresh, wide]), t["input_scale"], t["input_offset"])
    oracle, size = _oracle(t, x)
    x_q = torch.round(x.double() / t["input_scale"].double() + offset)
    assert bool((x_q[rows:] > 127).any()) and bool((x_q[rows:] < -128).any()), "the wide rows must clamp"

    rounding = FLOAT32_ROUNDING * size
    if call == "int8pack-decode":  # the int32 accumulation comes back rounded to bfloat16
        rounding = rounding + BF16_ROUNDING * size
    worst, rms = _quantization_error(t, weight.abs().amax(1, keepdim=True) / 127, x[:rows])
    float_layer = x[:rows].double() @ weight.double().t() + bias.double()
    for tp in (1, 2):
        for name in (COLUMN, ROW):
            ours = _layer_output(tmp_path, tp, name, backend, x)
            err = (ours - oracle).abs()
            assert bool((err <= rounding).all()), (
                f"{name} tp={tp}: off the format's arithmetic by up to {float((err / rounding).max()):.3g}x "
                "the rounding allowance"
            )
            qerr = ours[:rows] - float_layer
            assert bool((qerr.abs() <= worst + rounding[:rows]).all()), (
                f"{name} tp={tp}: off the float layer by up to {float((qerr.abs() / worst).max()):.3g}x the worst case"
            )
            # Measured 0.95-1.0 of the predicted RMS (0.75% of the output's) on every backend and tp.
            assert float(qerr.pow(2).mean().sqrt()) <= RMS_MARGIN * float(rms), f"{name} tp={tp}"
