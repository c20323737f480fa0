"""What the actors need to know, as plain frozen dataclasses; `cluster` builds them from the run config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model.sampling import SamplingParams


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
    quantization: str = "auto"  # "none" refuses a quantized checkpoint (RunConfig.quantization)
    profile_dir: str | None = None


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
    sampling: SamplingParams = field(default_factory=SamplingParams)  # of requests that carry none
    policy: str = "continuous"
    prefill_chunk_tokens: int = 2048
    decode_steps_per_call: int = 4
    worker_timeout_s: float = 600.0
    rendezvous_timeout_s: float = 300.0
    max_group_restarts: int = 3
    dist_env: dict[str, str] = field(default_factory=dict)
    profile: bool = False
