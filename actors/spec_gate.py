"""Whether a group's next pure-decode call speculates: from what its calls have cost per token, by batch size.

Verification computes k + 1 query rows per sequence, so a speculative round costs more than a decode step,
and more so as the batch grows (at small batches a step reads the weights; at large ones it computes).
It pays while the tokens a round yields (1 + the accepted proposals) outweigh that. The gate keeps, per
batch bucket (the power of two at or above the number of decoding rows), an average of the tokens per
second that speculative and plain calls made, measured where the group loop sees each call return, and
picks the faster; each option is tried first, and the slower one again every `probe_every` calls of that
bucket, so that a change in acceptance or batch mix is noticed. The decision is made once per call, by the
group loop, so every rank of the group takes the same one.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def bucket(rows: int) -> int:
    """The power of two at or above `rows` (1 for 0 or 1)."""
    return 1 << max(0, rows - 1).bit_length()


@dataclass
class _Rates:
    spec: float | None = None  # tokens per second of speculative calls
    plain: float | None = None
    calls: int = 0


@dataclass
class SpecGate:
    """k for the next call (0: do not speculate), given how many rows decode."""

    k: int
    probe_every: int = 32
    weight: float = 0.3  # of the newest call in each average
    rates: dict[int, _Rates] = field(default_factory=dict)

    def tokens(self, rows: int) -> int:
        r = self.rates.setdefault(bucket(rows), _Rates())
        r.calls += 1
        if r.spec is None:
            return self.k
        if r.plain is None:
            return 0
        faster = r.spec >= r.plain
        probe = r.calls % self.probe_every == 0
        return self.k if faster != probe else 0

    def observe(self, rows: int, speculated: bool, seconds: float, tokens: int) -> None:
        """A pure-decode call over `rows` rows took `seconds` (the workers' time) and made `tokens` in all."""
        if seconds <= 0 or tokens <= 0:
            return
        r = self.rates.setdefault(bucket(rows), _Rates())
        rate = tokens / seconds
        old = r.spec if speculated else r.plain
        new = rate if old is None else (1 - self.weight) * old + self.weight * rate
        if speculated:
            r.spec = new
        else:
            r.plain = new

    def summary(self) -> dict[int, dict[str, float | None]]:
        """Tokens per second of each option, per batch bucket seen."""
        return {b: {"spec_tokens_per_s": r.spec, "plain_tokens_per_s": r.plain} for b, r in sorted(self.rates.items())}
