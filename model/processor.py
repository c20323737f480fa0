"""Turning a request (prompt text, images and videos, or chat messages) into model inputs, as Qwen2_5_VLProcessor does.

Uses the checkpoint's tokenizer and chat template, the PIL image processor and model/video.py, so
that neither torchvision nor transformers' video processor is needed.

Text a user sent is tokenized as text: control tokens typed in it (``<|im_start|>``,
``<|im_end|>``, ...) stay plain characters and cannot open a new turn or role. The template is
rendered around numbered slots that stand for the user's texts; the template's own special
tokens become control tokens, and each run of text between them (template text and user text
together) is tokenized with ``split_special_tokens=True``. Without typed control tokens this
gives exactly the ids of tokenizing the rendered template, as transformers does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from model.config import ModelConfig
from model.images import ImageLoadError, ImageSource, load_image
from model.template_tools import fill_slots, template_has_tools, with_slots
from model.video import (
    MAX_VIDEO_BYTES,
    MAX_VIDEO_SECONDS,
    VIDEO_KWARGS,
    VideoLoadError,
    VideoOptionError,
    VideoOptions,
    VideoSource,
    load_video,
    video_patches,
)

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
ROLES = ("system", "user", "assistant")
MM_PROCESSOR_KWARGS = ("min_pixels", "max_pixels")
# The least total budget a video is given: 4 frames of 28x28 (input_max_len then refuses the prompt).
FRAME_PIXELS_FLOOR = 4 * 28 * 28

# A user text's place in the rendered template: private-use characters around its index.
_SLOT = "\ue000{}\ue001"
_SLOT_RE = re.compile("\ue000(\\d+)\ue001")


class InvalidRequestError(ValueError):
    """A request that cannot be turned into model inputs; the message names the request id.

    `param` is the request field at fault (``messages[1].content``, ``mm_processor_kwargs.max_pixels``)
    when there is one; `status` is the HTTP status a server answers with (as on actors.errors.RequestError).
    """

    status = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class PreparedRequest:
    """Model inputs for one request."""

    request_id: str
    input_ids: list[int]
    # Every vision input, images and videos alike, in prompt order (the vision tower treats them the same).
    pixel_values: torch.Tensor | None  # (total_patches, 3 * temporal_patch * patch * patch) float32
    image_grid_thw: torch.Tensor | None  # (num_images + num_videos, 3) int64
    # Per vision input: None for an image, a video's seconds per temporal patch (None as a whole: no video).
    second_per_grid_ts: list[float | None] | None = None
    video_frames: list[int] = field(default_factory=list)  # frames sampled per video
    video_decode_s: float = 0.0  # time spent decoding and sampling the videos
    video_tokens: int = 0  # prompt tokens that stand for video frames

    @property
    def num_images(self) -> int:
        """Vision inputs (images and videos)."""
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])


@dataclass
class _Chat:
    """A request's conversation: template messages with slots for texts and bare image and video parts."""

    messages: list[dict[str, Any]]
    texts: list[str]
    images: list[ImageSource]
    videos: list[tuple[VideoSource, Any, Any, str]] = field(default_factory=list)  # source, start, end, field
    order: list[str] = field(default_factory=list)  # "image" / "video" per vision part, in prompt order
    json_strings: list[str] = field(default_factory=list)  # strings of tools and calls behind JSON slots

    def slot(self, text: str) -> str:
        """A user text's slot in the template."""
        self.texts.append(text)
        return _SLOT.format(len(self.texts) - 1)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _list_field(request_id: str, request: dict[str, Any], key: str, what: str) -> list:
    """request[key] as a list ([] when absent or None); InvalidRequestError naming the key otherwise."""
    value = request.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequestError(f"request {request_id}: {key!r} must be {what}, got {type(value).__name__}", key)
    return value


