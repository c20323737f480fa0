"""The model on one rank, Ray-free: vision encode, packed eager forwards, static-shape (graph) decode.

The KV cache is a pool of fixed-size blocks (model/kv_cache.py); the running requests and their block
tables are `model.batch.RunningBatch`'s. `ModelRunner.generate` runs a batch to completion in process,
each request in a fixed slot of blocks. Every rank of a tensor-parallel group calls the same methods
with the same arguments.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.batch import GenerationResult, generate
from model.config import ModelConfig
from model.cpu_linear import tune_cpu_linears
from model.device import DTYPES, KV_BLOCK_SIZE
from model.graph import CompiledDecode, GraphDecode, decode_lengths, pick_length
from model.kv_cache import NULL_BLOCK, PagedKVCache, blocks_for, slot_tables
from model.loader import load_weights
from model.npu_ops import decode_ops
from model.parallel import SINGLE, ParallelContext
from model.processor import PreparedRequest
from model.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from model.rotary import mrope_positions
from model.sampling import SamplingParams
from model.speculative import SpeculativeConfig
from model.text import PackedBatch
from model.vision_cache import VisionCache, image_key

if TYPE_CHECKING:
    from model.draft import Drafter

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def batch_buckets(max_batch_size: int) -> list[int]:
    """Decode batch sizes a step is padded to: powers of two, and the maximum itself."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return sizes + [max_batch_size]


def assign_images(token_counts: list[int], ranks: int) -> list[list[int]]:
    """Split images over ranks, largest first onto the least loaded rank; deterministic."""
    loads = [0] * ranks
    owned: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(token_counts)), key=lambda i: (-token_counts[i], i)):
        r = min(range(ranks), key=lambda r: (loads[r], r))
        owned[r].append(i)
        loads[r] += token_counts[i]
    return [sorted(o) for o in owned]


