"""W8A8 checkpoints: loading and slicing, strictness, the int8 arithmetic on every backend, accuracy.

- Loader: a checkpoint written by `model.quantize` loads at tp 1 and tp 2 (each rank built with its
  ParallelContext; loading needs no collective) and every rank holds exactly its slice of weights and
  scales; a missing, extra or wrongly shaped scale fails naming the tensor; a hand-made description
  that mixes W8A8, W8A8_DYNAMIC and FLOAT layers loads each layer as described.
- Exactness: each backend's int8 linear equals the float64 reference of the same quantized arithmetic
  (dequantized weights, activations quantized then dequantized), static and dynamic, tp 1 and 2.
- Accuracy: teacher-forced logits of the quantized tiny model against its float source.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import model.npu_ops
import model.quant
from cluster.tools.greedy_check import NEAR_TIE_TOP_K, decode_step_logits
from model.config import ModelConfig
from model.loader import CheckpointError, load_weights
from model.parallel import SINGLE, ParallelContext
from model.processor import PromptBuilder
from model.quant import (
    DEQUANT_ROWS,
    DESCRIPTION_FILE,
    DYNAMIC,
    STATIC,
    dequantized_reference,
    quantized_layers,
    select_backend,
    use_backend,
)
from model.quantize import quantize_checkpoint
from model.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from model.runner import ModelRunner
from tests.npu_stand_in import FakeQuantNpu

SCHEMES = {"static": STATIC, "dynamic": DYNAMIC}


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint written by model.quantize in each scheme: "static" / "dynamic" -> path."""
    root = tmp_path_factory.mktemp("quantized")
    return {name: _quantize(tiny_checkpoint, root / name, scheme) for name, scheme in SCHEMES.items()}


def _quantize(src: Path, dst: Path, scheme: str) -> Path:
    quantize_checkpoint(src, dst, scheme)
    return dst


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _edited(src: Path, dst: Path, tensors: dict[str, torch.Tensor], description: dict[str, str] | None = None) -> Path:
    """A copy of checkpoint `src` with other tensors (and optionally another description)."""
    shutil.copytree(src, dst)
    save_file(tensors, str(dst / "model.safetensors"))
    if description is not None:
        (dst / DESCRIPTION_FILE).write_text(json.dumps(description))
    return dst


def _model(path: Path, ctx: ParallelContext = SINGLE) -> Qwen2_5_VLForConditionalGeneration:
    model = Qwen2_5_VLForConditionalGeneration(ModelConfig.from_pretrained(path), ctx, SINGLE)
    load_weights(model, path)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- loader
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_rank_holds_its_slice_of_weights_and_scales(quantized: dict[str, Path], scheme: str) -> None:
    path = quantized[scheme]
    ckpt = _tensors(path)
    for tp in (1, 2):
        for rank in range(tp):
            layer = _model(path, ParallelContext(rank, tp)).model.layers[1]
            attn, mlp, pre = layer.self_attn, layer.mlp, "model.layers.1."
            q, kv = attn.qkv_proj.q_size, attn.qkv_proj.kv_size  # rows per rank (2 KV heads: split at tp 2)

            def rows(name: str, n: int, pre: str = pre, rank: int = rank) -> torch.Tensor:
                return ckpt[pre + name][rank * n : (rank + 1) * n]

            for leaf in ("weight", "weight_scale") + (("deq_scale", "quant_bias") if scheme == "static" else ()):
                expect_qkv = torch.cat(
                    [rows(f"self_attn.{p}_proj.{leaf}", n) for p, n in (("q", q), ("k", kv), ("v", kv))]
                )
                assert torch.equal(getattr(attn.qkv_proj, leaf), expect_qkv.to(getattr(attn.qkv_proj, leaf).dtype))
                inter = mlp.gate_up_proj.part_sizes[0]
                expect_gu = torch.cat([rows(f"mlp.{p}_proj.{leaf}", inter) for p in ("gate", "up")])
                assert torch.equal(getattr(mlp.gate_up_proj, leaf), expect_gu.to(expect_gu.dtype))
                # Row-parallel: the weight's input columns are split, per-output scales are whole.
                full = ckpt[pre + f"mlp.down_proj.{leaf}"]
                cols = mlp.down_proj.in_per_rank
                expect = full[:, rank * cols : (rank + 1) * cols] if leaf == "weight" else full
                assert torch.equal(getattr(mlp.down_proj, leaf), expect)
            if scheme == "static":
                assert torch.equal(attn.qkv_proj.input_scale, ckpt[pre + "self_attn.q_proj.input_scale"])
                assert torch.equal(mlp.down_proj.input_scale, ckpt[pre + "mlp.down_proj.input_scale"])
                assert attn.qkv_proj.bias is None  # folded into quant_bias
            else:
                expect_bias = torch.cat(
                    [rows(f"self_attn.{p}_proj.bias", n) for p, n in (("q", q), ("k", kv), ("v", kv))]
                )
                assert torch.equal(attn.qkv_proj.bias, expect_bias)
            assert attn.qkv_proj.weight.dtype == torch.int8


