"""model/sampling.py against transformers' own logits warpers on the same logits.

transformers' ``generate(do_sample=True)`` applies ``TemperatureLogitsWarper`` and then, when top_p < 1,
``TopPLogitsWarper`` (which keeps at least one token). The distribution we sample from must keep the
same tokens with the same probabilities, including at the top-p boundary, with ties and with a tiny
top_p; and ``sample`` must draw from that distribution.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from model.sampling import SamplingParams, filter_logits, make_generator, sample

TEMPERATURES = [0.05, 0.3, 0.7, 1.0, 1.5, 4.0]
TOP_PS = [1e-9, 0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999, 1.0]
PROB_ATOL = 1e-6


def _reference(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """transformers' scores for (B, V) logits, with its warpers in generate's order."""
    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


def _assert_same_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> None:
    ours = filter_logits(logits, temperature, top_p)
    ref = _reference(logits, temperature, top_p)
    kept = torch.isfinite(ours)
    assert torch.equal(kept, torch.isfinite(ref)), (temperature, top_p, kept.sum(-1), torch.isfinite(ref).sum(-1))
    assert kept.any(dim=-1).all()
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), atol=PROB_ATOL, rtol=0)


def _random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale


@pytest.mark.parametrize("top_p", TOP_PS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_random_logits_match_transformers(temperature: float, top_p: float) -> None:
    for vocab, seed in ((7, 0), (64, 1), (1000, 2)):
        _assert_same_distribution(_random_logits(6, vocab, seed), temperature, top_p)


@pytest.mark.parametrize("top_p", [1e-9, 0.2, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_ties_match_transformers(temperature: float, top_p: float) -> None:
    logits = torch.tensor(
        [
            [2.0, 2.0, 2.0, 0.0, 0.0, -1.0, -1.0, -1.0],  # a tied top group the nucleus may cut through
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all equal
            [0.0, 3.0, 0.0, 3.0, 0.0, 1.0, 1.0, 0.5],  # tied maxima apart, tied tail
        ]
    )
    _assert_same_distribution(logits, temperature, top_p)


@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_peaked_logits_keep_the_top_token(temperature: float) -> None:
    logits = torch.full((2, 100), -5.0)
    logits[0, 17] = 40.0  # every other probability underflows
    logits[1, 3] = logits[1, 90] = 40.0  # two tied peaks
    for top_p in (1e-9, 0.5, 0.99, 1.0):
        _assert_same_distribution(logits, temperature, top_p)


def test_tiny_top_p_keeps_exactly_one_token() -> None:
    logits = _random_logits(4, 50, seed=3)
    scores = filter_logits(logits, 1.0, 1e-9)
    assert torch.isfinite(scores).sum(-1).tolist() == [1] * 4
    assert torch.equal(scores.argmax(-1), logits.argmax(-1))


def test_top_p_one_keeps_every_token() -> None:
    logits = _random_logits(3, 40, seed=4)
    assert torch.isfinite(filter_logits(logits, 0.8, 1.0)).all()


@pytest.mark.parametrize("position", [1, 3, 5])
def test_boundary_token_at_exactly_one_minus_top_p(position: int) -> None:
    """A token whose ascending cumulative probability equals 1 - top_p exactly is dropped, as in transformers."""
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.1, 0.7, 2.5, -0.4, 1.6]])
    cumulative = torch.sort(logits, descending=False).values.softmax(-1).cumsum(-1)
    top_p = 1.0 - float(cumulative[0, position])
    # The precondition that makes this a boundary case: `<=` and `<` disagree at this threshold.
    assert not torch.equal(cumulative <= (1 - top_p), cumulative < (1 - top_p))
    _assert_same_distribution(logits, 1.0, top_p)
    kept = torch.isfinite(filter_logits(logits, 1.0, top_p))
    assert int(kept.sum()) == logits.shape[-1] - position - 1


def test_sample_draws_from_the_filtered_distribution() -> None:
    logits = torch.tensor([1.5, 0.2, 1.0, -0.3, 0.9, 2.0, -2.0, 0.0])
    params = SamplingParams(temperature=0.8, top_p=0.8, seed=5)
    probs = _reference(logits[None], params.temperature, params.top_p).softmax(-1)[0]
    draws = 20000
    gen = make_generator(params, "cpu")
    tokens = sample(logits.expand(draws, -1), [params] * draws, [gen] * draws)
    freq = torch.bincount(tokens, minlength=logits.numel()).double() / draws
    assert set(tokens.unique().tolist()) <= set(torch.nonzero(probs).flatten().tolist())
    # Binomial std at p=0.5 over 20000 draws is 0.0035; 0.015 is over 4 standard deviations.
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)


def test_greedy_and_padding_rows_take_argmax() -> None:
    logits = _random_logits(4, 30, seed=6)
    hot = SamplingParams(temperature=1.0, seed=1)
    params = [SamplingParams(), hot]  # rows 2 and 3 are padding
    tokens = sample(logits, params, [make_generator(p, "cpu") for p in params])
    assert make_generator(params[0], "cpu") is None
    assert tokens[0] == logits[0].argmax() and tokens[2:].tolist() == logits[2:].argmax(-1).tolist()


def test_seeded_sampling_repeats_and_seeds_differ() -> None:
    logits = _random_logits(1, 500, seed=7, scale=0.5).expand(64, -1)

    def draw(seed: int) -> list[int]:
        p = SamplingParams(temperature=1.0, top_p=0.9, seed=seed)
        gen = make_generator(p, "cpu")
        return sample(logits, [p] * 64, [gen] * 64).tolist()

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("max_new_tokens", 0),
    ],
)
def test_params_reject_out_of_range_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
