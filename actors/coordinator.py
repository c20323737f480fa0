"""Coordinator: the online engine's scheduler of the three phases over the DP groups (an async Ray actor).

Requests arrive through `generate` (a list, records in order), `stream` (a Ray streaming generator
of token deltas, then the record), `submit` + `deliveries` (one stream per caller process,
actors/deliveries.py) or all at once from several callers. Each is turned into model inputs once
(actors/preparation.py), then queued on a live DP group: the least loaded one, or, among groups
whose loads are close, the one whose prefix cache holds the longest prefix of it (actors/routing.py).
Every group runs its own rounds (actors/group_loop.py) in its own serving task (actors/supervisor.py,
which also fails and rebuilds a group whose worker dies or hangs). A round's new tokens come back to
`run_round` here, where the end of each request is decided once (EOS, length, a stop string, an
abort) in `end`, which hands it back to the scheduler, whose releases reach the workers before
their next step.

What may change across an `await` here: requests may end (an abort, a consumer gone) and groups
may fail while a round's call runs. So a round's outcome looks each request up again
(`self.requests`) and skips those that ended; `end` is idempotent; and a request that ends while a
call runs has its blocks freed at once, which is safe because its group's next plan comes only
after that call returned (actors/supervisor.py).

A request with n > 1 is a `Choices` (actors/choices.py) under its key, and each of its choices a
RequestState under its own key (f"{key}/{i}"), a sequence of the same DP group. A choice ends on its
own (EOS, length, its stop strings); one that fails or is aborted ends the others; the request is
counted and recorded once, when its last choice ends.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from actors import clock
from actors.choices import Choices
from actors.config import EngineConfig
from actors.deliveries import Outbox, expire_outboxes
from actors.delivery_socket import DeliveryServer, node_ip
from actors.errors import RequestError
from actors.group_factory import make_worker_group
from actors.group_loop import GroupLoop
from actors.metrics import EngineMetrics
from actors.preparation import Preparation
from actors.records import add_speculation, failed_record
from actors.requests import RequestState
from actors.routing import pick_group, route_slack
from actors.scheduler import GroupScheduler, Sequence
from actors.spec_gate import SpecGate
from actors.steps_per_call import StepsPerCall
from actors.supervisor import Supervisor
from model.processor import PromptBuilder

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

        `group_factory(dp_rank, cfg, strategies)` makes each DP group's workers (default: `make_worker_group`, Ray
        actors); benchmarks and tests pass fake groups with the same `start`/`kill`/`call` interface.
        """
        logging.basicConfig(level=logging.INFO, format="[coordinator] %(message)s")
        self.cfg = cfg
        self.placement = placement
        self.builder = PromptBuilder.from_pretrained(
            cfg.worker.model_path,
            max_images=cfg.max_images_per_prompt,
            max_videos=cfg.max_videos_per_prompt,
            max_input_len=cfg.input_max_len,
            max_video_seconds=cfg.max_video_seconds,
            max_video_bytes=cfg.max_video_bytes,
        )
        make_group = group_factory or make_worker_group
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
        self.keys_by_id: dict[str, set[str]] = {}  # request id -> keys in flight (ids given by users may repeat)
        self.preparation = Preparation(cfg, self.builder)
        self.supervisor = Supervisor(self.engines, cfg.max_group_restarts, self)
        self.received = 0  # requests that reached _submit, refused ones included (what a router counts)
        self.submitted = 0
        self.completed = 0
        self.phase_totals = {"vision_encode_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0}
        self.profile_pending = cfg.profile
        self.outboxes: dict[str, Outbox] = {}  # by subscriber (multiplexed delivery, actors/deliveries.py)
        self.delivery_server: DeliveryServer | None = None  # the same streams over TCP (actors/delivery_socket.py)

    def _group_loop(self, group: Any) -> GroupLoop:
        """A DP group's loop: its workers, its scheduler over its own KV pool, its steps per call."""
        cfg = self.cfg
        num_blocks, block_size = cfg.worker.kv_pool()
        steps = StepsPerCall(cfg.decode_steps_per_call, cfg.max_decode_call_ms, lookahead=cfg.async_scheduling)
        scheduler = GroupScheduler(
            cfg.worker.max_batch_size,
            num_blocks,
            block_size,
            cfg.policy,
            cfg.prefill_chunk_tokens,
            steps.fixed,
            cfg.prefix_caching,
            max_decode_stall=cfg.max_decode_stall,
            encoder_budget=cfg.encoder_budget_tokens,
        )
        spec = cfg.worker.speculative
        gate = SpecGate(spec.num_speculative_tokens) if spec is not None else None
        return GroupLoop(
            group, scheduler, self.builder.eos_token_ids, steps, lookahead=cfg.async_scheduling, spec_gate=gate
        )

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
        await self.supervisor.start_all()
        # What exists now (modules, tokenizer, config) lives as long as the actor: keep it out of the cyclic
        # collector's full passes, which otherwise rescan it while requests stream.
        gc.collect()
        gc.freeze()
        return self.topology()

    async def rebuild_group(self, dp_rank: int) -> list[dict]:
        """Replace the workers of one DP group now (after a failure) without touching the others: its running
        requests fail, its waiting ones move to other groups or wait for it. A rebuild already under way
        (after a failure) is awaited rather than started twice."""
        engine = next((e for e in self.engines if e.dp_rank == dp_rank), None)
        if engine is None:
            raise ValueError(f"dp_rank {dp_rank} is not one of this Coordinator's DP groups {self.dp_ranks}")
        await self.supervisor.rebuild(engine)
        return [i for i in self.topology() if i["dp_rank"] == dp_rank]

    async def shutdown(self) -> None:
        """Abort what runs, kill every worker and release the placement groups."""
        try:
            for state in list(self.requests.values()):
                self.end(state, "abort")
            if self.delivery_server is not None:
                self.delivery_server.close()
            await self.supervisor.shutdown()
        finally:
            self.placement.remove()

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
            "load": sum(e.scheduler.load for e in self.engines) + self.preparation.in_flight,
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
                self.end(state, "abort")

    async def submit(self, request: dict, subscriber: str, tag: str) -> dict:
        """Queue a request whose items go to `subscriber`'s `deliveries` stream, each as (tag, item).

        Returns the acknowledgement `stream` would yield first; raises as `stream` does before its
        first item. The items are those `stream` yields after the acknowledgement.
        """
        expire_outboxes(self.outboxes, clock.perf())  # those no subscriber came for (actors/deliveries.py)
        outbox = self.outboxes.setdefault(subscriber, Outbox())
        outbox.expect(tag)
        try:
            state = await self._submit(request, outbox.sink(tag))
        except BaseException:
            outbox.drop(tag)
            raise
        if state.finished:
            outbox.drop(tag)
        else:
            outbox.keys[tag] = state.key
        return state.acknowledgement()

    async def deliveries(self, subscriber: str) -> AsyncIterator[list[tuple[str, dict]]]:
        """Yield the items of `subscriber`'s requests as lists of (tag, item), as they gather (one Ray
        object per batch, not per item). When the subscriber goes away, its open requests are aborted."""
        outbox = self.outboxes.setdefault(subscriber, Outbox())
        outbox.subscribe()
        try:
            async for batch in outbox.batches():
                yield batch
        finally:
            if self.outboxes.get(subscriber) is outbox:
                del self.outboxes[subscriber]
            for key in [k for k in outbox.keys.values() if k is not None]:
                state = self.requests.get(key)
                if state is not None:
                    self.end(state, "abort")

    async def delivery_address(self) -> tuple[str, int, bytes]:
        """Where a subscriber reads what `deliveries` yields over TCP instead of Ray (actors/delivery_socket.py):
        this node's IP, a port and the token to present."""
        if self.delivery_server is None:
            self.delivery_server = DeliveryServer(node_ip(), lambda subscriber: self.deliveries(subscriber))
        return await self.delivery_server.address()

    def abort(self, request_id: str) -> bool:
        """End every in-flight request with this id; their records get finish_reason 'abort'."""
        keys = list(self.keys_by_id.get(str(request_id), ()))
        for key in keys:
            self.end(self.requests[key], "abort")
        preparing = self.preparation.abort(str(request_id))  # such a one ends as soon as it is prepared
        return bool(keys) or preparing

    async def _submit(self, request: Any, emit: Callable[[dict], None] | None = None) -> RequestState | Choices:
        """Prepare a request and queue it on a live group; its stream items go to `emit` (default: its own
        queue). One that `abort` named while it was prepared ends at once.

        Raises RequestError (or InvalidRequestError) naming the field when it cannot run as given,
        NoLiveGroupError when no group is alive.
        """
        self.received += 1
        seq, state, aborted = await self.preparation.prepare(request, emit)
        self._check_fits(seq)
        self.submitted += 1
        if aborted:  # its caller gave up while it was being prepared: it ends here, never queued
            self.completed += 1
            self.metrics.record_request(state.finish("abort"), None)
            return state
        self.enqueue(seq)
        self.requests[state.key] = state
        for choice in state.states if isinstance(state, Choices) else ():
            self.requests[choice.key] = choice
        self.keys_by_id.setdefault(seq.payload.record["id"], set()).add(state.key)
        return state

    def _check_fits(self, seq: Sequence) -> None:
        """RequestError naming the limit when the request could never fit a group's KV pool (it would wait forever)."""
        n = 1 + len(seq.forks)
        never = self.engines[0].scheduler.never_fits(len(seq.prompt_ids), seq.max_new_tokens, n)  # pools are alike
        if never is not None:
            raise RequestError(
                f"request {seq.payload.record['id']!r}: {never}; kv_cache.num_blocks or kv_cache.memory_gb sets "
                "the pool",
                "max_new_tokens",
            )

    def _rejected(self, request: Any, error: str) -> dict:
        record = failed_record(request, error, arrival_time=clock.wall(), end_time=clock.wall())
        self.metrics.record_request(record, None)
        self.submitted += 1
        self.completed += 1
        return record

    def enqueue(self, seq: Sequence) -> None:
        """Queue on a live group (actors/routing.py); with none alive, on a group being rebuilt (the request
        waits for it, as that group's own waiting requests do); NoLiveGroupError when there is neither."""
        live = {e.dp_rank: e for e in self.engines if e.group.alive}
        if not live:
            live = {e.dp_rank: e for e in self.engines if e.rebuild is not None}
        loads = {d: e.scheduler.load for d, e in live.items()}
        engine = live[pick_group(loads, lambda d: live[d].scheduler.prefix_hit(seq), self.route_slack)]
        engine.scheduler.add(seq)
        self.gauges(engine)
        engine.wake.set()

    def end(
        self, state: RequestState | Choices, finish_reason: str | None, error: str | BaseException | None = None
    ) -> None:
        """Finish a request (or a choice) once: leave its scheduler (its blocks free now), close its record,
        count it. A choice that fails or is aborted ends its request's other choices; the request is closed
        with its last choice; ending a Choices ends every choice."""
        if isinstance(state, Choices):
            for choice in state.states:
                self.end(choice, finish_reason, error)
            return
        if state.finished:
            return
        for engine in self.engines:
            if engine.scheduler.abort(state.key, finish_reason or "abort") is not None:
                engine.wake.set()  # its blocks are free now; the workers forget it at the next step
                self.gauges(engine)
        record = state.finish(finish_reason, error)
        self.requests.pop(state.key, None)
        parent = state.parent
        if parent is None:
            self._closed(state.key, record)
        elif parent.finished:  # its last choice
            self._closed(parent.key, parent.record)
        elif error is not None or finish_reason == "abort":
            self.end(parent, finish_reason, error)

    def _closed(self, key: str, record: dict) -> None:
        """A request ended: out of the tables, counted, its record into the metrics."""
        self.requests.pop(key, None)
        keys = self.keys_by_id.get(record["id"])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.keys_by_id[record["id"]]
        self.completed += 1
        self.metrics.record_request(record, record["dp_rank"])

    # ----------------------------------------------------------------------------- rounds
    async def run_round(self, engine: GroupLoop) -> None:
        """One round on one group (from its serving task), then its outcome: records of newly scheduled
        requests, failures, tokens. Requests that ended while the round ran are skipped."""
        dp = engine.dp_rank
        profile, self.profile_pending = self.profile_pending, False
        result = await engine.round(profile)
        now = clock.wall()
        for seq in [seq for seq, _, _ in result.plan.encode] + result.plan.admit:  # its encode or prefill began
            record = seq.payload.record
            if record["scheduled_time"] is None:
                record["scheduled_time"] = now
                record["dp_rank"] = dp
                record["cached_tokens"] = seq.cached_tokens
                self.metrics.record_queue(now - record["arrival_time"], dp)
        for parent, child, _ in result.plan.forks:  # choices forked from a prompt: scheduled with it
            if child.payload.record["scheduled_time"] is None:
                child.payload.record.update(
                    scheduled_time=parent.payload.record["scheduled_time"],
                    dp_rank=dp,
                    cached_tokens=parent.cached_tokens,
                )
        for request_id in result.plan.preempted:
            state = self.requests.get(request_id)
            if state is not None:
                state.record["preemptions"] = (state.record["preemptions"] or 0) + 1
        for name, seconds in result.phases.items():
            self.phase_totals[name] += seconds
            self.metrics.record_phase(name.removesuffix("_s"), seconds, dp)
        if result.vision_cache:
            self.metrics.record_vision_cache(dp, result.vision_cache["hits"], result.vision_cache["misses"])
        for seq, message in result.failed:
            state = self.requests.get(seq.request_id)
            if state is not None:
                self.end(state, None, message)
        for seq, out in result.outputs:
            self._deliver(engine, seq, out)
        rounds = [r for _, out in result.outputs for r in out.get("spec_rounds") or ()]
        self.metrics.record_speculation(dp, rounds)
        self.metrics.record_kv_cache(dp, engine.scheduler.stats())
        self.gauges(engine)

    def _deliver(self, engine: GroupLoop, seq: Sequence, out: dict) -> None:
        """A request's new tokens: stream them, then decide here, once, whether it ended (EOS or length as
        the workers report, or a stop string in its text)."""
        state = self.requests.get(seq.request_id)
        if state is None or state.finished:
            return
        item, stopped = state.add_tokens(out["tokens"], out["times"], out.get("logprobs"))
        add_speculation(state.record, out.get("spec_rounds") or [])
        engine.scheduler.append(seq, item["token_ids"])  # none past the one that completed a stop string
        if item["text"] or item["token_ids"]:
            state.emit(item)
        reason = "stop" if stopped else out["finish_reason"]
        if reason is not None:
            engine.scheduler.finish(seq, reason)
            self.end(state, reason)

    def gauges(self, engine: GroupLoop) -> None:
        self.metrics.set_queue_depth(engine.dp_rank, len(engine.scheduler.waiting), len(engine.scheduler.running))
