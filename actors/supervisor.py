"""The lives of a Coordinator's DP groups: start, serve, fail, rebuild.

Each live group has one serving task, which runs the group's rounds one after another through its
owner (the Coordinator's `run_round`). What this file keeps true, and what the rest of the
Coordinator relies on:

- A group's rounds run only in its serving task, one at a time (`GroupLoop.round` asserts it). So
  the next `schedule()` runs only after the previous step call returned, and that is what makes it
  safe to free at once the blocks of a request that ends while a call runs (an abort, a stop
  string): the workers may still write those blocks during that call, but a later plan is the
  first that can hand them to another request, and its call follows this one.
- A group has at most one rebuild at a time (`GroupLoop.rebuild`), and a rebuild replaces the
  workers only after the group's serving task has ended (it returned after failing the group, or it
  was cancelled and awaited), so no round sees the workers being replaced. Failures seen by the
  serving task and `Coordinator.rebuild_group` both go through `fail` and `_rebuild`.
- A failed group keeps no request without an owner: running ones are ended (their KV is gone),
  waiting ones move to another live group or, with none, wait for the rebuild; a rebuild that
  fails fails the group again, which ends them or hands them to the next rebuild.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from actors.errors import NO_LIVE_GROUP, NoLiveGroupError
from actors.group_loop import GroupLoop
from actors.groups import GroupFailure
from actors.metrics import EngineMetrics
from actors.requests import RequestState
from actors.scheduler import WAITING, Sequence

logger = logging.getLogger(__name__)


class GroupOwner(Protocol):
    """What the supervisor needs of the Coordinator."""

    metrics: EngineMetrics

    async def run_round(self, engine: GroupLoop) -> None: ...

    def end(self, state: RequestState, finish_reason: str | None, error: str | BaseException | None = None) -> None: ...

    def enqueue(self, seq: Sequence) -> None: ...

    def gauges(self, engine: GroupLoop) -> None: ...


class Supervisor:
    """Starts the groups, runs each one's serving task, and fails and rebuilds a group (never twice at once)."""

    def __init__(self, engines: list[GroupLoop], max_restarts: int, owner: GroupOwner) -> None:
        self.engines = engines
        self.max_restarts = max_restarts  # background rebuilds per group after failures
        self.owner = owner

    async def start_all(self) -> None:
        """Start every group at once; if any fails, kill them all and raise its error."""
        results = await asyncio.gather(*(e.group.start() for e in self.engines), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(e.group.kill() for e in self.engines))
            raise errors[0]
        for engine in self.engines:
            self._ready(engine)

    async def rebuild(self, engine: GroupLoop) -> None:
        """Replace a group's workers now: stop its serving task, fail what it runs, start it anew. A rebuild
        already in progress is awaited instead of a second one. GroupFailure when it could not be rebuilt."""
        if engine.rebuild is None:
            await self._stop_serving(engine)
            if engine.rebuild is None:  # the serving task may have failed the group and begun one itself
                orphans = self.fail(engine, f"dp group {engine.dp_rank} is being rebuilt", restart=False)
                engine.rebuild = asyncio.get_running_loop().create_task(self._rebuild(engine, orphans))
        error = await asyncio.shield(engine.rebuild)
        if error is not None:
            raise GroupFailure(f"dp group {engine.dp_rank} could not be rebuilt: {error}") from error

    async def shutdown(self) -> None:
        """Stop every serving task and rebuild, then kill every group's workers."""
        tasks = [t for e in self.engines for t in (e.task, e.rebuild) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(e.group.kill() for e in self.engines))

    # ----------------------------------------------------------------------------- serving
    def _ready(self, engine: GroupLoop) -> None:
        """A group has (re)started: record its memory and run its serving task."""
        for info, stats in zip(engine.group.infos, engine.group.stats):
            self.owner.metrics.record_memory(info["rank"], stats)
        assert engine.task is None or engine.task.done(), f"dp group {engine.dp_rank} has a serving task already"
        engine.task = asyncio.get_running_loop().create_task(self._serve(engine))
        engine.wake.set()

    async def _serve(self, engine: GroupLoop) -> None:
        """The group's rounds while it lives; a failure fails the group (and begins its rebuild) and ends the task."""
        while engine.group.alive:
            if engine.idle:
                engine.wake.clear()
                await engine.wake.wait()
                continue
            try:
                await self.owner.run_round(engine)
            except GroupFailure as e:
                self.fail(engine, str(e))
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug in this loop must not leave requests waiting forever
                logger.exception("dp group %d loop failed", engine.dp_rank)
                self.fail(engine, f"dp group {engine.dp_rank} failed: {type(e).__name__}: {e}")
                return

    async def _stop_serving(self, engine: GroupLoop) -> None:
        """Cancel the group's serving task and wait until it has ended (a round in flight is abandoned)."""
        task = engine.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        engine.drop_in_flight()  # a call started ahead belongs to the workers being replaced
        assert not engine.in_round, f"dp group {engine.dp_rank}: a round outlived its serving task"

    # ----------------------------------------------------------------------------- failures
    def fail(self, engine: GroupLoop, message: str, restart: bool = True) -> list[Sequence]:
        """Mark the group dead, end its running requests and move its waiting ones to other live groups.

        Returns the waiting requests with nowhere else to go. With `restart`, a rebuild begins in the
        background for them (up to `max_restarts` per group), or, with none left, they end with
        NoLiveGroupError; without, the caller's rebuild carries them.
        """
        logger.error(message)
        engine.group.alive = False
        engine.drop_in_flight()
        others_live = any(e.group.alive for e in self.engines)
        orphans = []
        for seq in engine.scheduler.take_all():
            state: RequestState = seq.payload
            if state.finished:
                continue
            if seq.state != WAITING or seq.output_ids:  # started (a preempted one has tokens already)
                self.owner.end(state, None, message)
            elif others_live:
                self.owner.enqueue(seq)
            else:
                orphans.append(seq)
        self.owner.gauges(engine)
        if not restart:
            return orphans
        if engine.rebuild is None and engine.restarts < self.max_restarts:
            engine.restarts += 1
            engine.rebuild = asyncio.get_running_loop().create_task(self._rebuild(engine, orphans))
        else:
            for seq in orphans:
                self.owner.end(seq.payload, None, NoLiveGroupError(f"{NO_LIVE_GROUP} ({message})"))
        return orphans

    async def _rebuild(self, engine: GroupLoop, orphans: list[Sequence]) -> BaseException | None:
        """Start the group's workers anew, `orphans` waiting for it; the error when that failed (the group is
        then failed again, which ends the orphans or hands them to the next rebuild)."""
        assert engine.task is None or engine.task.done(), f"dp group {engine.dp_rank} rebuilt while it serves"
        for seq in orphans:
            if not seq.payload.finished:
                engine.scheduler.add(seq)
        try:
            await engine.group.kill()
            await engine.group.start()
        except Exception as e:
            engine.rebuild = None
            self.fail(engine, f"dp group {engine.dp_rank} could not be rebuilt: {e}")
            return e
        engine.rebuild = None
        logger.info("dp group %d rebuilt (restart %d of %d)", engine.dp_rank, engine.restarts, self.max_restarts)
        self._ready(engine)
        return None
