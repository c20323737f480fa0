"""Qwen2.5-VL: the vision tower, the text decoder and the LM head, under Hugging Face module names."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from model.config import ModelConfig
from model.parallel import ParallelContext, ParallelLMHead
from model.text import PackedBatch, Qwen2Model
from model.vision import Qwen2_5_VisionTransformer


class Qwen2_5_VLForConditionalGeneration(nn.Module):
    """Parameter names match the released checkpoint layout (`model.*`, `visual.*`, `lm_head.*`)."""

    # Checkpoint projection name -> (our fused module, which part of it).
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, ctx: ParallelContext, vision_ctx: ParallelContext) -> None:
        super().__init__()
        self.config = config
        self.visual = Qwen2_5_VisionTransformer(config.vision, vision_ctx)
        self.model = Qwen2Model(config.text, ctx)
        self.lm_head = ParallelLMHead(config.text.vocab_size, config.text.hidden_size, ctx)

    def embed_prompt(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """input_ids (L,) -> embeddings (L, hidden) with image (and video) embeddings scattered at the pad tokens."""
        embeds = self.model.embed_tokens(input_ids)
        if image_embeds is not None:
            is_image = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
            n = int(is_image.sum())
            if n != image_embeds.shape[0]:
                raise ValueError(f"prompt has {n} image-pad tokens but the images give {image_embeds.shape[0]}")
            embeds = embeds.masked_scatter(is_image[:, None], image_embeds.to(embeds.dtype))
        return embeds

    def prefill(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        image_embeds: torch.Tensor | None,
        packed: PackedBatch,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed pieces (see `Qwen2Model.prefill`) -> logits of `logits_rows` (R, vocab), or of all rows.

        input_ids (T,), positions (3, T); image_embeds holds the embeddings of the pieces' image-pad
        tokens, in order.
        """
        hidden = self.model.prefill(self.embed_prompt(input_ids, image_embeds), positions, packed)
        return self.lm_head(hidden if logits_rows is None else hidden[logits_rows])

    def decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache_lens: torch.Tensor,
        block_tables: torch.Tensor,
        kv_len: int | None = None,
        kv_lens: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """One token for each row -> logits (B, vocab); attention reads `kv_len` positions of each row, or with
        the paged kernel each row's `kv_lens` (host ints, Qwen2Model.decode)."""
        return self.lm_head(self.model.decode(input_ids, positions, cache_lens, block_tables, kv_len, kv_lens))
