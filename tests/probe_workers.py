"""Model-free workers for the phase-call tests (tests/test_compiled_group.py, tests/test_socket_group.py): calls
that echo, sum, keep, raise or wait on a signal actor, so that a call is in flight for as long as a test needs,
without sleeps. Each test module names its own `ProbeWorker` subclass with the namespace its signal lives in."""

from __future__ import annotations

import asyncio
import hashlib

import ray
import torch

from actors.shard_worker import ShardWorker

SIGNAL = "phase-call-signal"


@ray.remote(num_cpus=0)
class Signal:
    """Where probe workers report that a call started, and then wait for good (until the test kills them)."""

    def __init__(self) -> None:
        self.arrived = 0
        self.changed = asyncio.Event()
        self.never = asyncio.Event()

    async def arrive(self) -> None:
        self.arrived += 1
        self.changed.set()

    async def arrivals(self, count: int) -> int:
        while self.arrived < count:
            self.changed.clear()
            await self.changed.wait()
        return self.arrived

    async def wait(self) -> None:
        await self.never.wait()


class ProbeWorker(ShardWorker):
    """A ShardWorker without a model or a process group, with calls that echo, sum, keep, raise or wait."""

    signal_namespace = ""  # where the test module's `Signal` lives

    def init_process_group(self, ip: str, port: int, timeout_s: float) -> None:
        pass

    def load(self) -> dict:
        return {"rank": self.rank}

    def warmup(self) -> dict:
        return {"rank": self.rank}

    def echo(self, value: object) -> object:
        return value

    def digest(self, tensor: torch.Tensor) -> str:
        return digest_of(tensor)

    def keep(self, tensor: torch.Tensor) -> None:
        self.kept = tensor

    def kept_digest(self) -> str:
        return digest_of(self.kept)

    def wait_on(self, rank: int) -> int:
        """Rank `rank` reports its arrival and waits for good; the others answer at once."""
        if self.rank == rank:
            signal = ray.get_actor(SIGNAL, namespace=self.signal_namespace)
            ray.get(signal.arrive.remote())
            ray.get(signal.wait.remote())
        return self.rank

    def raise_or_wait(self, rank: int) -> int:
        """Rank `rank` raises; the others wait for good, as peers of a collective would for it."""
        if self.rank == rank:
            raise ValueError(f"rank {rank} refuses")
        signal = ray.get_actor(SIGNAL, namespace=self.signal_namespace)
        ray.get(signal.arrive.remote())
        ray.get(signal.wait.remote())
        return self.rank


def digest_of(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
