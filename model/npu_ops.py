"""The decode step's elementwise and attention ops: plain PyTorch, or NPU fused kernels.

`DecodeOps` is the plain path every backend runs. `FusedOps` calls the torch_npu kernels that
vllm-ascend uses for decode: npu_rms_norm / npu_add_rms_norm, npu_rotary_mul, npu_swiglu and
npu_fused_infer_attention_score. Both take and return the same shapes, so the decode step is
written once (model/text.py) and `ModelRunner(fused_ops=True)` swaps the implementation.

Shapes: x (B, hidden); q (B, H, D), k (B, KVH, D); cos/sin (B, D); keys/values (B, L, KVH, D) (BSND,
gathered from the paged cache through the step's block tables) with L the decode length; mask (B, L)
bool, True where a key is attended.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from model.device import import_torch_npu
from model.rotary import apply_rotary


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm computed in float32, scaled by `weight` in the input dtype (as the reference model)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class DecodeOps:
    """Plain PyTorch ops; every backend runs them."""

    name = "plain"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual): the residual add fused with the next norm."""
        total = x + residual
        return rms_norm(total, weight, eps), total

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, cos[:, None], sin[:, None]), apply_rotary(k, cos[:, None], sin[:, None])

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(first half) * second half of the last dim ([gate | up])."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """One query per row over its slot's keys -> (B, H * D). Grouped heads share a KV head."""
        batch, heads, dim = q.shape
        kv_heads = keys.shape[2]
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # (B, KVH, L, D)
        q = q.view(batch, kv_heads, heads // kv_heads, dim)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scale  # (B, KVH, G, L)
        scores = scores.float().masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = scores.softmax(-1).to(values.dtype)
        return torch.matmul(probs, values).reshape(batch, heads * dim)  # (B, KVH, G, D) -> (B, H * D)


class FusedOps(DecodeOps):
    """torch_npu's fused kernels, with argument layouts as documented by torch_npu (op-plugin).

    `npu` is the torch_npu module (tests pass a stand-in written from the documented semantics).
    Attention reads the keys gathered from the step's blocks in BSND layout (contiguous), under a
    (B, 1, 1, L) mask: no host-side lengths, so the step captures as it is.
    """

    name = "fused"

    def __init__(self, npu: ModuleType | Any) -> None:
        self.npu = npu

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.npu.npu_rms_norm(x, weight, eps)[0]  # -> (y, rstd)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, _, total = self.npu.npu_add_rms_norm(x, residual, weight, eps)  # -> (y, rstd, x1 + x2)
        return y, total

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # npu_rotary_mul wants 4-D x: one token per row as (B, S=1, N, D), cos/sin (B, 1, 1, D).
        cos, sin = cos[:, None, None], sin[:, None, None]
        q = self.npu.npu_rotary_mul(q.unsqueeze(1), cos, sin).squeeze(1)
        k = self.npu.npu_rotary_mul(k.unsqueeze(1), cos, sin).squeeze(1)
        return q, k

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.npu.npu_swiglu(gate_up, dim=-1)

    def attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        batch, heads, dim = q.shape
        out, _ = self.npu.npu_fused_infer_attention_score(
            q.reshape(batch, 1, heads, dim),
            keys,
            values,
            atten_mask=~mask[:, None, None, :],  # (B, 1, 1, L), True = not attended
            num_heads=heads,
            num_key_value_heads=keys.shape[2],
            scale=scale,
            input_layout="BSND",
        )
        return out.reshape(batch, heads * dim)


PLAIN = DecodeOps()


def torch_npu_module() -> ModuleType:
    """The torch_npu module whose kernels FusedOps calls (imported on first use)."""
    return import_torch_npu()


def decode_ops(fused: bool) -> DecodeOps:
    """The ops the decode step runs: FusedOps over torch_npu when `fused`, else the plain ones."""
    return FusedOps(torch_npu_module()) if fused else PLAIN
