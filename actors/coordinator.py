"""Coordinator: the online engine's scheduler of the three phases over the DP groups (an async Ray actor).

Requests arrive through `generate` (a list, records in order), `stream` (a Ray streaming generator
of token deltas, then the record) or both at once from several callers. Each is turned into model
inputs once, then queued on the least-loaded live DP group. Every group runs its own loop: ask its
`GroupScheduler` for a plan (slots to release, requests to admit, prompt chunks to prefill), run
vision encode for the admitted requests' images, run the packed prefill, then a few decode steps,
and hand each request its new tokens. A finished request frees its slot at once.

A group whose worker dies or hangs fails its running requests (naming the rank), hands its waiting
requests to other groups and is rebuilt in the background, up to `max_group_restarts` times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from actors.config import EngineConfig
from actors.groups import CallError, GroupFailure, WorkerGroup
from actors.metrics import EngineMetrics
from actors.records import failed_record
from actors.requests import RequestState, sampling_params, stop_strings
from actors.scheduler import GroupScheduler, Sequence
from model.processor import PromptBuilder

logger = logging.getLogger(__name__)

NO_LIVE_GROUP = "no live DP group to serve it"


class Engine:
    """A DP group's workers, scheduler and serving loop."""

    def __init__(self, group: WorkerGroup, scheduler: GroupScheduler) -> None:
        self.group = group
        self.scheduler = scheduler
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.restarts = 0
        self.rebuilding = False

    @property
    def dp_rank(self) -> int:
        return self.group.dp_rank


