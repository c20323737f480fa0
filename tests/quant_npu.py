"""torch_npu's int8 kernels as their documentation defines them, for cpu tests of the npu path.

npu_quantize(x, scales, zero_points, dtype, axis, div_mode=False) = round(x * scales + zero_points)
as int8, scales and zero_points one value per element of x's last dim (axis -1);
npu_dynamic_quant(x) -> (round(x / s) as int8, s = max|row| / 127 float32, one per row);
npu_quant_matmul(x1 int8 (M, K), x2 int8 (K, N), scale (N,), *, pertoken_scale (M,), bias,
output_dtype) = (x1 @ x2 + int32 bias) * scale [* pertoken_scale] [+ float bias], scale float32,
or int64 holding float32 bits (float16 output), computed exactly here.
"""

from __future__ import annotations

import torch

from tests.test_capture import FakeTorchNpu


class FakeQuantNpu(FakeTorchNpu):
    """FakeTorchNpu plus the quantization kernels vllm-ascend's W8A8 linear methods call."""

    def npu_quantize(self, x, scales, zero_points, dtype, axis=1, div_mode=True):
        self._count("npu_quantize")
        assert dtype == torch.qint8 and axis == -1 and div_mode is False, "vllm-ascend's form: reciprocal scale"
        assert scales.shape == zero_points.shape == x.shape[-1:], "one scale and offset per input channel"
        return torch.round(x.float() * scales + zero_points).clamp(-128, 127).to(torch.int8)

    def npu_dynamic_quant(self, x, smooth_scales=None):
        self._count("npu_dynamic_quant")
        assert smooth_scales is None
        scale = x.float().abs().amax(-1).clamp_min(1e-12) / 127.0
        return torch.round(x.float() / scale[..., None]).clamp(-128, 127).to(torch.int8), scale

    def npu_quant_matmul(self, x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None):
        self._count("npu_quant_matmul")
        assert x1.dtype == x2.dtype == torch.int8 and x1.dim() == x2.dim() == 2 and offset is None
        assert x1.shape[1] == x2.shape[0] and x2.is_contiguous(), "x2 is (K, N) and contiguous"
        n = x2.shape[1]
        if scale.dtype == torch.int64:
            assert output_dtype == torch.float16 and pertoken_scale is None
            scale = (scale & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
        assert scale.dtype == torch.float32 and scale.shape == (n,)
        acc = x1.double() @ x2.double()
        if pertoken_scale is None:
            if bias is not None:
                assert bias.dtype == torch.int32 and bias.shape == (n,)
                acc = acc + bias.double()
            out = acc * scale.double()
        else:
            assert pertoken_scale.dtype == torch.float32 and pertoken_scale.shape == (x1.shape[0],)
            out = acc * scale.double() * pertoken_scale.double()[:, None]
            if bias is not None:
                assert bias.dtype.is_floating_point and bias.shape == (n,)
                out = out + bias.double()
        return out.to(output_dtype)
