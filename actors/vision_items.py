"""A request's vision inputs as units of vision encode: an image whole, a video one temporal slice at a time.

The vision tower attends within windows of a frame and, in its full-attention blocks, within one temporal
slice (the two frames of a video's temporal patch; an image is one slice): no attention crosses slices, and
a patch's rotary angles do not depend on its slice (model/vision.py, model/rotary.py). Encoding a video's
slices in separate calls therefore gives the embeddings of encoding it whole. The merged patches of a video
come slice by slice, so each slice's embeddings are a contiguous run of the video's image-pad tokens, and
a request's items in order are its image-pad tokens in order: the round's encoder budget
(GroupScheduler.encoder_budget) can split a long video at any slice boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class VisionItem:
    """One unit of vision encode."""

    image: int  # which of the request's vision inputs (prompt order, images and videos alike)
    slice: int  # its temporal slice (0 for an image)
    tokens: int  # its image-pad tokens in the prompt (merged patches): what it takes of the encoder budget
    input_end: int  # where its vision input's tokens end in the prompt


def vision_items(spans: Sequence[tuple[int, int]], slices: Sequence[int]) -> list[VisionItem]:
    """The items of vision inputs whose image-pad tokens are `spans` [start, end) and whose temporal slices are
    `slices` (1 for an image, grid_t for a video; empty: one slice each). ValueError when they do not fit."""
    slices = list(slices) or [1] * len(spans)
    if len(slices) != len(spans):
        raise ValueError(f"{len(slices)} slice counts for {len(spans)} vision inputs")
    items = []
    for image, ((start, end), count) in enumerate(zip(spans, slices)):
        if not isinstance(count, int) or count < 1 or (end - start) % count:
            raise ValueError(f"vision input {image}: {end - start} tokens do not split into {count!r} temporal slices")
        per = (end - start) // count
        items.extend(VisionItem(image, t, per, end) for t in range(count))
    return items


def first_to_encode(items: Sequence[VisionItem], num_cached: int) -> int:
    """The index of the first item whose vision input ends after the first `num_cached` prompt tokens (len(items):
    none). An input wholly inside a cached prefix needs no encode; one that ends after it is encoded whole,
    since the workers take the embeddings of whole inputs (model.batch.RunningBatch.admit)."""
    return next((i for i, item in enumerate(items) if item.input_end > num_cached), len(items))
