"""How many pure-decode steps one call to a worker group runs: a fixed number, or chosen from measured times.

With `scheduler.async_scheduling` (the default), `auto` runs one step per call: each token reaches its
stream when it is made, and a request that arrives is planned into the call after the one running, one
decode step later. The group loop starts each call while the previous one runs, so the orchestration
overlaps the device step; what still shows (on a host whose cores the Coordinator shares with the
workers, and a model whose step is as short as a call's cost) is the price of streaming every token,
and an integer setting trades it back for throughput (docs/benchmarks.md, "Ray call cost").

Without it, every call costs a fixed orchestration time (the Coordinator's round, Ray's task submission and reply,
the worker's set-up of the step inputs) on top of its steps. With `auto`, from the group's own
estimates (`actors/step_costs.py`: the device time of one pure-decode step, and a call's overhead,
its wall time at the Coordinator less the workers' time), a call runs as many steps as keep the
overhead under `OVERHEAD_SHARE` of the call, but is never longer than `max_call_ms`: that bounds how
long a request that arrives mid-call waits to be admitted, and how long a request that ended mid-call
(a stop string, an abort) holds its blocks. The scheduler still cuts a call short where no running
request needs that many more tokens.
"""

from __future__ import annotations

import math

from actors.step_costs import StepCosts

AUTO = "auto"
# The share of a call that orchestration may take in `auto` mode.
OVERHEAD_SHARE = 0.02
# Steps of the first calls, before anything is measured, and the most one call may run.
FIRST_STEPS = 4
MAX_STEPS = 1024


class StepsPerCall:
    """`steps(costs)`: the steps of the next pure-decode call, fixed or from the group's step costs (auto)."""

    def __init__(self, setting: int | str, max_call_ms: float, lookahead: bool = False) -> None:
        if setting != AUTO and (isinstance(setting, bool) or not isinstance(setting, int) or setting < 1):
            raise ValueError(f"decode_steps_per_call must be an integer >= 1 or {AUTO!r}, got {setting!r}")
        if max_call_ms <= 0:
            raise ValueError(f"max_decode_call_ms must be > 0, got {max_call_ms!r}")
        self.auto = setting == AUTO
        self.lookahead = lookahead
        self.fixed = (1 if lookahead else FIRST_STEPS) if self.auto else int(setting)
        self.max_call_s = max_call_ms / 1e3

    def steps(self, costs: StepCosts) -> int:
        if not self.auto or self.lookahead or costs.decode_step_s is None or costs.overhead_s is None:
            return self.fixed
        step = max(costs.decode_step_s, 1e-6)
        wanted = math.ceil(costs.overhead_s / (OVERHEAD_SHARE * step))
        longest = max(1, int(self.max_call_s / step))
        return max(1, min(wanted, longest, MAX_STEPS))
