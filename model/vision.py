"""The Qwen2.5-VL vision tower: patch embedding, window/full attention blocks, patch merger.

Attention never crosses images, so the tower can encode any subset of a batch's images and give
the same embeddings per image: that is what data-parallel vision relies on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VisionConfig
from model.layers import GatedMLP, RMSNorm
from model.parallel import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelContext,
    ReplicatedLinear,
    RowParallelLinear,
    TensorSource,
    _copy,
)
from model.rotary import apply_rotary, vision_position_ids, vision_rotary


def window_index(grid_thw: torch.Tensor, spatial_merge_size: int, window_size: int,
                 patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder merge units so each attention window is contiguous.

    Returns (index, window_ids): `index` (num_units,) permutes merge units (groups of
    spatial_merge_size**2 patches) into window order; `window_ids` (num_units,) gives, in that
    new order, the window each unit belongs to (windows never span two images).
    """
    units_per_window = window_size // spatial_merge_size // patch_size
    index, window_ids = [], []
    offset, next_window = 0, 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        ids = torch.arange(t * gh * gw).reshape(t, gh, gw)
        win_h = torch.arange(gh) // units_per_window
        win_w = torch.arange(gw) // units_per_window
        n_wh, n_ww = int(win_h[-1]) + 1, int(win_w[-1]) + 1
        # Window number of each unit: frames, then window rows, then window columns.
        win = (torch.arange(t)[:, None, None] * n_wh + win_h[None, :, None]) * n_ww + win_w[None, None, :]
        order = torch.argsort(win.flatten(), stable=True)
        index.append(ids.flatten()[order] + offset)
        window_ids.append(win.flatten()[order] + next_window)
        offset += t * gh * gw
        next_window += t * n_wh * n_ww
    return torch.cat(index), torch.cat(window_ids)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.head_dim = config.head_dim
        self.num_heads = config.num_heads // ctx.size
        dim = config.hidden_size
        self.qkv = MergedColumnParallelLinear(dim, [dim, dim, dim], bias=True, ctx=ctx)
        self.proj = RowParallelLinear(dim, dim, bias=True, ctx=ctx)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                spans: list[tuple[int, int]], segment: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).permute(1, 2, 0, 3)  # 3 x (H, N, D)
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        out = torch.empty_like(q)
        for start, end in spans:
            mask = None
            if segment is not None:
                seg = segment[start:end]
                mask = seg[:, None] == seg[None, :]
            out[:, start:end] = F.scaled_dot_product_attention(
                q[:, start:end], k[:, start:end], v[:, start:end], attn_mask=mask)
        return self.proj(out.transpose(0, 1).reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, 1e-6)
        self.norm2 = RMSNorm(config.hidden_size, 1e-6)
        self.attn = VisionAttention(config, ctx)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=True, ctx=ctx)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                spans: list[tuple[int, int]], segment: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, spans, segment)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d with stride = kernel, applied as a matmul on flattened patches."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.proj = ReplicatedLinear(config.patch_dim, config.hidden_size, bias=False)
        self.proj.weight.weight_loader = self._load_conv

    @staticmethod
    def _load_conv(param: nn.Parameter, source: TensorSource, shard_id: object = None) -> None:
        _copy(param, source[:].reshape(param.shape[0], -1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels.to(self.proj.weight.dtype))


class PatchMerger(nn.Module):
    """Concatenate each merge-size x merge-size block of patches and project to the text width."""

    def __init__(self, config: VisionConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.merged_dim = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = RMSNorm(config.hidden_size, 1e-6)
        self.mlp = nn.Sequential(
            ColumnParallelLinear(self.merged_dim, self.merged_dim, bias=True, ctx=ctx),
            nn.GELU(),
            RowParallelLinear(self.merged_dim, config.out_hidden_size, bias=True, ctx=ctx),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


class Qwen2_5_VisionTransformer(nn.Module):
    """Encodes the patches of one or more images into one embedding per LLM image token."""

    def __init__(self, config: VisionConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config, ctx) for _ in range(config.depth))
        self.merger = PatchMerger(config, ctx)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (num_patches, patch_dim), grid_thw (num_images, 3) -> (num_patches / merge**2, out)."""
        c = self.config
        unit = c.spatial_merge_size**2
        x = self.patch_embed(pixel_values)
        n = x.shape[0]
        grid_thw = grid_thw.cpu()
        order, window_ids = window_index(grid_thw, c.spatial_merge_size, c.window_size, c.patch_size)
        # Move whole merge units into window order; the patch rotary angles move with them.
        cos, sin = vision_rotary(vision_position_ids(grid_thw, c.spatial_merge_size), c.head_dim, c.rope_theta)
        cos = cos.view(n // unit, unit, -1)[order].reshape(n, -1).to(x.device)
        sin = sin.view(n // unit, unit, -1)[order].reshape(n, -1).to(x.device)
        window_segment = window_ids.repeat_interleave(unit).to(x.device)
        order = order.to(x.device)
        x = x.view(n // unit, unit, -1)[order].reshape(n, -1)
        sizes = (grid_thw.prod(-1)).tolist()
        ends = torch.tensor(sizes).cumsum(0).tolist()
        spans = [(end - size, end) for size, end in zip(sizes, ends)]
        for i, block in enumerate(self.blocks):
            segment = None if i in c.fullatt_block_indexes else window_segment
            x = block(x, cos, sin, spans, segment)
        merged = self.merger(x)
        return merged[torch.argsort(order)]
