"""Steps per pure-decode call: fixed, or chosen from each group's measured step time and call overhead."""

from __future__ import annotations

import math

import pytest

from actors.steps_per_call import FIRST_STEPS, MAX_STEPS, OVERHEAD_SHARE, StepsPerCall


def test_a_fixed_setting_ignores_measurements() -> None:
    steps = StepsPerCall(6, max_call_ms=50)
    steps.observe(6, 0.006, 0.030)
    assert steps.steps == 6


def test_auto_starts_at_the_first_steps_then_keeps_the_overhead_under_its_share() -> None:
    steps = StepsPerCall("auto", max_call_ms=1000)
    assert steps.steps == FIRST_STEPS
    steps.observe(4, worker_s=0.004, call_s=0.007)  # 1 ms steps, 3 ms of overhead
    assert steps.steps == math.ceil(0.003 / (OVERHEAD_SHARE * 0.001))  # 150 steps: 3 ms is 2% of 150 ms
    overhead = 0.003 / (steps.steps * 0.001)
    assert overhead <= OVERHEAD_SHARE


def test_auto_never_runs_a_call_longer_than_max_call_ms() -> None:
    steps = StepsPerCall("auto", max_call_ms=50)
    steps.observe(4, worker_s=0.004, call_s=0.007)
    assert steps.steps == 50  # 50 steps of 1 ms, though 2% would want 150
    slow = StepsPerCall("auto", max_call_ms=50)
    slow.observe(2, worker_s=0.2, call_s=0.203)  # 100 ms steps: one step per call, never zero
    assert slow.steps == 1
    fast = StepsPerCall("auto", max_call_ms=10_000)
    fast.observe(1000, worker_s=0.001, call_s=0.101)
    assert fast.steps == MAX_STEPS


def test_auto_follows_the_measurements_as_they_change() -> None:
    steps = StepsPerCall("auto", max_call_ms=10_000)
    steps.observe(10, worker_s=0.010, call_s=0.013)
    first = steps.steps
    for _ in range(40):  # the step got four times slower (a bigger batch): fewer steps keep the same share
        steps.observe(10, worker_s=0.040, call_s=0.043)
    assert steps.steps == pytest.approx(first / 4, rel=0.05)
    steps.observe(0, worker_s=0.5, call_s=0.6)  # a call that ran no step says nothing of the step time
    assert steps.steps == pytest.approx(first / 4, rel=0.05)


@pytest.mark.parametrize("setting", [0, -1, "fast", 2.5, True])
def test_bad_settings_name_the_key_and_value(setting: object) -> None:
    with pytest.raises(ValueError, match="decode_steps_per_call") as err:
        StepsPerCall(setting, max_call_ms=50)  # type: ignore[arg-type]
    assert repr(setting) in str(err.value)
    with pytest.raises(ValueError, match="max_decode_call_ms"):
        StepsPerCall("auto", max_call_ms=0)
