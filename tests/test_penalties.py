"""Penalties, logit bias, top-k and min_tokens (model/penalties.py, model/sampling.py) against transformers'
logits processors, on random logits and through multi-step greedy decoding on the tiny checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from actors.errors import RequestError
from actors.request_fields import check_request_fields
from actors.requests import sampling_params
from cluster.config import ConfigError, load_config
from cluster.openai_api import APIError, engine_request, parse_request
from model.penalties import Penalties
from model.processor import PreparedRequest
from model.runner import ModelRunner
from model.sampling import SamplingParams, filter_logits
from tests.reference import HFReference, step_rows

VOCAB = 50
EOS = frozenset({3, 7})


def _penalize(params: SamplingParams, prompt: list[int], output: list[int], logits: torch.Tensor) -> torch.Tensor:
    state = Penalties([params], [prompt], [output], [EOS], VOCAB, torch.device("cpu"))
    return state.apply(logits)


@pytest.mark.parametrize("penalty", [0.5, 1.2, 2.0])
def test_repetition_penalty_is_transformers(penalty: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, VOCAB, generator=gen) * 3
    prompt, output = [1, 5, 5, 9], [9, 12, 40]
    ours = _penalize(SamplingParams(repetition_penalty=penalty), prompt, output, logits)
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(ours, ref)


def test_min_tokens_and_logit_bias_are_transformers() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1))
    prompt, output = [1, 2], [4, 5]
    params = SamplingParams(min_tokens=3, logit_bias=((6, 5.0), (10, -100.0)))
    ids = torch.tensor([prompt + output])
    ref = MinNewTokensLengthLogitsProcessor(len(prompt), 3, sorted(EOS))(ids, logits.clone())
    ref = SequenceBiasLogitsProcessor({(6,): 5.0, (10,): -100.0})(ids, ref)
    torch.testing.assert_close(_penalize(params, prompt, output, logits), ref)
    # Once min_tokens are out, EOS is free again.
    done = _penalize(SamplingParams(min_tokens=2), prompt, output, logits)
    torch.testing.assert_close(done, logits)


def test_presence_and_frequency_penalties_are_openais_formula() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(2))
    prompt, output = [11, 11, 12], [12, 13, 13, 13]
    ours = _penalize(SamplingParams(presence_penalty=0.5, frequency_penalty=-0.25), prompt, output, logits)
    expected = logits.clone()
    for token, count in ((12, 1), (13, 3)):  # prompt tokens are not counted
        expected[0, token] -= 0.5 + -0.25 * count
    torch.testing.assert_close(ours, expected)


def test_counts_advance_only_for_rows_that_took_a_token() -> None:
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams(), SamplingParams(presence_penalty=1.0)]
    state = Penalties(params, [[1]] * 3, [[], [], []], [EOS] * 3, VOCAB, torch.device("cpu"))
    state.advance(torch.tensor([4, 4, 4]), [True, True, False])
    state.advance(torch.tensor([4, 8, 8]), [True, True, True])
    logits = torch.zeros(3, VOCAB)
    out = state.apply(logits)
    assert out[0, 4] == -2.0 and out[1].abs().sum() == 0 and out[2, 8] == -1.0 and out[2, 4] == 0.0


@pytest.mark.parametrize("top_k", [1, 3, 10])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_top_k_is_transformers(top_k: int, temperature: float) -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(3))
    logits[0, :5] = 2.0  # ties at the k-th score are kept, as transformers keeps them
    ours = filter_logits(logits, temperature, 1.0, top_k)
    ref = TopKLogitsWarper(top_k)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1))


def test_greedy_decoding_with_penalties_follows_transformers(
    tiny_checkpoint: Path, prepared: Callable[[Path], dict[str, PreparedRequest]], hf_reference: HFReference
) -> None:
    """Multi-step greedy decoding with a repetition penalty, a bias and min_tokens: every token is the argmax
    of transformers' processors over transformers' logits after the same prefix (teacher-forced)."""
    request = prepared(tiny_checkpoint)["text"]
    eos = [int(t) for t in json.loads((tiny_checkpoint / "generation_config.json").read_text())["eos_token_id"]]
    runner = ModelRunner(tiny_checkpoint, max_batch_size=2, max_seq_len=256)
    (plain,) = runner.generate([request], [SamplingParams(max_new_tokens=12)], eos)
    favoured = plain.output_token_ids[3]  # biased up to come first, then penalized once generated
    params = SamplingParams(max_new_tokens=12, repetition_penalty=1.8, min_tokens=6, logit_bias=((favoured, 20.0),))
    _, result = runner.generate([request, request], [SamplingParams(max_new_tokens=12), params], eos)
    tokens = result.output_token_ids
    assert tokens != plain.output_token_ids  # the penalties change what is generated
    prompt = list(request.input_ids)
    rows = step_rows(hf_reference.logits(tiny_checkpoint, request, tokens), len(prompt))
    processors = [
        MinNewTokensLengthLogitsProcessor(len(prompt), 6, eos),
        SequenceBiasLogitsProcessor({(favoured,): 20.0}),
        RepetitionPenaltyLogitsProcessor(1.8),
    ]
    for step, (token, row) in enumerate(zip(tokens, rows)):
        ids = torch.tensor([prompt + tokens[:step]])
        scores = row.unsqueeze(0).clone()
        for processor in processors:
            scores = processor(ids, scores)
        best = int(scores.argmax())
        assert token == best or float(scores[0, best] - scores[0, token]) < 1e-3, (step, token, best)
    assert not set(tokens[:6]) & set(eos)


# --------------------------------------------------------------------------------- request checks
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 2.5}, "repetition_penalty"),
        ({"top_k": -2}, "top_k"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 40, "max_new_tokens": 8}, "min_tokens"),
        ({"logit_bias": {"12": 101}}, "logit_bias"),
        ({"logit_bias": {"twelve": 1}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
    ],
)
def test_bad_penalty_fields_name_the_field(fields: dict, param: str) -> None:
    request = {"prompt": "hi", **fields}
    with pytest.raises(RequestError) as raised:
        check_request_fields(request)
        sampling_params(request, SamplingParams())
    assert raised.value.param == param


def test_openai_fields_reach_the_sampling_params() -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "repetition_penalty": 1.1,
        "logit_bias": {"7": -100, "12": 3},
        "top_k": 20,
        "min_tokens": 2,
    }
    request = engine_request(parse_request(json.dumps(body).encode()), "r")
    check_request_fields(request)
    params = sampling_params(request, SamplingParams())
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, 0.25, 1.1)
    assert params.logit_bias == ((7, -100.0), (12, 3.0)) and (params.top_k, params.min_tokens) == (20, 2)
    with pytest.raises(APIError) as info:
        parse_request(json.dumps({**body, "presence_penalty": 3}).encode())
    assert info.value.param == "presence_penalty"


# --------------------------------------------------------------------------------- generation_config
def _checkpoint_with_generation_config(tmp_path: Path, tiny_checkpoint: Path, generation: dict) -> Path:
    path = tmp_path / "ckpt"
    path.mkdir()
    for file in tiny_checkpoint.iterdir():
        (path / file.name).symlink_to(file)
    (path / "generation_config.json").unlink()
    (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def test_generation_config_precedence(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """request > a key the user set (file or command line) > the checkpoint's generation_config > built-in."""
    generation = {"eos_token_id": [1], "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    path = _checkpoint_with_generation_config(tmp_path, tiny_checkpoint, generation)
    conf = tmp_path / "run.yaml"
    conf.write_text(f"model_path: {path}\ndata_config:\n  top_p: 0.5\n")
    cfg = load_config(conf, ["data_config.top_k=3"])
    data = cfg.data_config
    assert (data.temperature, data.top_p, data.top_k, data.repetition_penalty) == (0.7, 0.5, 3, 1.05)
    plain = load_config(conf, ["generation_config=none"]).data_config
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (0.0, 0.5, 0, 1.0)
    defaults = SamplingParams(temperature=data.temperature, top_p=data.top_p, top_k=data.top_k)
    assert sampling_params({"prompt": "hi", "temperature": 0.0}, defaults).temperature == 0.0
    with pytest.raises(ConfigError, match="generation_config"):
        load_config(conf, ["generation_config=always"])