class PromptBuilder:
    """Builds token ids and pixel values for requests with the checkpoint's own template and processors."""

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Qwen2VLImageProcessorPil,
        eos_token_ids: list[int],
        max_images: int | None = None,
        max_videos: int | None = None,
        max_input_len: int | None = None,
        max_video_seconds: float = MAX_VIDEO_SECONDS,
        max_video_bytes: int = MAX_VIDEO_BYTES,
    ) -> None:
        """max_input_len: the longest prompt in tokens; by default a video's pixel budget is what fits it
        beside the prompt's text and images (capped by qwen-vl-utils' total)."""
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.eos_token_ids = list(eos_token_ids)
        self.max_images = max_images
        self.max_videos = max_videos
        self.max_input_len = max_input_len
        self.max_video_seconds = max_video_seconds
        self.max_video_bytes = max_video_bytes
        self.merge_size: int = int(image_processor.merge_size)
        self.image_token_id: int = self._token_id(IMAGE_TOKEN)
        self.video_token_id: int = self._token_id(VIDEO_TOKEN)
        self.vision_start_token_id: int = self._token_id(VISION_START_TOKEN)
        # The checkpoint's pixel budget per image; mm_processor_kwargs may narrow it per request.
        self.min_pixels = int(image_processor.size["shortest_edge"])
        self.max_pixels = int(image_processor.size["longest_edge"])
        self._added_ids = {t.content: int(i) for i, t in tokenizer.added_tokens_decoder.items()}
        added = sorted(self._added_ids, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(re.escape(t) for t in added) + ")")
        # A template with a tools section renders `tools`, tool results and earlier calls itself.
        template = tokenizer.chat_template
        self.template_tools = isinstance(template, str) and template_has_tools(template)
        # Whether the tool-call tags are tokens of their own (Qwen2.5's tokenizer: added, not special).
        self.tool_call_tokens = "<tool_call>" in self._added_ids and "</tool_call>" in self._added_ids
        # Decoding runs at every delivery of every request: call the Rust tokenizer directly where the
        # Python wrapper would only add its overhead (~6 us vs ~1 us), i.e. with no clean-up pass.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        plain = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decode_ids = backend.decode if plain else tokenizer.decode

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token} token")
        return int(token_id)

    @classmethod
    def from_pretrained(
        cls, model_path: str | os.PathLike[str], max_images: int | None = None, **video_limits: Any
    ) -> PromptBuilder:
        """Load the tokenizer, chat template and image processor from a checkpoint directory.

        EOS ids come from generation_config.json (a list or an int), else from config.json.
        `video_limits`: max_videos, max_input_len, max_video_seconds, max_video_bytes (see __init__).
        """
        path = Path(model_path)
        if max_images is not None and max_images < 0:
            raise ValueError(f"max_images must be >= 0 or None, got {max_images}")
        if video_limits.get("max_videos") is not None and video_limits["max_videos"] < 0:
            raise ValueError(f"max_videos must be >= 0 or None, got {video_limits['max_videos']}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not tokenizer.chat_template:
            raise ValueError(f"{path}: tokenizer has no chat template")
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        config = _read_json(path / "config.json")
        eos = list(ModelConfig.from_pretrained(path).eos_token_ids)
        if not eos:
            raise ValueError(f"{path}: no eos_token_id in generation_config.json or config.json")
        builder = cls(tokenizer, image_processor, eos, max_images=max_images, **video_limits)
        for key, token_id in (
            ("image_token_id", builder.image_token_id),
            ("video_token_id", builder.video_token_id),
            ("vision_start_token_id", builder.vision_start_token_id),
        ):
            if key in config and config[key] != token_id:
                raise ValueError(f"{path}: config.json {key}={config[key]} but the tokenizer says {token_id}")
        return builder

    # ------------------------------------------------------------------------------ validation
    def _request_id(self, request: Any) -> str:
        if not isinstance(request, dict):
            raise InvalidRequestError(f"request must be a dict, got {type(request).__name__}")
        request_id = request.get("id")
        if request_id is None:
            raise InvalidRequestError(f"request has no 'id' (keys: {sorted(request)})", "id")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request 'id' must be a non-empty string, got {request_id!r}", "id")
        return request_id

    def _check_text(self, request_id: str, text: Any, field: str) -> str:
        if not isinstance(text, str):
            raise InvalidRequestError(f"request {request_id}: '{field}' must be a string, got {text!r}", field)
        for token in (IMAGE_TOKEN, VIDEO_TOKEN):
            if token in text:
                raise InvalidRequestError(
                    f"request {request_id}: '{field}' must not contain the placeholder token {token}", field
                )
        return text

    def _check_image(self, request_id: str, image: Any, field: str) -> ImageSource:
        if not isinstance(image, (str, bytes, os.PathLike)):
            raise InvalidRequestError(
                f"request {request_id}: {field} must be a path, URL or bytes, got {image!r}", field
            )
        return image

    def _prompt_chat(self, request_id: str, request: dict[str, Any]) -> _Chat:
        """A {"prompt", "images"} request as one user message: the images, in order, then the prompt."""
        prompt = self._check_text(request_id, request.get("prompt"), "prompt")
        if not prompt.strip():
            raise InvalidRequestError(f"request {request_id}: 'prompt' is empty or whitespace", "prompt")
        images = _list_field(request_id, request, "images", "a list of paths")
        images = [self._check_image(request_id, image, f"images[{i}]") for i, image in enumerate(images)]
        videos = _list_field(request_id, request, "videos", "a list")
        chat = _Chat([], [prompt], images, order=["image"] * len(images))
        for i, video in enumerate(videos):
            self._add_video(request_id, video, f"videos[{i}]", chat)
        content: list[dict[str, str]] = [{"type": kind} for kind in chat.order]
        content.append({"type": "text", "text": _SLOT.format(0)})
        chat.messages.append({"role": "user", "content": content})
        return chat

    def _add_video(self, request_id: str, video: Any, field: str, chat: _Chat) -> None:
        """A video entry: a source (path, URL, bytes), a list of frame images, or an object
        {"video": source or frames, "video_start": s, "video_end": s}."""
        start = end = None
        where = field
        if isinstance(video, dict):
            start, end = video.get("video_start"), video.get("video_end")
            video = video.get("video")
            where = f"{field}.video"
        if isinstance(video, list):
            for i, frame in enumerate(video):
                self._check_image(request_id, frame, f"{where}[{i}]")
        elif not isinstance(video, (str, bytes, os.PathLike)):
            raise InvalidRequestError(
                f"request {request_id}: {where} must be a path, URL, bytes or a list of frames, got {video!r}", where
            )
        chat.videos.append((video, start, end, field))
        chat.order.append("video")

    def _messages_chat(self, request_id: str, request: dict[str, Any]) -> _Chat:
        """OpenAI-style chat messages: system/user/assistant turns, content a string or a list of parts.

        Parts: {"type": "text", "text"}, {"type": "image_url", "image_url": {"url"} or url} and
        {"type": "image", "image": source}; images only in user turns.
        """
        for key in ("prompt", "images", "videos"):
            if request.get(key) is not None:
                raise InvalidRequestError(f"request {request_id}: give 'messages' or '{key}', not both", key)
        messages = request["messages"]
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError(f"request {request_id}: 'messages' must be a non-empty list", "messages")
        chat = _Chat([], [], [])
        roles = (*ROLES, "tool") if self.template_tools else ROLES
        for i, message in enumerate(messages):
            field = f"messages[{i}]"
            if not isinstance(message, dict):
                raise InvalidRequestError(f"request {request_id}: {field} must be an object, got {message!r}", field)
            role = message.get("role")
            if role not in roles:
                raise InvalidRequestError(
                    f"request {request_id}: {field}.role must be one of {list(roles)}, got {role!r}", f"{field}.role"
                )
            content = message.get("content")
            if self.template_tools and (role == "tool" or message.get("tool_calls")):
                chat.messages.append(self._tool_message(request_id, message, field, chat))
                continue
            if isinstance(content, str):
                chat.messages.append(
                    {"role": role, "content": chat.slot(self._check_text(request_id, content, f"{field}.content"))}
                )
                continue
            if not isinstance(content, list):
                raise InvalidRequestError(
                    f"request {request_id}: {field}.content must be a string or a list of parts, got {content!r}",
                    f"{field}.content",
                )
            parts = []
            for j, part in enumerate(content):
                parts.append(self._part(request_id, role, part, f"{field}.content[{j}]", chat))
            chat.messages.append({"role": role, "content": parts})
        if not any(text.strip() for text in chat.texts) and not chat.order:
            raise InvalidRequestError(f"request {request_id}: 'messages' have no text and no image", "messages")
        return chat

    def _tool_message(self, request_id: str, message: dict[str, Any], field: str, chat: _Chat) -> dict[str, Any]:
        """A tool result ({"role": "tool", "content", "tool_call_id"}) or an assistant turn with `tool_calls`,
        for a template that renders them; the calls' arguments as objects, as templates expect."""
        role, content = message["role"], message.get("content")
        if role == "tool" and not isinstance(content, str):
            raise InvalidRequestError(
                f"request {request_id}: {field}.content of a tool result must be a string", f"{field}.content"
            )
        if content is not None and not isinstance(content, str):
            raise InvalidRequestError(
                f"request {request_id}: {field}.content of a turn with tool_calls must be a string or null",
                f"{field}.content",
            )
        text = self._check_text(request_id, content, f"{field}.content") if content else ""
        out: dict[str, Any] = {"role": role, "content": chat.slot(text) if text else ""}
        if role == "tool":
            if message.get("tool_call_id") is not None:
                out["tool_call_id"] = with_slots(str(message["tool_call_id"]), self._added_re, chat.json_strings)
            return out
        calls = message["tool_calls"]
        if not isinstance(calls, list):
            raise InvalidRequestError(f"request {request_id}: {field}.tool_calls must be a list", f"{field}.tool_calls")
        out["tool_calls"] = []
        for j, call in enumerate(calls):
            where = f"{field}.tool_calls[{j}]"
            function = call.get("function") if isinstance(call, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            arguments = function.get("arguments", {}) if isinstance(function, dict) else None
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    arguments = None
            if not isinstance(name, str) or not isinstance(arguments, dict):
                raise InvalidRequestError(
                    f"request {request_id}: {where} must be {{'function': {{'name', 'arguments': a JSON object}}}}",
                    f"{where}.function",
                )
            entry = {"type": "function", "function": {"name": name, "arguments": arguments}}
            if call.get("id") is not None:
                entry["id"] = str(call["id"])
            out["tool_calls"].append(with_slots(entry, self._added_re, chat.json_strings))
        return out

    def _part(self, request_id: str, role: str, part: Any, field: str, chat: _Chat) -> dict[str, str]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            return {"type": "text", "text": chat.slot(self._check_text(request_id, part.get("text"), f"{field}.text"))}
        if kind in ("image_url", "image"):
            if role != "user":
                raise InvalidRequestError(
                    f"request {request_id}: {field}: images are allowed in user messages only", field
                )
            source = part.get(kind)
            if kind == "image_url" and isinstance(source, dict):
                source = source.get("url")
            chat.images.append(self._check_image(request_id, source, f"{field}.{kind}"))
            chat.order.append("image")
            return {"type": "image"}
        if kind in ("video_url", "video"):
            if role != "user":
                raise InvalidRequestError(
                    f"request {request_id}: {field}: videos are allowed in user messages only", field
                )
            source = part.get(kind)
            if kind == "video_url":
                source = source.get("url") if isinstance(source, dict) else source
                if not isinstance(source, str):
                    raise InvalidRequestError(
                        f"request {request_id}: {field}.video_url must be {{'url': ...}}, got {part.get(kind)!r}",
                        f"{field}.video_url",
                    )
            entry = {"video": source, "video_start": part.get("video_start"), "video_end": part.get("video_end")}
            self._add_video(request_id, entry, field, chat)
            return {"type": "video"}
        raise InvalidRequestError(
            f"request {request_id}: {field} must be a text, image_url, image, video_url or video part, got type "
            f"{kind!r}",
            f"{field}.type",
        )

    def _image_size(self, request_id: str, kwargs: Any) -> dict[str, int] | None:
        """The image processor's `size` for a request's mm_processor_kwargs, within the checkpoint's limits."""
        if kwargs is None:
            return None
        if not isinstance(kwargs, dict):
            raise InvalidRequestError(
                f"request {request_id}: 'mm_processor_kwargs' must be an object, got {kwargs!r}", "mm_processor_kwargs"
            )
        unknown = sorted(set(kwargs) - set(MM_PROCESSOR_KWARGS) - set(VIDEO_KWARGS))
        if unknown:
            raise InvalidRequestError(
                f"request {request_id}: unknown 'mm_processor_kwargs.{unknown[0]}' "
                f"(known: {list(MM_PROCESSOR_KWARGS + VIDEO_KWARGS)})",
                f"mm_processor_kwargs.{unknown[0]}",
            )
        values = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
        for key in MM_PROCESSOR_KWARGS:
            value = kwargs.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not self.min_pixels <= value <= self.max_pixels:
                raise InvalidRequestError(
                    f"request {request_id}: 'mm_processor_kwargs.{key}'={value!r} must be an integer in "
                    f"[{self.min_pixels}, {self.max_pixels}] (the checkpoint's limits)",
                    f"mm_processor_kwargs.{key}",
                )
            values[key] = value
        if values["min_pixels"] > values["max_pixels"]:
            raise InvalidRequestError(
                f"request {request_id}: 'mm_processor_kwargs.min_pixels'={values['min_pixels']} exceeds "
                f"max_pixels={values['max_pixels']}",
                "mm_processor_kwargs.min_pixels",
            )
        return {"shortest_edge": values["min_pixels"], "longest_edge": values["max_pixels"]}

    # ------------------------------------------------------------------------------ building
    def build(self, request: dict[str, Any]) -> PreparedRequest:
        """Prepare a request for the model.

        A request is ``{"id", "prompt", "images": [sources], "videos": [videos]}`` (one user turn: the
        images, the videos, then the prompt) or ``{"id", "messages": [...]}`` (OpenAI-style chat turns,
        see `_messages_chat`), optionally with ``mm_processor_kwargs`` (``min_pixels``/``max_pixels``
        for images; ``fps``, ``max_frames``, ``video_min_pixels``, ``video_max_pixels``,
        ``video_total_pixels`` for videos). An image source is a path, a file://, data: or http(s)://
        URL, or bytes; a video is such a source, a list of frame images, or ``{"video", "video_start",
        "video_end"}``. Each ``<|image_pad|>`` / ``<|video_pad|>`` of the template becomes its input's
        token count ``t * h * w // merge_size**2``, as Qwen2_5_VLProcessor does.

        Raises:
            InvalidRequestError: for a missing id, a bad prompt, messages, images or videos value, an
                image or video that fails to load, more images than max_images or videos than
                max_videos, or mm_processor_kwargs outside their limits; `param` names the part.
        """
        request_id = self._request_id(request)
        if request.get("messages") is not None:
            chat = self._messages_chat(request_id, request)
        else:
            chat = self._prompt_chat(request_id, request)
        if self.max_images is not None and len(chat.images) > self.max_images:
            raise InvalidRequestError(
                f"request {request_id}: {len(chat.images)} images, more than max_images={self.max_images}", "images"
            )
        if self.max_videos is not None and len(chat.videos) > self.max_videos:
            raise InvalidRequestError(
                f"request {request_id}: {len(chat.videos)} videos, more than max_videos_per_prompt={self.max_videos}",
                "videos",
            )
        kwargs = request.get("mm_processor_kwargs")
        size = self._image_size(request_id, kwargs)
        try:
            video_options = VideoOptions.from_kwargs(kwargs or {})
        except VideoOptionError as exc:
            raise InvalidRequestError(f"request {request_id}: {exc}", exc.field) from exc
        images = []
        for i, source in enumerate(chat.images):
            try:
                images.append(load_image(source))
            except ImageLoadError as exc:
                raise InvalidRequestError(f"request {request_id}: images[{i}]: {exc}", "images") from exc

        pixel_values = image_grid_thw = None
        counts: list[int] = []
        if images:
            kwargs_size = {"size": size} if size is not None else {}
            processed = self.image_processor(images=images, return_tensors="pt", **kwargs_size)
            pixel_values = processed["pixel_values"].to(torch.float32)
            image_grid_thw = processed["image_grid_thw"].to(torch.int64)
            counts = (image_grid_thw.prod(dim=-1) // self.merge_size**2).tolist()
        tools = request.get("tools")
        if tools is not None and not self.template_tools:
            raise InvalidRequestError(
                f"request {request_id}: 'tools' given, but the checkpoint's chat template has no tools section", "tools"
            )
        if tools is not None and not isinstance(tools, list):
            raise InvalidRequestError(f"request {request_id}: 'tools' must be a list, got {tools!r}", "tools")
        extra = {"tools": with_slots(tools, self._added_re, chat.json_strings)} if tools else {}
        rendered = self.tokenizer.apply_chat_template(
            chat.messages, tokenize=False, add_generation_prompt=True, **extra
        )
        if chat.json_strings:
            rendered = fill_slots(rendered, chat.json_strings, chat.slot)
        if not chat.videos:
            input_ids = self._tokenize(request_id, rendered, chat.texts, counts)
            return PreparedRequest(request_id, input_ids, pixel_values, image_grid_thw)
        text_len = len(self._tokenize(request_id, rendered, chat.texts, counts, [0] * len(chat.videos)))
        videos = self._videos(request_id, chat, video_options, kwargs or {}, text_len)
        video_counts = [int(grid.prod()) // self.merge_size**2 for _, grid, _ in videos]
        input_ids = self._tokenize(request_id, rendered, chat.texts, counts, video_counts)
        # Images and videos in prompt order: one list for the vision tower, the positions and the caches.
        image_items = iter([] if image_grid_thw is None else pixel_values.split(image_grid_thw.prod(-1).tolist()))
        image_grids = iter([] if image_grid_thw is None else image_grid_thw)
        video_items = iter(videos)
        patches, grids, seconds = [], [], []
        for kind in chat.order:
            if kind == "image":
                patches.append(next(image_items))
                grids.append(next(image_grids))
                seconds.append(None)
            else:
                video_patches_, grid, sampled = next(video_items)
                patches.append(video_patches_)
                grids.append(grid)
                seconds.append(self.image_processor.temporal_patch_size / sampled.sample_fps)
        return PreparedRequest(
            request_id,
            input_ids,
            torch.cat(patches),
            torch.stack(grids),
            seconds,
            [sampled.num_frames for _, _, sampled in videos],
            sum(sampled.decode_s for _, _, sampled in videos),
            sum(video_counts),
        )

    def _videos(
        self, request_id: str, chat: _Chat, base: VideoOptions, kwargs: dict[str, Any], text_len: int
    ) -> list[tuple]:
        """(patches, grid (3,), SampledVideo) per video. Without video_total_pixels, each video's budget is
        its share of what input_max_len leaves beside `text_len` tokens, capped by qwen-vl-utils' total."""
        proc = self.image_processor
        if self.max_input_len is not None and kwargs.get("video_total_pixels") is None:
            tokens = max(self.max_input_len - text_len, 0) // len(chat.videos)
            # qwen-vl-utils gives each frame total / frames * temporal_patch_size pixels: total / factor**2 tokens.
            pixels_per_token = (proc.patch_size * self.merge_size) ** 2
            budget = max(tokens * pixels_per_token, FRAME_PIXELS_FLOOR)
            base = dataclasses.replace(base, total_pixels=min(base.total_pixels, budget))
        out = []
        for source, start, end, where in chat.videos:
            try:
                options = base.clip(start, end, where)
                factor = proc.patch_size * self.merge_size
                sampled = load_video(source, options, self.max_video_seconds, self.max_video_bytes, factor)
            except VideoOptionError as exc:
                raise InvalidRequestError(f"request {request_id}: {exc}", exc.field) from exc
            except VideoLoadError as exc:
                raise InvalidRequestError(f"request {request_id}: {where}: {exc}", where) from exc
            patches, grid = video_patches(
                sampled.frames,
                proc.image_mean,
                proc.image_std,
                proc.rescale_factor,
                proc.patch_size,
                proc.temporal_patch_size,
                self.merge_size,
            )
            out.append((patches, grid, sampled))
        return out

    def _tokenize(
        self,
        request_id: str,
        rendered: str,
        texts: list[str],
        image_counts: list[int],
        video_counts: list[int] | None = None,
    ) -> list[int]:
        """Token ids of a template rendered with slots: its special tokens as control tokens, every
        text run between them (template text with the user texts filled in) as plain text."""
        items: list[str | list[str]] = []  # a special token of the template, or a run of text pieces
        run: list[str] = []
        for k, piece in enumerate(_SLOT_RE.split(rendered)):
            if k % 2:  # a slot index
                run.append(texts[int(piece)])
                continue
            for m, sub in enumerate(self._added_re.split(piece)):
                if m % 2:
                    items.extend([run, sub])
                    run = []
                elif sub:
                    run.append(sub)
        items.append(run)
        runs = ["".join(item) for item in items if isinstance(item, list) and "".join(item)]
        encoded = iter(self.tokenizer(runs, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        ids: list[int] = []
        images = iter(image_counts)
        videos = iter(video_counts or [])
        for item in items:
            if isinstance(item, list):
                if "".join(item):
                    ids.extend(next(encoded))
            elif item == IMAGE_TOKEN:
                count = next(images, None)
                if count is None:
                    raise InvalidRequestError(
                        f"request {request_id}: the chat template has more {IMAGE_TOKEN} "
                        f"tokens than the {len(image_counts)} images"
                    )
                ids.extend([self.image_token_id] * count)
            elif item == VIDEO_TOKEN:
                count = next(videos, None)
                if count is None:
                    raise InvalidRequestError(
                        f"request {request_id}: the chat template has more {VIDEO_TOKEN} tokens than the videos"
                    )
                ids.extend([self.video_token_id] * count)
            else:
                ids.append(self._added_ids[item])
        if next(images, None) is not None:
            raise InvalidRequestError(
                f"request {request_id}: the chat template has fewer {IMAGE_TOKEN} tokens "
                f"than the {len(image_counts)} images"
            )
        if next(videos, None) is not None:
            raise InvalidRequestError(
                f"request {request_id}: the chat template has fewer {VIDEO_TOKEN} tokens than the videos"
            )
        return ids

    def decode(self, token_ids: list[int]) -> str:
        """Text of generated token ids, without special tokens."""
        return self._decode_ids(list(token_ids), skip_special_tokens=True)
