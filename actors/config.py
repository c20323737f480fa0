"""What the actors need to know, as plain frozen dataclasses; `cluster` builds them from the run config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    profile_dir: str | None = None


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling settings of requests that do not carry their own."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False


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
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    policy: str = "continuous"
    prefill_chunk_tokens: int = 2048
    decode_steps_per_call: int = 4
    worker_timeout_s: float = 600.0
    rendezvous_timeout_s: float = 300.0
    max_group_restarts: int = 3
    dist_env: dict[str, str] = field(default_factory=dict)
    profile: bool = False
