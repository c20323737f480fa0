"""The prefix cache with images, through the Coordinator's own path (no Ray, no model): two different images of
the same size behind the same text have the same token ids, and only the images' keys tell their KV apart.

The Coordinator runs in this process with prefix caching on, over a fake group whose toy model keeps its KV in
the block pool: each position of a block holds the token computed there and, inside an image, a digest of the
pixels the group's `encode` call was given for that image. The next token is a hash of the history read back
through the request's block table, so a request that reuses another image's blocks reads that image and gets
other tokens than it gets alone.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from actors.config import EngineConfig, WorkerConfig
from actors.coordinator import Coordinator
from cluster.tools.fake_workers import TOKEN_RANGE, FakeSeq, FakeWorkerGroup
from model.batch import image_spans
from model.processor import PreparedRequest, PromptBuilder
from tests.test_group_loop import NoPlacement

BLOCK = 4
PROMPT = "Describe this picture in a few words."
NEW_TOKENS = 8


def toy_next(history: list[tuple[int, bytes]]) -> int:
    """The toy model: the next token is a hash of the (token, image digest) history."""
    digest = hashlib.sha256(b"".join(t.to_bytes(4, "little") + image for t, image in history)).digest()
    low, high = TOKEN_RANGE
    return low + int.from_bytes(digest[:4], "little") % (high - low)


@dataclass
class KVReadingGroup(FakeWorkerGroup):
    """FakeWorkerGroup whose tokens come from what the request's block table reads back from the KV pool."""

    image_token_id: int = -1
    kv: dict[int, list[tuple[int, bytes] | None]] = field(default_factory=dict)  # block -> its positions
    encoded: dict[str, list[bytes]] = field(default_factory=dict)  # request -> pixel digests of its encoded images
    content: dict[str, list[bytes | None]] = field(default_factory=dict)  # request -> per prompt position
    written: dict[str, int] = field(default_factory=dict)  # request -> positions written to its blocks

    async def call(self, method: str, *args: Any) -> list[dict]:
        if method == "encode":
            for request in args[0]:
                sizes = [int(grid.prod()) for grid in request.image_grid_thw]
                pixels = torch.split(request.pixel_values, sizes)
                digests = [hashlib.sha256(p.numpy().tobytes()).digest()[:8] for p in pixels]
                self.encoded.setdefault(request.request_id, []).extend(digests)
        return await super().call(method, *args)

    def _step(
        self,
        releases: list[str],
        preempted: list[str],
        admissions: list[tuple],
        tables: dict[str, tuple[int, list[int]]],
        chunks: list[tuple[str, int, int]],
        decode: list[str],
        steps: int,
        profile: bool = False,
        forks: list[tuple] | None = None,
    ) -> dict:
        for rid in releases:
            self.content.pop(rid, None)
            self.written.pop(rid, None)
        for rid in [*releases, *preempted]:
            self.encoded.pop(rid, None)
        for rid in preempted:
            self.written[rid] = 0
        for request, _, _, num_cached in admissions:
            self.content[request.request_id] = self._prompt_content(request)
            self.written[request.request_id] = num_cached  # the cached positions are already in its blocks
        answer = super()._step(releases, preempted, admissions, tables, chunks, decode, steps, profile, forks)
        for rid, _, _ in chunks:  # a chunk that ended before its prompt did samples nothing, but writes
            if rid in self.seqs and rid not in answer["errors"]:
                self._write(rid, self.seqs[rid])
        return answer

    def _prompt_content(self, request: PreparedRequest) -> list[bytes | None]:
        """What each prompt position holds besides its token: b"" for text, the digest of its image's pixels
        where an encode gave them (the images after the cached prefix), None for an image never encoded here."""
        content: list[bytes | None] = [b""] * len(request.input_ids)
        spans = image_spans(request.input_ids, self.image_token_id)
        digests = self.encoded.pop(request.request_id, [])
        for i, (start, end) in enumerate(spans):
            j = i - (len(spans) - len(digests))  # the encoded images are the prompt's last ones
            content[start:end] = [digests[j] if j >= 0 else None] * (end - start)
        return content

    def _write(self, rid: str, seq: FakeSeq) -> None:
        """Write the positions computed since the last write into the request's blocks."""
        content, table = self.content[rid], seq.table
        for pos in range(self.written[rid], seq.num_computed):
            image = content[pos] if pos < len(content) else b""
            assert image is not None, f"{rid}: position {pos} is in an image that was never encoded"
            self.kv.setdefault(table[pos // BLOCK], [None] * BLOCK)[pos % BLOCK] = (seq.tokens[pos], image)
        self.written[rid] = seq.num_computed

    def _sample(self, rid: str, seq: FakeSeq, out: dict[str, dict], now: float) -> None:
        self._write(rid, seq)
        table = seq.table
        history = [self.kv[table[pos // BLOCK]][pos % BLOCK] for pos in range(seq.num_computed)]
        token = toy_next(history)
        seq.tokens.append(token)
        if len(seq.output) >= seq.max_new_tokens:  # every request here ignores EOS
            seq.finish_reason = "length"
        item = out.setdefault(rid, {"request_id": rid, "tokens": [], "times": [], "finish_reason": None})
        item["tokens"].append(token)
        item["times"].append(now)
        item["finish_reason"] = seq.finish_reason


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two different images of the same size."""
    root = tmp_path_factory.mktemp("twins")
    paths = []
    for seed in (11, 12):
        pixels = np.random.default_rng(seed).integers(0, 256, (100, 150, 3), dtype=np.uint8)
        paths.append(str(root / f"twin-{seed}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths[0], paths[1]


def _coordinator(model_path: Path) -> Coordinator:
    worker = WorkerConfig(str(model_path), "cpu", "float32", "eager", "dp", 2, 256, kv_block_size=BLOCK)
    cfg = EngineConfig(
        worker, tp_size=1, dp_size=1, worker_options={}, namespace="test", input_max_len=200,
        max_images_per_prompt=1, max_group_restarts=0, prefix_caching=True,
    )  # fmt: skip
    image_token_id = PromptBuilder.from_pretrained(model_path).image_token_id

    def group(dp_rank: int, cfg: EngineConfig, strategies: list[Any]) -> KVReadingGroup:
        return KVReadingGroup(dp_rank, cfg, strategies, image_token_id=image_token_id)

    return Coordinator(cfg, NoPlacement(), [0], group_factory=group)


def _request(rid: str, image: str) -> dict:
    return {"id": rid, "prompt": PROMPT, "images": [image], "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


async def _one_by_one(model_path: Path, requests: list[dict]) -> list[dict]:
    """Each request served alone, in order, by one fresh Coordinator (its prefix cache shared)."""
    coord = _coordinator(model_path)
    await coord.setup()
    try:
        records = [(await coord.generate([request]))[0] for request in requests]
    finally:
        await coord.shutdown()
    assert all(r["error"] is None for r in records), [r["error"] for r in records]
    return records


def test_another_image_behind_the_same_text_hits_the_cache_only_up_to_the_image(
    tiny_checkpoint: Path, twins: tuple[str, str]
) -> None:
    a, b, a_again = asyncio.run(
        _one_by_one(tiny_checkpoint, [_request("a", twins[0]), _request("b", twins[1]), _request("a-again", twins[0])])
    )
    (b_alone,) = asyncio.run(_one_by_one(tiny_checkpoint, [_request("b", twins[1])]))

    builder = PromptBuilder.from_pretrained(tiny_checkpoint)
    ids = builder.build(_request("a", twins[0])).input_ids
    assert builder.build(_request("b", twins[1])).input_ids == ids  # only the pixels differ
    ((start, end),) = image_spans(ids, builder.image_token_id)
    assert a["cached_tokens"] == b_alone["cached_tokens"] == 0
    # The other image's blocks are not reused: the hit stops before the first block that holds image tokens,
    # and the tokens are the ones it gets alone, not the first image's.
    assert b["cached_tokens"] == start // BLOCK * BLOCK, (b["cached_tokens"], start, end)
    assert b["output_token_ids"] == b_alone["output_token_ids"]
    assert b["output_token_ids"] != a["output_token_ids"]
    # The first image, asked about again, hits past its image tokens and gets its own tokens.
    assert a_again["cached_tokens"] >= end, (a_again["cached_tokens"], end)
    assert a_again["output_token_ids"] == a["output_token_ids"]
