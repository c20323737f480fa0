"""The plain decode ops (model/npu_ops.py DecodeOps) and the few-row linear (model/cpu_linear.py) against
their textbook forms: the CPU fast paths compute the same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.cpu_linear as cpu_linear
from model.npu_ops import PLAIN, rms_norm
from model.rotary import apply_rotary


@pytest.mark.parametrize("rows", range(1, 10))
@pytest.mark.parametrize("form", cpu_linear.FORMS)
def test_linear_equals_f_linear_in_every_form(monkeypatch: pytest.MonkeyPatch, rows: int, form: str) -> None:
    g = torch.Generator().manual_seed(rows)
    x, weight, bias = torch.randn(rows, 48, generator=g), torch.randn(80, 48, generator=g), torch.randn(80, generator=g)
    monkeypatch.setattr(cpu_linear, "_forms", {(80, 48, r): form for r in range(1, 10)})
    cpu_linear.attach_packed(weight)
    for b in (None, bias):
        out = cpu_linear.linear(x, weight, b)
        assert out.shape == (rows, 80) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_a_compiled_step_runs_the_packed_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(48, 80)
    x = torch.randn(4, 48, generator=g)
    monkeypatch.setattr(cpu_linear, "_forms", {(80, 48, 4): "packed"})
    cpu_linear.attach_packed(layer.weight)
    reached = []
    real = cpu_linear.packed_linear

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        held = getattr(weight, cpu_linear.PACKED_ATTR)
        reached.append(held[0] == weight.data_ptr())  # the parameter itself, with its copy
        return real(x, weight, bias)

    monkeypatch.setattr(cpu_linear, "packed_linear", spy)
    step = torch.compile(lambda x: cpu_linear.linear(x, layer.weight, layer.bias), dynamic=False)
    with torch.inference_mode():
        torch.testing.assert_close(step(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert reached == [True]


def test_a_packed_copy_is_not_read_once_its_weight_moved() -> None:
    weight, x = torch.randn(80, 48), torch.randn(4, 48)
    cpu_linear.attach_packed(weight)
    weight.data = torch.randn(80, 48)  # new numbers in new storage: the copy is stale
    torch.testing.assert_close(cpu_linear.packed_linear(x, weight), F.linear(x, weight))


def test_tuning_times_each_weight_shape_once_and_keeps_a_faster_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "_forms", {(4, 4, r): "swapped" for r in range(1, 65)})  # measured before
    passes = []
    speeds = {"plain": 1.0, "swapped": 0.9, "packed": 0.5}  # packed 2x faster, swapped within the margin

    def fake_pass(weights: list, packs: dict, rows: int, form: str) -> dict:
        passes.append(([tuple(w.shape) for w in weights], rows, form))
        return {tuple(w.shape): speeds[form] for w in weights if form != "packed" or id(w) in packs}

    monkeypatch.setattr(cpu_linear, "_time_pass", fake_pass)
    a, b, int8, known = torch.randn(16, 8), torch.randn(16, 8), torch.zeros(16, 8, dtype=torch.int8), torch.randn(4, 4)
    made = cpu_linear.tune_cpu_linears([a, b, int8, known, torch.zeros(8)])
    assert made == {(16, 8, r): "packed" for r in cpu_linear.PROBE_ROWS}
    # each form warmed up on one weight of the new shape, then timed over both in one pass; the known shape not at all
    expected = [[(16, 8)], [(16, 8), (16, 8)]]
    assert passes == [(shapes, r, f) for r in cpu_linear.PROBE_ROWS for f in cpu_linear.FORMS for shapes in expected]
    assert cpu_linear._forms[(16, 8, 3)] == "packed"  # rows between probes follow the next probe
    for w in (a, b):  # both weights of the packed shape hold their copy
        torch.testing.assert_close(cpu_linear.linear(torch.ones(3, 8), w), F.linear(torch.ones(3, 8), w))
        assert getattr(w, cpu_linear.PACKED_ATTR)[0] == w.data_ptr()
    assert not hasattr(int8, cpu_linear.PACKED_ATTR) and not hasattr(known, cpu_linear.PACKED_ATTR)
    later = torch.randn(16, 8)  # a second model's weight of a shape tuned before: packed, not timed
    assert cpu_linear.tune_cpu_linears([later]) == {} and len(passes) == 2 * 3 * len(cpu_linear.PROBE_ROWS)
    assert getattr(later, cpu_linear.PACKED_ATTR)[0] == later.data_ptr()
    monkeypatch.setattr(cpu_linear, "FORM_GAIN", 3.0)  # 2x faster is not enough now
    c = torch.zeros(32, 8)
    assert set(cpu_linear.tune_cpu_linears([c]).values()) == {"plain"}
    assert not hasattr(c, cpu_linear.PACKED_ATTR)


def test_tuning_times_real_passes() -> None:
    weights = [torch.randn(24, 16), torch.randn(24, 16), torch.randn(16, 24)]
    packs = {id(weights[0]): cpu_linear.pack(weights[0])}
    for form in cpu_linear.FORMS:
        spent = cpu_linear._time_pass(weights, packs, 3, form)
        assert set(spent) == ({(24, 16)} if form == "packed" else {(24, 16), (16, 24)})
        assert all(t > 0 for t in spent.values())


def test_decode_attention_equals_masked_softmax_over_grouped_heads() -> None:
    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, length = 3, 6, 2, 16, 40
    q = torch.randn(batch, heads, dim, generator=g)
    keys, values = torch.randn(2, batch, length, kv_heads, dim, generator=g)
    lens = torch.tensor([40, 17, 1])
    mask = torch.arange(length)[None, :] < lens[:, None]  # (B, L)
    out = PLAIN.attention(q, keys, values, mask, dim**-0.5)
    expected = []
    for b in range(batch):
        k = keys[b, : lens[b]].repeat_interleave(heads // kv_heads, dim=1)  # (len, H, D)
        v = values[b, : lens[b]].repeat_interleave(heads // kv_heads, dim=1)
        probs = (torch.einsum("hd,lhd->hl", q[b], k) * dim**-0.5).softmax(-1)
        expected.append(torch.einsum("hl,lhd->hd", probs, v).reshape(-1))
    torch.testing.assert_close(out, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_rotary_of_queries_and_keys_together_equals_each_alone() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 6, 16, generator=g), torch.randn(2, 2, 16, generator=g)
    cos, sin = torch.randn(2, 2, 16, generator=g)
    rq, rk = PLAIN.rotary(q, k, cos, sin)
    torch.testing.assert_close(rq, apply_rotary(q, cos[:, None], sin[:, None]))
    torch.testing.assert_close(rk, apply_rotary(k, cos[:, None], sin[:, None]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_computed_in_float32_and_scaled_in_the_input_dtype(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    x, weight = torch.randn(3, 32, generator=g).to(dtype), torch.randn(32, generator=g).to(dtype)
    xf = x.float()
    expected = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected)