def test_missing_extra_and_misshaped_scales_name_the_tensor(quantized: dict[str, Path], tmp_path: Path) -> None:
    src = quantized["static"]
    good = _tensors(src)
    name = "model.layers.0.self_attn.k_proj.deq_scale"
    cases = {
        "missing": ({k: v for k, v in good.items() if k != name}, name),
        "extra": ({**good, "model.layers.0.mlp.down_proj.pertoken_scale": torch.ones(1)}, "down_proj.pertoken_scale"),
        "misshaped": ({**good, name: good[name][:-1]}, name),
        "float weight": ({**good, "model.layers.2.mlp.up_proj.weight": torch.randn(256, 128)}, "up_proj.weight"),
        "q/k/v input scales differ": (
            {
                **good,
                "model.layers.0.self_attn.v_proj.input_scale": good[name.replace("k_proj.deq", "v_proj.input")] * 2,
            },
            "v_proj.input_scale",
        ),
    }
    for case, (tensors, named) in cases.items():
        with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
            _model(_edited(src, tmp_path / case.replace(" ", "_"), tensors))
    # A scale of a layer the description keeps float is extra too.
    description = json.loads((src / DESCRIPTION_FILE).read_text())
    floated = {k: ("FLOAT" if ".layers.2.mlp.down_proj." in k else v) for k, v in description.items()}
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.down_proj\.(weight|input|deq|quant)"):
        _model(_edited(src, tmp_path / "floated", good, floated))


def test_int64_deq_scale_of_float16_checkpoints_loads_as_its_float32_bits(
    quantized: dict[str, Path], tmp_path: Path
) -> None:
    """msmodelslim stores deq_scale of float16 models as int64 holding the float32 bits (npu_quant_matmul's form)."""
    tensors = _tensors(quantized["static"])
    name = "model.layers.0.mlp.down_proj.deq_scale"
    as_bits = tensors[name].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    model = _model(_edited(quantized["static"], tmp_path / "int64", {**tensors, name: as_bits}))
    assert torch.equal(model.model.layers[0].mlp.down_proj.deq_scale, tensors[name])


def test_description_errors_name_the_entry(quantized: dict[str, Path], tmp_path: Path) -> None:
    src = quantized["dynamic"]
    description = json.loads((src / DESCRIPTION_FILE).read_text())
    tensors = _tensors(src)
    cases = {
        "visual.blocks.0.attn.proj.weight": {**description, "visual.blocks.0.attn.proj.weight": "W8A8"},
        "W4A8": {**description, "model.layers.1.mlp.down_proj.weight": "W4A8"},
        "must share one scheme": {**description, "model.layers.1.self_attn.v_proj.weight": "W8A8"},
    }
    for i, (message, desc) in enumerate(cases.items()):
        with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
            _model(_edited(src, tmp_path / str(i), tensors, desc))
    with pytest.raises(CheckpointError, match="quantization='none'"):
        load_weights(
            Qwen2_5_VLForConditionalGeneration(ModelConfig.from_pretrained(src), SINGLE, SINGLE),
            src,
            quantization="none",
        )


def test_mixed_description_loads_each_layer_as_described(
    tiny_checkpoint: Path, quantized: dict[str, Path], tmp_path: Path
) -> None:
    """Layer 0 attention static, layer 1 MLP dynamic, everything else float: a hand-made mix."""
    float_t, static_t, dynamic_t = (
        _tensors(tiny_checkpoint),
        _tensors(quantized["static"]),
        _tensors(quantized["dynamic"]),
    )
    picks = {"model.layers.0.self_attn.": (static_t, STATIC), "model.layers.1.mlp.": (dynamic_t, DYNAMIC)}
    tensors = {k: v for k, v in float_t.items() if not any(k.startswith(p) and "_proj." in k for p in picks)}
    description = {"model_quant_type": "W8A8", **dict.fromkeys(tensors, "FLOAT")}
    for prefix, (source, scheme) in picks.items():
        chosen = {k: v for k, v in source.items() if k.startswith(prefix) and "_proj." in k}
        tensors.update(chosen)
        description.update(dict.fromkeys(chosen, scheme))
    model = _model(_edited(tiny_checkpoint, tmp_path / "mixed", tensors, description))
    layers = {name: layer.quant.scheme for name, layer in quantized_layers(model)}
    assert layers == {
        "model.layers.0.self_attn.qkv_proj": STATIC,
        "model.layers.0.self_attn.o_proj": STATIC,
        "model.layers.1.mlp.gate_up_proj": DYNAMIC,
        "model.layers.1.mlp.down_proj": DYNAMIC,
    }
    float_mlp = model.model.layers[0].mlp.gate_up_proj
    assert float_mlp.quant is None and float_mlp.weight.dtype == torch.float32
    assert torch.equal(float_mlp.weight[:256], float_t["model.layers.0.mlp.gate_proj.weight"])


