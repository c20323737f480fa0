"""Rotary embeddings: 3-D M-RoPE for the text decoder and 2-D rotary for the vision tower.

Position ids are computed by pure functions here so they can be tested without a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., heads, seq, head_dim) or broadcast-compatible with cos/sin."""
    return x * cos + rotate_half(x) * sin


def mrope_positions(
    input_ids: Sequence[int],
    image_grid_thw: torch.Tensor | None,
    image_token_id: int,
    spatial_merge_size: int,
    video_token_id: int | None = None,
    second_per_grid_ts: Sequence[float | None] | None = None,
    tokens_per_second: float = 2.0,
) -> tuple[torch.Tensor, int]:
    """3-D positions (temporal, height, width) for one prompt, and the offset decode positions use.

    Text tokens advance all three axes together. The tokens of each vision input (a run of image-pad
    or video-pad tokens; `image_grid_thw` holds every input's grid in prompt order, images and videos
    alike) take a (t, h, w) grid starting at the current position; a video's temporal patch i sits at
    ``int(i * second_per_grid_ts * tokens_per_second)`` (float32, as transformers computes it), an
    image's single patch at 0. `second_per_grid_ts` has one entry per input, None for an image (None
    as a whole: all images). Text after an input resumes at the input's largest position + 1 over the
    three axes (the definition in the model authors' get_rope_index docstring; for an image this is
    start + max(h, w)). Returns (positions (3, L) int64, rope_delta) where the token at cache index
    i >= L sits at position i + rope_delta on all three axes.
    """
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)
    length = ids.numel()
    positions = torch.empty(3, length, dtype=torch.long)
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in image_grid_thw.tolist()]
    seconds = list(second_per_grid_ts) if second_per_grid_ts is not None else [None] * len(grids)
    if len(seconds) != len(grids):
        raise ValueError(f"{len(seconds)} second_per_grid_ts entries for {len(grids)} vision inputs")
    is_vision = (ids == image_token_id) if video_token_id is None else (ids == image_token_id) | (ids == video_token_id)
    is_image = is_vision.tolist()
    i, current, image = 0, 0, 0
    while i < length:
        if not is_image[i]:
            j = i
            while j < length and not is_image[j]:
                j += 1
            positions[:, i:j] = torch.arange(current, current + j - i)
            current += j - i
            i = j
            continue
        if image >= len(grids):
            raise ValueError(f"prompt has more image or video pad runs than images and videos ({len(grids)})")
        t, h, w = grids[image]
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        n = t * gh * gw
        if i + n > length or not all(is_image[i : i + n]) or ids[i : i + n].unique().numel() != 1:
            raise ValueError(f"image or video {image} needs {n} pad tokens of one kind at position {i}")
        times = torch.arange(t)
        if seconds[image] is not None:
            interval = tokens_per_second * torch.tensor(seconds[image], dtype=torch.float32)
            times = (times * interval).long()
        tt, hh, ww = torch.meshgrid(times, torch.arange(gh), torch.arange(gw), indexing="ij")
        span = torch.stack([tt, hh, ww]).reshape(3, n) + current
        positions[:, i : i + n] = span
        current = int(span.max()) + 1
        i += n
        image += 1
    if image != len(grids):
        raise ValueError(f"prompt has {image} image or video pad runs but {len(grids)} images and videos")
    delta = (int(positions.max()) + 1 - length) if length else 0
    return positions, delta


class MRotaryEmbedding(torch.nn.Module):
    """cos/sin for the text decoder; each section of the frequency axis follows one of (t, h, w)."""

    def __init__(self, head_dim: int, theta: float, mrope_section: Sequence[int]) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # For each frequency index, which of the three position axes drives it.
        axis = torch.cat([torch.full((s,), i % 3) for i, s in enumerate(mrope_section)])
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (3, ...) -> cos, sin of shape (..., head_dim)."""
        freqs = positions.unsqueeze(-1).float() * self.inv_freq  # (3, ..., head_dim/2)
        freqs = torch.gather(freqs, 0, self.axis.expand_as(freqs[:1]).long()).squeeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def text_only(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin when all three axes share the same positions (every decode step)."""
        freqs = positions.unsqueeze(-1).float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def vision_position_ids(grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """(row, col) of every patch, in the block-major order the image processor emits patches.

    Returns (num_patches, 2): patches come in merge-size x merge-size blocks, blocks row-major.
    """
    out = []
    m = spatial_merge_size
    for t, h, w in grid_thw.tolist():
        hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        hpos = hpos.reshape(block).transpose(1, 2).flatten()
        wpos = wpos.reshape(block).transpose(1, 2).flatten()
        out.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
    return torch.cat(out)


def vision_rotary(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (num_patches, head_dim): half the frequencies follow the row, half the column."""
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float32) / quarter))
    freqs = position_ids.unsqueeze(-1).float() * inv_freq  # (N, 2, head_dim/4)
    freqs = freqs.flatten(1)  # (N, head_dim/2): row frequencies then column frequencies
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
