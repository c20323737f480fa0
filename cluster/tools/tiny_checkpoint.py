"""Offline tiny random Qwen2.5-VL checkpoints with the files of the released Instruct repos.

A checkpoint holds config.json, generation_config.json, safetensors weights (one file or
shards with an index), a small byte-level BPE tokenizer with Qwen's special tokens and chat
template, and preprocessor_config.json. Building needs no network and no downloaded weights.

CLI: ``python -m cluster.tools.tiny_checkpoint OUT_DIR [--hidden-size N ...] [--force]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

if TYPE_CHECKING:
    from transformers import Qwen2_5_VLForConditionalGeneration

LAYOUTS = ("released", "transformers5")
MARKER_FILE = "tiny_spec.json"
MARKER_VERSION = 2  # bump whenever the files written for a given spec change

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2.5's tool-call tags: added tokens that are not special (they stay in decoded text), as in the real
# tokenizer, where a call is `<tool_call>` + JSON + `</tool_call>`.
TOOL_TOKENS = ("<tool_call>", "</tool_call>")

QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

BPE_TRAINER_VOCAB = 640
LM_HEAD_SCALE = 4.0

TOKENIZER_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words, and this
picture shows a small red house next to a tall green tree under a bright blue sky.
Describe the image in detail. What is in this photo? How many people are standing on the
street? The woman on the left is holding an umbrella, while the man on the right reads a
newspaper. There are three cats sleeping on the sofa and one dog watching them from the door.
Please answer the question about the chart: which year had the highest sales? The sales grew
from 2019 to 2023, with the largest increase between 2021 and 2022.
You are a helpful assistant. I am happy to help you with your question. Here is a short
summary of the document: the report explains how the system works, what the results were,
and why the team decided to change the design of the model.
Once upon a time there was a little girl who lived in a village near the forest. Every day she
walked to the river to look at the water, the birds, the flowers and the mountains far away.
In the kitchen, a bowl of fresh fruit sits on the wooden table: apples, oranges, bananas and
grapes. The window is open and the morning light falls on the white wall.
The train leaves the station at seven o'clock and arrives in the city at nine. Passengers
should have their tickets ready. Don't forget your bag! It's raining, so we'll take the bus.
Mathematics is the study of numbers, shapes and patterns. For example, 3 + 4 = 7 and 12 / 4 = 3.
The computer program reads the input, processes the data and writes the output to a file.
Machine learning models learn from examples; a larger model needs more data and more compute.
This text contains letters, numbers, punctuation (commas, periods, colons; semicolons), quotes
"like these" and 'these', and symbols such as #, $, %, & and @ for variety.
The weather today is sunny with a few clouds. Tomorrow there will be rain in the afternoon and
strong wind in the evening. Temperatures will stay between ten and eighteen degrees.
Look at the first image and the second image. Compare them and tell me what is different.
The cat in the first picture is black, and the cat in the second picture is white and brown.
"""