# ----------------------------------------------------------------------------------------------- arithmetic
# int8pack returns the int32 accumulation rounded to bfloat16 (relative 2^-8, of the accumulation: against
# the output's range where quant_bias cancels most of it); the others are exact up to float32 rounding.
BACKEND_TOL = {"dequant": 1e-5, "int_mm": 1e-5, "npu": 1e-5, "int8pack": 2**-7}
# Decode-sized calls, and prefill-sized ones: int8pack then converts the weight to float, whole or (the
# tiny weights made to count as wide ones) in blocks of 16 channels.
CALLS = {"decode": (5, False), "prefill": (DEQUANT_ROWS + 3, False), "prefill-blocks": (DEQUANT_ROWS + 3, True)}


@pytest.fixture
def fake_npu(monkeypatch: pytest.MonkeyPatch) -> FakeQuantNpu:
    fake = FakeQuantNpu()
    monkeypatch.setattr(model.npu_ops, "torch_npu_module", lambda: fake)
    return fake


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("backend", list(BACKEND_TOL))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_int8_linear_equals_the_dequantized_reference(
    quantized: dict[str, Path],
    scheme: str,
    backend: str,
    call: str,
    fake_npu: FakeQuantNpu,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows, blocks = CALLS[call]
    if blocks:
        monkeypatch.setattr("model.quant._WHOLE_BYTES", 0)
        monkeypatch.setattr("model.quant._BLOCK_BYTES", 1)
    gen = torch.Generator().manual_seed(0)
    x_in = {"qkv_proj": torch.randn(rows, 128, generator=gen), "down_proj": torch.randn(rows, 256, generator=gen)}
    tp1 = None
    for tp in (1, 2):
        partials = []
        for rank in range(tp):
            model = _model(quantized[scheme], ParallelContext(rank, tp))
            use_backend(model, backend)
            layer1 = model.model.layers[1]
            if scheme == "static":  # an asymmetric activation offset, as msmodelslim may write
                layer1.mlp.down_proj.input_offset.fill_(3.0)
                use_backend(model, backend)
            for layer, x in ((layer1.self_attn.qkv_proj, x_in["qkv_proj"]), (layer1.mlp.down_proj, x_in["down_proj"])):
                if layer is layer1.mlp.down_proj:
                    x = x[:, rank * layer.in_per_rank : (rank + 1) * layer.in_per_rank]
                ours, ref = layer.quant.apply(layer, x).double(), dequantized_reference(layer, x)
                tol = BACKEND_TOL[backend]
                torch.testing.assert_close(ours, ref, rtol=tol, atol=tol * float(ref.abs().max()))
                if layer is layer1.mlp.down_proj:
                    partials.append(ref)
        if tp == 1:
            tp1 = partials[0]
        elif scheme == "static":  # one per-tensor activation scale: the rank partials add up to tp 1's sum
            torch.testing.assert_close(sum(partials), tp1, rtol=1e-9, atol=1e-9)
    if backend == "npu":
        assert fake_npu.calls["npu_quant_matmul"] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_npu_kernels_get_their_documented_dtypes(
    quantized: dict[str, Path], scheme: str, dtype: torch.dtype, fake_npu: FakeQuantNpu
) -> None:
    """A bfloat16 / float16 model on the npu backend, through stand-ins that assert op-plugin's dtype rules:
    npu_quantize (div_mode=False) takes its scales in the input's dtype and zero points in the scales' dtype;
    npu_quant_matmul takes for float16 output an int64 static scale made by npu_trans_quant_param, and with a
    per-token scale a bfloat16 or float32 bias (not float16). The result is the quantized arithmetic's, up to
    the rounding of the scales in the model's dtype (and to 19 bits for the int64 scale)."""
    gen = torch.Generator().manual_seed(0)
    layer = _model(quantized[scheme]).model.layers[1].self_attn.qkv_proj  # column-parallel, with a bias
    if layer.bias is not None:  # the dynamic scheme keeps the float bias, in the model's dtype
        layer.bias.data = layer.bias.data.to(dtype)
    layer.compute_dtype = dtype
    x = torch.randn(5, 128, generator=gen).to(dtype)
    ref = dequantized_reference(layer, x)
    layer.quant.prepare(layer, "npu")
    ours = layer.quant.apply(layer, x)
    assert ours.dtype == dtype and fake_npu.calls["npu_quant_matmul"] == 1
    assert fake_npu.calls.get("npu_trans_quant_param", 0) == (scheme == "static" and dtype == torch.float16)
    # Output and activation scales rounded to 8 (bfloat16) or 11 (float16) bits: measured 0.8% / 0.07% of max |y|.
    tol = (2**-6 if dtype == torch.bfloat16 else 2**-9) * float(ref.abs().max())
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=tol)


