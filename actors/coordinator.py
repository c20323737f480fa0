"""Coordinator: the online engine's scheduler of the three phases over the DP groups (an async Ray actor).

Requests arrive through `generate` (a list, records in order), `stream` (a Ray streaming generator
of token deltas, then the record) or both at once from several callers. Each is turned into model
inputs once, then queued on a live DP group: the least loaded one, or, among groups whose loads are
close, the one whose prefix cache holds the longest prefix of it. Every group runs its own loop of
rounds (actors/group_loop.py): its `GroupScheduler` plans (releases, preemptions, admissions by free
KV blocks, prompt chunks and decode tokens under one token budget), the workers run it, and the new
tokens come back here, where the end of each request is decided once (EOS, length, a stop string,
an abort) and handed back to the scheduler, whose releases reach the workers before their next step.

A group whose worker dies or hangs fails its running requests (naming the rank), hands its waiting
requests to other groups and is rebuilt in the background, up to `max_group_restarts` times.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from actors.config import EngineConfig
from actors.deliveries import Outbox
from actors.errors import NO_LIVE_GROUP, NoLiveGroupError, RequestError
from actors.group_loop import GroupLoop
from actors.groups import GroupFailure, WorkerGroup
from actors.metrics import EngineMetrics
from actors.records import failed_record
from actors.requests import RequestState, sampling_params, stop_strings
from actors.routing import pick_group, route_slack
from actors.scheduler import WAITING, GroupScheduler, Sequence
from actors.steps_per_call import StepsPerCall
from model.batch import image_spans
from model.processor import PreparedRequest, PromptBuilder
from model.vision_cache import image_key

logger = logging.getLogger(__name__)


def describe(cfg: EngineConfig | None, extra: str = "") -> str:
    """The repr of a Coordinator (or of the router in its place) for `cfg`: what Ray's dashboard shows."""
    if cfg is None:
        return "Coordinator(not initialised)"
    return (
        f"Coordinator(dp_size={cfg.dp_size}, tp_size={cfg.tp_size}, world_size={cfg.dp_size * cfg.tp_size}, "
        f"device={cfg.worker.device}, policy={cfg.policy}{extra})"
    )


