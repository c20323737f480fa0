"""Model configuration read from a Hugging Face Qwen2.5-VL checkpoint directory.

Two `config.json` layouts exist: the released one (text fields at the top level,
`rope_scaling.mrope_section`, nested `vision_config`) and the one transformers 5 writes
(text fields under `text_config`, `rope_parameters`). Both map onto the same dataclasses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelConfigError(ValueError):
    """A checkpoint's configuration is missing, malformed or does not fit the requested layout."""


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    tokens_per_second: float = 2.0  # M-RoPE time positions per second of video
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch as the image processor emits it."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    mrope_section: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 128_000
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> ModelConfig:
        """Read `config.json` (and `generation_config.json` for EOS ids) from a checkpoint directory."""
        path = Path(model_path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelConfigError(f"model_path {str(path)!r} has no config.json")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{config_file} is not valid JSON: {e}") from e
        generation = {}
        if (path / "generation_config.json").is_file():
            generation = json.loads((path / "generation_config.json").read_text())
        config = _parse(raw, generation, source=str(config_file))
        config.validate()
        return config

    def validate(self) -> None:
        """Check internal consistency; errors name the offending field."""
        t, v = self.text, self.vision
        _require(
            t.hidden_size % t.num_attention_heads == 0,
            "hidden_size",
            t.hidden_size,
            f"must be divisible by num_attention_heads={t.num_attention_heads}",
        )
        _require(
            t.num_attention_heads % t.num_key_value_heads == 0,
            "num_key_value_heads",
            t.num_key_value_heads,
            f"must divide num_attention_heads={t.num_attention_heads}",
        )
        _require(
            sum(t.mrope_section) * 2 == t.head_dim,
            "mrope_section",
            list(t.mrope_section),
            f"must sum to head_dim/2={t.head_dim // 2}",
        )
        _require(
            v.hidden_size % v.num_heads == 0,
            "vision_config.hidden_size",
            v.hidden_size,
            f"must be divisible by vision_config.num_heads={v.num_heads}",
        )
        _require(
            v.out_hidden_size == t.hidden_size,
            "vision_config.out_hidden_size",
            v.out_hidden_size,
            f"must equal hidden_size={t.hidden_size}",
        )
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        _require(
            not bad,
            "vision_config.fullatt_block_indexes",
            list(v.fullatt_block_indexes),
            f"must all be < depth={v.depth}",
        )

    def validate_tp(self, tp_size: int) -> None:
        """Check that the text model shards over `tp_size` ranks (the vision tower may run unsharded)."""
        t = self.text
        _require(tp_size >= 1, "tp_size", tp_size, "must be >= 1")
        _require(
            t.num_attention_heads % tp_size == 0,
            "parallel_config.tp_size",
            tp_size,
            f"must divide num_attention_heads={t.num_attention_heads}",
        )
        _require(
            t.intermediate_size % tp_size == 0,
            "parallel_config.tp_size",
            tp_size,
            f"must divide intermediate_size={t.intermediate_size}",
        )
        kv = t.num_key_value_heads
        _require(
            kv % tp_size == 0 or tp_size % kv == 0,
            "parallel_config.tp_size",
            tp_size,
            f"must divide num_key_value_heads={kv} or be a multiple of it",
        )

    def vision_divides(self, tp_size: int) -> bool:
        """Whether the vision tower's heads and MLP split evenly over `tp_size` ranks."""
        v = self.vision
        return v.num_heads % tp_size == 0 and v.intermediate_size % tp_size == 0


def _require(ok: bool, field: str, value: Any, why: str) -> None:
    if not ok:
        raise ModelConfigError(f"{field}={value!r} {why}")


def _parse(raw: dict, generation: dict, source: str) -> ModelConfig:
    text_raw = raw.get("text_config") or raw
    vision_raw = raw.get("vision_config")
    if vision_raw is None:
        raise ModelConfigError(f"{source} has no vision_config: not a Qwen2.5-VL checkpoint")
    rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or raw.get("rope_scaling") or {}
    try:
        text = TextConfig(
            hidden_size=int(text_raw["hidden_size"]),
            intermediate_size=int(text_raw["intermediate_size"]),
            num_hidden_layers=int(text_raw["num_hidden_layers"]),
            num_attention_heads=int(text_raw["num_attention_heads"]),
            num_key_value_heads=int(text_raw.get("num_key_value_heads", text_raw["num_attention_heads"])),
            vocab_size=int(text_raw["vocab_size"]),
            mrope_section=tuple(int(x) for x in rope.get("mrope_section", (16, 24, 24))),
            rms_norm_eps=float(text_raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", text_raw.get("rope_theta", raw.get("rope_theta", 1e6)))),
            max_position_embeddings=int(text_raw.get("max_position_embeddings", 128_000)),
            hidden_act=str(text_raw.get("hidden_act", "silu")),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", False))),
        )
        vision_rope = vision_raw.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=int(vision_raw["depth"]),
            hidden_size=int(vision_raw["hidden_size"]),
            num_heads=int(vision_raw["num_heads"]),
            intermediate_size=int(vision_raw["intermediate_size"]),
            out_hidden_size=int(vision_raw.get("out_hidden_size", text_raw["hidden_size"])),
            patch_size=int(vision_raw.get("patch_size", vision_raw.get("spatial_patch_size", 14))),
            temporal_patch_size=int(vision_raw.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vision_raw.get("spatial_merge_size", 2)),
            window_size=int(vision_raw.get("window_size", 112)),
            fullatt_block_indexes=tuple(int(i) for i in vision_raw.get("fullatt_block_indexes", (7, 15, 23, 31))),
            in_channels=int(vision_raw.get("in_channels", vision_raw.get("in_chans", 3))),
            hidden_act=str(vision_raw.get("hidden_act", "silu")),
            rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
            tokens_per_second=float(vision_raw.get("tokens_per_second", 2)),
        )
    except KeyError as e:
        raise ModelConfigError(f"{source} is missing the field {e.args[0]!r}") from e
    for act, field in ((text.hidden_act, "hidden_act"), (vision.hidden_act, "vision_config.hidden_act")):
        if act != "silu":
            raise ModelConfigError(f"{field}={act!r} is not supported (only 'silu')")

    eos = generation.get("eos_token_id", text_raw.get("eos_token_id", raw.get("eos_token_id")))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))

    def token_id(name: str, default: int) -> int:
        return int(raw.get(name, text_raw.get(name, default)))

    return ModelConfig(
        text=text,
        vision=vision,
        image_token_id=token_id("image_token_id", 151655),
        video_token_id=token_id("video_token_id", 151656),
        vision_start_token_id=token_id("vision_start_token_id", 151652),
        eos_token_ids=eos_ids,
    )
