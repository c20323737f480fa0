"""Pure position functions against transformers: M-RoPE position ids and vision window order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.vision_utils import get_vision_window_index

from model.rotary import mrope_positions
from model.vision import window_index

IMAGE = 7  # image-pad token id in these synthetic prompts
MERGE = 2


def hf_rope_index(ids: list[int], grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
    """transformers' get_rope_index for one prompt, without building a model."""
    config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=MERGE, tokens_per_second=2))
    fake_model = SimpleNamespace(
        config=config, get_vision_position_ids=lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(None, *a, **k)
    )
    input_ids = torch.tensor([ids])
    positions, deltas = Qwen2_5_VLModel.get_rope_index(
        fake_model, input_ids, (input_ids == IMAGE).int(), image_grid_thw=torch.tensor(grids) if grids else None
    )
    return positions[:, 0], int(deltas[0, 0])


def prompt(*parts: int | tuple[int, int, int]) -> tuple[list[int], list[tuple[int, int, int]]]:
    """parts: an int n is n text tokens, a tuple is an image grid (t, h, w) in patches."""
    ids, grids = [], []
    for part in parts:
        if isinstance(part, tuple):
            t, h, w = part
            ids += [IMAGE] * (t * h * w // MERGE**2)
            grids.append(part)
        else:
            ids += [100 + (len(ids) + i) % 50 for i in range(part)]
    return ids, grids


PROMPTS = {
    "text_only": prompt(17),
    "one_image": prompt(5, (1, 8, 10), 9),
    "two_images_text_between": prompt(3, (1, 14, 6), 4, (1, 12, 18), 6),
    "image_at_start": prompt((1, 4, 6), 8),
    "image_at_end": prompt(6, (1, 10, 4)),
    "image_only": prompt((1, 6, 6)),
    "square_then_tall": prompt(2, (1, 8, 8), 1, (1, 16, 4), 3),
    "two_frames": prompt(4, (2, 6, 8), 5),
}


@pytest.mark.parametrize("name", PROMPTS)
def test_mrope_positions_match_transformers(name: str) -> None:
    ids, grids = PROMPTS[name]
    ours, delta = mrope_positions(ids, torch.tensor(grids) if grids else None, IMAGE, MERGE)
    theirs, their_delta = hf_rope_index(ids, grids)
    assert torch.equal(ours, theirs)
    assert delta == their_delta


def test_mrope_positions_reject_wrong_image_count() -> None:
    ids, grids = prompt(3, (1, 4, 4), 2)
    with pytest.raises(ValueError, match="image"):
        mrope_positions(ids, torch.tensor(grids * 2), IMAGE, MERGE)
    with pytest.raises(ValueError, match="image"):
        mrope_positions(ids, torch.tensor([(1, 8, 8)]), IMAGE, MERGE)


GRIDS = {
    "one_window": [(1, 8, 8)],
    "exact_multiple": [(1, 16, 24)],
    "not_multiple": [(1, 14, 6)],
    "one_unit": [(1, 2, 2)],
    "wide_thin": [(1, 2, 30)],
    "several_images": [(1, 8, 10), (1, 14, 6), (1, 12, 18), (1, 4, 6)],
    "two_frames": [(2, 10, 12)],
}


@pytest.mark.parametrize("window_size", [56, 112, 224])
@pytest.mark.parametrize("name", GRIDS)
def test_window_index_matches_transformers(name: str, window_size: int) -> None:
    grid = torch.tensor(GRIDS[name])
    order, window_ids = window_index(grid, MERGE, window_size, 14)
    their_order, cu_seqlens = get_vision_window_index(grid, MERGE, window_size, 14)
    assert torch.equal(order, their_order)
    # Our per-unit window ids, as cumulative patch counts per window, give transformers' boundaries.
    assert torch.equal(window_ids, torch.sort(window_ids).values), "window ids must be contiguous"
    counts = torch.unique_consecutive(window_ids, return_counts=True)[1] * MERGE**2
    ours_cu = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    assert torch.equal(ours_cu, cu_seqlens.long())
