"""Synthetic workloads for the planner: requests as the scheduler sees them (token counts, image spans, hashes).

A workload is a list of `SimRequest`: prompt token ids (ordinary ids, image tokens where the images
sit), each image's token span, grid and content key, the output length (EOS ignored, as vLLM's
random dataset), and for a conversation's later turns the turn it follows (sent when that one ended).

- `chat`: one image (a photo or a screenshot, 400-1,600 image tokens) and a 20-120 token question,
  32-256 output tokens;
- `documents`: 2-3 document pages of 1,280 image tokens each (896 x 1,120 pixels), a 60-200 token
  instruction, 128-384 output tokens;
- `multi-turn`: conversations of 3 turns on one image (as `chat`); each turn resends the history
  (earlier prompts and answers, the answers being exactly the tokens the simulated groups produce)
  plus a 20-80 token question, so the prefix cache can serve the history;
- `vision-arena`: VisionArena-Chat-like single turns (docs/simulator.md gives the statistics used);
- `random:IN:OUT`: IN random prompt tokens, OUT output tokens, no images;
- a request file in the `cluster.launch` format (.jsonl/.json): its text tokenized by the engine's
  tokenizer, each image's tokens from its pixel size as Qwen2.5-VL's processor resizes it.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.tools.fake_workers import TOKEN_RANGE, prompt_seed, toy_token

NAMED = ("chat", "documents", "multi-turn", "vision-arena")
# Qwen2.5-VL's released preprocessor_config.json: 28 x 28 pixels per LLM token after the 2x2 merge.
FACTOR = 28
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384


@dataclass
class SimRequest:
    """One synthetic request: what its PreparedRequest and scheduler Sequence carry."""

    id: str
    prompt_ids: list[int]
    images: list[tuple[int, int, bytes]]  # (start, end, content key) of each image's tokens
    grids: list[tuple[int, int, int]]  # (t, h, w) patches of each image
    max_new_tokens: int
    follows: str | None = None  # the id of the turn this one continues (sent once that one ended)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_tokens(self) -> int:
        return sum(end - start for start, end, _ in self.images)


def smart_resize(
    height: int, width: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """Qwen2.5-VL's resize: both sides multiples of 28, area within [min_pixels, max_pixels], aspect kept."""
    h, w = max(FACTOR, round(height / FACTOR) * FACTOR), max(FACTOR, round(width / FACTOR) * FACTOR)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / FACTOR) * FACTOR, math.floor(width / beta / FACTOR) * FACTOR
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / FACTOR) * FACTOR, math.ceil(width * beta / FACTOR) * FACTOR
    return h, w


