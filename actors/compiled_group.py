"""A DP group whose phase calls go through one Ray Compiled Graph (`ray.phase_calls: compiled`).

An ordinary actor call costs about 1 ms per worker on the caller's side; a compiled graph passes the
call through shared-memory channels to a loop already running on each worker, for a few tenths of a
millisecond per call (docs/architecture.md, "Phase calls"). Start-up begins as ordinary calls
(node_info, rendezvous: `WorkerGroup.start`); then the group compiles one graph, and every call from
`load` on goes through it: every rank's `ShardWorker.dispatch` reads the same `(method, args)` and
returns the method's answer. Rules Ray sets and this class keeps:

- Only the process (and the event loop) that compiled the graph executes it: the Coordinator's.
- An actor runs one compiled graph at a time, so every phase call shares the one graph; executions
  start one at a time, in the order of the calls, and every rank runs them in that order (the group
  loop may start the next step while one runs); a rebuild compiles a fresh graph on the fresh workers.
- Ray bounds neither the wait for an asyncio execution's answer nor a teardown blocked by a hung
  method, so the bounds are kept here: a call waits at most `ray.worker_timeout_s`, polling the
  workers (`dispatch_state`, an ordinary call that runs beside the graph's loop) once it takes
  longer than PROBE_S, so that a dead rank, or a rank that raised while its peers wait for it in a
  collective, fails the call at once and names the rank.
- After a failure the graph is torn down and the group refuses calls until `kill` and `start`;
  `kill` tears the graph down (bounded) and kills the workers, which also ends a teardown held up by
  a hung rank.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import RayActorError

from actors.config import EngineConfig
from actors.groups import CallError, GroupFailure, WorkerGroup, as_future, rank_names, retrieve_exception
from actors.shard_worker import Raised

logger = logging.getLogger(__name__)

# A call taking longer than this is checked on (dead rank, a rank stuck after its peers failed) every PROBE_S.
PROBE_S = 1.0
# Initial size of each channel's buffer (the input, read by every rank, and each rank's answer). A larger
# message grows the channel to its size; Ray keeps the old buffer, so start large enough for most calls.
CHANNEL_BYTES = 8 << 20
# The threads in which Ray's asyncio graph waits for channels, polling (names as Ray's thread pools give them).
POLLING_THREADS = ("channel.AwaitableBackgroundReader", "channel.AwaitableBackgroundWriter")
POLLING_CHECKS = 8  # calls that look for them before giving up (with a warning)
# How long `kill` lets a graph finish its teardown before it kills the workers (a hung rank never finishes).
TEARDOWN_GRACE_S = 5.0


class CompiledWorkerGroup(WorkerGroup):
    """`WorkerGroup` whose calls after start go through one compiled graph; same interface and failures."""

    def __init__(self, dp_rank: int, cfg: EngineConfig, strategies: list[Any]) -> None:
        super().__init__(dp_rank, cfg, strategies)
        self.graph: Any = None  # ray.dag.CompiledDAG
        self.failure: str | None = None  # why the graph stopped; calls refuse until kill + start
        self._calls = 0  # executions of this graph, to compare with each rank's `dispatch_state`
        self._lock = asyncio.Lock()  # one execution starts at a time: each rank runs them in that order
        self._pending: asyncio.Future | None = None  # a call's answer that never came (failed group)
        self._teardown: threading.Event | None = None  # set when the graph's teardown has returned
        self._polling_checks = 0  # calls that looked for the polling threads, none found yet; -1 once they were

    # ----------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start the workers as `WorkerGroup` does; the graph is compiled after the rendezvous (`_connect`)."""
        self.graph, self.failure, self._calls, self._pending, self._teardown = None, None, 0, None, None
        self._polling_checks = 0
        await super().start()

    async def _connect(self) -> None:
        """Compile the group's graph, after the rendezvous and before `load`: `load` and `warmup` go through it
        too, so all of a worker's torch work runs on the graph's thread. A load on the actor's main thread
        would leave an OpenMP thread team there beside the graph thread's, which slows every later step on
        cpu (the socket path measured 4-10%: docs/benchmarks.md, "Call sockets")."""
        try:
            with InputNode() as call:
                dag = MultiOutputNode([w.dispatch.bind(call) for w in self.workers])
            # Blocks this event loop while it sets up the channels (tenths of a second); it must run on the
            # loop that executes the graph.
            self.graph = dag.experimental_compile(
                enable_asyncio=True,
                _submit_timeout=self.cfg.worker_timeout_s,
                _buffer_size_bytes=CHANNEL_BYTES,
            )
        except Exception as e:
            raise GroupFailure(f"dp group {self.dp_rank} could not compile its graph: {type(e).__name__}: {e}") from e

    async def kill(self, timeout_s: float = 30.0) -> None:
        """Tear the graph down, kill the workers and wait (bounded) until their names are free."""
        deadline = time.monotonic() + timeout_s
        self.alive = False
        if self.graph is not None:
            self._start_teardown()
            if self.failure is None:  # a healthy graph ends its workers' loops by itself: no error logs
                await _wait_event(self._teardown, min(TEARDOWN_GRACE_S, timeout_s))
        await super().kill(max(deadline - time.monotonic(), 0.0))
        if self._teardown is not None and not await _wait_event(self._teardown, deadline - time.monotonic()):
            logger.warning("dp group %d: compiled graph teardown still running after %gs", self.dp_rank, timeout_s)
        if self._pending is not None:
            self._pending.cancel()
        self.graph, self._pending, self._teardown = None, None, None
        self.failure = self.failure or "killed"

    def _start_teardown(self) -> None:
        """Tear the graph down on a thread of its own (Ray's teardown blocks, and waits for a hung rank)."""
        if self._teardown is not None:
            return
        done = self._teardown = threading.Event()
        graph = self.graph

        def teardown() -> None:
            try:
                graph.teardown()
            except Exception:
                logger.exception("dp group %d: compiled graph teardown failed", self.dp_rank)
            finally:
                done.set()

        threading.Thread(target=teardown, name=f"teardown-dp{self.dp_rank}", daemon=True).start()

    # ----------------------------------------------------------------------------- calls
    async def call(self, method: str, *args: Any, timeout_s: float | None = None, what: str | None = None) -> list:
        """Call `method` on every rank with the same arguments; every rank's result, in rank order.

        Before the graph exists (start-up) this is an ordinary call. Raises GroupFailure (naming the rank)
        when a rank died or did not answer within the timeout, CallError when a live rank raised.
        """
        if self.graph is None and self.failure is None:
            return await super().call(method, *args, timeout_s=timeout_s, what=what)
        what = what or method
        timeout_s = timeout_s or self.cfg.worker_timeout_s
        deadline = time.monotonic() + timeout_s
        async with self._lock:  # executions start in the order of the calls: the workers run them so
            if self.failure is not None:
                raise GroupFailure(f"dp group {self.dp_rank} cannot run '{what}': {self.failure}")
            answer = await self._submit(method, args, what)
            number = self._calls
        results = await self._wait(answer, number, deadline, timeout_s, what)
        if 0 <= self._polling_checks < POLLING_CHECKS:  # Ray starts them with the first execution
            self._polling_checks = -1 if lower_polling_threads() else self._polling_checks + 1
            if self._polling_checks == POLLING_CHECKS:
                logger.warning("dp group %d: no %s thread found to lower", self.dp_rank, POLLING_THREADS[0])
        raised = [(rank, r) for rank, r in zip(self.ranks, results) if isinstance(r, Raised)]
        if raised:
            rank, error = raised[0]
            raise CallError(f"{rank_names([rank])} of dp group {self.dp_rank} failed in '{what}': {error.error}")
        return results

    async def _submit(self, method: str, args: tuple, what: str) -> asyncio.Future:
        """Start one execution of the graph; the future of every rank's answer."""
        try:
            futures = await self.graph.execute_async((method, args))
        except Exception as e:  # Ray tore the graph down already (a worker died since the last call)
            raise await self._graph_failed(None, what, e) from e
        self._calls += 1
        answer = asyncio.ensure_future(_all(futures))
        answer.add_done_callback(retrieve_exception)
        return answer

    async def _wait(self, answer: asyncio.Future, number: int, deadline: float, timeout_s: float, what: str) -> list:
        """Every rank's answer to execution `number`, by `deadline`, checking on the ranks while it takes long.

        An execution started while another one runs waits behind it on the workers: its own time counts
        from its start, so `ray.worker_timeout_s` bounds the two together.
        """
        while True:
            done, _ = await asyncio.wait({answer}, timeout=min(PROBE_S, max(deadline - time.monotonic(), 0.0)))
            if done:
                break
            if self.failure is not None:  # an earlier execution found the group failed
                raise self._fail(answer, self.failure)
            states = await self._probe(number)
            dead = [rank for rank, s in zip(self.ranks, states) if s == "dead"]
            if dead:
                raise self._fail(answer, f"{rank_names(dead)} of dp group {self.dp_rank} died (RayActorError)")
            running = [rank for rank, s in zip(self.ranks, states) if s == "running"]
            raised = [(rank, s) for rank, s in zip(self.ranks, states) if isinstance(s, Raised)]
            if raised and running:  # the others wait for it in a collective: the group is stuck
                rank, error = raised[0]
                raise self._fail(
                    answer, f"{rank_names([rank])} of dp group {self.dp_rank} failed in '{what}': {error.error}"
                )
            if time.monotonic() >= deadline:
                raise self._fail(
                    answer,
                    f"dp group {self.dp_rank} did not finish '{what}' within {timeout_s:g}s "
                    f"(ray.worker_timeout_s); rank(s) {running} still running",
                )
        try:
            return answer.result()
        except Exception as e:  # Ray closes the channels of a graph whose worker died
            raise await self._graph_failed(answer, what, e) from e

    async def _graph_failed(self, answer: asyncio.Future | None, what: str, error: Exception) -> GroupFailure:
        """The failure of an execution the graph itself failed: the dead ranks, else Ray's error."""
        dead = await self.dead_ranks()
        if dead:
            return self._fail(answer, f"{rank_names(dead)} of dp group {self.dp_rank} died (RayActorError)")
        return self._fail(answer, f"dp group {self.dp_rank} failed in '{what}': {type(error).__name__}: {error}")

    async def _probe(self, number: int, timeout_s: float = 5.0) -> list[Any]:
        """Each rank's state in execution `number`: "dead", "running" (or no answer), "done" or its `Raised`."""
        futures = [asyncio.ensure_future(as_future(w.dispatch_state.remote())) for w in self.workers]
        await asyncio.wait(futures, timeout=timeout_s)
        states: list[Any] = []
        for f in futures:
            if not f.done():
                f.cancel()
                states.append("running")
            elif isinstance(f.exception(), RayActorError):
                states.append("dead")
            elif f.exception() is not None:
                states.append("running")
            else:
                done, raised_in, raised = f.result()
                if raised_in == number:
                    states.append(raised)
                else:
                    states.append("running" if done < number else "done")
        return states

    def _fail(self, answer: asyncio.Future | None, message: str) -> GroupFailure:
        """Stop using the graph (calls refuse until kill + start), tear it down, and the failure to raise."""
        self.failure = message
        self._pending = answer
        self._start_teardown()
        return GroupFailure(message)


