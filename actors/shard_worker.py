"""ShardWorker: one Ray actor per device, holding one tensor-parallel shard of the model.

Set-up: `node_info` -> `rendezvous_address` (rank 0 of the group) -> `init_process_group` (every
rank) -> `load` -> `warmup`. Then the Coordinator runs rounds, the same calls on every rank of the
group: `encode` (vision tower) and `step` (forget, preempt and start requests, set their block tables,
then one packed forward of prompt chunks and decode tokens, or a few pure-decode steps). The worker
keeps the model, the paged KV cache, the graphs and each request's tokens and sampling state; the
Coordinator keeps everything else about a request, and its scheduler owns the blocks. After set-up the
phase calls arrive through `dispatch`: from the call socket `open_call_socket` opens (`ray.phase_calls:
socket`, actors/socket_group.py) or from the group's compiled graph (`compiled`, actors/compiled_group.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist

from actors.call_socket import CallServer
from actors.config import WorkerConfig
from actors.worker_phases import Admission, Fork, WorkerPhases
from model.batch import RunningBatch, TableUpdate
from model.device import bind_device, dist_backend
from model.draft import Drafter, load_drafter
from model.parallel import SINGLE, ParallelContext, free_port
from model.processor import PreparedRequest
from model.runner import ModelRunner, batch_buckets
from model.speculative import verify_buckets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Raised:
    """What `dispatch` answers when the method raised: the exception's type and message."""

    error: str


def process_rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def worker_actor_name(rank: int) -> str:
    """The Ray actor name of the worker holding ``rank``."""
    return f"shard-worker-{rank}"


