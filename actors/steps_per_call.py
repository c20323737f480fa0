"""How many pure-decode steps one call to a worker group runs: a fixed number, or chosen from measured times.

Every call costs a fixed orchestration time (the Coordinator's round, Ray's task submission and reply,
the worker's set-up of the step inputs) on top of its steps. With `auto`, each group keeps two moving
averages from its own pure-decode calls, the device time of one step (the worker's own timing over
its steps) and the call's overhead (the call's wall time at the Coordinator less the worker's time),
and runs as many steps per call as keep the overhead under `OVERHEAD_SHARE` of the call, but never a
call longer than `max_call_ms`: that bounds how long a request that arrives mid-call waits to be
admitted, and how long a request that ended mid-call (a stop string, an abort) holds its blocks.
The scheduler still cuts a call short where no running request needs that many more tokens.
"""

from __future__ import annotations

import math

AUTO = "auto"
# The share of a call that orchestration may take in `auto` mode.
OVERHEAD_SHARE = 0.02
# Steps of the first calls, before anything is measured, and the most one call may run.
FIRST_STEPS = 4
MAX_STEPS = 1024
# Weight of the newest call in the moving averages.
SMOOTHING = 0.2


class StepsPerCall:
    """`steps` for the next pure-decode call; `observe` each pure-decode call's times (auto mode)."""

    def __init__(self, setting: int | str, max_call_ms: float) -> None:
        if setting != AUTO and (isinstance(setting, bool) or not isinstance(setting, int) or setting < 1):
            raise ValueError(f"decode_steps_per_call must be an integer >= 1 or {AUTO!r}, got {setting!r}")
        if max_call_ms <= 0:
            raise ValueError(f"max_decode_call_ms must be > 0, got {max_call_ms!r}")
        self.auto = setting == AUTO
        self.fixed = FIRST_STEPS if self.auto else int(setting)
        self.max_call_s = max_call_ms / 1e3
        self.step_s: float | None = None  # device time of one step
        self.overhead_s: float | None = None  # a call's wall time beyond its steps

    @property
    def steps(self) -> int:
        if not self.auto or self.step_s is None or self.overhead_s is None:
            return self.fixed
        step = max(self.step_s, 1e-6)
        wanted = math.ceil(self.overhead_s / (OVERHEAD_SHARE * step))
        longest = max(1, int(self.max_call_s / step))
        return max(1, min(wanted, longest, MAX_STEPS))

    def observe(self, steps: int, worker_s: float, call_s: float) -> None:
        """One pure-decode call: `steps` run in `worker_s` on the worker, `call_s` as the caller saw it."""
        if not self.auto or steps < 1 or worker_s <= 0:
            return
        self.step_s = _average(self.step_s, worker_s / steps)
        self.overhead_s = _average(self.overhead_s, max(0.0, call_s - worker_s))


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new
