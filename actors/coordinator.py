"""Coordinator: one actor per run that owns the ShardWorkers and schedules batches over DP groups.

Requests are turned into model inputs here once (tokenizer, chat template, image processor), then
each DP group takes `batch_size` of them at a time; every rank of the group gets the same batch and
runs vision encode -> prefill -> decode inside one `generate` call. A group whose worker dies or
hangs has its in-flight requests failed with the rank named, and the others go on serving.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import placement_group_table

from actors.metrics import EngineMetrics
from actors.shard_worker import ShardWorker, WorkerConfig
from cluster.config import RunConfig
from cluster.devices import actor_resource_options, get_device_spec
from cluster.placement import Placement, order_groups_by_node, worker_actor_name
from model.processor import PreparedRequest, PromptBuilder
from model.sampling import SamplingParams

logger = logging.getLogger(__name__)

REQUEST_OVERRIDES = ("max_new_tokens", "temperature", "top_p", "seed")
_MAX_SEED = 2**63 - 1


def check_override(key: str, value: Any) -> str | None:
    """Why a per-request sampling override cannot be used, or None (bools are not numbers here)."""
    if key in ("max_new_tokens", "seed"):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"'{key}' must be an integer, got {value!r}"
        lowest = 1 if key == "max_new_tokens" else 0
        if not lowest <= value <= _MAX_SEED:
            return f"'{key}'={value!r} must be >= {lowest}"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"'{key}' must be a finite number, got {value!r}"
    if key == "temperature" and value < 0:
        return f"'temperature'={value!r} must be >= 0"
    if key == "top_p" and not 0 < value <= 1:
        return f"'top_p'={value!r} must be in (0, 1]"
    return None


def failed_record(request: Any, error: str, dp_rank: int | None = None) -> dict:
    """The record of a request that produced no tokens: every result field empty, `error` set."""
    request_id = request.get("id") if isinstance(request, dict) else None
    return {"id": None if request_id is None else str(request_id), "output_token_ids": [], "output_text": "",
            "prompt_tokens": 0, "ttft_s": None, "tpot_s": None, "e2e_s": None, "error": error,
            "finish_reason": None, "dp_rank": dp_rank, "itl_s": []}


class RendezvousError(RuntimeError):
    """A TP group's process group did not form in time."""


@dataclass
class DPGroup:
    """The workers of one TP group (one data-parallel replica)."""

    dp_rank: int
    placement_index: int
    workers: list[Any] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)
    alive: bool = False
    rendezvous: tuple[str, int] | None = None
    stats: list[dict] = field(default_factory=list)


@dataclass
class Pending:
    """A request waiting for a group, or in flight on one."""

    index: int
    prepared: PreparedRequest
    params: SamplingParams


