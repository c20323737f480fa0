"""Write an msmodelslim-format W8A8 checkpoint from a float one, offline.

    python -m model.quantize SRC DST --scheme w8a8|w8a8_dynamic

Every projection of the text decoder (q/k/v/o, gate/up/down) gets per-channel symmetric int8
weights: weight_scale = max|W_row| / 127, weight = round(W / weight_scale), weight_offset = 0. With
`w8a8` (static) each projection also gets one activation scale, calibrated by prefilling the prompts
below through the float model: input_scale = max|x| / 127 over those tokens, input_offset = 0,
deq_scale = input_scale * weight_scale, quant_bias = round(bias / deq_scale). `w8a8_dynamic` keeps the
float bias and quantizes activations per token at run time. The vision tower, embeddings, norms and
LM head are copied as they are and marked FLOAT in quant_model_description.json. The other files of
SRC (config, tokenizer, processor) are copied; the safetensors keep SRC's file names and shards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.loader import checkpoint_files
from model.names import normalize_name
from model.parallel import ColumnParallelLinear, RowParallelLinear
from model.processor import PromptBuilder
from model.quant import DESCRIPTION_FILE, DYNAMIC, FLOAT, STATIC
from model.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from model.runner import ModelRunner

SCHEME_NAMES = {"w8a8": STATIC, "w8a8_dynamic": DYNAMIC}
# Prompts whose activations set the static scales: short, varied text (the tool's own calibration set).
CALIBRATION_PROMPTS = (
    "Describe the weather today and tomorrow, then summarize the report in three sentences.",
    "What is in this photo? Describe it in detail, including colors, objects and people.",
    "Write a short Python function that returns the n-th Fibonacci number, and explain it.",
    "Translate into French: the train leaves at nine and arrives in Lyon before noon.",
    "List three causes of the French Revolution and one consequence of each.",
    "1, 2, 3, 5, 8, 13: continue the sequence and name it. Then compute 17 * 23.",
)
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def calibrate(model_path: Path, prompts: tuple[str, ...] = CALIBRATION_PROMPTS) -> dict[str, float]:
    """max |input| of each text-decoder linear (our module names) over the prefill of `prompts`, float32 cpu."""
    runner = ModelRunner(model_path, max_batch_size=1, max_seq_len=1024)
    builder = PromptBuilder.from_pretrained(model_path)
    absmax: dict[str, float] = {}

    def hook(name: str):
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            absmax[name] = max(absmax.get(name, 0.0), float(args[0].abs().max()))

        return record

    handles = [
        module.register_forward_pre_hook(hook(name))
        for name, module in runner.model.named_modules()
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and name.startswith("model.layers.")
    ]
    for i, prompt in enumerate(prompts):
        runner.prefill(builder.build({"id": f"calibration-{i}", "prompt": prompt}), None, slot=0)
    for h in handles:
        h.remove()
    return absmax


def _module_of(name: str) -> tuple[str, str] | None:
    """Checkpoint weight name -> (our module name, projection) for a text-decoder projection, else None."""
    norm = normalize_name(name)
    parts = norm.split(".")
    if not norm.startswith("model.layers.") or len(parts) != 6 or parts[4] not in _PROJECTIONS:
        return None
    fused = Qwen2_5_VLForConditionalGeneration.packed_modules.get(parts[4], (parts[4], None))[0]
    return ".".join([*parts[:4], fused]), parts[4]


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (int8 weight (out, in), scale (out, 1) float32)."""
    w = weight.float()
    scale = (w.abs().amax(1, keepdim=True) / 127.0).clamp_min(1e-12)
    return torch.round(w / scale).clamp_(-127, 127).to(torch.int8), scale


def quantize_checkpoint(src: str | Path, dst: str | Path, scheme: str) -> dict[str, str]:
    """Write the quantized checkpoint of `src` into `dst` (scheme W8A8 or W8A8_DYNAMIC); returns its description."""
    src, dst = Path(src), Path(dst)
    if scheme not in (STATIC, DYNAMIC):
        raise ValueError(f"scheme={scheme!r} must be {STATIC} or {DYNAMIC}")
    if (src / DESCRIPTION_FILE).is_file():
        raise ValueError(f"{src} is already quantized ({DESCRIPTION_FILE} present): give a float checkpoint")
    if dst.resolve() == src.resolve():
        raise ValueError("DST must differ from SRC")
    absmax = calibrate(src) if scheme == STATIC else {}
    dst.mkdir(parents=True, exist_ok=True)
    description: dict[str, str] = {"model_quant_type": scheme, "version": "1.0.0"}
    weight_map: dict[str, str] = {}
    for file in checkpoint_files(src):
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        for key, tensor in tensors.items():
            prefix, _, leaf = key.rpartition(".")
            module = _module_of(prefix + ".weight") if leaf in ("weight", "bias") else None
            if module is None:
                out[key], description[key] = tensor, FLOAT
                continue
            if leaf == "bias":  # written with its weight
                continue
            out.update(_quantized(prefix, tensor, tensors.get(prefix + ".bias"), scheme, absmax.get(module[0])))
        description.update({k: scheme for k in out if k not in description})
        save_file(out, str(dst / file.name), metadata={"format": "pt"})
        weight_map.update({k: file.name for k in out})
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
            shutil.copy2(item, dst / item.name)
    if (src / "model.safetensors.index.json").is_file():
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
    (dst / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2))
    return description


def _quantized(
    prefix: str, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str, absmax: float | None
) -> dict[str, torch.Tensor]:
    """The tensors of one quantized projection, under msmodelslim's names."""
    qweight, scale = quantize_weight(weight)
    out = {
        f"{prefix}.weight": qweight,
        f"{prefix}.weight_scale": scale,
        f"{prefix}.weight_offset": torch.zeros_like(scale),
    }
    if scheme == DYNAMIC:
        if bias is not None:
            out[f"{prefix}.bias"] = bias
        return out
    if absmax is None:
        raise ValueError(f"calibration saw no input of {prefix}")
    input_scale = torch.tensor([max(absmax, 1e-6) / 127.0], dtype=torch.float32)
    deq_scale = (input_scale * scale[:, 0]).float()
    float_bias = bias.float() if bias is not None else torch.zeros_like(deq_scale)
    out.update(
        {
            f"{prefix}.input_scale": input_scale,
            f"{prefix}.input_offset": torch.zeros(1),
            f"{prefix}.deq_scale": deq_scale,
            f"{prefix}.quant_bias": torch.round(float_bias / deq_scale).to(torch.int32),
        }
    )
    if bias is not None:
        out[f"{prefix}.bias"] = bias  # folded into quant_bias; kept, as readers may expect it
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="float checkpoint directory")
    parser.add_argument("dst", help="output directory (created)")
    parser.add_argument("--scheme", choices=sorted(SCHEME_NAMES), default="w8a8")
    args = parser.parse_args(argv)
    try:
        description = quantize_checkpoint(args.src, args.dst, SCHEME_NAMES[args.scheme])
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scheme = SCHEME_NAMES[args.scheme]
    count = sum(v == scheme for k, v in description.items() if k != "model_quant_type")
    print(f"wrote {args.dst}: {count} quantized tensors ({scheme}), description in {DESCRIPTION_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