class ModelRunner:
    """Loads this rank's shard of a checkpoint and runs the three phases."""

    def __init__(
        self,
        model_path: str | Path,
        ctx: ParallelContext = SINGLE,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        max_batch_size: int = 4,
        max_seq_len: int = 2048,
        vision_mode: str = "dp",
        progress: bool = False,
        fused_ops: bool = False,
        vision_cache_bytes: int = 0,
        num_kv_blocks: int | None = None,
        kv_block_size: int | None = None,
        quantization: str = "auto",
        decode_attention: str | None = None,
    ) -> None:
        """max_seq_len: the longest sequence (prompt + new tokens) one request may reach. The KV pool holds
        `num_kv_blocks` blocks of `kv_block_size` tokens (defaults: the device's block size, and enough
        blocks for max_batch_size sequences of max_seq_len, plus the null block). decode_attention: with
        fused_ops, "paged" (None: the default) reads the cache through block tables in the NPU kernel,
        "gather" copies the live blocks first (model/npu_ops.py)."""
        if vision_mode not in ("dp", "tp"):
            raise ValueError(f"vision_mode={vision_mode!r} must be 'dp' or 'tp'")
        self.model_path = Path(model_path)
        self.ctx = ctx
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.config = ModelConfig.from_pretrained(model_path)
        self.config.validate_tp(ctx.size)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.vision_dp = vision_mode == "dp" and ctx.size > 1
        vision_ctx = ctx if vision_mode == "tp" and self.config.vision_divides(ctx.size) else SINGLE
        if vision_mode == "tp" and vision_ctx is SINGLE and ctx.size > 1:
            logger.warning("vision tower sizes do not divide tp_size=%d: running it replicated", ctx.size)
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = Qwen2_5_VLForConditionalGeneration(self.config, ctx, vision_ctx)
        self.loaded = load_weights(
            self.model, model_path, progress, f"rank {ctx.rank} loading weights", quantization=quantization
        )
        self.model.eval().requires_grad_(False)
        if self.device.type == "cpu":  # the faster form of few-row products here, per weight shape (`linear`)
            tune_cpu_linears([*self.model.model.layers.parameters(), self.model.lm_head.weight])
        attn = self.model.model.layers[0].self_attn
        self.block_size = kv_block_size or KV_BLOCK_SIZE.get(self.device.type, 16)
        self.max_blocks_per_seq = blocks_for(max_seq_len, self.block_size)
        if num_kv_blocks is None:
            num_kv_blocks = max_batch_size * self.max_blocks_per_seq + 1
        self.cache = PagedKVCache.allocate(
            self.config.text.num_hidden_layers,
            num_kv_blocks,
            self.block_size,
            attn.num_kv_heads,
            attn.head_dim,
            self.dtype,
            self.device,
        )
        self.model.model.attach_cache(self.cache)
        self._slot_rows: dict[int, torch.Tensor] = {}  # batch size -> fixed slot tables (see `decode`)
        self.buckets = batch_buckets(max_batch_size)
        self.model.model.decode_ops = decode_ops(fused_ops, decode_attention)  # npu fused kernels, or plain PyTorch
        self.model.visual.attention_ops = self.model.model.decode_ops  # the tower's varlen attention
        self.decode_fn = self.model.decode
        self.fused_ops = fused_ops
        self.paged_decode = self.model.model.decode_ops.paged  # decode takes each row's KV length on the host
        self.decode_lengths = decode_lengths(self.device.type, False, max_seq_len, fused_ops, self.paged_decode)
        self.vision_cache = VisionCache(vision_cache_bytes) if vision_cache_bytes else None

    # ----------------------------------------------------------------------------- vision encode
    @torch.inference_mode()
    def encode_images(self, requests: list[PreparedRequest]) -> list[torch.Tensor | None]:
        """Embeddings (num_image_tokens, hidden) per request, None for text-only requests.

        With a vision cache, each image is first looked up by its processed pixels and grid; an image
        met before (in an earlier call, or earlier in this one) is not encoded again. Only the misses
        go through the tower, split over the ranks in vision dp mode: every rank sees the same images
        and its cache the same history, so all ranks take the same decisions and the same collectives.
        """
        images: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (request index, grid (3,), patches)
        for i, req in enumerate(requests):
            if req.image_grid_thw is None:
                continue
            offset = 0
            for grid in req.image_grid_thw:
                n = int(grid.prod())
                images.append((i, grid, req.pixel_values[offset : offset + n]))
                offset += n
        if not images:
            return [None] * len(requests)
        embeds: list[torch.Tensor | None] = [None] * len(images)
        source = list(range(len(images)))  # the image whose embeddings image j takes
        todo = source[:]
        cache = self.vision_cache
        keys: list[bytes] = []
        if cache is not None:
            keys = [image_key(patches, grid) for _, grid, patches in images]
            first: dict[bytes, int] = {}
            todo = []
            for j, key in enumerate(keys):
                if key in first:  # the same image earlier in this call
                    source[j] = first[key]
                    cache.record_hit()
                    continue
                first[key] = j
                embeds[j] = cache.get(key)
                if embeds[j] is None:
                    todo.append(j)
        for j, emb in zip(todo, self._encode([images[j] for j in todo])):
            embeds[j] = emb
            if cache is not None:
                cache.put(keys[j], emb.clone())  # a copy: `emb` may be a view into a batch-wide buffer
        out: list[list[torch.Tensor]] = [[] for _ in requests]
        for j, (i, _, _) in enumerate(images):
            out[i].append(embeds[source[j]])
        return [torch.cat(o) if o else None for o in out]

    def _encode(self, images: list[tuple[int, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """(request index, grid, patches) per image -> embeddings per image, in order.

        In vision dp mode each rank encodes its share and one all_gather gives every rank all of them;
        every rank must call this with the same images (an empty list makes no collective on any rank).
        """
        if not images:
            return []
        unit = self.config.vision.spatial_merge_size**2
        counts = [int(g.prod()) // unit for _, g, _ in images]
        owners = assign_images(counts, self.ctx.size) if self.vision_dp else [list(range(len(images)))]
        mine = owners[self.ctx.rank] if self.vision_dp else owners[0]
        hidden = self.config.text.hidden_size
        local = torch.empty(0, hidden, dtype=self.dtype, device=self.device)
        if mine:
            pixels = torch.cat([images[j][2] for j in mine]).to(self.device)
            grids = torch.stack([images[j][1] for j in mine])
            local = self.model.visual(pixels, grids)
        if not self.vision_dp:
            return list(local.split(counts))
        width = max(sum(counts[j] for j in o) for o in owners)
        padded = torch.zeros(width, hidden, dtype=local.dtype, device=self.device)
        padded[: local.shape[0]] = local
        gathered = self.ctx.all_gather(padded, dim=0).view(self.ctx.size, width, hidden)
        per_image: list[torch.Tensor] = [local] * len(images)
        for r, owned in enumerate(owners):
            start = 0
            for j in owned:
                per_image[j] = gathered[r, start : start + counts[j]]
                start += counts[j]
        return per_image

    def vision_cache_stats(self) -> dict[str, int]:
        """Cumulative vision-cache hits and misses, and the bytes and entries held (all 0 without a cache)."""
        if self.vision_cache is None:
            return {"hits": 0, "misses": 0, "bytes": 0, "entries": 0}
        return self.vision_cache.stats()

    # ----------------------------------------------------------------------------- prefill / decode
    @torch.inference_mode()
    def prefill(
        self, request: PreparedRequest, image_embeds: torch.Tensor | None, slot: int, all_logits: bool = False
    ) -> tuple[torch.Tensor, int]:
        """Fill slot `slot`'s blocks (`slot_table`) with the whole prompt -> (logits of the last position, or
        of all, rope delta). For in-process checks and tools; the engine goes through RunningBatch."""
        positions, delta = self.prompt_positions(request)
        ids = torch.tensor(request.input_ids, dtype=torch.long, device=self.device)
        length = len(request.input_ids)
        rows = None if all_logits else torch.tensor([length - 1], device=self.device)
        packed = PackedBatch.build([(0, length, self.slot_table(slot))], self.block_size, self.device)
        logits = self.model.prefill(ids, positions.to(self.device), image_embeds, packed, rows)
        return (logits if all_logits else logits[0]), delta

    def slot_table(self, slot: int) -> list[int]:
        """The fixed blocks of slot `slot` (see kv_cache.slot_tables); ValueError if the pool does not hold it."""
        table = slot_tables(slot + 1, self.max_seq_len, self.block_size)[slot]
        if table[-1] >= self.cache.num_blocks:
            raise ValueError(f"slot {slot} needs blocks up to {table[-1]}; the pool has {self.cache.num_blocks}")
        return table

    def table_tensor(self, tables: list[list[int]]) -> torch.Tensor:
        """Block tables as a (B, max_blocks_per_seq) tensor on the device, padded with the null block."""
        width = self.max_blocks_per_seq
        rows = [t + [NULL_BLOCK] * (width - len(t)) for t in tables]
        if any(len(r) > width for r in rows):
            raise ValueError(f"a block table is longer than max_blocks_per_seq={width}")
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def prompt_positions(self, request: PreparedRequest) -> tuple[torch.Tensor, int]:
        """M-RoPE positions (3, L) of a prompt and its rope delta (decode position = cache length + delta)."""
        return mrope_positions(
            request.input_ids,
            request.image_grid_thw,
            self.config.image_token_id,
            self.config.vision.spatial_merge_size,
            self.config.video_token_id,
            request.second_per_grid_ts,
            self.config.vision.tokens_per_second,
        )

    @torch.inference_mode()
    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache_lens: torch.Tensor,
        max_len: int | None = None,
        block_tables: torch.Tensor | None = None,
        kv_lens: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """One step for B rows (B a bucket size) -> logits (B, vocab).

        block_tables (B, max_blocks_per_seq) (`table_tensor`); None: the fixed tables of slots 0..B-1.
        max_len: a host-side bound on cache_lens + 1 over the rows (None: max_seq_len). Attention reads
        the shortest of `self.decode_lengths` that covers it (per device: model/graph.py, decode_lengths).
        kv_lens: cache_lens + 1 as host ints (padded rows: 1), what the paged NPU kernel reads per row
        (`paged_decode`); without them it reads cache_lens back from the device once. Unused otherwise.
        """
        if block_tables is None:
            rows = tokens.shape[0]
            if rows not in self._slot_rows:
                self._slot_rows[rows] = self.table_tensor([self.slot_table(s) for s in range(rows)])
            block_tables = self._slot_rows[rows]
        length = pick_length(self.decode_lengths, max_len)
        if not self.paged_decode:
            return self.decode_fn(tokens, positions, cache_lens, block_tables, length)
        lens = (cache_lens + 1).tolist() if kv_lens is None else list(kv_lens)
        return self.decode_fn(tokens, positions, cache_lens, block_tables, length, lens)

    def add_decode_buckets(self, sizes: list[int]) -> None:
        """More decode batch sizes (before `capture_graphs`): speculative verification runs k + 1 query rows
        per sequence, and a draft's first step two (model/speculative.py, model/draft.py)."""
        bad = [s for s in sizes if not isinstance(s, int) or s < 1]
        if bad:
            raise ValueError(f"decode buckets must be positive integers, got {bad}")
        self.buckets = sorted(set(self.buckets) | set(sizes))

    # ----------------------------------------------------------------------------- warm-up / graphs
    @torch.inference_mode()
    def warmup(self) -> None:
        """One short prefill and one decode step, so first-request latency excludes one-time costs.

        The prefill writes block 1 only (every pool has it), not slot 0's max_seq_len worth of blocks: a
        pool sized by kv_cache.num_blocks or memory_gb may hold less than one max_seq_len sequence.
        """
        length = min(4, self.block_size)
        positions, _ = self.prompt_positions(PreparedRequest("warmup", [0] * length, None, None))
        packed = PackedBatch.build([(0, length, [NULL_BLOCK + 1])], self.block_size, self.device)
        ids = torch.zeros(length, dtype=torch.long, device=self.device)
        rows = torch.tensor([length - 1], device=self.device)
        self.model.prefill(ids, positions.to(self.device), None, packed, rows)
        one = torch.zeros(1, dtype=torch.long, device=self.device)
        self.decode(one, one + length, one + length, block_tables=self.table_tensor([[]]))

    @torch.inference_mode()
    def capture_graphs(self, buckets: list[int] | None = None) -> None:
        """Switch decode to graph mode: capture (cuda/npu) or compile (cpu) each batch bucket and length.

        `buckets` (default: all of `self.buckets`) limits which sizes are prepared now; on cpu any
        other bucket compiles on first use, on cuda/npu only the prepared ones can run. Lengths are
        `decode_lengths(device, graph=True)`: every length bucket on cuda (and npu with the gather), a few on
        cpu (`cpu_graph_lengths`), max_seq_len with the paged kernel (one graph per batch bucket, lengths
        updated per step). The dummy steps read and write the null block only.
        """
        sizes = self.buckets if buckets is None else sorted(buckets)
        unknown = [b for b in sizes if b not in self.buckets]
        if unknown:
            raise ValueError(f"buckets {unknown} are not decode buckets of this runner ({self.buckets})")
        lengths = decode_lengths(self.device.type, True, self.max_seq_len, self.fused_ops, self.paged_decode)
        if self.device.type == "cpu":
            shapes = len(self.buckets) * len(lengths) + 2
            self.decode_fn = CompiledDecode(self.model.decode, shapes, cpp_wrapper=self.ctx.size == 1)
            for size in sizes:  # compile each bucket now, not on the first request
                for length in lengths:
                    # Distinct tensors: passing one tensor thrice would make dynamo guard on the aliasing
                    # and recompile on the first real step.
                    steps = (torch.zeros(size, dtype=torch.long) for _ in range(3))
                    self.decode_fn(*steps, self.table_tensor([[]] * size), length)
        else:
            self.decode_fn = GraphDecode(
                self.model.decode, sizes, lengths, self.device, self.max_blocks_per_seq, host_lengths=self.paged_decode
            )
        self.decode_lengths = lengths

    def eager_buckets(self) -> list[dict]:
        """The decode (batch, length) pairs that run eager in graph mode because their capture failed."""
        return self.decode_fn.eager_buckets() if isinstance(self.decode_fn, GraphDecode) else []

    # ----------------------------------------------------------------------------- whole batch
    def check_fits(self, request: PreparedRequest, params: SamplingParams) -> str | None:
        """Why a request cannot run on this runner, or None."""
        need = len(request.input_ids) + params.max_new_tokens
        if not request.input_ids:
            return f"request {request.request_id!r} has an empty prompt"
        if need > self.max_seq_len:
            return (
                f"request {request.request_id!r}: prompt of {len(request.input_ids)} tokens + max_new_tokens="
                f"{params.max_new_tokens} needs {need} KV positions, more than max_seq_len={self.max_seq_len}"
            )
        return None

    def generate(
        self,
        requests: list[PreparedRequest],
        params: list[SamplingParams],
        eos_token_ids: list[int] | None = None,
        speculative: SpeculativeConfig | None = None,
        drafter: Drafter | None = None,
    ) -> list[GenerationResult]:
        """Run requests to completion, max_batch_size at a time; results in request order (`model.batch.generate`)."""
        eos = list(self.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        return generate(self, requests, params, eos, speculative, drafter)
