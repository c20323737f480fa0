"""The Qwen2.5-VL vision tower: patch embedding, window/full attention blocks, patch merger.

Attention never crosses images, so the tower can encode any subset of a batch's images and give
the same embeddings per image: that is what data-parallel vision relies on.

Attention is varlen attention over the groups (`npu_ops.DecodeOps.varlen_attention`), which on the
plain path runs as 4-D (batch, heads, seq, head_dim) scaled_dot_product_attention, the layout the
fused kernels of every backend take (CPU flash, CUDA flash / memory-efficient, NPU fusion
attention). Merge units are reordered once so that every attention group is a contiguous block of
rows and groups of equal length sit next to each other (`vision_layout`): a window block then is
one SDPA call per run of equal-size windows (at most four per frame: interior, right edge, bottom
edge, corner), with the windows as the batch and no mask; a full-attention block is one call per
run of equal-size frames. No score tensor is larger than one group's (64 x 64 per head for a
112-pixel window), and a fused kernel never materializes even that for a whole frame. The MLP runs
over MLP_CHUNK_ROWS rows at a time, so its temporaries do not grow with the image either.

Where the fused kernels are on (`fused_ops`, on by default on npu in the device table), attention is
instead one fused varlen call per block over every group at once (`npu_ops.FusedOps.varlen_attention`:
TND layout with cumulative group lengths, as vllm-ascend's encoder attention runs): SDPA on npu may
take its math path for a shape, and one 16,384-patch frame would then materialize ~8.6 GB of scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.config import VisionConfig
from model.layers import GatedMLP, RMSNorm
from model.npu_ops import PLAIN, DecodeOps
from model.parallel import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelContext,
    ReplicatedLinear,
    RowParallelLinear,
    TensorSource,
    _copy,
)
from model.rotary import rotate_half, vision_position_ids, vision_rotary

Run = tuple[int, int, int]  # (start row, number of groups, rows per group)
MLP_CHUNK_ROWS = 4096


def window_index(
    grid_thw: torch.Tensor, spatial_merge_size: int, window_size: int, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
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


@dataclass(frozen=True)
class VisionLayout:
    """The row order the tower works in, and its attention groups in that order.

    `order` (num_units,) permutes the input's merge units (spatial_merge_size**2 patches each) so
    that frames (images, or the frames of a video) follow one another in input order and, inside a
    frame, each window is contiguous, larger windows first. `window_runs` and `frame_runs` list the
    attention groups of the window blocks and of the full-attention blocks as runs
    (start, count, length) in patches: `count` consecutive groups of `length` rows from `start`.
    """

    order: torch.Tensor
    window_runs: list[Run]
    frame_runs: list[Run]


def _runs(lengths: torch.Tensor, unit: int) -> list[Run]:
    """Consecutive group lengths (in merge units) -> runs of equal lengths (in patches)."""
    values, counts = torch.unique_consecutive(lengths, return_counts=True)
    runs, start = [], 0
    for length, count in zip((values * unit).tolist(), counts.tolist()):
        runs.append((start, count, length))
        start += count * length
    return runs


def vision_layout(grid_thw: torch.Tensor, spatial_merge_size: int, window_size: int, patch_size: int) -> VisionLayout:
    """Row order and attention runs for images of grids `grid_thw` (num_images, 3), on the CPU.

    The windows are transformers' (`window_index`: window_size pixels square from the top-left
    corner, cut by the image edge); only their order inside a frame differs, which attention within
    a group does not see.
    """
    unit = spatial_merge_size**2
    per_window = window_size // spatial_merge_size // patch_size
    order, window_ids = window_index(grid_thw, spatial_merge_size, window_size, patch_size)
    sizes = torch.unique_consecutive(window_ids, return_counts=True)[1]  # units per window
    grid = grid_thw.long().cpu()
    frames = grid[:, 0]
    gh, gw = grid[:, 1] // spatial_merge_size, grid[:, 2] // spatial_merge_size
    windows_per_frame = (-(-gh // per_window) * -(-gw // per_window)).repeat_interleave(frames)
    window_frame = torch.arange(len(windows_per_frame)).repeat_interleave(windows_per_frame)
    # Frame first, then larger windows first; stable, so equal windows keep transformers' order.
    perm = torch.argsort(window_frame * (int(sizes.max()) + 1) - sizes, stable=True)
    new_sizes = sizes[perm]
    old_starts = (sizes.cumsum(0) - sizes)[perm]
    new_starts = new_sizes.cumsum(0) - new_sizes
    units = (old_starts - new_starts).repeat_interleave(new_sizes) + torch.arange(int(sizes.sum()))
    frame_units = (gh * gw).repeat_interleave(frames)
    return VisionLayout(order[units], _runs(new_sizes, unit), _runs(frame_units, unit))


def run_offsets(runs: list[Run]) -> list[int]:
    """Cumulative row ends of the groups of consecutive `runs`: [0, end of group 0, end of group 1, ...]."""
    offsets = [0]
    for start, count, length in runs:
        offsets.extend(start + length * (i + 1) for i in range(count))
    return offsets


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: list[Run], ops: DecodeOps = PLAIN
) -> torch.Tensor:
    """Attention within groups of consecutive rows: q, k, v (N, H, D) -> (N, H, D).

    One varlen attention over all groups, each group a sequence (`ops.varlen_attention`): the plain ops
    run one 4-D SDPA call per run, its groups as the batch (count, H, length, D); the fused kernels one
    call for all. The inputs may be strided views (rows of a fused qkv output); only the last dimension
    must be contiguous.
    """
    offsets = run_offsets(runs)
    return ops.varlen_attention(q, k, v, offsets, offsets, q.shape[-1] ** -0.5, causal=False)


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding written into `x`: x * cos + rotate_half(x) * sin."""
    rotated = rotate_half(x)
    return x.mul_(cos).addcmul_(rotated, sin)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.head_dim = config.head_dim
        self.num_heads = config.num_heads // ctx.size
        dim = config.hidden_size
        self.qkv = MergedColumnParallelLinear(dim, [dim, dim, dim], bias=True, ctx=ctx)
        self.proj = RowParallelLinear(dim, dim, bias=True, ctx=ctx)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, runs: list[Run], ops: DecodeOps = PLAIN
    ) -> torch.Tensor:
        """x (N, hidden); cos/sin (N, 1, head_dim) float32; attention within each group of `runs`."""
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)
        # Rotary in float32 as the reference does, in place on the float copy (on qkv itself when it is
        # float32): the only temporary is one (N, H, D) rotate_half.
        q, k = (_rotate_(qkv[:, i].float(), cos, sin).to(x.dtype) for i in range(2))
        out = grouped_attention(q, k, qkv[:, 2], runs, ops)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, 1e-6)
        self.norm2 = RMSNorm(config.hidden_size, 1e-6)
        self.attn = VisionAttention(config, ctx)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=True, ctx=ctx)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, runs: list[Run], ops: DecodeOps = PLAIN
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, runs, ops)
        # The MLP acts on each row alone: a few thousand rows at a time bound its (rows, 2 x intermediate)
        # temporaries whatever the image size, and its output is added in place.
        for start in range(0, x.shape[0], MLP_CHUNK_ROWS):
            rows = x[start : start + MLP_CHUNK_ROWS]
            rows += self.mlp(self.norm2(rows))
        return x


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

    # Checkpoint projection name -> (our fused module, which part of it), for loading the tower alone.
    packed_modules = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: VisionConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config, ctx) for _ in range(config.depth))
        self.merger = PatchMerger(config, ctx)
        # Whose varlen attention the blocks run: the plain ops, or the fused kernels (npu_ops.FusedOps).
        self.attention_ops: DecodeOps = PLAIN

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (num_patches, patch_dim), grid_thw (num_images, 3) -> (num_patches / merge**2, out)."""
        c = self.config
        unit = c.spatial_merge_size**2
        grid_thw = grid_thw.cpu()
        layout = vision_layout(grid_thw, c.spatial_merge_size, c.window_size, c.patch_size)
        x = self.patch_embed(pixel_values)
        n = x.shape[0]
        order = layout.order.to(x.device)
        # Whole merge units move into the layout's order; each patch's rotary angles move with it.
        cos, sin = vision_rotary(vision_position_ids(grid_thw, c.spatial_merge_size), c.head_dim, c.rope_theta)
        cos, sin = (t.view(n // unit, unit, -1)[layout.order].view(n, 1, -1).to(x.device) for t in (cos, sin))
        x = x.view(n // unit, unit, -1)[order].view(n, -1)
        for i, block in enumerate(self.blocks):
            runs = layout.frame_runs if i in c.fullatt_block_indexes else layout.window_runs
            x = block(x, cos, sin, runs, self.attention_ops)
        return self.merger(x)[torch.argsort(order)]
