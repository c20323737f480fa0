"""What the actors need to know, as plain frozen dataclasses; `cluster` builds them from the run config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model.device import KV_BLOCK_SIZE
from model.kv_cache import blocks_for
from model.sampling import SamplingParams
from model.speculative import SpeculativeConfig

PHASE_CALLS = ("socket", "compiled", "ordinary")  # how a DP group's calls reach its workers (`ray.phase_calls`)


@dataclass(frozen=True)
class WorkerConfig:
    """One ShardWorker: the checkpoint, the device and the shapes of its KV cache."""

    model_path: str
    device: str  # cpu | cuda | npu
    dtype: str
    exe_mode: str
    vision_mode: str
    max_batch_size: int
    max_seq_len: int
    vision_cache_bytes: int = 0
    fused_ops: bool = False
    decode_attention: str | None = None  # with fused_ops: "paged" (None) or "gather" (RunConfig.decode_attention)
    quantization: str = "auto"  # "none" refuses a quantized checkpoint (RunConfig.quantization)
    profile_dir: str | None = None
    num_kv_blocks: int | None = None  # None: max_batch_size sequences of max_seq_len (+ the null block)
    kv_block_size: int | None = None  # None: the device's default (model.device.KV_BLOCK_SIZE)
    speculative: SpeculativeConfig | None = None  # speculative decoding (None: off)

    def kv_pool(self) -> tuple[int, int]:
        """(blocks, tokens per block) of each rank's KV pool, block 0 (the null block) included."""
        size = self.kv_block_size or KV_BLOCK_SIZE[self.device]
        blocks = self.num_kv_blocks or self.max_batch_size * blocks_for(self.max_seq_len, size) + 1
        return blocks, size


@dataclass(frozen=True)
class EngineConfig:
    """The Coordinator: its workers, its scheduler, its limits and its timeouts."""

    worker: WorkerConfig
    tp_size: int
    dp_size: int
    worker_options: dict[str, Any]  # `actor.options(...)` resources of one worker (fits one bundle)
    namespace: str
    input_max_len: int
    max_images_per_prompt: int
    max_videos_per_prompt: int = 2
    max_video_seconds: float = 3600.0  # a longer video is refused (serve.max_video_seconds)
    max_video_bytes: int = 256 * 1024 * 1024  # a larger video file is refused (serve.max_video_bytes)
    sampling: SamplingParams = field(default_factory=SamplingParams)  # of requests that carry none
    policy: str = "continuous"
    prefix_caching: bool = True
    prefill_chunk_tokens: int = 2048
    decode_steps_per_call: int | str = "auto"  # an integer, or "auto" (actors/steps_per_call.py)
    max_decode_call_ms: float = 500.0
    async_scheduling: bool = True  # plan the next step call while a pure-decode call runs (actors/group_loop.py)
    max_decode_stall: float | None = 0.5  # a round's prompt chunks may add this x a decode step (None: no cap)
    encoder_budget_tokens: int | None = 2048  # image-pad tokens of vision encode per round (None: no bound)
    worker_timeout_s: float = 600.0
    rendezvous_timeout_s: float = 300.0
    max_group_restarts: int = 3
    phase_calls: str = "socket"  # one of PHASE_CALLS: how a group's calls reach its workers (actors/group_factory.py)
    dist_env: dict[str, str] = field(default_factory=dict)
    profile: bool = False
    grammar_cache_size: int = 256  # structured-output grammars whose check is kept (actors/grammars.py)
    grammar_compile_timeout_s: float = 10.0
