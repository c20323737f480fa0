"""The vision-embedding cache: keys, LRU eviction by bytes, and ModelRunner reusing embeddings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.processor import PreparedRequest
from model.runner import ModelRunner
from model.sampling import SamplingParams
from model.vision_cache import VisionCache, image_key


def test_key_follows_pixels_and_grid() -> None:
    pixels = torch.randn(16, 8)
    grid = torch.tensor([1, 4, 4])
    key = image_key(pixels, grid)
    assert image_key(pixels.clone(), grid.clone()) == key
    changed = pixels.clone()
    changed[7, 3] += 1e-6
    assert image_key(changed, grid) != key
    assert image_key(pixels, torch.tensor([1, 2, 8])) != key
    assert image_key(pixels.double(), grid) != key
    assert image_key(pixels[::2].contiguous(), grid) != image_key(pixels[1::2].contiguous(), grid)


def test_lru_evicts_by_bytes() -> None:
    entry = torch.zeros(250)  # 1,000 bytes
    cache = VisionCache(2_500)
    cache.put(b"a", entry.clone())
    cache.put(b"b", entry.clone())
    assert cache.get(b"a") is not None  # "a" becomes the most recent
    cache.put(b"c", entry.clone())  # over budget: evicts "b", the least recently used
    assert b"b" not in cache and b"a" in cache and b"c" in cache
    assert cache.stats() == {"hits": 1, "misses": 0, "bytes": 2_000, "entries": 2}
    cache.put(b"big", torch.zeros(1_000))  # 4,000 bytes: larger than the budget, not stored
    assert b"big" not in cache and len(cache) == 2
    cache.put(b"d", torch.zeros(500))  # 2,000 bytes: evicts both others
    assert cache.get(b"a") is None and cache.get(b"d") is not None
    assert cache.stats() == {"hits": 2, "misses": 1, "bytes": 2_000, "entries": 1}
    cache.put(b"d", torch.zeros(10))  # replacing an entry frees its old bytes
    assert cache.stats()["bytes"] == 40
    with pytest.raises(ValueError, match=">= 0"):
        VisionCache(-1)


def _image(request: PreparedRequest, index: int, request_id: str) -> PreparedRequest:
    """Request `request_id` holding only image `index` of `request` (for encode_images, ids do not matter)."""
    sizes = request.image_grid_thw.prod(-1).tolist()
    start = sum(sizes[:index])
    return PreparedRequest(
        request_id, [], request.pixel_values[start : start + sizes[index]], request.image_grid_thw[index : index + 1]
    )


@pytest.fixture(scope="module")
def requests(
    tiny_checkpoint: Path, prepared: Callable[[Path], dict[str, PreparedRequest]]
) -> dict[str, PreparedRequest]:
    return prepared(tiny_checkpoint)


@pytest.fixture(scope="module")
def plain(tiny_checkpoint: Path) -> ModelRunner:
    return ModelRunner(tiny_checkpoint, max_batch_size=4, max_seq_len=256)


def test_same_image_again_hits_with_identical_embeddings_and_tokens(
    tiny_checkpoint: Path, requests: dict[str, PreparedRequest], plain: ModelRunner
) -> None:
    runner = ModelRunner(tiny_checkpoint, max_batch_size=4, max_seq_len=256, vision_cache_bytes=16 << 20)
    request = requests["one_image"]
    [expected] = plain.encode_images([request])
    [first] = runner.encode_images([request])
    assert runner.vision_cache_stats() == {"hits": 0, "misses": 1, "bytes": expected.numel() * 4, "entries": 1}
    [again] = runner.encode_images([replace(request, request_id="again")])
    assert runner.vision_cache_stats()["hits"] == 1
    assert torch.equal(first, expected) and torch.equal(again, expected)

    params = [SamplingParams(max_new_tokens=6)]
    [reference] = plain.generate([request], params, eos_token_ids=[])
    for _ in range(2):
        [result] = runner.generate([request], params, eos_token_ids=[])
        assert result.output_token_ids == reference.output_token_ids
    assert runner.vision_cache_stats() == {"hits": 3, "misses": 1, "bytes": expected.numel() * 4, "entries": 1}


def test_repeats_inside_one_batch_and_across_requests(
    tiny_checkpoint: Path, requests: dict[str, PreparedRequest], plain: ModelRunner
) -> None:
    """The second image of a two-image request sent alone, and one image twice in one batch."""
    runner = ModelRunner(tiny_checkpoint, max_batch_size=4, max_seq_len=256, vision_cache_bytes=16 << 20)
    two, one = requests["two_images"], requests["one_image"]
    batch = [two, requests["text"], one, replace(one, request_id="one_again")]
    expected = plain.encode_images(batch)
    got = runner.encode_images(batch)
    assert got[1] is None
    for ours, theirs in zip(got, expected):
        assert ours is None or torch.equal(ours, theirs)
    assert runner.vision_cache_stats() | {"bytes": 0} == {"hits": 1, "misses": 3, "bytes": 0, "entries": 3}

    second = _image(two, 1, "second_alone")
    [alone] = runner.encode_images([second])
    tokens_first = int(two.image_grid_thw[0].prod()) // 4
    assert torch.equal(alone, expected[0][tokens_first:])
    assert runner.vision_cache_stats()["hits"] == 2


def test_budget_evicts_least_recent_image(tiny_checkpoint: Path, requests: dict[str, PreparedRequest]) -> None:
    """A budget that holds the larger of two images but not both: each new image evicts the other."""
    two = requests["two_images"]
    a, b = _image(two, 0, "a"), _image(two, 1, "b")
    sizes = [int(g.prod()) // 4 * 128 * 4 for g in two.image_grid_thw]  # tokens x hidden 128 x fp32
    runner = ModelRunner(tiny_checkpoint, max_batch_size=4, max_seq_len=256, vision_cache_bytes=max(sizes))
    assert sum(sizes) > max(sizes)
    for request in (a, b, a, a):
        runner.encode_images([request])
    # a: miss, b: miss (evicts a), a: miss (evicts b), a: hit.
    assert runner.vision_cache_stats() == {"hits": 1, "misses": 3, "bytes": sizes[0], "entries": 1}


def test_no_cache_by_default(tiny_checkpoint: Path, requests: dict[str, PreparedRequest], plain: ModelRunner) -> None:
    plain.encode_images([requests["one_image"]] * 2)
    assert plain.vision_cache is None
    assert plain.vision_cache_stats() == {"hits": 0, "misses": 0, "bytes": 0, "entries": 0}
