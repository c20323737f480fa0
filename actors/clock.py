"""The request path's clock: wall time for records, a monotonic counter for step costs.

The Coordinator, the group loops and the request bookkeeping read time only through `wall()` and
`perf()`, so that a simulation (cluster/tools/simulate.py) can run the same code in simulated time
by installing its own clock with `use()`. Timeouts on real Ray calls keep reading the real clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_wall: Callable[[], float] = time.time
_perf: Callable[[], float] = time.perf_counter


def wall() -> float:
    """Seconds since the epoch: arrival, delivery and end times in records."""
    return _wall()


def perf() -> float:
    """A monotonic counter in seconds: the group loops' call timings."""
    return _perf()


@contextmanager
def use(now: Callable[[], float]) -> Iterator[None]:
    """Read both clocks from `now` (seconds) inside the block; the real clocks come back after it."""
    global _wall, _perf
    saved = _wall, _perf
    _wall = _perf = now
    try:
        yield
    finally:
        _wall, _perf = saved