@dataclass
class TinySpec:
    """Sizes and options of a tiny random Qwen2.5-VL checkpoint."""

    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 1000
    mrope_section: list[int] | None = None
    vision_depth: int = 4
    vision_hidden_size: int = 64
    vision_num_heads: int = 4
    vision_intermediate_size: int = 128
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [1, 3])
    window_size: int = 112
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    num_shards: int = 1
    layout: str = "released"
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 64
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def resolved_mrope_section(self) -> list[int]:
        """The M-RoPE section, or Qwen's [16, 24, 24] split scaled to head_dim // 2."""
        if self.mrope_section is not None:
            return list(self.mrope_section)
        half = self.head_dim // 2
        temporal = round(half * 16 / 64)
        height = round(half * 24 / 64)
        return [temporal, height, half - temporal - height]

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        positive = (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "vision_depth",
            "vision_hidden_size",
            "vision_num_heads",
            "vision_intermediate_size",
            "window_size",
            "patch_size",
            "spatial_merge_size",
            "temporal_patch_size",
            "num_shards",
            "min_pixels",
            "max_pixels",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TinySpec.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"TinySpec.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"TinySpec.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"TinySpec.hidden_size / num_attention_heads = {self.head_dim} must be even")
        section = self.resolved_mrope_section()
        if len(section) != 3 or any(not isinstance(s, int) or s <= 0 for s in section):
            raise ValueError(f"TinySpec.mrope_section must be three positive ints, got {section}")
        if sum(section) != self.head_dim // 2:
            raise ValueError(
                f"TinySpec.mrope_section {section} sums to {sum(section)}, "
                f"but must sum to head_dim // 2 = {self.head_dim // 2}"
            )
        if self.vision_hidden_size % self.vision_num_heads:
            raise ValueError(
                f"TinySpec.vision_hidden_size ({self.vision_hidden_size}) must be divisible by "
                f"vision_num_heads ({self.vision_num_heads})"
            )
        vision_head_dim = self.vision_hidden_size // self.vision_num_heads
        if vision_head_dim % 4:
            raise ValueError(
                f"TinySpec.vision_hidden_size / vision_num_heads = {vision_head_dim} must be divisible by 4"
                " (2D rotary embedding)"
            )
        depth = self.vision_depth
        bad = [i for i in self.fullatt_block_indexes if not isinstance(i, int) or not 0 <= i < depth]
        if bad:
            raise ValueError(
                f"TinySpec.fullatt_block_indexes {self.fullatt_block_indexes}: {bad} not in "
                f"[0, vision_depth={self.vision_depth})"
            )
        if len(set(self.fullatt_block_indexes)) != len(self.fullatt_block_indexes):
            raise ValueError(f"TinySpec.fullatt_block_indexes has duplicates: {self.fullatt_block_indexes}")
        merged_patch = self.patch_size * self.spatial_merge_size
        if self.window_size % merged_patch:
            raise ValueError(
                f"TinySpec.window_size ({self.window_size}) must be a multiple of "
                f"patch_size * spatial_merge_size = {merged_patch}"
            )
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"TinySpec.min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        if self.max_pixels < merged_patch**2:
            raise ValueError(
                f"TinySpec.max_pixels ({self.max_pixels}) is below one merged patch ({merged_patch**2} pixels)"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(f"TinySpec.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"TinySpec.seed must be an int, got {self.seed!r}")


# Named shapes used by the tests, benchmarks and checks. Built checkpoints are cached by their spec, so
# a preset's values never change; a new shape gets a new name.
_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Qwen2.5-0.5B's text shape (untied LM head) and a 2-block vision tower.
    "small": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, vision_depth=2, vision_hidden_size=128, vision_num_heads=4,
        vision_intermediate_size=256, fullatt_block_indexes=[1],
    ),
    # Unlike the default on every axis that can vary: 3 heads of 32 with one KV head, an odd vocabulary,
    # a 3-head vision tower with 2x2-unit windows and one full-attention block.
    "odd": dict(
        hidden_size=96, num_attention_heads=3, num_key_value_heads=1, intermediate_size=160, vocab_size=1001,
        vision_depth=3, vision_hidden_size=48, vision_num_heads=3, vision_intermediate_size=80,
        fullatt_block_indexes=[0], window_size=56, seed=1,
    ),
    # The odd text model of "odd" with the default vision tower.
    "odd_text": dict(
        hidden_size=96, num_attention_heads=3, num_key_value_heads=1, intermediate_size=160, vocab_size=1001, seed=1
    ),
    # "odd" with 4 text heads, so that it shards over tp 2 and 4 while its single KV head, vocabulary 1001
    # and 3 vision heads do not divide.
    "tp_odd": dict(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=1, intermediate_size=192, vocab_size=1001,
        vision_depth=3, vision_hidden_size=48, vision_num_heads=3, vision_intermediate_size=96,
        fullatt_block_indexes=[2], window_size=56, seed=2,
    ),
    # About 210 MB of fp32 weights, 95% of them in two wide decoder layers; a 1-block vision tower.
    "wide": dict(
        hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, intermediate_size=2048,
        num_hidden_layers=2, vocab_size=1000, vision_depth=1, fullatt_block_indexes=[0],
    ),
}  # fmt: skip
PRESETS = tuple(_PRESETS)


def preset(name: str, **changes: Any) -> TinySpec:
    """A fresh TinySpec of the named shape (one of PRESETS), with `changes` (e.g. num_shards=3) on top."""
    if name not in _PRESETS:
        raise ValueError(f"unknown tiny checkpoint preset {name!r}; choose from {PRESETS}")
    return TinySpec(**copy.deepcopy(_PRESETS[name]), **changes)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE in Qwen2's configuration, trained on the embedded corpus, plus Qwen's specials."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix=""))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=BPE_TRAINER_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TOKENIZER_CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in SPECIAL_TOKENS]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False) for t in TOOL_TOKENS]
    )
    return tokenizer


def _special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    ids: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *TOOL_TOKENS):
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise RuntimeError(f"added token {token} missing from the trained tokenizer")
        ids[token] = token_id
    return ids


