"""Eight-bit linear layers for msmodelslim W8A8 checkpoints: the scheme table, the loaders, the kernels.

Checkpoint format (msmodelslim, as vllm-ascend reads it): `quant_model_description.json` maps every
tensor name to its scheme ("W8A8", "W8A8_DYNAMIC" or "FLOAT"), plus "model_quant_type". For each
quantized linear `P` the safetensors hold, besides the int8 `P.weight` (out, in):

- W8A8 (static): `P.input_scale`, `P.input_offset` (1,) float (one activation scale per tensor),
  `P.deq_scale` (out,) float32 (int64 holding the float32 bits, in float16 checkpoints),
  `P.quant_bias` (out,) int32, and optionally `P.weight_scale`, `P.weight_offset` (out, 1) and the
  float `P.bias` (already folded into quant_bias, so not used). The arithmetic:
  x_q = clamp(round(x / input_scale + input_offset)), y = (x_q @ W^T + quant_bias) * deq_scale.
- W8A8_DYNAMIC: `P.weight_scale`, `P.weight_offset` (out, 1) float and the float `P.bias` if the
  layer has one; activations are quantized per token when they arrive:
  s = max|x_row| / 127, x_q = round(x / s), y = (x_q @ W^T) * weight_scale * s + bias.

Only the text decoder's projections are quantized; the vision tower, the embedding and the LM head
stay float. Scales and offsets are sliced with their weight at load: per output channel like the
rows of a column-parallel weight, whole for a row-parallel one (whose quant_bias is added on rank 0
only, before the all-reduce); a per-tensor scale that several parts of a fused projection (q/k/v,
gate/up) carry must be the same in every part.

Kernels, per backend (`select_backend`; `use_backend` switches, e.g. to compare them):
- npu: `torch_npu.npu_quantize` / `npu_dynamic_quant` and `npu_quant_matmul`, as vllm-ascend calls
  them (weight passed as (in, out), stored column-major so that view is contiguous), with the dtypes
  op-plugin's API docs require (`npu_static_args`): npu_quantize's scales and zero points in the
  activations' dtype (div_mode=False); for float16 output the static dequant scale made by
  `npu_trans_quant_param` (int64) and the dynamic path's float bias as float32.
- cuda: `torch._int_mm` (int8 x int8 -> int32; rows padded to 32, as cuBLASLt needs more than 16).
- cpu: `torch.ops.aten._weight_int8pack_mm`, the int8 weight kernel torch uses for CPU decode, fed
  the int8 activations as bfloat16 (integers up to 127 are exact there): it reads the int8 weight and
  returns the int32 accumulation rounded to bfloat16 (relative error below 2^-8), scaled in float32.
  Chosen by measurement (cluster/tools/bench_quant.py, 0.5B decode shapes, 8 layers of distinct
  weights, 2-core AVX2 CPU without VNNI, ms per layer): batch 1 fp32 5.0, `_int_mm` 7.7,
  int8pack on float32 activations 12.9, int8pack on bfloat16 activations 2.2; batch 8: 17.7, 83,
  68, 5.4. `_int_mm` has no fast int8 path on this CPU; the bfloat16 int8pack path is the only one
  faster than float. From about 48 rows on (prefill) it is slower than float (128 rows of the 0.5B
  down projection, 4864 -> 896: float 9.4 ms, int8pack 14.8), so calls of `DEQUANT_ROWS` rows or more
  (eager only, never inside a compiled decode step) run `_converted_mm`: float GEMMs over the weight
  converted to float32 in a reused scratch buffer, a cache-sized block of channels at a time for wide
  weights (128 x 896 -> 9728 on a quiet machine: float 41.6 ms, whole conversion 45.7, 2 MB blocks
  37.5), whole for the others (128 x 4864 -> 896: float 13.1, whole 15.7, 2 MB blocks 20.3).
- dequant: the float arithmetic of the same quantized values (weights dequantized at each call): the
  fallback where a kernel is missing or the sizes do not suit it (int8pack needs in_features % 8 == 0,
  `_int_mm` both sizes), announced by one log line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import model.npu_ops as npu_ops
from model.names import normalize_name
from model.parallel import ColumnParallelLinear, RowParallelLinear, TensorSource, default_weight_loader, set_loader

logger = logging.getLogger(__name__)

DESCRIPTION_FILE = "quant_model_description.json"
FLOAT = "FLOAT"
STATIC = "W8A8"
DYNAMIC = "W8A8_DYNAMIC"
SCHEMES = (STATIC, DYNAMIC)
QUANTIZATION_MODES = ("auto", "none")
BACKENDS = ("npu", "int_mm", "int8pack", "dequant")
# The cpu int8pack kernel's rows at which a float GEMM on blockwise-converted weights gets faster (prefill).
DEQUANT_ROWS = 48
_scratch: dict[tuple[torch.device, bool], torch.Tensor] = {}
# `_converted_mm` blocking: weights up to this size (float32 bytes) or of longer rows are converted whole.
_WHOLE_BYTES = 8 << 20
_BLOCK_MAX_K = 2048
_BLOCK_BYTES = 2 << 20  # one block of converted rows: stays in cache while it is multiplied
# Description entries that are metadata, not tensor names.
_META_KEYS = ("model_quant_type", "version", "kv_cache_type", "fa_quant_type", "group_size", "optional")
# Tensors of a quantized linear beside its weight: name -> (per "channel" (out,), (out, 1) or "tensor" (1,), dtype).
SCHEME_PARAMS: dict[str, dict[str, tuple[str, torch.dtype]]] = {
    STATIC: {
        "input_scale": ("tensor", torch.float32),
        "input_offset": ("tensor", torch.float32),
        "deq_scale": ("channel", torch.float32),
        "quant_bias": ("channel", torch.int32),
        "weight_scale": ("column", torch.float32),
        "weight_offset": ("column", torch.float32),
    },
    DYNAMIC: {
        "weight_scale": ("column", torch.float32),
        "weight_offset": ("column", torch.float32),
    },
}
# Tensors a static W8A8 checkpoint may or may not carry (vllm-ascend declares them; msmodelslim's
# format page lists five tensors per layer without them).
_OPTIONAL = {STATIC: ("weight_scale", "weight_offset")}


class QuantizationError(ValueError):
    """A quantized checkpoint or its description that this engine cannot use; the message names the tensor."""


def read_description(model_path: str | Path) -> dict[str, str] | None:
    """The checkpoint's quant_model_description.json, or None for a float checkpoint."""
    path = Path(model_path) / DESCRIPTION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QuantizationError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise QuantizationError(f"{path} must hold an object of tensor name -> scheme")
    return data


