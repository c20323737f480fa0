"""Which DP group a request goes to: the rule shared by the Coordinator and the router (actors/router.py).

The least loaded live group; among groups whose loads are close to it (within `route_slack`
requests), the one whose prefix cache holds the most of the request (ties: the less loaded, then
the lower DP rank). The Coordinator reads loads and prefix hits from its schedulers; the router
from the groups' reports and its view of what it sent them (actors/prefix_view.py).
"""

from __future__ import annotations

from collections.abc import Callable

from actors.errors import NoLiveGroupError


def route_slack(max_batch_size: int) -> int:
    """Loads within this many requests of the least loaded group count as close."""
    return max(1, max_batch_size // 4)


def pick_group(loads: dict[int, int], hit: Callable[[int], int], slack: int) -> int:
    """The DP rank for a request, from the live groups' loads (DP rank -> requests in flight) and `hit(rank)`,
    how much of the request that group's prefix cache holds. NoLiveGroupError when no group is live."""
    if not loads:
        raise NoLiveGroupError()
    least = min(loads.values())
    close = [d for d, load in loads.items() if load <= least + slack]
    return max(close, key=lambda d: (hit(d), -loads[d], -d))
