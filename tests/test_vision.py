"""The vision tower against transformers: window layout, embeddings, and no score tensor over a whole frame.

Images of odd sizes (windows cut by the image edge), several images per request, and two-frame
grids; the default tiny checkpoint (112-pixel windows, two full-attention blocks) and the "odd" one
(56-pixel windows, 3 heads, full attention in block 0).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.vision_utils import get_vision_window_index

from model import vision
from model.processor import PreparedRequest
from model.runner import ModelRunner
from model.vision import grouped_attention, vision_layout
from tests.reference import HFReference

MERGE = 2
ATOL = 1e-4

GRIDS = {
    "edge_cut": [(1, 14, 6)],
    "exact_windows": [(1, 16, 24)],
    "one_unit": [(1, 2, 2)],
    "wide_thin": [(1, 2, 30)],
    "several_images": [(1, 8, 10), (1, 14, 6), (1, 12, 18), (1, 4, 6)],
    "same_size_images": [(1, 8, 8), (1, 8, 8), (1, 10, 10)],
    "two_frames": [(2, 10, 12)],
}


def _groups(order: torch.Tensor, bounds: list[tuple[int, int]]) -> list[frozenset[int]]:
    """The input merge units of each group [start, end) of units in the reordered sequence."""
    return [frozenset(order[start:end].tolist()) for start, end in bounds]


@pytest.mark.parametrize("window_size", [56, 112])
@pytest.mark.parametrize("name", GRIDS)
def test_layout_groups_are_transformers_windows_and_frames(name: str, window_size: int) -> None:
    grid = torch.tensor(GRIDS[name])
    unit = MERGE**2
    layout = vision_layout(grid, MERGE, window_size, 14)
    their_order, cu = get_vision_window_index(grid, MERGE, window_size, 14)
    theirs = _groups(their_order, [(a // unit, b // unit) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])

    def bounds(runs: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
        return [((s + i * n) // unit, (s + (i + 1) * n) // unit) for s, c, n in runs for i in range(c)]

    ours = _groups(layout.order, bounds(layout.window_runs))
    assert sorted(layout.order.tolist()) == list(range(int(grid.prod(-1).sum()) // unit))
    assert sorted(ours, key=min) == sorted(theirs, key=min)
    # Full attention: one group per frame, the units of that frame, frames in input order.
    frame_sizes = [h * w // unit for t, h, w in GRIDS[name] for _ in range(t)]
    starts = torch.tensor([0, *frame_sizes]).cumsum(0).tolist()
    frames = [frozenset(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
    assert _groups(layout.order, bounds(layout.frame_runs)) == frames
    # Windows of one size are one run: at most interior, right edge, bottom edge and corner per frame.
    assert len(layout.window_runs) <= 4 * len(frame_sizes)


@pytest.mark.parametrize("runs", [[(0, 1, 12)], [(0, 3, 4)], [(0, 2, 4), (8, 1, 3), (11, 1, 1)]])
def test_grouped_attention_is_attention_within_each_group(runs: list[tuple[int, int, int]]) -> None:
    """Against one masked SDPA over all rows (block-diagonal mask), on strided views of a fused qkv."""
    torch.manual_seed(0)
    n, heads, dim = 12, 2, 8
    qkv = torch.randn(n, 3, heads, dim)
    group = torch.cat([torch.arange(c).repeat_interleave(length) + 100 * i for i, (_, c, length) in enumerate(runs)])
    mask = group[:, None] == group[None, :]
    q, k, v = (qkv[:, i].transpose(0, 1)[None] for i in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0].transpose(0, 1)
    ours = grouped_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], runs)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mlp_rows", [None, 100], ids=["mlp_whole", "mlp_in_chunks"])
@pytest.mark.parametrize("checkpoint_name", ["default", "odd"])
def test_tower_matches_transformers(
    checkpoint_name: str,
    mlp_rows: int | None,
    checkpoint: Callable[[str], Path],
    hf_reference: HFReference,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if mlp_rows is not None:  # the default chunk is larger than these images: cut them, at odd rows
        monkeypatch.setattr(vision, "MLP_CHUNK_ROWS", mlp_rows)
    path = checkpoint(checkpoint_name)
    runner = ModelRunner(path, max_batch_size=1, max_seq_len=64)
    visual = hf_reference.model(path).model.visual
    torch.manual_seed(0)
    for name in ("edge_cut", "several_images", "same_size_images", "two_frames", "wide_thin"):
        grid = torch.tensor(GRIDS[name])
        pixels = torch.randn(int(grid.prod(-1).sum()), runner.config.vision.patch_dim)
        with torch.inference_mode():
            ours = runner.model.visual(pixels, grid)
            theirs = visual(pixels, grid_thw=grid).pooler_output
        diff = (ours - theirs).abs().max().item()
        assert diff <= ATOL, f"{checkpoint_name}/{name}: max |diff| {diff:.3g}"


@pytest.mark.parametrize("checkpoint_name", ["default", "odd"])
def test_encode_images_matches_get_image_features(
    checkpoint_name: str,
    checkpoint: Callable[[str], Path],
    prepared: Callable[[Path], dict[str, PreparedRequest]],
    hf_reference: HFReference,
) -> None:
    """A batch with a text request and requests of one and two images, as the processor prepares them."""
    path = checkpoint(checkpoint_name)
    requests = [prepared(path)[n] for n in ("two_images", "text", "one_image", "small_image")]
    runner = ModelRunner(path, max_batch_size=4, max_seq_len=64)
    embeds = runner.encode_images(requests)
    model = hf_reference.model(path).model
    for request, ours in zip(requests, embeds):
        if request.image_grid_thw is None:
            assert ours is None
            continue
        with torch.inference_mode():
            theirs = torch.cat(model.get_image_features(request.pixel_values, request.image_grid_thw).pooler_output)
        diff = (ours - theirs).abs().max().item()
        assert diff <= ATOL, f"{checkpoint_name}/{request.request_id}: max |diff| {diff:.3g}"


def test_no_allocation_grows_with_the_square_of_a_frame(tiny_checkpoint: Path) -> None:
    """4,096 patches through the default tower (two full-attention blocks): one head's score matrix over
    the frame would be 64 MiB; the largest single allocation stays far below (fused SDPA, 4-D inputs)."""
    runner = ModelRunner(tiny_checkpoint, max_batch_size=1, max_seq_len=64)
    grid = torch.tensor([[1, 64, 64]])
    pixels = torch.randn(64 * 64, runner.config.vision.patch_dim)
    with (
        torch.inference_mode(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        runner.model.visual(pixels, grid)
    largest = max(prof.events(), key=lambda e: e.cpu_memory_usage)  # bytes allocated inside one op, children included
    one_head_scores = 4096 * 4096 * 4
    assert 0 < largest.cpu_memory_usage < one_head_scores // 8, (
        f"{largest.name} allocates {largest.cpu_memory_usage / 2**20:.1f} MiB"
    )
