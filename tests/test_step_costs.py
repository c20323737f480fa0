"""The step-cost estimates against a known linear cost model: seconds = decode step x steps + token cost x tokens."""

from __future__ import annotations

import pytest

from actors.step_costs import StepCosts

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
