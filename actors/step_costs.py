"""Running estimates of a DP group's step times, from the step calls its group loop already times.

Two figures size the token budget of a round (`GroupScheduler.set_step_costs`): the seconds of one
pure-decode step, and the seconds each prompt token adds to a round. A third, a call's overhead (its
wall time at the caller beyond the workers' own time), with the first sets how many steps a
pure-decode call runs (`actors/steps_per_call.py`). All are exponentially weighted moving averages,
so they follow the batch size and the context lengths as they drift.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepCosts:
    """EWMA of a pure-decode step's seconds and of a prompt token's seconds (None until first seen).

    A round with prompt chunks runs one decode step (or none) beside them; what it takes beyond the
    current decode-step estimate, over its prompt tokens, is one sample of a prompt token's cost
    (before any decode step was seen, the whole round's time: an overestimate, so a smaller cap).
    """

    weight: float = 0.2  # of each new sample
    decode_step_s: float | None = None
    prompt_token_s: float | None = None
    overhead_s: float | None = None  # of a pure-decode call

    def __post_init__(self) -> None:
        if not 0 < self.weight <= 1:
            raise ValueError(f"weight={self.weight!r} must be in (0, 1]")

    def observe(self, seconds: float, decode_steps: int, prompt_tokens: int, call_s: float | None = None) -> None:
        """One step call: the workers' seconds, the decode steps and prompt tokens it ran (a call with neither
        is ignored), and its wall time as the caller saw it (None: not timed)."""
        if prompt_tokens > 0:
            extra = seconds - (self.decode_step_s or 0.0) * min(decode_steps, 1)
            if extra > 0:  # else the prompt tokens hid in the noise: no sample
                self.prompt_token_s = self._mix(self.prompt_token_s, extra / prompt_tokens)
        elif decode_steps > 0 and seconds > 0:
            self.decode_step_s = self._mix(self.decode_step_s, seconds / decode_steps)
            if call_s is not None:
                self.overhead_s = self._mix(self.overhead_s, max(0.0, call_s - seconds))

    def _mix(self, old: float | None, sample: float) -> float:
        return sample if old is None else old + self.weight * (sample - old)
