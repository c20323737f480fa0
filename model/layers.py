"""Small layers shared by the vision tower and the text decoder."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from model.npu_ops import PLAIN, rms_norm
from model.parallel import (
    MergedColumnParallelLinear,
    ParallelContext,
    RowParallelLinear,
    default_weight_loader,
    set_loader,
)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as the reference implementation does."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = set_loader(nn.Parameter(torch.ones(hidden)), default_weight_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused and column-parallel, down row-parallel."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, ctx: ParallelContext) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias=bias, ctx=ctx)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=bias, ctx=ctx)

    def forward(
        self, x: torch.Tensor, silu_and_mul: Callable[[torch.Tensor], torch.Tensor] = PLAIN.silu_and_mul
    ) -> torch.Tensor:
        """`silu_and_mul` maps [gate | up] to silu(gate) * up (a fused kernel may stand in)."""
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
