"""Running estimates of a DP group's step times, from the step calls its group loop already times.

Two figures size the token budget of a round (`GroupScheduler.set_step_costs`): the seconds of one
pure-decode step, and the seconds each prompt token adds to a round. A third, a call's overhead (its
wall time at the caller beyond the workers' own time), with the first sets how many steps a
pure-decode call runs (`actors/steps_per_call.py`). All are exponentially weighted, so they follow
the batch size and the context lengths as they drift.

A round with prompt chunks runs the eager packed forward, whose fixed cost is not a captured decode
step's (on an accelerator it is well above it), so a prompt token's cost is the slope b of a line
seconds = a + b x prompt tokens fitted to such rounds, not what a round takes beyond a decode step
over its tokens: that would charge the fixed excess to the tokens, and as the smaller cap it gives
shrinks the chunks, each round would charge it to fewer tokens, the cap falling round after round to
its floor (`GroupScheduler.prefill_cap`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Line:
    """An exponentially weighted least-squares line y = a + b x; `slope` is b once the points determine it.

    The slope is refit on each new point while the weighted x values hold at least two distinct token
    counts (a weighted variance of at least half what two counts one apart give, added one after the
    other) and the fit's slope is above zero; otherwise (one x value so far, or one x for so long that
    the others have faded, or noise that makes tokens look free) it keeps its last value, None before
    any.
    """

    def __init__(self, weight: float) -> None:
        self.weight = weight  # of each new point
        self.slope: float | None = None
        self._points = 0
        self._mean_x = self._mean_y = self._var_x = self._cov_xy = 0.0

    def add(self, x: float, y: float) -> None:
        self._points += 1
        if self._points == 1:
            self._mean_x, self._mean_y = x, y
            return
        w = self.weight
        dx, dy = x - self._mean_x, y - self._mean_y
        self._mean_x += w * dx
        self._mean_y += w * dy
        self._var_x = (1 - w) * (self._var_x + w * dx * dx)
        self._cov_xy = (1 - w) * (self._cov_xy + w * dx * dy)
        if self._var_x >= w * (1 - w) / 2 and self._cov_xy > 0:
            self.slope = self._cov_xy / self._var_x


@dataclass
class StepCosts:
    """A pure-decode step's seconds and a prompt token's seconds (None until first seen), and a call's overhead.

    A prompt token's cost is the slope of the line fitted to the rounds that carry decode rows (the
    rounds the cap applies to), or while their prompt tokens have not spread enough to fit it, of the
    line fitted to every round with prompt tokens (prefill-only rounds have no decode rows, so a lower
    fixed cost: good enough to start from). Before either is fitted it is the moving average of what a
    round takes beyond the decode-step estimate over its prompt tokens (the whole round before any
    decode step was seen), which counts the fixed cost as tokens: an overestimate, so a smaller cap,
    and a new chunk size, which the next round's fit then uses.
    """

    weight: float = 0.2  # of each new sample
    decode_step_s: float | None = None
    prompt_token_s: float | None = None
    overhead_s: float | None = None  # of a pure-decode call
    _mixed: Line = field(init=False, repr=False)  # rounds with prompt tokens and decode rows
    _prompts: Line = field(init=False, repr=False)  # every round with prompt tokens

    def __post_init__(self) -> None:
        if not 0 < self.weight <= 1:
            raise ValueError(f"weight={self.weight!r} must be in (0, 1]")
        self._mixed, self._prompts = Line(self.weight), Line(self.weight)

    def observe(self, seconds: float, decode_steps: int, prompt_tokens: int, call_s: float | None = None) -> None:
        """One step call: the workers' seconds, the decode steps and prompt tokens it ran (a call with neither
        is ignored), and its wall time as the caller saw it (None: not timed)."""
        if prompt_tokens > 0:
            if decode_steps > 0:
                self._mixed.add(prompt_tokens, seconds)
            self._prompts.add(prompt_tokens, seconds)
            slope = self._mixed.slope or self._prompts.slope
            if slope is not None:
                self.prompt_token_s = slope
                return
            extra = seconds - (self.decode_step_s or 0.0) * min(decode_steps, 1)
            if extra > 0:  # else the prompt tokens hid in the noise: no sample
                self.prompt_token_s = self._mix(self.prompt_token_s, extra / prompt_tokens)
        elif decode_steps > 0 and seconds > 0:
            self.decode_step_s = self._mix(self.decode_step_s, seconds / decode_steps)
            if call_s is not None:
                self.overhead_s = self._mix(self.overhead_s, max(0.0, call_s - seconds))

    def _mix(self, old: float | None, sample: float) -> float:
        return sample if old is None else old + self.weight * (sample - old)
