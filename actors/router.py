"""Router: the named `coordinator` when each DP group has a Coordinator actor of its own (`ray.group_coordinators`).

One Coordinator actor serves every DP group on one event loop: past a few groups of 64 running
requests, its per-token work (detokenizing, stop strings, records, stream objects) is more than one
process can do between steps (docs/coordinator_bench.md). Here each DP group gets a Coordinator
actor of its own (actors/coordinator.py, serving that one group: its loop, its requests, its
streams), so that work spreads over as many processes as there are groups, and this actor keeps the
Coordinator's Ray API for drivers and the HTTP server while it only routes:

- a request goes to the least loaded live group or, among groups within `route_slack` requests of
  it, to the one whose prefix cache most likely holds the longest prefix of it. The router does not
  tokenize: its view of each group's cache is the text of the requests it sent there
  (actors/prefix_view.py). A group's load is what it reported when last asked plus what was routed
  to it since; the groups are asked when a request is to be routed and their answers are older
  than `POLL_S` (so at most every `POLL_S` under traffic, and never while idle);
- `generate`, `stream` and `abort` are forwarded (a stream is relayed item by item: one Ray object
  per item, as before); `submit` is forwarded, and `delivery_sources` names the group Coordinators,
  whose `deliveries` streams a caller reads directly (actors/deliveries.py), so token deltas never
  pass through this actor;
- `status`, `progress`, `stats`, `kv_cache_stats` and `topology` combine the groups' answers.

A group whose worker dies fails its running requests and keeps its waiting ones until it is rebuilt,
by its own Coordinator: unlike one Coordinator for all groups, waiting requests do not move to
another group. New requests avoid a group that is not live; a request routed to one that just
failed is routed again. A group Coordinator actor that dies itself is not restarted: its group
counts as not live from then on (as the one Coordinator's death ends a run).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from actors import clock
from actors.config import EngineConfig
from actors.coordinator import Coordinator, describe
from actors.delivery_socket import DeliveryServer, node_ip
from actors.errors import NoLiveGroupError, unwrap
from actors.groups import as_future
from actors.prefix_view import PrefixView, chunk_keys, request_text
from actors.records import failed_record
from actors.routing import pick_group, route_slack

logger = logging.getLogger(__name__)

POLL_S = 0.1  # answers older than this are read again before a request is routed
POLL_TIMEOUT_S = 1.0  # a group that does not answer by then keeps its last answer (a dead one: not live)


class GroupPlacement:
    """The placement of one group's ranks, as a Coordinator reads it (`strategy(tp_rank)`); the router
    owns and removes the placement groups."""

    def __init__(self, strategies: list[Any]) -> None:
        self.strategies = strategies

    def strategy(self, index: int) -> Any:
        return self.strategies[index]

    def remove(self) -> None:
        pass


class Router:
    """Routes requests to one Coordinator actor per DP group; the same Ray API as a Coordinator."""

    def __init__(
        self,
        cfg: EngineConfig,
        placement: Any,
        group_order: list[int],
        group_factory: Callable[[int, EngineConfig, list[Any]], Any] | None = None,
    ) -> None:
        """As Coordinator: `placement.strategy(i)` places bundle i; DP rank d runs in placement group
        `group_order[d]`; `group_factory` makes each group's workers (fakes in tests and benchmarks)."""
        logging.basicConfig(level=logging.INFO, format="[coordinator] %(message)s")
        self.cfg = cfg
        self.placement = placement
        tp = cfg.tp_size
        self.groups = [
            self._spawn(d, GroupPlacement([placement.strategy(g * tp + t) for t in range(tp)]), group_factory)
            for d, g in enumerate(group_order)
        ]
        n = len(self.groups)
        num_blocks, block_size = cfg.worker.kv_pool()
        self.views = [PrefixView.for_pool(num_blocks, block_size) for _ in range(n)]
        self.route_slack = route_slack(cfg.worker.max_batch_size)
        self.alive = [True] * n
        self.loads = [0] * n  # as last reported
        self.received = [0] * n  # requests each group had received when it last reported
        self.routed = [0] * n  # requests sent to each group
        self.refused = 0  # requests `generate` ended here, with no live group to send them to
        self.polled_at = -POLL_S  # time.monotonic() of the last answers
        self.polling: asyncio.Future | None = None
        self.delivery_server: DeliveryServer | None = None  # `deliveries` over TCP (actors/delivery_socket.py)

    def _spawn(self, dp_rank: int, placement: GroupPlacement, group_factory: Any) -> Any:
        """Group `dp_rank`'s Coordinator actor, on the node of the group's rank 0 (in its placement bundle,
        holding no resource of it), so each node's CPUs serve the groups it hosts."""
        where = {} if placement.strategy(0) is None else {"scheduling_strategy": placement.strategy(0)}
        return (
            ray.remote(Coordinator)
            .options(namespace=self.cfg.namespace, num_cpus=0, max_concurrency=1000, max_restarts=0, **where)
            .remote(self.cfg, placement, [0], group_factory, [dp_rank])
        )

    def __repr__(self) -> str:
        return describe(self.__dict__.get("cfg"), ", group_coordinators=True")

    # ----------------------------------------------------------------------------- lifecycle
    async def setup(self) -> list[dict]:
        """Start every group's Coordinator and its workers, all at once."""
        results = await asyncio.gather(*(g.setup.remote() for g in self.groups), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self._stop_groups()
            raise unwrap(errors[0])
        return sorted((i for infos in results for i in infos), key=lambda i: i["rank"])

    async def rebuild_group(self, dp_rank: int) -> list[dict]:
        if not 0 <= dp_rank < len(self.groups):
            raise ValueError(f"dp_rank {dp_rank} is not a DP group of this run (dp_size {len(self.groups)})")
        try:
            infos = await self.groups[dp_rank].rebuild_group.remote(dp_rank)
        except RayTaskError as e:
            raise unwrap(e) from None
        self.alive[dp_rank] = True
        return infos

    async def shutdown(self) -> None:
        """Abort what runs, stop every group's Coordinator and workers, and release the placement groups."""
        try:
            if self.delivery_server is not None:
                self.delivery_server.close()
            await self._stop_groups()
        finally:
            self.placement.remove()

    async def _stop_groups(self) -> None:
        await asyncio.gather(*(g.shutdown.remote() for g in self.groups), return_exceptions=True)
        for group in self.groups:
            if isinstance(group, ray.actor.ActorHandle):  # (not an in-process stand-in: ray.kill would start Ray)
                try:
                    ray.kill(group, no_restart=True)
                except Exception:  # already dead
                    pass

    # ----------------------------------------------------------------------------- queries
    async def _each(self, method: str) -> list[Any]:
        """Every group Coordinator's answer to `method` (an exception in place of a dead one's)."""
        return await asyncio.gather(*(getattr(g, method).remote() for g in self.groups), return_exceptions=True)

    async def topology(self) -> list[dict]:
        infos = [i for r in await self._each("topology") if not isinstance(r, BaseException) for i in r]
        return sorted(infos, key=lambda i: i["rank"])

    async def status(self) -> dict:
        replies = [r for r in await self._each("status") if not isinstance(r, BaseException)]
        return {
            "live_groups": sum(r["live_groups"] for r in replies),
            "dp_size": len(self.groups),
            "waiting": sum(r["waiting"] for r in replies),
            "running": sum(r["running"] for r in replies),
        }

    async def kv_cache_stats(self) -> list[dict]:
        return [s for r in await self._each("kv_cache_stats") if not isinstance(r, BaseException) for s in r]

    async def progress(self) -> tuple[int, int]:
        replies = [r for r in await self._each("progress") if not isinstance(r, BaseException)]
        return self.refused + sum(r[0] for r in replies), self.refused + sum(r[1] for r in replies)

    async def stats(self) -> dict:
        replies = [r for r in await self._each("stats") if not isinstance(r, BaseException)]
        phases: dict[str, float] = {}
        for reply in replies:
            for name, seconds in reply["phases"].items():
                total = name in ("vision_encode_s", "prefill_s", "decode_s")
                phases[name] = phases.get(name, 0.0) + seconds if total else max(phases.get(name, 0.0), seconds)
        return {"phases": phases, "workers": [w for r in replies for w in r["workers"]]}

    def delivery_sources(self) -> list:
        """The group Coordinators: a caller reads each one's `deliveries` stream (actors/deliveries.py)."""
        return list(self.groups)

    # ----------------------------------------------------------------------------- requests
    async def generate(self, requests: list[dict]) -> list[dict]:
        """As Coordinator.generate: one record per request, in order (errors become records)."""
        if not isinstance(requests, (list, tuple)):
            raise TypeError(f"generate() takes a list of request dicts, got {type(requests).__name__}")
        records: list[dict | None] = [None] * len(requests)
        batches: dict[int, list[int]] = {}
        await self._fresh_loads()
        for i, request in enumerate(requests):
            try:
                batches.setdefault(self._pick(request), []).append(i)
            except NoLiveGroupError as e:
                records[i] = failed_record(request, str(e), arrival_time=clock.wall(), end_time=clock.wall())
                self.refused += 1
        calls = [self.groups[d].generate.remote([requests[i] for i in idx]) for d, idx in batches.items()]
        for (d, idx), reply in zip(batches.items(), await asyncio.gather(*calls, return_exceptions=True)):
            for j, i in enumerate(idx):
                if isinstance(reply, BaseException):  # the group's Coordinator died
                    self.alive[d] = False
                    error = f"dp group {d} failed: {type(unwrap(reply)).__name__}: {unwrap(reply)}"
                    records[i] = failed_record(requests[i], error, arrival_time=clock.wall(), end_time=clock.wall())
                else:
                    records[i] = reply[j]
        return records  # type: ignore[return-value]

    async def stream(self, request: dict, ack: bool = False) -> AsyncIterator[dict]:
        """As Coordinator.stream, relayed from the group that serves the request."""
        refs, first = await self._routed(
            request, lambda g: g.stream.options(num_returns="streaming").remote(request, ack), stream=True
        )
        finished = False
        try:
            item = first
            while True:
                yield item
                if item.get("final"):
                    finished = True
                    return
                try:
                    item = await (await refs.__anext__())
                except RayTaskError as e:
                    raise unwrap(e) from None
        finally:
            if not finished:  # the group's stream aborts the request when cancelled
                try:
                    ray.cancel(refs) if isinstance(refs, ray.ObjectRefGenerator) else refs.cancel()
                except Exception:  # the group's Coordinator is gone, and its stream with it
                    logger.debug("could not cancel a relayed stream", exc_info=True)

    async def submit(self, request: dict, subscriber: str, tag: str) -> dict:
        """As Coordinator.submit; the items come on the serving group's `deliveries` stream."""
        _, ack = await self._routed(request, lambda g: g.submit.remote(request, subscriber, tag))
        return ack

    async def delivery_address(self) -> tuple[str, int, bytes]:
        """As Coordinator.delivery_address, for the merged `deliveries` below."""
        if self.delivery_server is None:
            self.delivery_server = DeliveryServer(node_ip(), lambda subscriber: self.deliveries(subscriber))
        return await self.delivery_server.address()

    async def deliveries(self, subscriber: str) -> AsyncIterator[list[tuple[str, dict]]]:
        """Every group's `deliveries` for `subscriber`, merged (a caller that reads `delivery_sources`
        instead reads them without this relay)."""
        batches: asyncio.Queue = asyncio.Queue()

        async def read(group: Any) -> None:
            async for ref in group.deliveries.options(num_returns="streaming").remote(subscriber):
                batches.put_nowait(await ref)

        readers = [asyncio.ensure_future(read(g)) for g in self.groups]
        try:
            while True:
                getter = asyncio.ensure_future(batches.get())
                done, _ = await asyncio.wait([getter, *readers], return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    failed = next(r for r in readers if r in done)
                    raise unwrap(failed.exception() or RuntimeError("a group Coordinator ended a subscription"))
                yield getter.result()
        finally:
            for reader in readers:
                reader.cancel()

    async def abort(self, request_id: str) -> bool:
        """End every in-flight request with this id, on whichever group holds it."""
        return any(r is True for r in await asyncio.gather(
            *(g.abort.remote(request_id) for g in self.groups), return_exceptions=True
        ))  # fmt: skip

    # ----------------------------------------------------------------------------- routing
    def _pick(self, request: Any, exclude: frozenset[int] = frozenset()) -> int:
        """The group for `request` (its view then counts it there); NoLiveGroupError when none is live."""
        live = [d for d in range(len(self.groups)) if self.alive[d] and d not in exclude]
        loads = {d: self.loads[d] + max(0, self.routed[d] - self.received[d]) for d in live}
        keys = chunk_keys(request_text(request)) if live else []
        d = pick_group(loads, lambda d: self.views[d].hit(keys), self.route_slack)
        self.views[d].add(keys)
        self.routed[d] += 1
        return d

    async def _routed(self, request: Any, call: Callable[[Any], Any], stream: bool = False) -> tuple[Any, Any]:
        """Route `request` and make `call` on its group: (what `call` returned, its first result). A
        group found dead on the way (no live group there, or its Coordinator gone) is skipped and the
        request routed again; the request's own errors are raised as the group raised them."""
        tried: set[int] = set()
        while True:
            await self._fresh_loads()
            d = self._pick(request, frozenset(tried))
            out = call(self.groups[d])
            try:
                first = await (await out.__anext__()) if stream else await out
                return out, first
            except (RayTaskError, NoLiveGroupError, RayActorError) as e:
                error = unwrap(e)
                if not isinstance(error, (NoLiveGroupError, RayActorError)):
                    raise error from None
                self.alive[d] = False
                tried.add(d)
            except StopAsyncIteration:
                raise RuntimeError(f"dp group {d} ended a stream before its first item") from None

    async def _fresh_loads(self) -> None:
        """Ask every group for its load, liveness and requests received, unless the answers are recent
        (concurrent callers share one round of questions)."""
        if time.monotonic() - self.polled_at < POLL_S:
            return
        if self.polling is None or self.polling.done():
            self.polling = asyncio.ensure_future(self._poll())
        await asyncio.shield(self.polling)

    async def _poll(self) -> None:
        asked = [asyncio.ensure_future(as_future(g.load.remote())) for g in self.groups]
        await asyncio.wait(asked, timeout=POLL_TIMEOUT_S)
        for d, answer in enumerate(asked):
            if not answer.done():
                answer.cancel()  # busy: its last answer stands
            elif answer.exception() is not None:
                self.alive[d] = False  # its Coordinator is gone
            else:
                reply = answer.result()
                self.alive[d], self.loads[d], self.received[d] = reply["alive"], reply["load"], reply["received"]
        self.polled_at = time.monotonic()