# ----------------------------------------------------------------------------------------------- accuracy
KL_BOUND = 0.02


REQUEST = {"id": "a", "prompt": "Describe the weather in detail."}
CONTINUATION = list(range(7, 31))


@pytest.fixture(scope="module")
def float_logits(tiny_checkpoint: Path) -> torch.Tensor:
    request = PromptBuilder.from_pretrained(tiny_checkpoint).build(REQUEST)
    return decode_step_logits(ModelRunner(tiny_checkpoint, max_seq_len=256), request, CONTINUATION)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_logits_stay_close_to_the_float_source(
    quantized: dict[str, Path], float_logits: torch.Tensor, scheme: str
) -> None:
    """Teacher-forced logits over 24 steps: mean KL(float || int8) below 0.02 nats, top-1 differences only at near ties.

    Why this bound: per-channel int8 weights and 8-bit activations perturb each projection's output by
    about 0.5% of its range; through 3 layers that moves the logits of this random model by a few
    hundredths (measured mean KL 0.006 static, 0.002 dynamic), whereas a wrong scale or slice sends
    the KL past 0.5. Random tiny models have near-tied logits (FACTS 6), so a top-1 flip is accepted
    only where each side's token is in the other's top-5, the rule the rest of the suite uses.
    """
    request = PromptBuilder.from_pretrained(quantized[scheme]).build(REQUEST)
    ours = decode_step_logits(ModelRunner(quantized[scheme], max_seq_len=256), request, CONTINUATION)
    ref = float_logits
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    assert float(kl.sum(-1).mean()) < KL_BOUND
    for step in torch.nonzero(ours.argmax(-1) != ref.argmax(-1)).flatten().tolist():
        assert int(ours[step].argmax()) in ref[step].topk(NEAR_TIE_TOP_K).indices
        assert int(ref[step].argmax()) in ours[step].topk(NEAR_TIE_TOP_K).indices
    assert float((ours.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.75


def test_backend_choice_and_the_fallback_log_line(
    quantized: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    npu = SimpleNamespace(type="npu")  # torch.device("npu") needs torch_npu
    assert [select_backend(cpu, 128, 100), select_backend(cpu, 100, 128)] == ["int8pack", "dequant"]
    assert [select_backend(cuda, 128, 64), select_backend(cuda, 128, 60)] == ["int_mm", "dequant"]
    assert select_backend(npu, 100, 100) == "npu"
    monkeypatch.setattr(model.quant, "select_backend", lambda device, n_in, n_out: "dequant")
    with caplog.at_level("WARNING", logger="model.quant"):
        loaded = _model(quantized["dynamic"])
    assert {layer.quant.backend for _, layer in quantized_layers(loaded)} == {"dequant"}
    [record] = [r for r in caplog.records if r.name == "model.quant"]
    assert "no int8 kernel for 12 quantized layer(s)" in record.getMessage()


def test_the_converted_gemm_runs_outside_inference_mode_after_running_inside() -> None:
    """Its scratch buffer, made under inference_mode by the engine's forward, is not written outside it."""
    from model.quant import _converted_mm

    weight = torch.randint(-128, 128, (64, 32), dtype=torch.int8)
    xq = torch.randn(4, 32).round()
    with torch.inference_mode():
        inside = _converted_mm(xq, weight)
    outside = _converted_mm(xq, weight)
    assert torch.equal(inside, outside)
    assert torch.equal(outside, xq @ weight.float().t())
