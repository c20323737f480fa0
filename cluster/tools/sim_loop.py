"""A discrete-event asyncio loop: its clock is simulated and jumps to the next timer when nothing is ready.

Code that waits with `asyncio.sleep`, `call_later` or timeouts runs unchanged on it, but a sleep of
a modelled duration costs no real time: when no callback is ready and no I/O is pending, the loop's
`time()` advances to the earliest timer. `run(coro, start)` runs a coroutine on such a loop with the
request path's clock (actors/clock.py) reading the same simulated time, so records, step timings and
the Coordinator's timers all live in it. Threads would leak real time into it: the simulation runs none.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any

from actors import clock


class _JumpSelector(selectors.DefaultSelector):
    """A selector that polls real I/O without blocking and turns a wait into a jump of the loop's clock."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: SimLoop | None = None

    def select(self, timeout: float | None = None) -> list:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # nothing scheduled at all: only a thread could wake us, and none runs
            raise RuntimeError("simulation stalled: no timer is pending and nothing is ready")
        assert self.loop is not None
        self.loop.now += timeout
        return []


class SimLoop(asyncio.SelectorEventLoop):
    """An event loop whose `time()` is `now`, advanced only by waits (see the module docstring)."""

    def __init__(self, start: float = 0.0) -> None:
        selector = _JumpSelector()
        self.now = start
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self.now


def run(main: Coroutine[Any, Any, Any], start: float = 1_000_000.0) -> Any:
    """Run `main` to completion on a fresh SimLoop starting at `start` seconds, with actors.clock reading it."""
    loop = SimLoop(start)
    try:
        with clock.use(loop.time):
            return loop.run_until_complete(main)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