class Coordinator:
    """Schedules vision encode, prefill and decode of all requests on the DP groups."""

    def __init__(self, cfg: EngineConfig, placement: Any, group_order: list[int]) -> None:
        """`placement.strategy(i)` places bundle i; DP rank d runs in placement group `group_order[d]`."""
        logging.basicConfig(level=logging.INFO, format="[coordinator] %(message)s")
        self.cfg = cfg
        self.placement = placement
        self.builder = PromptBuilder.from_pretrained(cfg.worker.model_path, max_images=cfg.max_images_per_prompt)
        tp = cfg.tp_size
        self.engines = [
            Engine(
                WorkerGroup(d, cfg, [placement.strategy(g * tp + t) for t in range(tp)]),
                GroupScheduler(
                    cfg.worker.max_batch_size, cfg.policy, cfg.prefill_chunk_tokens, cfg.decode_steps_per_call
                ),
            )
            for d, g in enumerate(group_order)
        ]
        self.metrics = EngineMetrics()
        self.requests: dict[str, RequestState] = {}  # in flight, by internal key
        self.keys = itertools.count()
        self.submitted = 0
        self.completed = 0
        self.phase_totals = {"vision_encode_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0}
        self.profile_pending = cfg.profile

    def __repr__(self) -> str:
        # Ray's dashboard shows this in the Actors page's Repr column. Ray reads it once, after
        # __init__, so it holds what does not change; live counts are in status() and the metrics. It
        # must not fail on a half-initialised actor: Ray labels an error raised in __init__ with it.
        cfg = self.__dict__.get("cfg")
        if cfg is None:
            return "Coordinator(not initialised)"
        return (
            f"Coordinator(dp_size={cfg.dp_size}, tp_size={cfg.tp_size}, world_size={cfg.dp_size * cfg.tp_size}, "
            f"device={cfg.worker.device}, policy={cfg.policy})"
        )

    # ----------------------------------------------------------------------------- lifecycle
    async def setup(self) -> list[dict]:
        """Start every DP group, all at once: create workers, form process groups, load shards, warm up."""
        results = await asyncio.gather(*(e.group.start() for e in self.engines), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(e.group.kill() for e in self.engines))
            raise errors[0]
        for engine in self.engines:
            self._group_ready(engine)
        return self.topology()

    async def rebuild_group(self, dp_rank: int) -> list[dict]:
        """Replace the workers of one DP group now (after a failure) without touching the others."""
        engine = self.engines[dp_rank]
        orphans = await self._fail_group(engine, f"dp group {dp_rank} is being rebuilt", rebuild=False)
        await engine.group.kill()
        await engine.group.start()
        for seq in orphans:
            if not seq.payload.finished:
                engine.scheduler.add(seq)
        self._group_ready(engine)
        return [i for i in self.topology() if i["dp_rank"] == dp_rank]

    async def shutdown(self) -> None:
        """Abort what runs, kill every worker and release the placement groups."""
        try:
            for state in list(self.requests.values()):
                self._end(state, "abort")
            for engine in self.engines:
                if engine.task is not None:
                    engine.task.cancel()
            await asyncio.gather(*(e.group.kill() for e in self.engines))
        finally:
            self.placement.remove()

    def _group_ready(self, engine: Engine) -> None:
        for info, stats in zip(engine.group.infos, engine.group.stats):
            self.metrics.record_memory(info["rank"], stats)
        if engine.task is None or engine.task.done():
            engine.task = asyncio.get_running_loop().create_task(self._serve(engine))
        engine.wake.set()

    # ----------------------------------------------------------------------------- queries
    def topology(self) -> list[dict]:
        """Per rank: rank, tp_rank, dp_rank, node_id, node_ip, device, device_ids, device_index, alive, rendezvous."""
        out = []
        for engine in self.engines:
            group = engine.group
            address = f"tcp://{group.rendezvous[0]}:{group.rendezvous[1]}" if group.rendezvous else None
            out.extend({**info, "alive": group.alive, "rendezvous": address} for info in group.infos)
        return sorted(out, key=lambda i: i["rank"])

    def status(self) -> dict:
        """Live groups, waiting and running requests (what a health check needs)."""
        return {
            "live_groups": sum(e.group.alive for e in self.engines),
            "dp_size": len(self.engines),
            "waiting": sum(len(e.scheduler.waiting) for e in self.engines),
            "running": sum(len(e.scheduler.running) for e in self.engines),
        }

    def progress(self) -> tuple[int, int]:
        """(requests finished, requests submitted) since the Coordinator started."""
        return self.completed, self.submitted

    def stats(self) -> dict:
        """Phase totals of the requests served so far, and each worker's load/warm-up/capture figures."""
        workers = [s for e in self.engines for s in e.group.stats]
        return {
            "phases": {
                **self.phase_totals,
                "load_s": max((s["load_s"] for s in workers), default=0.0),
                "warmup_s": max((s["warmup_s"] for s in workers), default=0.0),
                "graph_capture_s": max((s["graph_capture_s"] for s in workers), default=0.0),
            },
            "workers": workers,
        }

    # ----------------------------------------------------------------------------- requests
    async def generate(self, requests: list[dict]) -> list[dict]:
        """Serve requests to completion; one record per request, in order (errors become records).

        A request may carry `max_new_tokens`, `temperature`, `top_p`, `seed`, `ignore_eos`, `stop`
        and `mm_processor_kwargs` of its own, and `messages` instead of `prompt` + `images`.
        """
        if not isinstance(requests, (list, tuple)):
            raise TypeError(f"generate() takes a list of request dicts, got {type(requests).__name__}")
        states: list[RequestState | dict] = []
        for i, request in enumerate(requests):
            try:
                states.append(await self._submit(request))
            except ValueError as e:
                states.append(self._rejected(request, str(e)))
            except Exception as e:  # a processor bug must fail this request, not the call
                states.append(self._rejected(request, f"cannot prepare request {i}: {type(e).__name__}: {e}"))
        return [s if isinstance(s, dict) else await asyncio.shield(s.done) for s in states]

    async def stream(self, request: dict, ack: bool = False) -> AsyncIterator[dict]:
        """Yield {"id", "token_ids", "text"} as tokens come, then the record with "final": True.

        Raises ValueError before yielding when the request cannot be prepared. With `ack`, the first
        item is {"id", "token_ids": [], "text": "", "accepted": True} as soon as the request is
        queued (an HTTP server can then answer 200 before the first token). When the consumer goes
        away (the generator is cancelled or closed), the request is aborted and its slot freed.
        """
        state = await self._submit(request)
        try:
            if ack and not state.finished:
                yield {"id": state.record["id"], "token_ids": [], "text": "", "accepted": True}
            while True:
                item = await state.queue.get()
                yield item
                if item.get("final"):
                    return
        finally:
            if not state.finished:
                self._end(state, "abort")

    def abort(self, request_id: str) -> bool:
        """End every in-flight request with this id; their records get finish_reason 'abort'."""
        states = [s for s in self.requests.values() if s.record["id"] == str(request_id)]
        for state in states:
            self._end(state, "abort")
        return bool(states)

    async def _submit(self, request: Any) -> RequestState:
        """Prepare a request and queue it on the least-loaded live group (ValueError if it cannot run)."""
        arrival = time.time()
        if not isinstance(request, dict):
            raise ValueError(f"request is not a dict: {request!r}")
        params = sampling_params(request, self.cfg.sampling)
        stop = stop_strings(request)
        prepared = await asyncio.to_thread(self.builder.build, request)
        if len(prepared.input_ids) > self.cfg.input_max_len:
            raise ValueError(
                f"request {prepared.request_id!r}: prompt has {len(prepared.input_ids)} tokens, more "
                f"than data_config.input_max_len={self.cfg.input_max_len}"
            )
        need = len(prepared.input_ids) + params.max_new_tokens
        if need > self.cfg.worker.max_seq_len:
            raise ValueError(
                f"request {prepared.request_id!r}: prompt of {len(prepared.input_ids)} tokens + "
                f"max_new_tokens={params.max_new_tokens} needs {need} KV slots, more than "
                f"max_seq_len={self.cfg.worker.max_seq_len}"
            )
        key = f"{prepared.request_id}#{next(self.keys)}"
        state = RequestState.create(key, prepared.request_id, prepared, params, stop, self.builder.decode, arrival)
        self.submitted += 1
        self.requests[key] = state
        self._enqueue(state)
        return state

    def _rejected(self, request: Any, error: str) -> dict:
        record = failed_record(request, error, arrival_time=time.time(), end_time=time.time())
        self.metrics.record_request(record, None)
        self.submitted += 1
        self.completed += 1
        return record

    def _enqueue(self, state: RequestState) -> None:
        live = [e for e in self.engines if e.group.alive]
        if not live:
            self._end(state, None, NO_LIVE_GROUP)
            return
        engine = min(live, key=lambda e: (e.scheduler.load, e.dp_rank))
        engine.scheduler.add(Sequence(state.key, len(state.prepared.input_ids), payload=state))
        self._gauges(engine)
        engine.wake.set()

    def _end(self, state: RequestState, finish_reason: str | None, error: str | None = None) -> None:
        """Finish a request once: leave its scheduler, close its record, count it."""
        if state.finished:
            return
        for engine in self.engines:
            if engine.scheduler.abort(state.key, finish_reason or "abort") is not None:
                engine.wake.set()  # its slot is released with the next plan
                self._gauges(engine)
        tail = state.tail() if error is None and finish_reason != "stop" else None
        if tail is not None:
            state.queue.put_nowait(tail)
        record = state.finish(finish_reason, error)
        self.requests.pop(state.key, None)
        self.completed += 1
        self.metrics.record_request(record, record["dp_rank"])

    # ----------------------------------------------------------------------------- the group loop
    async def _serve(self, engine: Engine) -> None:
        while engine.group.alive:
            if engine.scheduler.idle:
                engine.wake.clear()
                await engine.wake.wait()
                continue
            try:
                await self._step(engine)
            except GroupFailure as e:
                await self._fail_group(engine, str(e))
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug in this loop must not leave requests waiting forever
                logger.exception("dp group %d loop failed", engine.dp_rank)
                await self._fail_group(engine, f"dp group {engine.dp_rank} failed: {type(e).__name__}: {e}")
                return

    async def _step(self, engine: Engine) -> None:
        """One round on one group: releases + admissions + prefill chunks, then decode steps."""
        sched, dp = engine.scheduler, engine.dp_rank
        plan = sched.schedule()
        now = time.time()
        for seq in plan.admit:
            state: RequestState = seq.payload
            if state.record["scheduled_time"] is None:
                state.record["scheduled_time"] = now
                state.record["dp_rank"] = dp
                self.metrics.record_queue(now - state.record["arrival_time"], dp)
        self._gauges(engine)
        profile, self.profile_pending = self.profile_pending, False
        images = [
            dataclasses.replace(seq.payload.prepared, request_id=seq.request_id)
            for seq in plan.admit
            if seq.payload.prepared.image_grid_thw is not None
        ]
        if images:
            out = await self._call(engine, plan.admit, "encode", images, profile)
            if out is not None:
                self._phase("vision_encode_s", out["seconds"], dp)
                if out.get("cache"):
                    self.metrics.record_vision_cache(dp, out["cache"]["hits"], out["cache"]["misses"])
        if plan.releases or plan.admit or plan.chunks:
            # Workers know requests by their internal key; pixels stay behind (encode already ran).
            admissions = [
                (
                    seq.slot,
                    dataclasses.replace(seq.payload.prepared, request_id=seq.request_id, pixel_values=None),
                    seq.payload.params,
                    list(self.builder.eos_token_ids),
                )
                for seq in plan.admit
            ]
            chunks = [(seq.slot, end) for seq, _, end in plan.chunks]
            involved = plan.admit + [seq for seq, _, _ in plan.chunks]
            out = await self._call(engine, involved, "prefill", plan.releases, admissions, chunks, profile)
            if out is not None:
                self._phase("prefill_s", out["seconds"], dp)
                for key, message in out["errors"].items():
                    if key in self.requests:
                        self._end(self.requests[key], None, message)
                for seq, _, end in plan.chunks:
                    if seq.request_id in sched.by_id:
                        sched.prefilled(seq, end)
                self._deliver(engine, out["outputs"])
        steps = sched.decode_steps()
        if steps:
            decoding = [s for s in sched.running if s.state == "decoding"]
            out = await self._call(engine, decoding, "decode", steps, [])
            if out is not None:
                self._phase("decode_s", out["seconds"], dp)
                self._deliver(engine, out["outputs"])

    async def _call(self, engine: Engine, involved: list[Sequence], method: str, *args: Any) -> dict | None:
        """Rank 0's answer to a phase call on every rank; None when a live rank raised (the involved
        requests are failed with its message, the group goes on). GroupFailure propagates."""
        try:
            return (await engine.group.call(method, *args))[0]
        except CallError as e:
            for seq in involved:
                state = self.requests.get(seq.request_id)
                if state is not None:
                    self._end(state, None, str(e))
            return None

    def _deliver(self, engine: Engine, outputs: dict) -> None:
        """New tokens per slot: stream them, end requests at EOS, length or a stop string."""
        sched = engine.scheduler
        for slot, out in outputs.items():
            seq = sched.by_id.get(out["request_id"])
            state = self.requests.get(out["request_id"])
            if seq is None or state is None or seq.slot != int(slot):
                continue  # aborted while the call ran
            item, stopped = state.add_tokens(out["tokens"], out["times"])
            if item is not None and (item["text"] or item["token_ids"]):
                state.queue.put_nowait(item)
            if stopped:
                self._end(state, "stop")
            elif out["finish_reason"] is not None:
                sched.finish(seq, out["finish_reason"])
                self._end(state, out["finish_reason"])
        self._gauges(engine)

    # ----------------------------------------------------------------------------- failures
    async def _fail_group(self, engine: Engine, message: str, rebuild: bool = True) -> list[Sequence]:
        """Fail the group's running requests and move its waiting ones to other live groups.

        With `rebuild`, the group is rebuilt in the background (up to max_group_restarts times) and
        waiting requests with nowhere else to go wait for it; returns those left waiting.
        """
        logger.error(message)
        engine.group.alive = False
        others_live = any(e.group.alive for e in self.engines)
        orphans = []
        for seq in engine.scheduler.take_all():
            state: RequestState = seq.payload
            if state.finished:
                continue
            if seq.state != "waiting":
                self._end(state, None, message)
            elif others_live:
                self._enqueue(state)
            else:
                orphans.append(seq)
        self._gauges(engine)
        if rebuild and engine.restarts < self.cfg.max_group_restarts and not engine.rebuilding:
            engine.restarts += 1
            engine.rebuilding = True
            asyncio.get_running_loop().create_task(self._rebuild(engine, orphans))
        elif rebuild:
            for seq in orphans:
                self._end(seq.payload, None, f"{NO_LIVE_GROUP} ({message})")
        return orphans

    async def _rebuild(self, engine: Engine, orphans: list[Sequence]) -> None:
        """Start the group's workers anew; `orphans` (requests with nowhere else to go) wait for it."""
        for seq in orphans:
            if not seq.payload.finished:
                engine.scheduler.add(seq)
        try:
            await engine.group.kill()
            await engine.group.start()
        except Exception as e:
            engine.rebuilding = False
            await self._fail_group(engine, f"dp group {engine.dp_rank} could not be rebuilt: {e}")
            return
        engine.rebuilding = False
        logger.info(
            "dp group %d rebuilt (restart %d of %d)", engine.dp_rank, engine.restarts, self.cfg.max_group_restarts
        )
        self._group_ready(engine)

    # ----------------------------------------------------------------------------- metrics
    def _phase(self, name: str, seconds: float, dp_rank: int) -> None:
        self.phase_totals[name] += seconds
        self.metrics.record_phase(name.removesuffix("_s"), seconds, dp_rank)

    def _gauges(self, engine: Engine) -> None:
        self.metrics.set_queue_depth(engine.dp_rank, len(engine.scheduler.waiting), len(engine.scheduler.running))
