"""Steps per pure-decode call: fixed, or chosen from a group's measured step time and call overhead."""

from __future__ import annotations

import math

import pytest

from actors.step_costs import StepCosts
from actors.steps_per_call import FIRST_STEPS, MAX_STEPS, OVERHEAD_SHARE, StepsPerCall


def costs(step_s: float | None, overhead_s: float | None) -> StepCosts:
    return StepCosts(decode_step_s=step_s, overhead_s=overhead_s)


def test_a_fixed_setting_ignores_measurements() -> None:
    assert StepsPerCall(6, max_call_ms=50).steps(costs(0.001, 0.003)) == 6


def test_auto_starts_at_the_first_steps_then_keeps_the_overhead_under_its_share() -> None:
    steps = StepsPerCall("auto", max_call_ms=1000)
    assert steps.steps(StepCosts()) == FIRST_STEPS
    n = steps.steps(costs(0.001, 0.003))  # 1 ms steps, 3 ms of overhead
    assert n == math.ceil(0.003 / (OVERHEAD_SHARE * 0.001))  # 150 steps: 3 ms is 2% of 150 ms
    assert 0.003 / (n * 0.001) <= OVERHEAD_SHARE


def test_auto_never_runs_a_call_longer_than_max_call_ms() -> None:
    assert StepsPerCall("auto", max_call_ms=50).steps(costs(0.001, 0.003)) == 50  # though 2% would want 150
    assert StepsPerCall("auto", max_call_ms=50).steps(costs(0.1, 0.003)) == 1  # 100 ms steps: one, never zero
    assert StepsPerCall("auto", max_call_ms=10_000).steps(costs(1e-6, 0.1)) == MAX_STEPS


def test_pure_decode_calls_feed_the_step_time_and_the_overhead() -> None:
    """The estimates auto reads come from pure-decode calls only, and follow the step time as it changes."""
    est = StepCosts()
    est.observe(0.010, 10, 0, call_s=0.013)
    assert est.decode_step_s == pytest.approx(0.001) and est.overhead_s == pytest.approx(0.003)
    est.observe(0.5, 1, 100, call_s=0.6)  # a round with prompt tokens: not a decode step, not a decode call
    assert est.decode_step_s == pytest.approx(0.001) and est.overhead_s == pytest.approx(0.003)
    auto = StepsPerCall("auto", max_call_ms=10_000)
    first = auto.steps(est)
    for _ in range(40):  # steps four times slower (a bigger batch): fewer steps keep the same share
        est.observe(0.040, 10, 0, call_s=0.043)
    assert auto.steps(est) == pytest.approx(first / 4, rel=0.05)


@pytest.mark.parametrize("setting", [0, -1, "fast", 2.5, True])
def test_bad_settings_name_the_key_and_value(setting: object) -> None:
    with pytest.raises(ValueError, match="decode_steps_per_call") as err:
        StepsPerCall(setting, max_call_ms=50)  # type: ignore[arg-type]
    assert repr(setting) in str(err.value)
    with pytest.raises(ValueError, match="max_decode_call_ms"):
        StepsPerCall("auto", max_call_ms=0)


def test_auto_with_async_scheduling_runs_one_step_per_call() -> None:
    """Calls planned ahead overlap their orchestration with the running call: auto streams every token."""
    steps = StepsPerCall("auto", max_call_ms=1000, lookahead=True)
    assert steps.steps(StepCosts()) == 1
    assert steps.steps(costs(0.0005, 0.003)) == 1  # though without lookahead 2% would want 300
    assert StepsPerCall(8, max_call_ms=1000, lookahead=True).steps(costs(0.0005, 0.003)) == 8
