"""The step-cost estimates against known cost models: seconds per decode step; a round's fixed cost + cost per token."""

from __future__ import annotations

import pytest

from actors.scheduler import GroupScheduler
from actors.step_costs import Line, StepCosts

DECODE_S, TOKEN_S = 0.25, 0.013


def model_seconds(decode_steps: int, prompt_tokens: int) -> float:
    """A round's time: one forward's fixed cost per decode step (one for a prefill-only round), plus its tokens."""
    return DECODE_S * max(decode_steps, 1 if prompt_tokens else 0) + TOKEN_S * prompt_tokens


def test_estimates_converge_to_the_model_and_overestimate_a_token_on_the_way():
    costs = StepCosts()
    costs.observe(model_seconds(0, 40), 0, 40)  # the first prefill, before any decode step
    assert costs.decode_step_s is None and costs.prompt_token_s > TOKEN_S  # the fixed cost counted as tokens
    costs.observe(model_seconds(4, 0), 4, 0)
    assert costs.decode_step_s == pytest.approx(DECODE_S)
    for tokens in [10, 20, 7, 30] * 5:
        costs.observe(model_seconds(1, tokens), 1, tokens)
        assert costs.prompt_token_s >= TOKEN_S * (1 - 1e-9)
    assert costs.prompt_token_s == pytest.approx(TOKEN_S, rel=0.02)


def test_the_decode_estimate_follows_a_slower_step():
    costs = StepCosts(weight=0.5)
    for _ in range(20):
        costs.observe(0.1 * 4, 4, 0)
    for _ in range(20):
        costs.observe(0.3 * 2, 2, 0)
    assert costs.decode_step_s == pytest.approx(0.3, rel=1e-3)


def test_calls_with_no_work_or_prompt_tokens_lost_in_noise_leave_the_estimates():
    costs = StepCosts(decode_step_s=0.2, prompt_token_s=0.01)
    costs.observe(0.001, 0, 0)  # releases only
    costs.observe(0.19, 1, 5)  # faster than a decode step alone: no sample
    assert (costs.decode_step_s, costs.prompt_token_s) == (0.2, 0.01)


def test_a_bad_weight_is_refused_naming_it():
    with pytest.raises(ValueError, match="weight=0"):
        StepCosts(weight=0)


# An accelerator: a captured decode step of 10 ms, while a round with prompt chunks runs the eager packed forward,
# whose fixed cost (20 ms) is above the captured step's, plus 0.1 ms per prompt token.
STEP_S, ROUND_S, PER_TOKEN_S = 0.010, 0.020, 0.0001


def test_a_line_fits_a_rounds_fixed_cost_apart_from_its_tokens():
    line = Line(weight=0.2)
    line.add(47, ROUND_S + PER_TOKEN_S * 47)
    assert line.slope is None  # one x value: no slope
    line.add(47, ROUND_S + PER_TOKEN_S * 47)
    assert line.slope is None
    line.add(12, ROUND_S + PER_TOKEN_S * 12)
    assert line.slope == pytest.approx(PER_TOKEN_S)
    for _ in range(200):  # one x for long: the others fade from the fit, and its slope is kept
        line.add(50, ROUND_S + PER_TOKEN_S * 50)
    assert line.slope == pytest.approx(PER_TOKEN_S)
    line.add(30, ROUND_S + PER_TOKEN_S * 80)  # fewer tokens, more time: noise, the slope is kept above zero
    assert line.slope == pytest.approx(PER_TOKEN_S)


def test_the_cap_stays_at_the_stall_allowance_when_a_round_with_prompt_tokens_costs_more_than_a_decode_step():
    """A long prompt beside one decoding request, the scheduler's cap fed back each round: charging a round's whole
    excess over a decode step to its prompt tokens gave caps 47, 34, 25, 19, ... down to 1 token a round."""
    sched = GroupScheduler(2, 512, 16, token_budget=2048, max_decode_stall=0.5)
    costs = StepCosts()
    costs.observe(4 * STEP_S, 4, 0)  # a pure-decode call
    caps = []
    for _ in range(40):
        sched.set_step_costs(costs.decode_step_s, costs.prompt_token_s)
        tokens = int(min(sched.prefill_cap, sched.token_budget - 1))  # the budget less the decode row
        caps.append(tokens)
        costs.observe(ROUND_S + PER_TOKEN_S * tokens, 1, tokens)
    allowance = 0.5 * STEP_S / PER_TOKEN_S  # 50 tokens: what 0.5 x a decode step of prompt tokens costs
    assert caps[0] == 2047  # no estimate yet: the whole budget
    assert all(0.9 * allowance <= cap <= allowance for cap in caps[1:]), caps
    assert costs.prompt_token_s == pytest.approx(PER_TOKEN_S)
