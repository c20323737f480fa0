"""Model shapes for the capacity planner: the sizes of Qwen2.5-VL's text model and vision tower, no weights.

`model_shape(name_or_path)` takes a preset name (`qwen2.5-vl-3b`, `-7b`, `-32b`, `-72b`: the
published `config.json` of each Qwen2.5-VL-*-Instruct checkpoint, their sources in docs/simulator.md)
or a checkpoint directory whose `config.json` is read (model/config.py, both key layouts). The
parameter and byte counts here feed the cost model (cluster/tools/cost_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.config import ModelConfig, ModelConfigError, TextConfig, VisionConfig


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost model needs: the text decoder's and the vision tower's."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    vision_depth: int = 32
    vision_hidden: int = 1280
    vision_heads: int = 16
    vision_intermediate: int = 3420
    vision_out_hidden: int = 0  # the merger's output: the text model's hidden size
    patch: int = 14
    spatial_merge: int = 2
    window: int = 112  # pixels
    full_attention_blocks: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        """Weights of one decoder layer: q/k/v (with biases) and o projections, the SwiGLU MLP, two norms."""
        kv = self.kv_heads * self.head_dim
        attention = self.hidden * (self.hidden + 2 * kv) + (self.hidden + 2 * kv) + self.hidden * self.hidden
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    def text_params(self) -> int:
        """Every text weight: embeddings, layers, final norm, LM head (once when tied)."""
        embeddings = self.vocab * self.hidden
        return (
            embeddings + self.layers * self.layer_params() + self.hidden + (0 if self.tied_embeddings else embeddings)
        )

    def vision_block_params(self) -> int:
        """One vision block: qkv and proj (with biases), the SwiGLU MLP (with biases), two norms."""
        h, i = self.vision_hidden, self.vision_intermediate
        return 4 * h * h + 4 * h + 3 * h * i + 2 * i + h + 2 * h

    def merger_params(self) -> int:
        """The patch merger: 2x2 patches (4 x vision hidden) -> same width -> the text hidden size."""
        width = self.vision_hidden * self.spatial_merge**2
        return width * width + width + width * self.vision_out_hidden + self.vision_out_hidden

    def vision_params(self) -> int:
        patch_embed = 3 * 2 * self.patch * self.patch * self.vision_hidden  # Conv3d, temporal patch 2, no bias
        return patch_embed + self.vision_depth * self.vision_block_params() + self.merger_params()

    def window_patches(self) -> int:
        """Patches per attention window of the windowed vision blocks (window pixels / patch pixels, squared)."""
        return (self.window // self.patch) ** 2

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "hidden": self.hidden,
            "layers": self.layers,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "intermediate": self.intermediate,
            "vocab": self.vocab,
            "text_params": self.text_params(),
            "vision_params": self.vision_params(),
        }


def _preset(name: str, hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int, tied: bool,
            vision_inter: int) -> ModelShape:  # fmt: skip
    return ModelShape(name, hidden, layers, heads, kv, inter, vocab, tied, vision_intermediate=vision_inter,
                      vision_out_hidden=hidden)  # fmt: skip


# From each Qwen/Qwen2.5-VL-*-Instruct config.json (docs/simulator.md names them):
# hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size,
# tie_word_embeddings, vision_config.intermediate_size (vision depth 32, hidden 1280, 16 heads in all four).
PRESETS: dict[str, ModelShape] = {
    "qwen2.5-vl-3b": _preset("qwen2.5-vl-3b", 2048, 36, 16, 2, 11008, 151936, True, 3420),
    "qwen2.5-vl-7b": _preset("qwen2.5-vl-7b", 3584, 28, 28, 4, 18944, 152064, False, 3420),
    "qwen2.5-vl-32b": _preset("qwen2.5-vl-32b", 5120, 64, 40, 8, 27648, 152064, False, 3456),
    "qwen2.5-vl-72b": _preset("qwen2.5-vl-72b", 8192, 80, 64, 8, 29568, 152064, False, 3456),
}


def from_config(name: str, text: TextConfig, vision: VisionConfig) -> ModelShape:
    """The shape of a parsed checkpoint config (model/config.py)."""
    return ModelShape(
        name,
        text.hidden_size,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.intermediate_size,
        text.vocab_size,
        text.tie_word_embeddings,
        vision.depth,
        vision.hidden_size,
        vision.num_heads,
        vision.intermediate_size,
        vision.out_hidden_size,
        vision.patch_size,
        vision.spatial_merge_size,
        vision.window_size,
        len(vision.fullatt_block_indexes),
    )


def model_shape(name_or_path: str) -> ModelShape:
    """A preset by name, or the shape of the checkpoint directory `name_or_path` (its config.json).

    Raises ValueError naming the value when it is neither.
    """
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"--model-shape={name_or_path!r}: not a preset ({', '.join(PRESETS)}) nor a checkpoint directory"
        )
    try:
        config = ModelConfig.from_pretrained(path)
    except ModelConfigError as e:
        raise ValueError(f"--model-shape={name_or_path!r}: {e}") from e
    return from_config(path.name, config.text, config.vision)