def lower_polling_threads(threads: Iterable[threading.Thread] | None = None) -> bool:
    """Run this process's compiled-graph polling threads (POLLING_THREADS) under Linux's SCHED_IDLE policy; whether
    a reader was found. Ray's asyncio graph waits for each answer in a thread that polls its channel for the whole
    call: at the process's priority that thread takes a core's share from the workers and the server on a small
    host; under SCHED_IDLE it runs on an idle core and yields a busy one. `threads`: where to look (default: all
    of this process's)."""
    if not hasattr(os, "sched_setscheduler"):  # not Linux: the threads keep the process's priority
        return True
    found = False
    for thread in threading.enumerate() if threads is None else threads:
        if thread.name.startswith(POLLING_THREADS) and thread.native_id is not None:
            try:
                os.sched_setscheduler(thread.native_id, os.SCHED_IDLE, os.sched_param(0))  # one thread's policy
            except OSError as e:
                logger.warning("could not lower the priority of %s: %s", thread.name, e)
            found = found or thread.name.startswith(POLLING_THREADS[0])
    return found


async def _all(futures: list) -> list:
    """Every rank's answer to one execution (the futures share one result; each is awaited once)."""
    return [await f for f in futures]


async def _wait_event(event: threading.Event | None, timeout_s: float) -> bool:
    """Wait (polling, without blocking the loop) up to `timeout_s` for `event`; whether it is set."""
    deadline = time.monotonic() + timeout_s
    while event is not None and not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return event is None or event.is_set()