def check_mode(quantization: str, model_path: str | Path) -> dict[str, str] | None:
    """The description to apply under `quantization` ("auto" | "none"); refuses a quantized checkpoint under "none"."""
    if quantization not in QUANTIZATION_MODES:
        raise QuantizationError(f"quantization={quantization!r} must be one of {', '.join(QUANTIZATION_MODES)}")
    description = read_description(model_path)
    if description is not None and quantization == "none":
        raise QuantizationError(
            f"quantization='none' but {model_path} is a quantized checkpoint ({DESCRIPTION_FILE}, "
            f"model_quant_type={description.get('model_quant_type')!r}); set quantization=auto or use a float one"
        )
    return description


# ----------------------------------------------------------------------------------------------- kernels
def _rounded_static(x: torch.Tensor, inv_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """round(x * (1 / input_scale) + input_offset), clamped to int8's range, still in float32."""
    return torch.addcmul(offset, x.float(), inv_scale).round_().clamp_(-128, 127)


def _rounded_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """round(x / s) per row with s = max|row| / 127, still in float32, and s (T,)."""
    scale = x.float().abs().amax(-1).clamp_min(1e-12) / 127.0
    return (x.float() / scale[:, None]).round_().clamp_(-128, 127), scale


def quantize_static(x: torch.Tensor, inv_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Per-tensor activation quantization: round(x * (1 / input_scale) + input_offset) as int8 (npu_quantize)."""
    return _rounded_static(x, inv_scale, offset).to(torch.int8)


def quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization (npu_dynamic_quant): x (T, K) -> int8 (T, K), scale (T,) float32."""
    rounded, scale = _rounded_dynamic(x)
    return rounded.to(torch.int8), scale


def _int_mm_padded(xq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x_q (T, K) int8 @ weight (N, K)^T int8 -> int32 (T, N); rows padded to 32, as cuBLASLt wants > 16."""
    rows = xq.shape[0]
    padded = max(32, -(-rows // 8) * 8)
    if padded != rows:
        xq = torch.cat([xq, xq.new_zeros(padded - rows, xq.shape[1])])
    return torch._int_mm(xq, weight.t())[:rows]


def _converted_mm(xq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x_q (T, K) float (integer values) @ weight (N, K)^T int8 -> (T, N) float32, by float GEMMs.

    The weight is converted to float32 into one scratch buffer that every layer and call reuses (no fresh
    allocation, so no page faults). A wide, short weight (K <= `_BLOCK_MAX_K`, more than `_WHOLE_BYTES` as
    float) is converted `_BLOCK_BYTES` of output channels at a time, each block multiplied while it is still
    in cache: the GEMM then reads int8 from memory, not float32, and beats the float layer. Any other weight
    is converted whole for one GEMM (narrow blocks of a long K make slow GEMMs).
    """
    n, k = weight.shape
    rows = n if k > _BLOCK_MAX_K or n * k * 4 <= _WHOLE_BYTES else max(16, _BLOCK_BYTES // (4 * k))
    # One buffer per device and per inference-mode state: a buffer made under inference_mode (the engine's
    # forward) cannot be written outside it, as a layer called directly would.
    key = (weight.device, torch.is_inference_mode_enabled())
    buffer = _scratch.get(key)
    if buffer is None or buffer.numel() < rows * k:
        buffer = _scratch[key] = torch.empty(rows * k, device=weight.device)
    out = torch.empty(xq.shape[0], n, device=xq.device)
    for start in range(0, n, rows):
        end = min(n, start + rows)
        block = buffer[: (end - start) * k].view(end - start, k)
        block.copy_(weight[start:end])
        torch.mm(xq, block.t(), out=out[:, start:end])
    return out


@dataclass
class QuantLinear:
    """The quantized forward of one parallel linear layer (its `quant`), for one scheme and one backend.

    `apply(layer, x)` returns what the float layer's matmul returned: the full column-parallel output
    (bias included), or a row-parallel rank's partial sum before the all-reduce.
    """

    scheme: str
    row_parallel: bool
    rank: int
    backend: str = "dequant"
    derived: dict[str, torch.Tensor] = field(default_factory=dict)
    npu: Any = None

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        y = self._npu(layer, x2) if self.backend == "npu" else self._torch(layer, x2)
        return y.reshape(*lead, y.shape[-1])

    # Adds the float bias only on column-parallel layers: RowParallelLinear adds it after its all-reduce.
    def _float_bias(self, layer: nn.Module) -> torch.Tensor | None:
        return None if self.row_parallel or self.scheme == STATIC else layer.bias

    def _quant_bias(self, layer: nn.Module) -> torch.Tensor | None:
        return layer.quant_bias if not self.row_parallel or self.rank == 0 else None

    def _torch(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Few passes over the activations: quantized values stay float until the kernel's own dtype, and
        # the output is scaled and biased in one addcmul.
        d = self.derived
        if self.scheme == STATIC:
            xq, scale = _rounded_static(x, d["inv_scale"], d["offset"]), d["out_scale"]
        else:
            xq, token_scale = _rounded_dynamic(x)
            scale = d["out_scale"] * token_scale[:, None]  # (T, out)
        if self.backend == "dequant":
            acc = xq @ layer.weight.float().t()  # integers below 2^24: exact in float32
        elif self.backend == "int8pack" and x.shape[0] >= DEQUANT_ROWS and not torch.compiler.is_compiling():
            acc = _converted_mm(xq, layer.weight)
        elif self.backend == "int8pack":
            acc = torch.ops.aten._weight_int8pack_mm(xq.to(torch.bfloat16), layer.weight, d["ones"])
        else:
            acc = _int_mm_padded(xq.to(torch.int8), layer.weight)
        bias = d.get("out_bias")
        y = torch.addcmul(bias, acc, scale) if bias is not None else acc * scale
        return y.to(x.dtype)

    def _npu(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        npu, d = self.npu, self.derived
        weight = layer.weight.t()  # (in, out), contiguous: the layout npu_quant_matmul takes
        if self.scheme == STATIC:
            xq = npu.npu_quantize(x, d["inv_scale_vec"], d["offset_vec"], torch.qint8, -1, False)
            return npu.npu_quant_matmul(xq, weight, d["deq_scale"], bias=self._quant_bias(layer), output_dtype=x.dtype)
        xq, token_scale = npu.npu_dynamic_quant(x)
        return npu.npu_quant_matmul(
            xq,
            weight,
            layer.weight_scale[:, 0],
            pertoken_scale=token_scale,
            bias=d.get("npu_bias"),
            output_dtype=x.dtype,
        )

    def prepare(self, layer: nn.Module, backend: str) -> None:
        """Derive what `backend` needs from the loaded tensors (idempotent; the loaded tensors stay)."""
        self.backend = backend
        weight = layer.weight
        derived: dict[str, torch.Tensor] = {}
        if self.scheme == STATIC:
            derived["inv_scale"] = 1.0 / layer.input_scale
            derived["offset"] = layer.input_offset.clone()
            derived["out_scale"] = layer.deq_scale
            qbias = self._quant_bias(layer)
            if qbias is not None:  # (acc + quant_bias) * deq_scale = acc * deq_scale + quant_bias * deq_scale
                derived["out_bias"] = (qbias.double() * layer.deq_scale.double()).float()
        else:
            derived["out_scale"] = layer.weight_scale[:, 0].float()
            if self._float_bias(layer) is not None:
                derived["out_bias"] = self._float_bias(layer).float()
        if backend != "npu" and not weight.is_contiguous():  # back from the npu layout
            weight.data = weight.data.contiguous()
        if backend == "int8pack":
            derived["ones"] = torch.ones(weight.shape[0], dtype=torch.bfloat16, device=weight.device)
        if backend == "npu":
            self.npu = npu_ops.torch_npu_module()
            if not weight.t().is_contiguous():  # store column-major: weight.t() is then (in, out) contiguous
                weight.data = weight.data.t().contiguous().t()
            if self.scheme == STATIC:
                derived["inv_scale_vec"], derived["offset_vec"] = npu_static_args(
                    derived["inv_scale"], derived["offset"], weight.shape[1], layer.compute_dtype
                )
                derived["deq_scale"] = npu_deq_scale(self.npu, layer.deq_scale, layer.compute_dtype)
            elif self._float_bias(layer) is not None:
                derived["npu_bias"] = npu_float_bias(self._float_bias(layer), layer.compute_dtype)
        self.derived = derived


def npu_static_args(
    inv_scale: torch.Tensor, offset: torch.Tensor, in_features: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_quantize's (scales, zero_points) for per-tensor static quantization of `dtype` activations.

    op-plugin's npu_quantize doc, div_mode=False: the scales (one per input channel here, axis -1) in the
    input's dtype, the zero points in the scales' shape and dtype. vllm-ascend keeps `input_scale` in the
    model's dtype and casts the offset to it (`AscendW8A8LinearMethod.process_weights_after_loading`).
    """
    return (
        inv_scale.to(dtype).expand(in_features).contiguous(),
        offset.to(dtype).expand(in_features).contiguous(),
    )


def npu_deq_scale(npu: Any, deq_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """npu_quant_matmul's static dequant scale (no per-token scale): float32 for bfloat16 output; for float16
    output the int64 that `npu_trans_quant_param` makes of it, as the npu_quant_matmul doc requires of int64
    scales (its float32 bits cut to 19, bit 46 set)."""
    if out_dtype != torch.float16:
        return deq_scale.float()
    return npu.npu_trans_quant_param(deq_scale.float().contiguous())


def npu_float_bias(bias: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The dynamic path's float bias for npu_quant_matmul with a per-token scale: its doc's table takes
    int32, bfloat16 or float32 there, so a float16 bias (float16 models) goes as float32."""
    return bias.float() if out_dtype == torch.float16 else bias


def dequantized_reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Float64 reference of a quantized layer: dequantized weights times quantized-then-dequantized activations.

    Static: x_dq = (x_q - offset) * input_scale, W_dq = W * deq_scale / input_scale, plus
    (offset * sum_k W + quant_bias) * deq_scale, which is the float bias once summed over ranks.
    Dynamic: x_dq = x_q * s, W_dq = W * weight_scale, plus the float bias. Row-parallel: this rank's
    partial sum (quant_bias on rank 0), as `QuantLinear.apply` returns it.
    """
    quant: QuantLinear = layer.quant
    w = layer.weight.double()
    if quant.scheme == STATIC:
        scale, offset = layer.input_scale.double(), layer.input_offset.double()
        xq = quantize_static(x, 1.0 / layer.input_scale, layer.input_offset)
        x_dq = (xq.double() - offset) * scale
        w_dq = w * (layer.deq_scale.double() / scale)[:, None]
        # The offset's share of x_q @ W^T, which quant_bias (added once, on rank 0) cancels in the sum over ranks.
        y = x_dq @ w_dq.t() + offset * w.sum(1) * layer.deq_scale.double()
        qbias = quant._quant_bias(layer)
        return y + qbias.double() * layer.deq_scale.double() if qbias is not None else y
    xq, token_scale = quantize_dynamic(x)
    y = (xq.double() * token_scale.double()[:, None]) @ (w * layer.weight_scale.double()).t()
    bias = quant._float_bias(layer)
    return y + bias.double() if bias is not None else y


def select_backend(device: torch.device, in_features: int, out_features: int) -> str:
    """The kernel a layer of these sizes runs on `device` ("dequant" where none fits or none is available)."""
    if device.type == "npu":
        return "npu"
    if device.type == "cuda":
        ok = hasattr(torch, "_int_mm") and in_features % 8 == 0 and out_features % 8 == 0
        return "int_mm" if ok else "dequant"
    ok = hasattr(torch.ops.aten, "_weight_int8pack_mm") and in_features % 8 == 0
    return "int8pack" if ok else "dequant"


# ----------------------------------------------------------------------------------------------- loading
class _Checked:
    """A tensor source whose reads go through `convert` (a dtype check or conversion), naming `what` on error."""

    def __init__(self, source: TensorSource, convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.source, self.convert = source, convert

    def get_shape(self) -> list[int]:
        return self.source.get_shape()

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.convert(self.source[index])


def _int8(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.int8:
        raise ValueError(f"a quantized weight must be int8, the checkpoint holds {t.dtype}")
    return t


def _int32(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.int32:
        raise ValueError(f"quant_bias must be int32, the checkpoint holds {t.dtype}")
    return t


def _deq_scale(t: torch.Tensor) -> torch.Tensor:
    """float32, or int64 whose low 32 bits are a float32 (msmodelslim's form for float16 models)."""
    if t.dtype == torch.int64:
        return (t & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    if not t.dtype.is_floating_point:
        raise ValueError(f"deq_scale must be float32 or int64, the checkpoint holds {t.dtype}")
    return t.float()


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.float()  # input_offset: stored as float (msmodelslim) or int8 (vllm-ascend's declaration)


_CONVERT = {"deq_scale": _deq_scale, "quant_bias": _int32, "input_offset": _as_float}


def _per_tensor_loader(name: str) -> Callable[..., None]:
    """A (1,) parameter every part of a fused projection carries: the first part sets it, the others must agree."""
    seen: set[int] = set()

    def load(param: nn.Parameter, source: TensorSource, shard_id: Any = None) -> None:
        value = source[:]
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one value per tensor, the checkpoint holds shape {tuple(value.shape)}")
        value = _CONVERT.get(name, lambda t: t)(value.reshape(1))
        if id(param) in seen and not torch.equal(param.data, value.to(param.dtype)):
            raise ValueError(
                f"{name} {value.item()} differs from {param.data.item()} given by another part of this fused "
                "projection (they share one activation quantization)"
            )
        seen.add(id(param))
        param.data.copy_(value)

    return load


def _channel_loader(layer: nn.Module, name: str, row_loader: Callable[..., None]) -> Callable[..., None]:
    """Slice a per-output-channel tensor like the layer's output rows (whole on a row-parallel layer)."""
    rows = row_loader if isinstance(layer, ColumnParallelLinear) else default_weight_loader
    convert = _CONVERT.get(name)
    if convert is None:
        return rows
    return lambda param, source, shard_id=None: rows(param, _Checked(source, convert), shard_id)


@dataclass
class QuantPlan:
    """What the loader needs of a quantized checkpoint: the tensors it may skip or miss, and the last step."""

    layers: dict[str, nn.Module]
    ignored: set[str]  # parameter names the checkpoint may carry and the model does not keep
    optional: set[str]  # parameters the checkpoint may omit

    def finalize(self) -> None:
        """After loading: check the values, then prepare each layer's kernel for its device."""
        fallback = []
        for name, layer in self.layers.items():
            if bool((layer.weight_offset != 0).any()):  # zeros where an optional offset was left out
                raise QuantizationError(
                    f"{name}.weight_offset is not all zero: asymmetric int8 weights are not supported"
                )
            backend = select_backend(layer.weight.device, layer.weight.shape[1], layer.weight.shape[0])
            if backend == "dequant":
                fallback.append(name)
            layer.quant.prepare(layer, backend)
        if fallback:
            logger.warning(
                "no int8 kernel for %d quantized layer(s) on %s (e.g. %s): running dequantized float math",
                len(fallback),
                next(iter(self.layers.values())).weight.device.type,
                fallback[0],
            )


def use_backend(model: nn.Module, backend: str) -> None:
    """Run every quantized layer of `model` on `backend` (one of BACKENDS), e.g. to compare kernels."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {', '.join(BACKENDS)}")
    for _, layer in quantized_layers(model):
        layer.quant.prepare(layer, backend)


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every linear layer of `model` that runs quantized."""
    for name, module in model.named_modules():
        if getattr(module, "quant", None) is not None:
            yield name, module


def _scheme_of(name: str, parts: list[str], description: dict[str, str]) -> str:
    """The scheme of linear `name` (our module name) from the description entries of its checkpoint parts."""
    prefix, _, leaf = name.rpartition(".")
    keys = [f"{prefix}.{part}.weight" for part in parts] if parts else [f"{name}.weight"]
    missing = [k for k in keys if k not in description]
    if missing:
        raise QuantizationError(f"{DESCRIPTION_FILE} has no entry for {missing[0]}")
    schemes = {description[k] for k in keys}
    if len(schemes) > 1:
        found = ", ".join(f"{k}={description[k]}" for k in keys)
        raise QuantizationError(f"the parts of fused {name} must share one scheme, the description gives {found}")
    scheme = schemes.pop()
    if scheme != FLOAT and scheme not in SCHEMES:
        raise QuantizationError(
            f"{keys[0]}: scheme {scheme!r} is not supported (supported: {', '.join(SCHEMES)}, {FLOAT})"
        )
    return scheme


def _quantize_layer(layer: nn.Module, scheme: str, name: str, plan: QuantPlan) -> None:
    """Swap a float parallel linear's parameters for the scheme's int8 weight and scales, loaders included."""
    row_parallel = isinstance(layer, RowParallelLinear)
    weight_loader = layer.weight.weight_loader
    out_features = layer.weight.shape[0]
    device = layer.weight.device
    layer.compute_dtype = layer.weight.dtype  # the compute dtype (npu_quant_matmul's output)
    int8 = torch.empty(layer.weight.shape, dtype=torch.int8, device=device)
    layer.weight = set_loader(
        nn.Parameter(int8, requires_grad=False),
        lambda param, source, shard_id=None: weight_loader(param, _Checked(source, _int8), shard_id),
    )
    for pname, (kind, dtype) in SCHEME_PARAMS[scheme].items():
        shape = {"tensor": (1,), "channel": (out_features,), "column": (out_features, 1)}[kind]
        loader = _per_tensor_loader(pname) if kind == "tensor" else _channel_loader(layer, pname, weight_loader)
        param = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)
        layer.register_parameter(pname, set_loader(param, loader))
    for pname in _OPTIONAL.get(scheme, ()):
        plan.optional.add(f"{name}.{pname}")
    if scheme == STATIC and layer.bias is not None:  # folded into quant_bias: read past, not kept
        plan.ignored.add(f"{name}.bias")
        layer.bias = None
    layer.quant = QuantLinear(scheme, row_parallel, layer.ctx.rank)


def prepare_model(model: nn.Module, description: dict[str, str]) -> QuantPlan:
    """Turn the text decoder's linears that `description` quantizes into int8 layers, before loading.

    Fails, naming the entry, on a scheme this engine does not run, on fused parts with different
    schemes, and on a quantized entry for a module that stays float here (vision tower, embedding,
    LM head).
    """
    entries = {normalize_name(k): v for k, v in description.items() if k not in _META_KEYS}
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules", {})
    parts_of: dict[str, list[str]] = {}
    for part, (fused, _) in packed.items():
        parts_of.setdefault(fused, []).append(part)
    plan = QuantPlan(layers={}, ignored=set(), optional=set())
    covered: set[str] = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or not name.startswith("model.layers."):
            continue
        parts = parts_of.get(name.rpartition(".")[2], [])
        prefix = name.rpartition(".")[0]
        covered.update(f"{prefix}.{p}." for p in parts)
        covered.add(name + ".")
        scheme = _scheme_of(name, parts, entries)
        if scheme == FLOAT:
            continue
        _quantize_layer(module, scheme, name, plan)
        plan.layers[name] = module
    stray = sorted(k for k, v in entries.items() if v != FLOAT and not any(k.startswith(c) for c in covered))
    if stray:
        raise QuantizationError(
            f"{DESCRIPTION_FILE} marks {stray[0]} as {entries[stray[0]]}, but only the text decoder's "
            "projections run quantized here (vision tower, embeddings and LM head stay float)"
        )
    return plan