class ShardWorker:
    """Owns one device, its shard of the weights, its KV cache and the running batch on it."""

    def __init__(self, rank: int, tp_rank: int, tp_size: int, dp_rank: int, config: WorkerConfig) -> None:
        self.rank, self.tp_rank, self.tp_size, self.dp_rank = rank, tp_rank, tp_size, dp_rank
        self.config = config
        self.device = bind_device(config.device, ray.get_runtime_context().get_accelerator_ids(), os.environ)
        self.runner: ModelRunner | None = None
        self.batch: RunningBatch | None = None
        self.phases: WorkerPhases | None = None  # the round calls over the batch, with the embeddings they await
        self.drafter: Drafter | None = None  # the draft model of speculative decoding (model/draft.py)
        self.graph_capture_s = 0.0
        self.warmup_s = 0.0
        self.profiler: Any = None
        self.profiled = False
        self.dispatched = 0  # calls `dispatch` has finished
        self.dispatch_raised: tuple[int, Raised] | None = None  # (call number, what it raised) of the last that raised
        self.dispatch_thread: int | None = None  # the thread `dispatch` last bound the device on
        self.call_server: CallServer | None = None  # the Coordinator's call connection (`open_call_socket`)
        logging.basicConfig(level=logging.INFO, format=f"[{worker_actor_name(rank)}] %(message)s")

    def __repr__(self) -> str:
        # Ray's dashboard shows this in the Actors page's Repr column, and Ray labels an error raised in
        # __init__ with it: it must not fail on a half-initialised worker, or its AttributeError would
        # replace the real error.
        get = self.__dict__.get
        return (
            f"ShardWorker(rank={get('rank', '?')}, tp={get('tp_rank', '?')}/{get('tp_size', '?')}, "
            f"dp={get('dp_rank', '?')}, device={get('device', 'unbound')})"
        )

    # ----------------------------------------------------------------------------- set-up
    def node_info(self) -> dict:
        """Where this worker runs: node id and IP, the device ids Ray gave it and the index it bound, its pid."""
        ctx = ray.get_runtime_context()
        ids = [str(i) for ids in ctx.get_accelerator_ids().values() for i in ids] if self.config.device != "cpu" else []
        return {
            "rank": self.rank,
            "tp_rank": self.tp_rank,
            "dp_rank": self.dp_rank,
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "device": self.config.device,
            "device_ids": ids,
            "device_index": self.device.index or 0,
            "pid": os.getpid(),
        }

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP as Ray sees it and a free port: the address rank 0 of the group listens on."""
        return ray.util.get_node_ip_address(), free_port()

    def init_process_group(self, ip: str, port: int, timeout_s: float) -> None:
        """Join this TP group's process group at tcp://ip:port (gloo, nccl or hccl)."""
        if self.tp_size == 1:
            return
        dist.init_process_group(
            dist_backend(self.config.device),
            init_method=f"tcp://{ip}:{port}",
            rank=self.tp_rank,
            world_size=self.tp_size,
            timeout=timedelta(seconds=timeout_s),
        )

    def load(self) -> dict:
        """Build this rank's shard from the checkpoint and allocate its KV cache."""
        start = time.perf_counter()
        cfg = self.config
        ctx = ParallelContext(
            rank=self.tp_rank, size=self.tp_size, group=dist.group.WORLD if self.tp_size > 1 else None
        )
        self.runner = ModelRunner(
            cfg.model_path,
            ctx=ctx,
            device=self.device,
            dtype=cfg.dtype,
            max_batch_size=cfg.max_batch_size,
            max_seq_len=cfg.max_seq_len,
            vision_mode=cfg.vision_mode,
            progress=True,
            vision_cache_bytes=cfg.vision_cache_bytes,
            fused_ops=cfg.fused_ops,
            decode_attention=cfg.decode_attention,
            num_kv_blocks=cfg.kv_pool()[0],
            kv_block_size=cfg.kv_pool()[1],
            quantization=cfg.quantization,
        )
        spec = cfg.speculative
        self.drafter = None
        if spec is not None:
            self.runner.add_decode_buckets(
                verify_buckets(batch_buckets(cfg.max_batch_size), spec.num_speculative_tokens)
            )
            if spec.method == "draft":
                assert spec.model is not None
                draft_ctx = ctx if spec.draft_tensor_parallel_size > 1 else SINGLE
                self.drafter = load_drafter(self.runner, spec.model, draft_ctx, progress=True)
        self.batch = RunningBatch(self.runner, spec, self.drafter)
        self.phases = WorkerPhases(self.batch)
        return {
            "rank": self.rank,
            "load_s": time.perf_counter() - start,
            "kv_blocks": self.runner.cache.num_blocks,
            "kv_block_size": self.runner.block_size,
            **self.memory(),
        }

    def warmup(self) -> dict:
        """Run one tiny prefill and decode eagerly, then capture/compile decode graphs when exe_mode is graph."""
        runner = self._runner()
        start = time.perf_counter()
        runner.warmup()
        if self.drafter is not None:
            self.drafter.runner.warmup()
        self.warmup_s = time.perf_counter() - start
        if self.config.exe_mode == "graph":
            start = time.perf_counter()
            runner.capture_graphs()
            if self.drafter is not None:
                self.drafter.runner.capture_graphs()
            self.graph_capture_s = time.perf_counter() - start
        return {
            "rank": self.rank,
            "warmup_s": self.warmup_s,
            "graph_capture_s": self.graph_capture_s,
            "eager_buckets": runner.eager_buckets(),
        }

    # ----------------------------------------------------------------------------- phases
    def encode(self, requests: list[PreparedRequest], profile: bool = False) -> dict:
        """Vision encode of the requests' next items; the embeddings wait here for each request's admission
        (`WorkerPhases.encode`)."""
        self._maybe_profile(profile)
        return self._phases().encode(requests)

    def step(
        self,
        releases: list[str],
        preempted: list[str],
        admissions: list[Admission],
        tables: dict[str, TableUpdate],
        chunks: list[tuple[str, int, int]],
        decode: list[str],
        steps: int,
        profile: bool = False,
        forks: list[Fork] | None = None,
        spec_tokens: int = 0,
    ) -> dict:
        """One round on the running batch (`WorkerPhases.step`): releases, preemptions, admissions, forks, block
        tables, then the chunks and decode rows in one packed forward, or `steps` pure-decode steps."""
        self._maybe_profile(profile)
        phases = self._phases()
        out = phases.step(releases, preempted, admissions, tables, chunks, decode, steps, forks, spec_tokens)
        ran_chunks = any(c[0] not in out["errors"] for c in chunks)
        if self.profiler is not None and not ran_chunks and not phases.batch.active:
            self._stop_profile()
        return out

    # ----------------------------------------------------------------------------- phase calls
    def open_call_socket(self, accept_timeout_s: float) -> tuple[str, int, bytes]:
        """Listen for the Coordinator's call connection on this node's IP (actors/call_socket.py): (ip, port,
        token). Calls read from it run through `dispatch`, in order, on the socket's own thread."""
        if self.call_server is not None:
            self.call_server.close()
        self.call_server = CallServer(
            ray.util.get_node_ip_address(),
            self.dispatch,
            lambda e: Raised(f"the answer could not be sent: {type(e).__name__}: {e}"),
            accept_timeout_s,
            name=f"call-socket-{self.rank}",
        )
        return (*self.call_server.address, self.call_server.token)

    def dispatch(self, call: tuple[str, tuple]) -> Any:
        """Run one phase call: `call` is (method name, positional arguments), from the call socket or the
        group's compiled graph.

        A method that raises answers `Raised` instead: an exception in a compiled graph comes back as
        every rank's answer, naming no rank, and the group could not tell a failed call from a failed graph.
        """
        method, args = call
        if self.dispatch_thread != threading.get_ident():  # the socket's or the graph's thread, not Ray's
            self.dispatch_thread = threading.get_ident()
            if self.device.type != "cpu":  # the current device is per thread (CUDA, ACL)
                getattr(torch, self.device.type).set_device(self.device)
        try:
            return getattr(self, method)(*args)
        except Exception as e:
            raised = Raised(f"{type(e).__name__}: {e}")
            self.dispatch_raised = (self.dispatched + 1, raised)
            return raised
        finally:
            self.dispatched += 1

    def dispatch_state(self) -> tuple[int, int, Raised | None]:
        """(calls `dispatch` has finished, the number of the last call that raised (0: none), what it raised), for
        a group checking on a long call; calls are numbered from 1 in the order the graph ran them.

        An ordinary call: it runs beside the graph's loop (Ray's own concurrency group), not after it.
        """
        done = self.dispatched  # read first: `dispatch` records what it raised before it counts the call
        number, raised = self.dispatch_raised or (0, None)
        return done, number, raised

    # ----------------------------------------------------------------------------- queries
    def memory(self) -> dict:
        """Host RSS and, on an accelerator, allocated device memory, in bytes."""
        out = {"rss_bytes": process_rss_bytes(), "device_bytes": 0}
        if self.config.device != "cpu":
            out["device_bytes"] = int(getattr(torch, self.config.device).memory_allocated())
        return out

    def environment(self, names: list[str]) -> dict[str, str | None]:
        """The values this worker sees for `names` (to check that dist_env reached it)."""
        return {name: os.environ.get(name) for name in names}

    def health(self) -> bool:
        return True

    def shutdown(self) -> None:
        if self.call_server is not None:
            self.call_server.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    # ----------------------------------------------------------------------------- helpers
    def _runner(self) -> ModelRunner:
        if self.runner is None:
            raise RuntimeError(f"{worker_actor_name(self.rank)}: load() has not run")
        return self.runner

    def _phases(self) -> WorkerPhases:
        self._runner()
        assert self.phases is not None
        return self.phases

    def _maybe_profile(self, profile: bool) -> None:
        """Start the torch profiler once, when asked; it stops when the running batch next drains."""
        if not profile or self.profiled or not self.config.profile_dir:
            return
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.config.device == "cuda" else [])
        self.profiled = True
        self.profiler = torch_profile(activities=activities)
        self.profiler.__enter__()

    def _stop_profile(self) -> None:
        self.profiler.__exit__(None, None, None)
        out_dir = Path(self.config.profile_dir or ".")
        out_dir.mkdir(parents=True, exist_ok=True)
        trace = out_dir / f"{worker_actor_name(self.rank)}.trace.json"
        self.profiler.export_chrome_trace(str(trace))
        self.profiler = None
        logger.info("profiler trace written to %s", trace)
