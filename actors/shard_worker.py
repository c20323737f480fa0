"""ShardWorker: one Ray actor per device, holding one tensor-parallel shard of the model.

The Coordinator drives it through: `node_info` -> `rendezvous_address` (rank 0 of the group) ->
`init_process_group` (every rank) -> `load` -> `warmup` -> `generate` (repeatedly). The whole decode
loop of a batch runs inside `generate`, so Ray is crossed once per batch, not once per token.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from cluster.devices import get_device_spec, import_backend, torch_device
from model.parallel import ParallelContext
from model.processor import PreparedRequest
from model.runner import ModelRunner
from model.sampling import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to know; built by the Coordinator from the run config."""

    model_path: str
    device: str
    dtype: str
    exe_mode: str
    vision_mode: str
    max_batch_size: int
    max_seq_len: int
    profile_dir: str | None = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def process_rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class ShardWorker:
    """Owns one device, its shard of the weights and its KV cache."""

    def __init__(self, rank: int, tp_rank: int, tp_size: int, dp_rank: int, config: WorkerConfig) -> None:
        self.rank, self.tp_rank, self.tp_size, self.dp_rank = rank, tp_rank, tp_size, dp_rank
        self.config = config
        self.spec = get_device_spec(config.device)
        import_backend(self.spec)
        self.runner: ModelRunner | None = None
        self.group_ready = False
        self.graph_capture_s = 0.0
        self.warmup_s = 0.0
        logging.basicConfig(level=logging.INFO, format=f"[shard-worker-{rank}] %(message)s")

    def node_info(self) -> dict:
        """Where this worker runs: node id and IP, the device ids Ray gave it, its pid."""
        ctx = ray.get_runtime_context()
        device_ids = ctx.get_accelerator_ids().get(self.spec.ray_resource, []) if self.spec.name != "cpu" else []
        return {
            "rank": self.rank, "tp_rank": self.tp_rank, "dp_rank": self.dp_rank,
            "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "device_ids": [str(d) for d in device_ids], "pid": os.getpid(),
        }

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP as Ray sees it and a free port: the address rank 0 of the group listens on."""
        return ray.util.get_node_ip_address(), free_port()

    def init_process_group(self, ip: str, port: int, timeout_s: float) -> None:
        """Join this TP group's process group at tcp://ip:port (gloo, nccl or hccl)."""
        if self.tp_size == 1:
            self.group_ready = True
            return
        if self.spec.name != "cpu":
            # Ray restricts the visible devices to those of this actor, so index 0 is ours.
            getattr(torch, self.spec.name).set_device(0)
        dist.init_process_group(self.spec.dist_backend, init_method=f"tcp://{ip}:{port}", rank=self.tp_rank,
                                world_size=self.tp_size, timeout=timedelta(seconds=timeout_s))
        self.group_ready = True

    def load(self) -> dict:
        """Build this rank's shard from the checkpoint and allocate its KV cache."""
        start = time.perf_counter()
        cfg = self.config
        ctx = ParallelContext(rank=self.tp_rank, size=self.tp_size,
                              group=dist.group.WORLD if self.tp_size > 1 else None)
        self.runner = ModelRunner(cfg.model_path, ctx=ctx, device=torch_device(self.spec, 0), dtype=cfg.dtype,
                                  max_batch_size=cfg.max_batch_size, max_seq_len=cfg.max_seq_len,
                                  vision_mode=cfg.vision_mode, progress=True)
        return {"rank": self.rank, "load_s": time.perf_counter() - start, **self.memory()}

    def warmup(self) -> dict:
        """Run one tiny batch eagerly, then capture/compile decode graphs when exe_mode is graph."""
        runner = self._runner()
        start = time.perf_counter()
        runner.warmup()
        self.warmup_s = time.perf_counter() - start
        if self.config.exe_mode == "graph":
            start = time.perf_counter()
            runner.capture_graphs()
            self.graph_capture_s = time.perf_counter() - start
        return {"rank": self.rank, "warmup_s": self.warmup_s, "graph_capture_s": self.graph_capture_s}

    def generate(self, requests: list[PreparedRequest], params: list[SamplingParams],
                 eos_token_ids: list[int] | None, profile: bool = False) -> dict:
        """Run one batch to completion; returns per-request results and phase times."""
        runner = self._runner()
        if profile and self.config.profile_dir:
            results = self._profiled(runner, requests, params, eos_token_ids)
        else:
            results = runner.generate(requests, params, eos_token_ids)
        return {"results": [asdict(r) for r in results], "phases": asdict(runner.last_phases)}

    def memory(self) -> dict:
        """Host RSS and, on an accelerator, allocated device memory, in bytes."""
        out = {"rss_bytes": process_rss_bytes(), "device_bytes": 0}
        if self.spec.name != "cpu":
            out["device_bytes"] = int(getattr(torch, self.spec.name).memory_allocated())
        return out

    def environment(self, names: list[str]) -> dict[str, str | None]:
        """The values this worker sees for `names` (to check that dist_env reached it)."""
        return {name: os.environ.get(name) for name in names}

    def health(self) -> bool:
        return True

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _runner(self) -> ModelRunner:
        if self.runner is None:
            raise RuntimeError(f"shard-worker-{self.rank}: load() has not run")
        return self.runner

    def _profiled(self, runner: ModelRunner, requests: list[PreparedRequest], params: list[SamplingParams],
                  eos_token_ids: list[int] | None) -> list:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.spec.name == "cuda":
            activities.append(ProfilerActivity.CUDA)
        out_dir = Path(self.config.profile_dir or ".")
        out_dir.mkdir(parents=True, exist_ok=True)
        with profile(activities=activities) as prof:
            results = runner.generate(requests, params, eos_token_ids)
        trace = out_dir / f"shard-worker-{self.rank}.trace.json"
        prof.export_chrome_trace(str(trace))
        logger.info("profiler trace written to %s", trace)
        return results