class Coordinator:
    """Schedules vision encode, prefill and decode of all requests on the DP groups."""

    def __init__(
        self,
        cfg: EngineConfig,
        placement: Any,
        group_order: list[int],
        group_factory: Callable[[int, EngineConfig, list[Any]], Any] | None = None,
        dp_ranks: list[int] | None = None,
    ) -> None:
        """`placement.strategy(i)` places bundle i; the i-th group served here runs in placement group
        `group_order[i]` as DP rank `dp_ranks[i]` (default: i; actors/router.py gives each of its group
        Coordinators one group).

        `group_factory(dp_rank, cfg, strategies)` makes each DP group's workers (default: `WorkerGroup`, Ray
        actors); benchmarks and tests pass fake groups with the same `start`/`kill`/`call` interface.
        """
        logging.basicConfig(level=logging.INFO, format="[coordinator] %(message)s")
        self.cfg = cfg
        self.placement = placement
        self.builder = PromptBuilder.from_pretrained(cfg.worker.model_path, max_images=cfg.max_images_per_prompt)
        make_group = group_factory or WorkerGroup
        self.dp_ranks = list(range(len(group_order)) if dp_ranks is None else dp_ranks)
        if len(self.dp_ranks) != len(group_order):
            raise ValueError(f"dp_ranks {self.dp_ranks} and group_order {group_order} differ in length")
        self.engines = [
            self._group_loop(make_group(d, cfg, [placement.strategy(g * cfg.tp_size + t) for t in range(cfg.tp_size)]))
            for d, g in zip(self.dp_ranks, group_order)
        ]
        # Loads within this many requests of the least loaded group count as close (cache-aware routing).
        self.route_slack = route_slack(cfg.worker.max_batch_size)
        self.metrics = EngineMetrics()
        self.requests: dict[str, RequestState] = {}  # in flight, by internal key
        self.keys = itertools.count()
        self.received = 0  # requests that reached _submit, refused ones included (what a router counts)
        self.in_preparation = 0  # requests being turned into model inputs (not on a group yet)
        self.submitted = 0
        self.completed = 0
        self.phase_totals = {"vision_encode_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0}
        self.profile_pending = cfg.profile
        self.outboxes: dict[str, Outbox] = {}  # by subscriber (multiplexed delivery, actors/deliveries.py)
        # Ids of requests being prepared (counts), and those of them an `abort` named meanwhile.
        self.preparing: dict[str, int] = {}
        self.aborted_preparing: set[str] = set()

    def _group_loop(self, group: Any) -> GroupLoop:
        """A DP group's loop: its workers, its scheduler over its own KV pool, its steps per call."""
        cfg = self.cfg
        num_blocks, block_size = cfg.worker.kv_pool()
        steps = StepsPerCall(cfg.decode_steps_per_call, cfg.max_decode_call_ms)
        scheduler = GroupScheduler(
            cfg.worker.max_batch_size,
            num_blocks,
            block_size,
            cfg.policy,
            cfg.prefill_chunk_tokens,
            steps.fixed,
            cfg.prefix_caching,
            max_decode_stall=cfg.max_decode_stall,
        )
        return GroupLoop(group, scheduler, self.builder.eos_token_ids, steps)

    def __repr__(self) -> str:
        # Ray's dashboard shows this in the Actors page's Repr column. Ray reads it once, after
        # __init__, so it holds what does not change; live counts are in status() and the metrics. It
        # must not fail on a half-initialised actor: Ray labels an error raised in __init__ with it.
        cfg, ranks = self.__dict__.get("cfg"), self.__dict__.get("dp_ranks")
        own = cfg is None or ranks is None or ranks == list(range(cfg.dp_size))
        return describe(cfg, "" if own else f", dp_ranks={ranks}")

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
        # What exists now (modules, tokenizer, config) lives as long as the actor: keep it out of the cyclic
        # collector's full passes, which otherwise rescan it while requests stream.
        gc.collect()
        gc.freeze()
        return self.topology()

    async def rebuild_group(self, dp_rank: int) -> list[dict]:
        """Replace the workers of one DP group now (after a failure) without touching the others."""
        engine = next((e for e in self.engines if e.dp_rank == dp_rank), None)
        if engine is None:
            raise ValueError(f"dp_rank {dp_rank} is not one of this Coordinator's DP groups {self.dp_ranks}")
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

    def _group_ready(self, engine: GroupLoop) -> None:
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

    def load(self) -> dict:
        """What a router needs to pick a group: whether one is alive, requests in flight (on the groups or
        being prepared for them), and requests received so far (refused ones included)."""
        return {
            "alive": any(e.group.alive for e in self.engines),
            "load": sum(e.scheduler.load for e in self.engines) + self.in_preparation,
            "received": self.received,
        }

    def delivery_sources(self) -> list:
        """The actors whose `deliveries` streams carry the items of requests given to `submit`: none but
        this one (a router lists its group Coordinators)."""
        return []

    def kv_cache_stats(self) -> list[dict]:
        """Per DP group: KV blocks used, free and cached, cumulative prefix-cache hit and query tokens,
        evictions and preemptions."""
        return [{"dp_rank": e.dp_rank, **e.scheduler.stats()} for e in self.engines]

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
        away (the generator is cancelled or closed), the request is aborted and its KV blocks freed.
        """
        state = await self._submit(request)
        try:
            if ack and not state.finished:
                yield state.acknowledgement()
            while True:
                item = await state.queue.get()
                yield item
                if item.get("final"):
                    return
        finally:
            if not state.finished:
                self._end(state, "abort")

    async def submit(self, request: dict, subscriber: str, tag: str) -> dict:
        """Queue a request whose items go to `subscriber`'s `deliveries` stream, each as (tag, item).

        Returns the acknowledgement `stream` would yield first; raises as `stream` does before its
        first item. The items are those `stream` yields after the acknowledgement.
        """
        outbox = self.outboxes.setdefault(subscriber, Outbox())
        state = await self._submit(request, outbox.sink(tag))
        if not state.finished:
            outbox.keys[tag] = state.key
        return state.acknowledgement()

    async def deliveries(self, subscriber: str) -> AsyncIterator[list[tuple[str, dict]]]:
        """Yield the items of `subscriber`'s requests as lists of (tag, item), as they gather (one Ray
        object per batch, not per item). When the subscriber goes away, its open requests are aborted."""
        outbox = self.outboxes.setdefault(subscriber, Outbox())
        try:
            async for batch in outbox.batches():
                yield batch
        finally:
            if self.outboxes.get(subscriber) is outbox:
                del self.outboxes[subscriber]
            for key in list(outbox.keys.values()):
                state = self.requests.get(key)
                if state is not None:
                    self._end(state, "abort")

    def abort(self, request_id: str) -> bool:
        """End every in-flight request with this id; their records get finish_reason 'abort'."""
        states = [s for s in self.requests.values() if s.record["id"] == str(request_id)]
        for state in states:
            self._end(state, "abort")
        if str(request_id) in self.preparing:  # it ends as soon as its preparation does
            self.aborted_preparing.add(str(request_id))
            return True
        return bool(states)

    async def _submit(self, request: Any, emit: Callable[[dict], None] | None = None) -> RequestState:
        """Prepare a request and queue it on the least-loaded live group; its stream items go to `emit`
        (default: its own queue). One that `abort` named while it was prepared ends at once.

        Raises RequestError (or InvalidRequestError) naming the field when it cannot run as given,
        NoLiveGroupError when no group is alive.
        """
        arrival = time.time()
        self.received += 1
        if not isinstance(request, dict):
            raise RequestError(f"request is not a dict: {request!r}")
        params = sampling_params(request, self.cfg.sampling)
        stop = stop_strings(request)
        rid = request.get("id")
        rid = rid if isinstance(rid, str) else None
        if rid is not None:
            self.preparing[rid] = self.preparing.get(rid, 0) + 1
        self.in_preparation += 1
        try:
            prepared, images = await asyncio.to_thread(self._prepare, request)
        finally:
            self.in_preparation -= 1
            aborted = self._prepared(rid)
        if len(prepared.input_ids) > self.cfg.input_max_len:
            raise RequestError(
                f"request {prepared.request_id!r}: prompt has {len(prepared.input_ids)} tokens, more "
                f"than data_config.input_max_len={self.cfg.input_max_len}",
                "messages" if request.get("messages") is not None else "prompt",
            )
        need = len(prepared.input_ids) + params.max_new_tokens
        if need > self.cfg.worker.max_seq_len:
            raise RequestError(
                f"request {prepared.request_id!r}: prompt of {len(prepared.input_ids)} tokens + "
                f"max_new_tokens={params.max_new_tokens} needs {need} KV positions, more than "
                f"max_seq_len={self.cfg.worker.max_seq_len}",
                "max_new_tokens",
            )
        key = f"{prepared.request_id}#{next(self.keys)}"
        seq = Sequence(prepared.request_id, list(prepared.input_ids), params.max_new_tokens, images)
        self._check_fits(seq)
        seq.request_id = key
        state = RequestState.create(
            key, prepared.request_id, prepared, params, stop, self.builder.decode, arrival, emit
        )
        seq.payload = state
        if aborted:  # its caller gave up while it was being prepared: it ends here, never queued
            self.submitted += 1
            self.completed += 1
            self.metrics.record_request(state.finish("abort"), None)
            return state
        self._enqueue(seq)
        self.submitted += 1
        self.requests[key] = state
        return state

    def _prepared(self, rid: str | None) -> bool:
        """A request named `rid` is prepared (or failed to be); whether an abort named it meanwhile."""
        if rid is None:
            return False
        aborted = rid in self.aborted_preparing
        left = self.preparing.pop(rid) - 1
        if left:
            self.preparing[rid] = left
        else:
            self.aborted_preparing.discard(rid)
        return aborted

    def _prepare(self, request: dict) -> tuple[PreparedRequest, list[tuple[int, int, bytes]]]:
        """Model inputs, and each image's token span with the hash of its processed pixels (prefix-cache keys)."""
        prepared = self.builder.build(request)
        images: list[tuple[int, int, bytes]] = []
        if prepared.image_grid_thw is not None:
            spans = image_spans(prepared.input_ids, self.builder.image_token_id)
            offset = 0
            for (start, end), grid in zip(spans, prepared.image_grid_thw):
                n = int(grid.prod())
                images.append((start, end, image_key(prepared.pixel_values[offset : offset + n], grid)))
                offset += n
        return prepared, images

    def _check_fits(self, seq: Sequence) -> None:
        """RequestError naming the limit when the request could never fit a group's KV pool (it would wait forever)."""
        never = self.engines[0].scheduler.never_fits(len(seq.prompt_ids), seq.max_new_tokens)  # every pool is alike
        if never is not None:
            name = seq.payload.record["id"] if seq.payload else seq.request_id
            raise RequestError(
                f"request {name!r}: {never}; kv_cache.num_blocks or kv_cache.memory_gb sets the pool", "max_new_tokens"
            )

    def _rejected(self, request: Any, error: str) -> dict:
        record = failed_record(request, error, arrival_time=time.time(), end_time=time.time())
        self.metrics.record_request(record, None)
        self.submitted += 1
        self.completed += 1
        return record

    def _enqueue(self, seq: Sequence) -> None:
        """Queue on the least-loaded live group; among groups within `route_slack` requests of it, the one
        whose prefix cache holds the most of the prompt (ties: the less loaded, then the lower rank).
        NoLiveGroupError when no group is alive."""
        live = {e.dp_rank: e for e in self.engines if e.group.alive}
        loads = {d: e.scheduler.load for d, e in live.items()}
        engine = live[pick_group(loads, lambda d: live[d].scheduler.prefix_hit(seq), self.route_slack)]
        engine.scheduler.add(seq)
        self._gauges(engine)
        engine.wake.set()

    def _end(self, state: RequestState, finish_reason: str | None, error: str | BaseException | None = None) -> None:
        """Finish a request once: leave its scheduler (its blocks free now), close its record, count it."""
        if state.finished:
            return
        for engine in self.engines:
            if engine.scheduler.abort(state.key, finish_reason or "abort") is not None:
                engine.wake.set()  # its blocks are free now; the workers forget it at the next step
                self._gauges(engine)
        record = state.finish(finish_reason, error)
        self.requests.pop(state.key, None)
        self.completed += 1
        self.metrics.record_request(record, record["dp_rank"])

    # ----------------------------------------------------------------------------- the group loop
    async def _serve(self, engine: GroupLoop) -> None:
        while engine.group.alive:
            if engine.scheduler.idle:
                engine.wake.clear()
                await engine.wake.wait()
                continue
            try:
                await self._round(engine)
            except GroupFailure as e:
                await self._fail_group(engine, str(e))
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug in this loop must not leave requests waiting forever
                logger.exception("dp group %d loop failed", engine.dp_rank)
                await self._fail_group(engine, f"dp group {engine.dp_rank} failed: {type(e).__name__}: {e}")
                return

    async def _round(self, engine: GroupLoop) -> None:
        """One round on one group, then its outcome: records of newly scheduled requests, failures, tokens."""
        dp = engine.dp_rank
        profile, self.profile_pending = self.profile_pending, False
        result = await engine.round(profile)
        now = time.time()
        for seq in result.plan.admit:
            record = seq.payload.record
            if record["scheduled_time"] is None:
                record["scheduled_time"] = now
                record["dp_rank"] = dp
                record["cached_tokens"] = seq.cached_tokens
                self.metrics.record_queue(now - record["arrival_time"], dp)
        for request_id in result.plan.preempted:
            state = self.requests.get(request_id)
            if state is not None:
                state.record["preemptions"] = (state.record["preemptions"] or 0) + 1
        for name, seconds in result.phases.items():
            self._phase(name, seconds, dp)
        if result.vision_cache:
            self.metrics.record_vision_cache(dp, result.vision_cache["hits"], result.vision_cache["misses"])
        for seq, message in result.failed:
            state = self.requests.get(seq.request_id)
            if state is not None:
                self._end(state, None, message)
        for seq, out in result.outputs:
            self._deliver(engine, seq, out)
        self.metrics.record_kv_cache(dp, engine.scheduler.stats())
        self._gauges(engine)

    def _deliver(self, engine: GroupLoop, seq: Sequence, out: dict) -> None:
        """A request's new tokens: stream them, then decide here, once, whether it ended (EOS or length as
        the workers report, or a stop string in its text)."""
        state = self.requests.get(seq.request_id)
        if state is None or state.finished:
            return
        engine.scheduler.append(seq, out["tokens"])
        item, stopped = state.add_tokens(out["tokens"], out["times"])
        if item is not None and (item["text"] or item["token_ids"]):
            state.emit(item)
        reason = "stop" if stopped else out["finish_reason"]
        if reason is not None:
            engine.scheduler.finish(seq, reason)
            self._end(state, reason)

    # ----------------------------------------------------------------------------- failures
    async def _fail_group(self, engine: GroupLoop, message: str, rebuild: bool = True) -> list[Sequence]:
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
            if seq.state != WAITING or seq.output_ids:  # started (a preempted one has tokens already)
                self._end(state, None, message)
            elif others_live:
                self._enqueue(seq)
            else:
                orphans.append(seq)
        self._gauges(engine)
        if rebuild and engine.restarts < self.cfg.max_group_restarts and not engine.rebuilding:
            engine.restarts += 1
            engine.rebuilding = True
            asyncio.get_running_loop().create_task(self._rebuild(engine, orphans))
        elif rebuild:
            for seq in orphans:
                self._end(seq.payload, None, NoLiveGroupError(f"{NO_LIVE_GROUP} ({message})"))
        return orphans

    async def _rebuild(self, engine: GroupLoop, orphans: list[Sequence]) -> None:
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

    def _gauges(self, engine: GroupLoop) -> None:
        self.metrics.set_queue_depth(engine.dp_rank, len(engine.scheduler.waiting), len(engine.scheduler.running))
