"""Session fixtures for the model tests: tiny checkpoints, generated images, prompts, a cached reference.

Checkpoints are built once per session into a temporary directory; transformers' reference model
of each is loaded once and its outputs memoized (tests/reference.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.processor import PreparedRequest, PromptBuilder
from model.tiny_checkpoint import TinySpec, build_tiny_checkpoint
from tests.reference import HFReference

# Checkpoints by name. "odd" has shapes unlike the default on every axis that can vary: 3 heads of
# 32 with one KV head, an odd vocabulary, a 3-head vision tower with 2x2-unit windows and one
# full-attention block. "tp_odd" is the same idea with 4 text heads, so that it shards over tp 2
# and 4 while its single KV head, vocabulary 1001 and 3 vision heads do not divide.
CHECKPOINT_SPECS: dict[str, TinySpec] = {
    "default": TinySpec(),
    "sharded": TinySpec(num_shards=3),
    "transformers5": TinySpec(layout="transformers5"),
    "odd": TinySpec(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, intermediate_size=160,
                    vocab_size=1001, vision_depth=3, vision_hidden_size=48, vision_num_heads=3,
                    vision_intermediate_size=80, fullatt_block_indexes=[0], window_size=56, seed=1),
    "tp_odd": TinySpec(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, intermediate_size=192,
                       vocab_size=1001, vision_depth=3, vision_hidden_size=48, vision_num_heads=3,
                       vision_intermediate_size=96, fullatt_block_indexes=[2], window_size=56, seed=2),
}

# Test images by name: (width, height). "small" is below min_pixels and gets scaled up; "large"
# is above max_pixels and gets scaled down; none is a multiple of the 112-pixel window.
IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "wide": (150, 100),
    "tall": (90, 200),
    "small": (40, 30),
    "large": (330, 250),
}

# Requests by name: prompt text and image names.
PROMPTS: dict[str, tuple[str, list[str]]] = {
    "text": ("Hello there, tell me a story.", []),
    "text_long": ("Describe the weather today and tomorrow, then summarize the report and explain "
                  "why the team decided to change the design of the model.", []),
    "one_image": ("What is in this photo?", ["wide"]),
    "small_image": ("Describe the image in detail.", ["small"]),
    "two_images": ("Compare the first image and the second image.", ["tall", "large"]),
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """checkpoint(name) -> path of the tiny checkpoint CHECKPOINT_SPECS[name], built on first use."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_tiny_checkpoint(root / name, CHECKPOINT_SPECS[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint: Callable[[str], Path]) -> Path:
    """The default tiny checkpoint."""
    return checkpoint("default")


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seeded random RGB images of different sizes, saved as PNG: name -> path."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (width, height) in IMAGE_SIZES.items():
        # Smooth gradients plus noise, so the vision tower sees structure as well as texture.
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        paths[name] = root / f"{name}.png"
        Image.fromarray(pixels).save(paths[name])
    return paths


@pytest.fixture(scope="session")
def prepared(sample_images: dict[str, Path]) -> Callable[[Path], dict[str, PreparedRequest]]:
    """prepared(checkpoint path) -> PROMPTS built with that checkpoint's tokenizer and processor."""
    cache: dict[Path, dict[str, PreparedRequest]] = {}

    def get(path: Path) -> dict[str, PreparedRequest]:
        if path not in cache:
            builder = PromptBuilder.from_pretrained(path)
            cache[path] = {
                name: builder.build({"id": name, "prompt": prompt, "images": [str(sample_images[i]) for i in images]})
                for name, (prompt, images) in PROMPTS.items()
            }
        return cache[path]

    return get


@pytest.fixture(scope="session")
def hf_reference() -> HFReference:
    """transformers' model per checkpoint, with memoized generations and logits."""
    return HFReference()
