"""Small layers shared by the vision tower and the text decoder."""

from __future__ import annotations

import torch
from torch import nn

from model.parallel import default_weight_loader, set_loader


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