def _tokenizer_config(special_ids: dict[str, int]) -> dict:
    added = {
        str(special_ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in (*SPECIAL_TOKENS, *TOOL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": QWEN2_5_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def released_config(spec: TinySpec, special_ids: dict[str, int]) -> dict:
    """config.json in the flat layout of the released Qwen2.5-VL-*-Instruct repos."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
        "vision_start_token_id": special_ids["<|vision_start|>"],
        "vision_end_token_id": special_ids["<|vision_end|>"],
        "vision_token_id": special_ids["<|vision_pad|>"],
        "image_token_id": special_ids["<|image_pad|>"],
        "video_token_id": special_ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": 128000,
        "max_window_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"type": "mrope", "mrope_section": spec.resolved_mrope_section()},
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": spec.vision_depth,
            "hidden_act": "silu",
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": spec.vision_intermediate_size,
            "num_heads": spec.vision_num_heads,
            "in_chans": 3,
            "out_hidden_size": spec.hidden_size,
            "patch_size": spec.patch_size,
            "spatial_merge_size": spec.spatial_merge_size,
            "spatial_patch_size": spec.patch_size,
            "window_size": spec.window_size,
            "fullatt_block_indexes": list(spec.fullatt_block_indexes),
            "tokens_per_second": 2,
            "temporal_patch_size": spec.temporal_patch_size,
        },
        "vocab_size": spec.vocab_size,
    }


def _generation_config(special_ids: dict[str, int]) -> dict:
    return {
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
        "pad_token_id": special_ids["<|endoftext|>"],
    }


def _preprocessor_config(spec: TinySpec) -> dict:
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": OPENAI_CLIP_STD,
        "max_pixels": spec.max_pixels,
        "merge_size": spec.spatial_merge_size,
        "min_pixels": spec.min_pixels,
        "patch_size": spec.patch_size,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "temporal_patch_size": spec.temporal_patch_size,
    }


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def random_model(spec: TinySpec, config: dict) -> Qwen2_5_VLForConditionalGeneration:
    """A transformers model with random weights scaled so that greedy decoding is well separated.

    Linear and conv weights are normal with std 1/sqrt(fan_in), embeddings std 1, norm weights
    near 1 and biases small but non-zero. The LM head is scaled up so that top-1 and top-2
    logits are rarely near ties.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # slow import, only when building

    hf_config = Qwen2_5_VLConfig(**copy.deepcopy(config))
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_config).float().eval()
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("embed_tokens.weight"):
                param.copy_(noise)
            elif name.endswith("bias"):
                param.copy_(0.02 * noise)
            elif param.dim() == 1:
                param.copy_(1.0 + 0.1 * noise)
            else:
                scale = LM_HEAD_SCALE if name == "lm_head.weight" else 1.0
                param.copy_(noise * scale / math.sqrt(math.prod(param.shape[1:])))
    return model


def to_layout(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename transformers-5 parameter names to the given checkpoint layout."""
    if layout == "transformers5":
        return dict(state_dict)
    renamed = {}
    for key, tensor in state_dict.items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model.") :]
        elif key.startswith("model.visual."):
            key = key[len("model.") :]
        renamed[key] = tensor
    return renamed


def split_shards(tensors: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    """Split tensors, in order, into num_shards non-empty groups of roughly equal bytes."""
    if num_shards > len(tensors):
        raise ValueError(f"TinySpec.num_shards ({num_shards}) exceeds the number of tensors ({len(tensors)})")
    items = list(tensors.items())
    sizes = [t.numel() * t.element_size() for _, t in items]
    total = sum(sizes)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    written = 0
    index = 0
    for position, ((key, tensor), size) in enumerate(zip(items, sizes, strict=True)):
        if shards[index] and index + 1 < num_shards:
            boundary = total * (index + 1) / num_shards
            must_advance = len(items) - position <= num_shards - index - 1
            if must_advance or abs(written + size - boundary) > abs(written - boundary):
                index += 1
        shards[index][key] = tensor
        written += size
    return shards


def write_weights(out_dir: Path, shards: list[dict[str, torch.Tensor]]) -> list[str]:
    """Write one safetensors file per shard (and the index when sharded); return the file names."""
    metadata = {"format": "pt"}
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map: dict[str, str] = {}
    total_size = 0
    for name, shard in zip(names, shards, strict=True):
        save_file({k: v.detach().contiguous() for k, v in shard.items()}, str(out_dir / name), metadata=metadata)
        (out_dir / name).chmod(0o644)
        weight_map.update(dict.fromkeys(shard, name))
        total_size += sum(t.numel() * t.element_size() for t in shard.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out_dir / "model.safetensors.index.json", index)
    return names


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _marker(spec: TinySpec, weight_files: list[str]) -> dict:
    return {"version": MARKER_VERSION, "spec": asdict(spec), "weight_files": weight_files}


def is_built(out_dir: str | Path, spec: TinySpec) -> bool:
    """Whether out_dir holds a complete checkpoint built from exactly this spec."""
    out = Path(out_dir)
    try:
        marker = json.loads((out / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("version") != MARKER_VERSION or marker.get("spec") != asdict(spec):
        return False
    required = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        *marker.get("weight_files", []),
    ]
    if spec.num_shards > 1:
        required.append("model.safetensors.index.json")
    return bool(marker.get("weight_files")) and all((out / name).is_file() for name in required)


def build_tiny_checkpoint(out_dir: str | Path, spec: TinySpec | None = None, *, force: bool = False) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint to out_dir and return its path.

    Does nothing if out_dir already holds a complete checkpoint of the same spec, unless force.
    """
    spec = spec if spec is not None else TinySpec()
    spec.validate()
    out = Path(out_dir)
    if not force and is_built(out, spec):
        return out

    tokenizer = train_tokenizer()
    if spec.vocab_size < tokenizer.get_vocab_size():
        raise ValueError(
            f"TinySpec.vocab_size ({spec.vocab_size}) is smaller than the tokenizer length "
            f"({tokenizer.get_vocab_size()})"
        )
    special_ids = _special_ids(tokenizer)
    config = released_config(spec, special_ids)
    model = random_model(spec, config)
    shards = split_shards(to_layout(model.state_dict(), spec.layout), spec.num_shards)

    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).unlink(missing_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)

    if spec.layout == "released":
        _write_json(out / "config.json", config)
    else:
        model.config.save_pretrained(out)
    weight_files = write_weights(out, shards)

    _write_json(out / "generation_config.json", _generation_config(special_ids))
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(special_ids))
    _write_json(out / "chat_template.json", {"chat_template": QWEN2_5_VL_CHAT_TEMPLATE})
    _write_json(out / "preprocessor_config.json", _preprocessor_config(spec))
    _write_json(out / MARKER_FILE, _marker(spec, weight_files))
    return out


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _parse_args(argv: Sequence[str] | None) -> tuple[Path, TinySpec, bool]:
    defaults = TinySpec()
    parser = argparse.ArgumentParser(
        prog="python -m cluster.tools.tiny_checkpoint", description="Build a tiny random Qwen2.5-VL checkpoint."
    )
    parser.add_argument("out_dir", type=Path)
    options = {
        "--hidden-size": "hidden_size",
        "--num-layers": "num_hidden_layers",
        "--num-heads": "num_attention_heads",
        "--num-kv-heads": "num_key_value_heads",
        "--intermediate-size": "intermediate_size",
        "--vocab-size": "vocab_size",
        "--vision-depth": "vision_depth",
        "--vision-hidden-size": "vision_hidden_size",
        "--vision-heads": "vision_num_heads",
        "--vision-intermediate-size": "vision_intermediate_size",
        "--window-size": "window_size",
        "--shards": "num_shards",
        "--seed": "seed",
    }
    for flag, dest in options.items():
        parser.add_argument(flag, dest=dest, type=int, default=getattr(defaults, dest))
    parser.add_argument(
        "--fullatt-blocks",
        dest="fullatt_block_indexes",
        type=_int_list,
        default=defaults.fullatt_block_indexes,
        help="comma-separated, e.g. 1,3",
    )
    parser.add_argument("--layout", choices=LAYOUTS, default=defaults.layout)
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical checkpoint exists")
    args = vars(parser.parse_args(argv))
    out_dir, force = args.pop("out_dir"), args.pop("force")
    known = {f.name for f in fields(TinySpec)}
    return out_dir, TinySpec(**{k: v for k, v in args.items() if k in known}), force


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: build (or reuse) a tiny checkpoint in OUT_DIR."""
    out_dir, spec, force = _parse_args(argv)
    try:
        spec.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not force and is_built(out_dir, spec):
        print(f"{out_dir}: tiny checkpoint with this spec already built; nothing to do (--force rebuilds)")
        return 0
    try:
        build_tiny_checkpoint(out_dir, spec, force=True)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))
    print(f"{out_dir}: built tiny Qwen2.5-VL checkpoint ({spec.layout} layout, {size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
