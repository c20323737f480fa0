"""Turning a request (prompt text plus image paths) into model inputs, as Qwen2_5_VLProcessor does.

Uses the checkpoint's tokenizer and chat template and the PIL image processor only, so that
neither torchvision nor a video processor is needed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from model.images import ImageLoadError, load_image

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"


class InvalidRequestError(ValueError):
    """A request that cannot be turned into model inputs; the message names the request id."""


@dataclass
class PreparedRequest:
    """Model inputs for one request."""

    request_id: str
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (total_patches, 3 * temporal_patch * patch * patch) float32
    image_grid_thw: torch.Tensor | None  # (num_images, 3) int64

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class PromptBuilder:
    """Builds token ids and pixel values for requests with the checkpoint's own template and processors."""

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Qwen2VLImageProcessorPil,
        eos_token_ids: list[int],
        max_images: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.eos_token_ids = list(eos_token_ids)
        self.max_images = max_images
        self.merge_size: int = int(image_processor.merge_size)
        self.image_token_id: int = self._token_id(IMAGE_TOKEN)
        self.vision_start_token_id: int = self._token_id(VISION_START_TOKEN)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token} token")
        return int(token_id)

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike[str], max_images: int | None = None) -> PromptBuilder:
        """Load the tokenizer, chat template and image processor from a checkpoint directory.

        EOS ids come from generation_config.json (a list or an int), else from config.json.
        """
        path = Path(model_path)
        if max_images is not None and max_images < 0:
            raise ValueError(f"max_images must be >= 0 or None, got {max_images}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not tokenizer.chat_template:
            raise ValueError(f"{path}: tokenizer has no chat template")
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        config = _read_json(path / "config.json")
        eos = _as_id_list(_read_json(path / "generation_config.json").get("eos_token_id"))
        if not eos:
            eos = _as_id_list(config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id")))
        if not eos:
            raise ValueError(f"{path}: no eos_token_id in generation_config.json or config.json")
        builder = cls(tokenizer, image_processor, eos, max_images=max_images)
        for key, token_id in (
            ("image_token_id", builder.image_token_id),
            ("vision_start_token_id", builder.vision_start_token_id),
        ):
            if key in config and config[key] != token_id:
                raise ValueError(f"{path}: config.json {key}={config[key]} but the tokenizer says {token_id}")
        return builder

    def _validate(self, request: Any) -> tuple[str, str, list[str | os.PathLike[str]]]:
        if not isinstance(request, dict):
            raise InvalidRequestError(f"request must be a dict, got {type(request).__name__}")
        request_id = request.get("id")
        if request_id is None:
            raise InvalidRequestError(f"request has no 'id' (keys: {sorted(request)})")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request 'id' must be a non-empty string, got {request_id!r}")
        prompt = request.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"request {request_id}: 'prompt' must be a string, got {prompt!r}")
        if not prompt.strip():
            raise InvalidRequestError(f"request {request_id}: 'prompt' is empty or whitespace")
        for token in (IMAGE_TOKEN, VIDEO_TOKEN):
            if token in prompt:
                raise InvalidRequestError(
                    f"request {request_id}: 'prompt' must not contain the placeholder token {token}"
                )
        images = request.get("images")
        if images is None:
            images = []
        if not isinstance(images, list):
            raise InvalidRequestError(
                f"request {request_id}: 'images' must be a list of paths, got {type(images).__name__}"
            )
        for i, image in enumerate(images):
            if not isinstance(image, (str, os.PathLike)):
                raise InvalidRequestError(f"request {request_id}: images[{i}] must be a path, got {image!r}")
        if self.max_images is not None and len(images) > self.max_images:
            raise InvalidRequestError(
                f"request {request_id}: {len(images)} images, more than max_images={self.max_images}"
            )
        return request_id, prompt, images

    def render(self, prompt: str, num_images: int) -> str:
        """The chat-template text of one user message: the images, in order, then the prompt."""
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def build(self, request: dict[str, Any]) -> PreparedRequest:
        """Prepare ``{"id": str, "prompt": str, "images": [paths]}`` for the model.

        Each ``<|image_pad|>`` of the rendered template is expanded to its image's token count
        ``t * h * w // merge_size**2``, as Qwen2_5_VLProcessor does, before tokenizing.

        Raises:
            InvalidRequestError: for a missing id, a bad prompt or images value, an image that
                fails to load, or more images than max_images.
        """
        request_id, prompt, image_paths = self._validate(request)
        images = []
        for i, image_path in enumerate(image_paths):
            try:
                images.append(load_image(image_path))
            except ImageLoadError as exc:
                raise InvalidRequestError(f"request {request_id}: images[{i}]: {exc}") from exc

        text = self.render(prompt, len(images))
        pixel_values = image_grid_thw = None
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            pixel_values = processed["pixel_values"].to(torch.float32)
            image_grid_thw = processed["image_grid_thw"].to(torch.int64)
            pieces = text.split(IMAGE_TOKEN)
            if len(pieces) != len(images) + 1:
                raise InvalidRequestError(
                    f"request {request_id}: rendered prompt has {len(pieces) - 1} {IMAGE_TOKEN} tokens "
                    f"for {len(images)} images"
                )
            counts = (image_grid_thw.prod(dim=-1) // self.merge_size**2).tolist()
            expanded = [pieces[0]]
            for count, piece in zip(counts, pieces[1:], strict=True):
                expanded.append(IMAGE_TOKEN * count + piece)
            text = "".join(expanded)
        input_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return PreparedRequest(request_id, list(input_ids), pixel_values, image_grid_thw)

    def decode(self, token_ids: list[int]) -> str:
        """Text of generated token ids, without special tokens."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
