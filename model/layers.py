"""Small layers shared by the vision tower and the text decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused and column-parallel, down row-parallel."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, ctx: ParallelContext) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias=bias, ctx=ctx)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=bias, ctx=ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