class Builder:
    """Makes prompts of ordinary token ids with image spans; `image_token_id` from the engine's tokenizer."""

    def __init__(self, image_token_id: int, rng: random.Random, special: frozenset[int] = frozenset()) -> None:
        self.image_token_id = image_token_id
        self.rng = rng
        self.images = 0
        self.special = special | {image_token_id}
        self.stand_in = next(t for t in range(*TOKEN_RANGE) if t not in self.special)

    def text(self, count: int) -> list[int]:
        """`count` random ids of TOKEN_RANGE, a special one (vision, EOS) replaced by an ordinary id."""
        low, high = TOKEN_RANGE
        ids = (self.rng.randrange(low, high) for _ in range(count))
        return [self.stand_in if t in self.special else t for t in ids]

    def image(self, ids: list[int], pixels_hw: tuple[int, int], key: bytes | None = None) -> tuple:
        """Append one image of these pixels to `ids`: its (start, end, key) and (t, h, w) grid."""
        h, w = smart_resize(*pixels_hw)
        grid = (1, h // 14, w // 14)
        tokens = grid[1] * grid[2] // 4
        if key is None:
            self.images += 1
            key = hashlib.sha256(f"image {self.images} {self.rng.random()}".encode()).digest()
        start = len(ids)
        ids.extend([self.image_token_id] * tokens)
        return (start, start + tokens, key), grid


def _single(b: Builder, rid: str, sizes: list[tuple[int, int]], text: int, out: int) -> SimRequest:
    ids = b.text(8)  # the chat template's system turn
    images, grids = [], []
    for hw in sizes:
        span, grid = b.image(ids, hw)
        images.append(span)
        grids.append(grid)
    ids.extend(b.text(text))
    return SimRequest(rid, ids, images, grids, out)


def _photo(rng: random.Random) -> tuple[int, int]:
    """A photo or screenshot of 400-1,600 image tokens at a 4:3, 16:9 or 3:4 aspect."""
    tokens = rng.randint(400, 1600)
    aspect = rng.choice((4 / 3, 16 / 9, 3 / 4))
    h = int(math.sqrt(tokens * FACTOR * FACTOR / aspect))
    return h, int(h * aspect)


def chat(n: int, rng: random.Random, b: Builder) -> list[SimRequest]:
    return [_single(b, f"chat-{i}", [_photo(rng)], rng.randint(20, 120), rng.randint(32, 256)) for i in range(n)]


def documents(n: int, rng: random.Random, b: Builder) -> list[SimRequest]:
    return [
        _single(b, f"doc-{i}", [(1120, 896)] * rng.randint(2, 3), rng.randint(60, 200), rng.randint(128, 384))
        for i in range(n)
    ]


def multi_turn(n: int, rng: random.Random, b: Builder, turns: int = 3) -> list[SimRequest]:
    """Conversations of `turns` turns until `n` requests; each turn's prompt is the last one's prompt, its
    answer (the fake model's tokens for that prompt) and a new question."""
    out: list[SimRequest] = []
    conversation = 0
    while len(out) < n:
        first = _single(b, f"conv-{conversation}-0", [_photo(rng)], rng.randint(20, 80), rng.randint(64, 192))
        out.append(first)
        previous = first
        for turn in range(1, turns):
            if len(out) == n:
                break
            seed = prompt_seed(previous.prompt_ids)
            answer = [toy_token(seed, k) for k in range(previous.max_new_tokens)]
            ids = previous.prompt_ids + answer + b.text(6 + rng.randint(20, 80))
            req = SimRequest(
                f"conv-{conversation}-{turn}", ids, list(previous.images), list(previous.grids),
                rng.randint(64, 192), follows=previous.id,
            )  # fmt: skip
            out.append(req)
            previous = req
        conversation += 1
    return out


def vision_arena(n: int, rng: random.Random, b: Builder) -> list[SimRequest]:
    """VisionArena-Chat-like first turns: one user image each, a 10-200 token question, and vLLM's output
    length for the set (128 tokens; 20% of turns end earlier, at 16-128, as EOS ends some there).
    The image sizes are assumed (docs/simulator.md): 45% screenshots of 1280 x 720 scaled by 0.6-1.0,
    35% photos re-encoded to a longest side of 1024 (4:3), 20% small images of 384-768 pixels a side."""
    reqs = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.45:
            scale = rng.uniform(0.6, 1.0)
            hw = (int(720 * scale), int(1280 * scale))
        elif kind < 0.80:
            hw = rng.choice(((768, 1024), (1024, 768)))
        else:
            side = rng.randint(384, 768)
            hw = (side, int(side * rng.uniform(0.75, 1.33)))
        out = 128 if rng.random() < 0.8 else rng.randint(16, 128)
        reqs.append(_single(b, f"va-{i}", [hw], rng.randint(10, 200), out))
    return reqs


def random_io(n: int, b: Builder, prompt: int, output: int) -> list[SimRequest]:
    return [SimRequest(f"random-{i}", b.text(prompt), [], [], output) for i in range(n)]


def from_file(requests: list[dict], b: Builder, tokenize: Any, default_out: int) -> list[SimRequest]:
    """Requests of a `cluster.launch` file: text through `tokenize`, images by their pixel size."""
    from PIL import Image

    out = []
    for request in requests:
        texts, paths = _parts(request)
        ids = b.text(8)
        images, grids = [], []
        for path in paths:
            with Image.open(path) as image:
                width, height = image.size
            span, grid = b.image(ids, (height, width), hashlib.sha256(str(path).encode()).digest())
            images.append(span)
            grids.append(grid)
        ids.extend(b.text(sum(len(tokenize(t)) for t in texts)))
        out.append(
            SimRequest(str(request["id"]), ids, images, grids, int(request.get("max_new_tokens") or default_out))
        )
    return out


def _parts(request: dict) -> tuple[list[str], list[str]]:
    """The texts and local image paths of a request (`prompt` + `images`, or `messages`)."""
    if request.get("messages") is None:
        return [request.get("prompt") or ""], [str(p) for p in request.get("images") or []]
    texts, paths = [], []
    for message in request["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") in ("image", "image_url"):
                source = part.get("image") or (part.get("image_url") or {}).get("url", "")
                paths.append(str(source).removeprefix("file://"))
    return texts, paths


def workload(
    spec: str,
    n: int,
    seed: int,
    image_token_id: int,
    tokenize: Any,
    default_out: int,
    special: frozenset[int] = frozenset(),
) -> list[SimRequest]:
    """`n` requests of the workload `spec` (a name, `random:IN:OUT` or a request file), drawn with `seed`; text
    ids avoid `special` (the tokenizer's vision and EOS ids).

    Raises ValueError naming the value when `spec` is none of them.
    """
    rng = random.Random(seed)
    b = Builder(image_token_id, rng, special)
    if spec == "chat":
        return chat(n, rng, b)
    if spec == "documents":
        return documents(n, rng, b)
    if spec == "multi-turn":
        return multi_turn(n, rng, b)
    if spec == "vision-arena":
        return vision_arena(n, rng, b)
    if spec.startswith("random:"):
        parts = spec.split(":")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
            raise ValueError(f"--workload={spec!r}: expected random:IN:OUT with positive integers")
        return random_io(n, b, int(parts[1]), int(parts[2]))
    if spec.endswith((".jsonl", ".json")):
        from cluster.datasets import load_requests

        requests = load_requests(spec, None, 1, 1, n, Path.cwd())
        return from_file(requests, b, tokenize, default_out)
    raise ValueError(f"--workload={spec!r}: choose {', '.join(NAMED)}, random:IN:OUT or a .jsonl/.json request file")