class Coordinator:
    """Schedules vision encode, prefill and decode of request batches on the DP groups."""

    def __init__(self, cfg: RunConfig, placement: Placement) -> None:
        logging.basicConfig(level=logging.INFO, format="[coordinator] %(message)s")
        self.cfg = cfg
        self.placement = placement
        self.spec = get_device_spec(cfg.device)
        data = cfg.data_config
        self.builder = PromptBuilder.from_pretrained(cfg.model_path, max_images=data.max_images_per_prompt)
        self.worker_config = WorkerConfig(
            model_path=cfg.model_path, device=cfg.device, dtype=cfg.dtype, exe_mode=cfg.exe_mode,
            vision_mode=cfg.parallel_config.vision_mode, max_batch_size=data.batch_size,
            max_seq_len=data.input_max_len + data.max_new_tokens,
            profile_dir=cfg.profile_dir if cfg.profile else None)
        node_of_group = [self._node_of(pg) for pg in placement.groups]
        # DP rank d runs in placement group order[d]: groups on one node get adjacent ranks.
        order = order_groups_by_node(node_of_group)
        self.groups = [DPGroup(dp_rank=d, placement_index=g) for d, g in enumerate(order)]
        self.metrics = EngineMetrics()
        self.lock = threading.Lock()
        self.done = 0
        self.total = 0
        self.phase_totals = {"vision_encode_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0}
        self.profiled = False

    # ----------------------------------------------------------------------------- lifecycle
    def setup(self) -> list[dict]:
        """Start every DP group: create workers, form process groups, load shards, warm up."""
        for group in self.groups:
            self._start_group(group)
        return self.topology()

    def rebuild_group(self, dp_rank: int) -> list[dict]:
        """Replace the workers of one DP group (after a failure) without touching the others."""
        group = self.groups[dp_rank]
        self._kill_group(group)
        self._start_group(group)
        return [i for i in self.topology() if i["dp_rank"] == dp_rank]

    def shutdown(self) -> None:
        """Kill every worker and release the placement groups."""
        for group in self.groups:
            self._kill_group(group)
        self.placement.remove()

    def _start_group(self, group: DPGroup) -> None:
        cfg, tp = self.cfg, self.cfg.tp_size
        timeout = cfg.ray.worker_timeout_s
        options = actor_resource_options(self.spec, cfg.ray.num_cpus_per_worker)
        env = {"env_vars": dict(cfg.dist_env)} if cfg.dist_env else None
        group.workers = []
        for tp_rank in range(tp):
            rank = group.dp_rank * tp + tp_rank
            actor = ray.remote(ShardWorker).options(
                name=worker_actor_name(rank), namespace=cfg.ray.namespace, max_restarts=0,
                scheduling_strategy=self.placement.strategy(group.placement_index * tp + tp_rank),
                runtime_env=env, **options)
            group.workers.append(actor.remote(rank, tp_rank, tp, group.dp_rank, self.worker_config))
        try:
            group.infos = self._get([w.node_info.remote() for w in group.workers], timeout, "start")
            ip, port = self._get([group.workers[0].rendezvous_address.remote()], timeout, "rendezvous")[0]
            group.rendezvous = (ip, port)
            self._init_group(group, ip, port)
            loads = self._get([w.load.remote() for w in group.workers], timeout, "load")
            warm = self._get([w.warmup.remote() for w in group.workers], timeout, "warm-up")
        except BaseException:
            self._kill_group(group)
            raise
        group.stats = [{**a, **b} for a, b in zip(loads, warm)]
        for info, load in zip(group.infos, loads):
            self.metrics.record_memory(info["rank"], load)
        group.alive = True
        logger.info("dp group %d ready on %s (rendezvous tcp://%s:%d)", group.dp_rank,
                    group.infos[0]["node_ip"], ip, port)

    def _init_group(self, group: DPGroup, ip: str, port: int) -> None:
        timeout = self.cfg.ray.rendezvous_timeout_s
        refs = [w.init_process_group.remote(ip, port, timeout) for w in group.workers]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout + 5)
        if pending:
            missing = [group.infos[refs.index(r)]["rank"] for r in pending]
            raise RendezvousError(
                f"process group of dp group {group.dp_rank} at tcp://{ip}:{port} did not form within "
                f"{timeout:g}s: rank(s) {missing} did not arrive")
        try:
            ray.get(ready)
        except RayError as e:
            raise RendezvousError(f"process group of dp group {group.dp_rank} at tcp://{ip}:{port} "
                                  f"failed to form: {e}") from e

    def _kill_group(self, group: DPGroup, timeout_s: float = 30.0) -> None:
        """Kill the group's workers and wait (bounded) until their names are free for a rebuild."""
        group.alive = False
        for w in group.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already dead
                pass
        names = [worker_actor_name(group.dp_rank * self.cfg.tp_size + t) for t in range(len(group.workers))]
        group.workers = []
        deadline = time.monotonic() + timeout_s
        for name in names:
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(name, namespace=self.cfg.ray.namespace)
                except ValueError:
                    break
                time.sleep(0.05)

    def _get(self, refs: list, timeout: float, what: str) -> list:
        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError as e:
            raise TimeoutError(f"workers did not finish '{what}' within {timeout:g}s "
                               "(ray.worker_timeout_s)") from e

    @staticmethod
    def _node_of(pg: Any) -> str:
        table = placement_group_table(pg)
        nodes = table.get("bundles_to_node_id", {})
        return str(nodes.get(0, ""))

    # ----------------------------------------------------------------------------- queries
    def topology(self) -> list[dict]:
        """Per rank: rank, tp_rank, dp_rank, node_id, node_ip, device_ids (and rendezvous, alive)."""
        out = []
        for group in self.groups:
            for info in group.infos:
                out.append({**info, "alive": group.alive,
                            "rendezvous": f"tcp://{group.rendezvous[0]}:{group.rendezvous[1]}"
                            if group.rendezvous else None})
        return sorted(out, key=lambda i: i["rank"])

    def progress(self) -> tuple[int, int]:
        """(requests finished, requests submitted) of the generate call in progress."""
        return self.done, self.total

    def stats(self) -> dict:
        """Phase totals of the requests served so far, and each worker's load/warm-up/capture figures."""
        workers = [s for g in self.groups for s in g.stats]
        return {
            "phases": {
                **self.phase_totals,
                "load_s": max((s["load_s"] for s in workers), default=0.0),
                "warmup_s": max((s["warmup_s"] for s in workers), default=0.0),
                "graph_capture_s": max((s["graph_capture_s"] for s in workers), default=0.0),
            },
            "workers": workers,
        }

    # ----------------------------------------------------------------------------- serving
    def generate(self, requests: list[dict]) -> list[dict]:
        """Run requests to completion over the live DP groups; one record per request, in order.

        A request may carry `max_new_tokens`, `temperature`, `top_p` and `seed` of its own.
        """
        if not isinstance(requests, (list, tuple)):
            raise TypeError(f"generate() takes a list of request dicts, got {type(requests).__name__}")
        with self.lock:
            return self._generate(list(requests))

    def _generate(self, requests: list[dict]) -> list[dict]:
        start = time.perf_counter()
        self.done, self.total = 0, len(requests)
        records: list[dict | None] = [None] * len(requests)
        queue: list[Pending] = []
        for i, request in enumerate(requests):
            try:
                queue.append(self._prepare(request, i))
            except (ValueError, TypeError) as e:
                records[i] = self._failed(request, str(e))
            except Exception as e:  # a processor bug must fail this request, not the call
                records[i] = self._failed(request, f"cannot prepare request {i}: {type(e).__name__}: {e}")
        in_flight: dict[int, tuple[list, list[Pending], float]] = {}
        deadline_s = self.cfg.ray.worker_timeout_s
        while queue or in_flight:
            for group in self.groups:
                if group.alive and group.dp_rank not in in_flight and queue:
                    batch, queue = queue[: self.cfg.data_config.batch_size], queue[self.cfg.data_config.batch_size:]
                    in_flight[group.dp_rank] = (self._dispatch(group, batch), batch, time.perf_counter())
            if not in_flight:
                for p in queue:
                    records[p.index] = self._failed(requests[p.index], "no live DP group left to serve it")
                break
            refs = [r for refs, _, _ in in_flight.values() for r in refs]
            ray.wait(refs, num_returns=1, timeout=1.0)
            for dp_rank in list(in_flight):
                refs, batch, dispatched = in_flight[dp_rank]
                group = self.groups[dp_rank]
                failure = self._failure(group, refs, dispatched, deadline_s)
                if failure is None and not all(self._ready(r) for r in refs):
                    continue
                del in_flight[dp_rank]
                if failure is None:
                    try:
                        out = ray.get(refs[0])
                    except RayError as e:
                        failure = f"dp group {dp_rank} failed: {e}"
                if failure is not None:
                    logger.error(failure)
                    self._kill_group(group)
                    for p in batch:
                        records[p.index] = self._failed(requests[p.index], failure, dp_rank)
                    continue
                offset = dispatched - start
                for p, result in zip(batch, out["results"]):
                    records[p.index] = self._record(result, offset, dp_rank)
                for key in self.phase_totals:
                    self.phase_totals[key] += out["phases"][key]
                self.metrics.record_phases(out["phases"], dp_rank)
            self.done = sum(r is not None for r in records)
        for i, record in enumerate(records):
            if record is None:  # cannot happen; never drop a request silently
                records[i] = self._failed(requests[i], "internal error: request was never scheduled")
        self.done = len(records)
        return records

    def _prepare(self, request: dict, index: int) -> Pending:
        if not isinstance(request, dict):
            raise ValueError(f"request {index} is not a dict: {request!r}")
        data = self.cfg.data_config
        values = {"max_new_tokens": data.max_new_tokens, "temperature": data.temperature,
                  "top_p": data.top_p, "seed": data.seed}
        for key in REQUEST_OVERRIDES:
            if request.get(key) is not None:
                problem = check_override(key, request[key])
                if problem is not None:
                    raise ValueError(f"request {request.get('id')!r}: {problem}")
                values[key] = request[key]
        try:
            params = SamplingParams(ignore_eos=data.ignore_eos, **values)
        except ValueError as e:
            raise ValueError(f"request {request.get('id')!r}: {e}") from e
        prepared = self.builder.build(request)
        if len(prepared.input_ids) > data.input_max_len:
            raise ValueError(f"request {prepared.request_id!r}: prompt has {len(prepared.input_ids)} tokens, more "
                             f"than data_config.input_max_len={data.input_max_len}")
        return Pending(index, prepared, params)

    def _dispatch(self, group: DPGroup, batch: list[Pending]) -> list:
        prepared = ray.put([p.prepared for p in batch])
        params = [p.params for p in batch]
        eos = list(self.builder.eos_token_ids)
        profile = self.cfg.profile and not self.profiled
        self.profiled = self.profiled or profile
        return [w.generate.remote(prepared, params, eos, profile) for w in group.workers]

    @staticmethod
    def _ready(ref: Any) -> bool:
        ready, _ = ray.wait([ref], timeout=0)
        return bool(ready)

    def _failure(self, group: DPGroup, refs: list, dispatched: float, deadline_s: float) -> str | None:
        """Why a group's batch failed (a dead or hung rank), or None while it is healthy.

        When one rank dies, its peers fail too (their collective breaks), possibly first: the dead
        ranks are found by pinging every rank, so the message names the rank that died.
        """
        errors: dict[int, RayError] = {}
        for info, ref in zip(group.infos, refs):
            if not self._ready(ref):
                continue
            try:
                ray.get(ref)
            except RayError as e:
                errors[info["rank"]] = e
        if errors:
            dead = self._dead_ranks(group)
            if dead:
                names = ", ".join(f"shard-worker-{r} (rank {r})" for r in dead)
                return f"{names} of dp group {group.dp_rank} died (RayActorError)"
            rank, error = next(iter(errors.items()))
            died = isinstance(error, RayActorError)
            return f"shard-worker-{rank} (rank {rank}) of dp group {group.dp_rank} " + (
                f"died ({type(error).__name__})" if died else f"failed: {error}")
        if time.perf_counter() - dispatched > deadline_s:
            late = [info["rank"] for info, ref in zip(group.infos, refs) if not self._ready(ref)]
            return (f"dp group {group.dp_rank} did not finish its batch within {deadline_s:g}s "
                    f"(ray.worker_timeout_s); rank(s) {late} still running")
        return None

    def _dead_ranks(self, group: DPGroup, timeout_s: float = 5.0) -> list[int]:
        """Ranks of the group whose actor is dead (a ping fails with RayActorError)."""
        refs = [w.health.remote() for w in group.workers]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        dead = []
        for info, ref in zip(group.infos, refs):
            if not self._ready(ref):
                continue  # alive but busy (or hung): not known dead
            try:
                ray.get(ref)
            except RayActorError:
                dead.append(info["rank"])
            except RayError:
                pass
        return dead

    def _record(self, result: dict, offset: float, dp_rank: int) -> dict:
        times = [offset + t for t in result["token_times_s"]]
        tokens = result["output_token_ids"]
        ttft = times[0] if times else None
        e2e = times[-1] if times else None
        tpot = (e2e - ttft) / (len(tokens) - 1) if len(tokens) > 1 else None
        record = {
            "id": result["request_id"], "output_token_ids": tokens,
            "output_text": self.builder.decode(tokens) if result["error"] is None else "",
            "prompt_tokens": result["prompt_tokens"], "ttft_s": ttft, "tpot_s": tpot, "e2e_s": e2e,
            "error": result["error"], "finish_reason": result["finish_reason"], "dp_rank": dp_rank,
            "itl_s": [b - a for a, b in zip(times, times[1:])],
        }
        self.metrics.record_request(record, dp_rank)
        return record

    def _failed(self, request: Any, error: str, dp_rank: int | None = None) -> dict:
        record = failed_record(request, error, dp_rank)
        self.metrics.record_request(record, dp_rank)
        return record
