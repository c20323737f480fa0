"""The plain decode ops (model/npu_ops.py DecodeOps) and the few-row linear (model/parallel.py) against
their textbook forms: the CPU fast paths compute the same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.parallel as parallel
from model.npu_ops import PLAIN, rms_norm
from model.rotary import apply_rotary


@pytest.mark.parametrize("rows", range(1, 10))
@pytest.mark.parametrize("swapped", [False, True])
def test_linear_equals_f_linear_in_both_forms(monkeypatch: pytest.MonkeyPatch, rows: int, swapped: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    x, weight, bias = torch.randn(rows, 48, generator=g), torch.randn(80, 48, generator=g), torch.randn(80, generator=g)
    choices = {(80, 48, r): swapped for r in range(1, parallel.PROBE_ROWS[-1] + 1)}
    monkeypatch.setattr(parallel, "_swapped", choices)
    for b in (None, bias):
        out = parallel.linear(x, weight, b)
        assert out.shape == (rows, 80) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_tuning_times_each_weight_shape_once_and_keeps_the_faster_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "_swapped", {(4, 4, 1): True})  # measured before: not timed again
    timed = []

    def fake_best_of(fn, *args) -> float:
        timed.append(fn)
        return 1.0 if len(timed) % 2 else 0.5  # F.linear first, then the swapped form: twice as fast

    monkeypatch.setattr(parallel, "_best_of", fake_best_of)
    a, b, int8 = torch.zeros(16, 8), torch.zeros(16, 8), torch.zeros(16, 8, dtype=torch.int8)
    made = parallel.tune_cpu_linears([a, b, int8, torch.zeros(4, 4), torch.zeros(8)])
    assert made == {(16, 8, r): True for r in parallel.PROBE_ROWS} | {(4, 4, r): True for r in (2, 4, 8)}
    assert len(timed) == 2 * len(made)
    monkeypatch.setattr(parallel, "SWAP_GAIN", 3.0)  # 2x faster is not enough now
    assert not any(parallel.tune_cpu_linears([torch.zeros(32, 8)]).values())


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
