"""The workers of one DP group (one TP group): create, rendezvous, load, call, kill, rebuild.

Everything here is awaited from the Coordinator's event loop, so one group starting, failing or
being rebuilt never blocks the others. Each call here is an ordinary Ray actor call per rank;
actors/socket_group.py and actors/compiled_group.py are the same group with its calls after start over a
socket per rank or through one Ray Compiled Graph (`ray.phase_calls`; actors/group_factory.py picks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from actors.config import EngineConfig
from actors.shard_worker import ShardWorker, worker_actor_name

logger = logging.getLogger(__name__)


class GroupFailure(RuntimeError):
    """A rank of the group died, hung, or the group could not start; the message names the rank."""


class CallError(RuntimeError):
    """A phase call raised on a worker that is still alive (the group itself is healthy)."""


class WorkerGroup:
    """The ShardWorkers of DP rank `dp_rank`, in placement bundle order."""

    worker_class: type = ShardWorker  # the actor class of every rank (tests substitute a model-free one)

    def __init__(self, dp_rank: int, cfg: EngineConfig, strategies: list[Any]) -> None:
        self.dp_rank = dp_rank
        self.cfg = cfg
        self.strategies = strategies  # one Ray scheduling strategy per TP rank
        self.workers: list[Any] = []
        self.infos: list[dict] = []
        self.stats: list[dict] = []
        self.rendezvous: tuple[str, int] | None = None
        self.alive = False

    @property
    def ranks(self) -> list[int]:
        return [self.dp_rank * self.cfg.tp_size + t for t in range(self.cfg.tp_size)]

    # ----------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Create the workers, form their process group, load the shards and warm up."""
        cfg = self.cfg
        env = {"env_vars": dict(cfg.dist_env)} if cfg.dist_env else None
        self.workers = [
            ray.remote(self.worker_class)
            .options(
                name=worker_actor_name(rank),
                namespace=cfg.namespace,
                max_restarts=0,
                scheduling_strategy=strategy,
                runtime_env=env,
                **cfg.worker_options,
            )
            .remote(rank, tp_rank, cfg.tp_size, self.dp_rank, cfg.worker)
            for tp_rank, (rank, strategy) in enumerate(zip(self.ranks, self.strategies))
        ]
        try:
            timeout = cfg.worker_timeout_s
            self.infos = await self.call("node_info", timeout_s=timeout, what="start")
            ip, port = (await self._gather([self.workers[0].rendezvous_address.remote()], timeout, "rendezvous"))[0]
            self.rendezvous = (ip, port)
            await self._rendezvous(ip, port)
            await self._connect()
            loads = await self.call("load", timeout_s=timeout, what="load")
            warm = await self.call("warmup", timeout_s=timeout, what="warm-up")
        except BaseException:
            await self.kill()
            raise
        self.stats = [{**a, **b} for a, b in zip(loads, warm)]
        self.alive = True
        logger.info(
            "dp group %d ready on %s (rendezvous tcp://%s:%d)", self.dp_rank, self.infos[0]["node_ip"], ip, port
        )

    async def _connect(self) -> None:
        """Set up the path of the calls from `load` on (a subclass's; ordinary calls need none)."""

    async def _rendezvous(self, ip: str, port: int) -> None:
        timeout = self.cfg.rendezvous_timeout_s
        refs = [w.init_process_group.remote(ip, port, timeout) for w in self.workers]
        futures = [asyncio.ensure_future(as_future(r)) for r in refs]
        done, pending = await asyncio.wait(futures, timeout=timeout + 5)
        if pending:
            missing = [self.ranks[i] for i, f in enumerate(futures) if f in pending]
            raise GroupFailure(
                f"process group of dp group {self.dp_rank} at tcp://{ip}:{port} did not form within "
                f"{timeout:g}s: rank(s) {sorted(missing)} did not arrive"
            )
        for f in done:
            if f.exception() is not None:
                raise GroupFailure(
                    f"process group of dp group {self.dp_rank} at tcp://{ip}:{port} failed to form: {f.exception()}"
                )

    async def kill(self, timeout_s: float = 30.0) -> None:
        """Kill the workers and wait (bounded) until their names are free for a rebuild."""
        self.alive = False
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already dead
                pass
        self.workers = []
        deadline = time.monotonic() + timeout_s
        for name in (worker_actor_name(r) for r in self.ranks):
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(name, namespace=self.cfg.namespace)
                except ValueError:
                    break
                await asyncio.sleep(0.05)

    # ----------------------------------------------------------------------------- calls
    async def call(self, method: str, *args: Any, timeout_s: float | None = None, what: str | None = None) -> list:
        """Call `method` on every rank with the same arguments; every rank's result, in rank order.

        Raises GroupFailure (naming the rank) when a rank died or did not answer within the timeout,
        CallError when a live rank raised.
        """
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        return await self._gather(refs, timeout_s or self.cfg.worker_timeout_s, what or method)

    async def _gather(self, refs: list, timeout_s: float, what: str) -> list:
        futures = [asyncio.ensure_future(as_future(r)) for r in refs]
        done, pending = await asyncio.wait(futures, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done if not f.cancelled()):
            # One rank failed; its peers may be stuck in a collective: find out who died.
            errors = {self.ranks[i]: f.exception() for i, f in enumerate(futures) if f in done and f.exception()}
            for f in pending:
                f.cancel()
            dead = await self.dead_ranks()
            if dead:
                raise GroupFailure(f"{rank_names(dead)} of dp group {self.dp_rank} died (RayActorError)")
            rank, error = next(iter(errors.items()))
            if isinstance(error, RayActorError):
                raise GroupFailure(f"{rank_names([rank])} of dp group {self.dp_rank} died ({type(error).__name__})")
            if pending:  # a rank raised while the others wait for it in a collective: the group is stuck
                raise GroupFailure(
                    f"{rank_names([rank])} of dp group {self.dp_rank} failed in '{what}': {_cause(error)}"
                )
            raise CallError(f"{rank_names([rank])} of dp group {self.dp_rank} failed in '{what}': {_cause(error)}")
        if pending:
            late = [self.ranks[i] for i, f in enumerate(futures) if f in pending]
            for f in pending:
                f.cancel()
            raise GroupFailure(
                f"dp group {self.dp_rank} did not finish '{what}' within {timeout_s:g}s "
                f"(ray.worker_timeout_s); rank(s) {late} still running"
            )
        return [f.result() for f in futures]

    async def dead_ranks(self, timeout_s: float = 5.0) -> list[int]:
        """Ranks whose actor is dead (a ping fails with RayActorError)."""
        futures = [asyncio.ensure_future(as_future(w.health.remote())) for w in self.workers]
        await asyncio.wait(futures, timeout=timeout_s)
        dead = []
        for rank, f in zip(self.ranks, futures):
            if f.done() and isinstance(f.exception(), RayActorError):
                dead.append(rank)
            elif not f.done():
                f.cancel()
        return dead


async def as_future(ref: Any) -> Any:
    """A coroutine awaiting `ref` (an ObjectRef, or any awaitable), for asyncio.ensure_future."""
    return await ref


def retrieve_exception(answer: asyncio.Future) -> None:
    """A done-callback marking a call's failure as seen, for an answer that may never be awaited (a group that
    failed another way, or dropped the call)."""
    if not answer.cancelled():
        answer.exception()


def rank_names(ranks: list[int]) -> str:
    """The workers of `ranks` as messages name them: "shard-worker-3 (rank 3), ..."."""
    return ", ".join(f"{worker_actor_name(r)} (rank {r})" for r in ranks)


def _cause(error: BaseException) -> str:
    """The worker's own exception message inside a Ray task error."""
    cause = getattr(error, "cause", None)
    if isinstance(error, RayError) and isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
