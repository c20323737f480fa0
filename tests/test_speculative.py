"""Speculative decoding in process: n-gram proposals, the acceptance rule, and whole runs against plain decoding.

- n-gram proposals follow vLLM's rule (longest suffix first, then its earliest occurrence);
- `accept` keeps greedy output exact, and with temperature its emitted tokens have the target's distribution
  (a chi-square test on synthetic distributions; a wrong acceptance rule fails it);
- the tiny model through `model.batch.generate` gives the same greedy tokens with speculation on (n-gram and
  draft, k = 1, 3, 7; text, image and video prompts), and at temperature 1 the same distribution of each of the
  first three tokens (two-sample chi-square per position, both methods), while a wrong rule fails;
- a draft whose tokenizer differs from the target's is refused with the tokens that differ.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cluster.tools.draft_checkpoint import cut_draft
from model import speculative
from model.draft import DraftMismatch, check_draft, load_drafter
from model.processor import PreparedRequest, PromptBuilder
from model.runner import ModelRunner
from model.sampling import SamplingParams
from model.speculative import SpeculativeConfig, accept, ngram_propose, verify_buckets
from tests.video_files import make_frames, write_video

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
ALPHA = 0.001  # significance of each chi-square test (seeded draws: a run's outcome is fixed)


# ----------------------------------------------------------------------------- n-gram proposals
def test_ngram_takes_what_followed_the_suffix() -> None:
    assert ngram_propose([1, 2, 3, 4, 2, 3], k=4, min_n=2, max_n=2) == [4, 2, 3]  # fewer than k: the end
    assert ngram_propose([1, 2, 3, 4, 2, 3], k=1, min_n=1, max_n=3) == [4]


def test_ngram_prefers_the_longest_suffix_then_the_earliest_occurrence() -> None:
    tokens = [7, 3, 9, 5, 3, 8, 5, 3]
    # n=2 ([5, 3]) occurs at 3 (followed by 8); n=1 ([3]) occurs first at 1 (followed by 9): the longer wins
    assert ngram_propose(tokens, k=2, min_n=1, max_n=3) == [8, 5]
    tokens = [3, 1, 4, 3, 2, 6, 3]  # [3] occurs at 0 and 3: the earliest (followed by 1) wins
    assert ngram_propose(tokens, k=1, min_n=1, max_n=1) == [1]


def test_ngram_without_a_match_proposes_nothing() -> None:
    assert ngram_propose([1, 2, 3, 4], k=3, min_n=1, max_n=2) == []
    assert ngram_propose([5], k=3, min_n=1, max_n=2) == []
    assert ngram_propose([1, 2, 1, 2], k=3, min_n=3, max_n=4) == []  # [2, 1, 2] never occurred before


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("method", "eagle", "speculative.method='eagle'"),
        ("num_speculative_tokens", 0, "num_speculative_tokens=0"),
        ("num_speculative_tokens", 16, "num_speculative_tokens=16"),
        ("prompt_lookup_min", 5, "prompt_lookup_min=5"),
    ],
)
def test_config_names_the_bad_value(field: str, value: object, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("[", r"\[")):
        SpeculativeConfig(**{field: value})
    with pytest.raises(ValueError, match="needs speculative.model"):
        SpeculativeConfig(method="draft")


# ----------------------------------------------------------------------------- the acceptance rule
def test_greedy_accepts_the_prefix_equal_to_the_argmax() -> None:
    logits = torch.full((4, 6), -1.0)
    for row, best in enumerate([2, 5, 1, 3]):
        logits[row, best] = 1.0
    assert accept(logits, [2, 5, 1], SamplingParams(), None) == ([2, 5, 1, 3], 3)  # all kept, bonus 3
    assert accept(logits, [2, 4, 1], SamplingParams(), None) == ([2, 5], 1)  # the target's token at the miss
    assert accept(logits[:1], [], SamplingParams(), None) == ([2], 0)


def chi_square_p(a: Counter, b: Counter) -> float:
    """Two-sample chi-square test of homogeneity; categories with fewer than 10 draws in all are pooled."""
    keys = sorted(set(a) | set(b))
    small = [key for key in keys if a[key] + b[key] < 10]
    rows = [[a[key], b[key]] for key in keys if key not in small]
    if small:
        rows.append([sum(a[key] for key in small), sum(b[key] for key in small)])
    table = torch.tensor(rows, dtype=torch.float64)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()
    dof = max(table.shape[0] - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def wrong_accept(logits, proposed, params, generator):  # keeps every proposal: the draft's distribution
    if not proposed:
        return accept(logits, proposed, params, generator)
    return list(proposed) + [int(torch.multinomial(logits[-1].softmax(-1), 1, generator=generator))], len(proposed)


def test_rejection_sampling_keeps_the_target_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, generator=gen) * 1.5
    params = SamplingParams(temperature=1.0, seed=0)
    draws = 6000
    plain = [Counter() for _ in range(2)]
    spec = [Counter() for _ in range(2)]
    wrong = [Counter() for _ in range(2)]
    for _ in range(draws):
        for position in range(2):  # the target's own samples at positions 0 and 1, given the same prefix
            plain[position][int(torch.multinomial(logits[position].softmax(-1), 1, generator=gen))] += 1
        proposals = [int(torch.randint(8, (1,), generator=gen)), 3]  # any deterministic-or-random proposal
        tokens, _ = accept(logits, proposals, params, gen)
        spec[0][tokens[0]] += 1
        if len(tokens) > 1 and tokens[0] == proposals[0]:  # position 1 is conditioned on keeping position 0
            spec[1][tokens[1]] += 1
        bad, _ = wrong_accept(logits, proposals, params, gen)
        wrong[0][bad[0]] += 1
    assert chi_square_p(plain[0], spec[0]) > ALPHA
    assert chi_square_p(plain[1], spec[1]) > ALPHA
    assert chi_square_p(plain[0], wrong[0]) < ALPHA


# ----------------------------------------------------------------------------- whole runs, in process
@pytest.fixture(scope="module")
def runner(tiny_checkpoint: Path) -> ModelRunner:
    runner = ModelRunner(tiny_checkpoint, max_batch_size=5, max_seq_len=512)
    runner.add_decode_buckets([size for k in (1, 3, 7) for size in verify_buckets(runner.buckets, k)])
    return runner


@pytest.fixture(scope="module")
def draft_path(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny checkpoint's first 2 of 3 decoder layers, with its embeddings, head and tower."""
    return cut_draft(tiny_checkpoint, tmp_path_factory.mktemp("draft") / "draft", layers=2)


@pytest.fixture(scope="module")
def requests(
    tiny_checkpoint: Path,
    prepared: Callable[[Path], dict[str, PreparedRequest]],
    tmp_path_factory: pytest.TempPathFactory,
) -> list[PreparedRequest]:
    """A prompt that repeats itself, a text, one image, two images, a video."""
    builder = PromptBuilder.from_pretrained(tiny_checkpoint)
    repeating = builder.build({"id": "repeat", "prompt": "one two three four one two three four one two three"})
    clip = tmp_path_factory.mktemp("video") / "clip.mkv"
    write_video(clip, make_frames(4, 112, 168, seed=2), 2)
    video = builder.build(
        {
            "id": "video",
            "prompt": "What happens in the video?",
            "videos": [str(clip)],
            "mm_processor_kwargs": {"video_min_pixels": 28 * 28, "video_max_pixels": 112 * 168},
        }
    )
    by_name = prepared(tiny_checkpoint)
    return [repeating, by_name["text"], by_name["one_image"], by_name["two_images"], video]


def greedy(n: int) -> list[SamplingParams]:
    return [SamplingParams(max_new_tokens=n, ignore_eos=True)] * 5


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_output_is_unchanged(
    runner: ModelRunner, requests: list[PreparedRequest], draft_path: Path, method: str, k: int
) -> None:
    plain = runner.generate(requests, greedy(40), [])
    config = SpeculativeConfig(
        method=method, num_speculative_tokens=k, model=str(draft_path) if method == "draft" else None
    )
    drafter = load_drafter(runner, draft_path) if method == "draft" else None
    spec = runner.generate(requests, greedy(40), [], config, drafter)
    for a, b in zip(plain, spec):
        assert b.output_token_ids == a.output_token_ids, a.request_id
        assert b.finish_reason == a.finish_reason == "length"
    proposed = sum(p for r in spec for p, _ in r.spec_rounds)
    accepted = sum(a for r in spec for _, a in r.spec_rounds)
    assert proposed > 0 and 0 < accepted <= proposed, (proposed, accepted)


def test_a_draft_identical_to_the_target_is_always_accepted(
    runner: ModelRunner, requests: list[PreparedRequest], tiny_checkpoint: Path
) -> None:
    config = SpeculativeConfig(method="draft", num_speculative_tokens=3, model=str(tiny_checkpoint))
    spec = runner.generate(requests, greedy(33), [], config, load_drafter(runner, tiny_checkpoint))
    plain = runner.generate(requests, greedy(33), [])
    for a, b in zip(plain, spec):
        assert b.output_token_ids == a.output_token_ids
        # 1 token from the prefill, then rounds of 3 accepted + 1 bonus: 8 rounds for the other 32
        assert b.spec_rounds == [(3, 3)] * 8, b.spec_rounds


def test_rows_without_proposals_verify_one_query_each(
    runner: ModelRunner, requests: list[PreparedRequest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round's query rows per sequence are 1 + the most proposals any row made: when no row proposes (no
    n-gram match, or every row resting) the round is a plain decode step, not k + 1 rows of padding."""
    import model.batch

    rows = []
    decode = runner.decode

    def spy(tokens: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        rows.append(tokens.shape[0])
        return decode(tokens, *args, **kwargs)

    plain = runner.generate(requests[1:3], greedy(12)[:2], [])
    monkeypatch.setattr(runner, "decode", spy)
    monkeypatch.setattr(model.batch, "ngram_propose", lambda tokens, k, low, high: [])
    spec = runner.generate(requests[1:3], greedy(12)[:2], [], SpeculativeConfig("ngram", 3))
    assert [r.output_token_ids for r in spec] == [r.output_token_ids for r in plain]
    assert rows and set(rows) == {2}, rows  # two sequences, one query each: the plain batch-2 bucket
    monkeypatch.setattr(model.batch, "ngram_propose", lambda tokens, k, low, high: [tokens[-1]])
    rows.clear()
    runner.generate(requests[1:3], greedy(12)[:2], [], SpeculativeConfig("ngram", 3))
    # at most one proposal each: two queries per sequence (one where a row has no room or rests), never k + 1
    assert 4 in rows and set(rows) <= {2, 4}, rows


def test_eos_and_max_new_tokens_hold_inside_a_round(
    runner: ModelRunner, requests: list[PreparedRequest], tiny_checkpoint: Path
) -> None:
    lengths = [SamplingParams(max_new_tokens=n) for n in (5, 6, 7, 9, 8)]
    plain = runner.generate(requests, lengths, [])
    eos = [plain[0].output_token_ids[2]]  # a token the first request makes third: its EOS here
    plain = runner.generate(requests, lengths, eos)
    config = SpeculativeConfig(method="draft", num_speculative_tokens=7, model=str(tiny_checkpoint))
    drafter = load_drafter(runner, tiny_checkpoint)
    spec = runner.generate(requests, lengths, eos, config, drafter)
    assert plain[0].finish_reason == "stop"
    for a, b in zip(plain, spec):
        assert (b.output_token_ids, b.finish_reason) == (a.output_token_ids, a.finish_reason)


def test_rows_with_logprobs_or_penalties_take_one_token_per_round(
    runner: ModelRunner, requests: list[PreparedRequest], tiny_checkpoint: Path
) -> None:
    params = [
        SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=True, top_logprobs=2),
        SamplingParams(max_new_tokens=12, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(max_new_tokens=12, ignore_eos=True),
        SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.8, seed=3),
        SamplingParams(max_new_tokens=12, ignore_eos=True),
    ]
    plain = runner.generate(requests, params, [])
    config = SpeculativeConfig(method="draft", num_speculative_tokens=3, model=str(tiny_checkpoint))
    spec = runner.generate(requests, params, [], config, load_drafter(runner, tiny_checkpoint))
    for a, b in zip(plain[:3], spec[:3]):
        assert b.output_token_ids == a.output_token_ids
    assert [e[0] for e in spec[0].logprobs] == pytest.approx([e[0] for e in plain[0].logprobs], abs=1e-4)
    assert spec[0].spec_rounds == [] and spec[1].spec_rounds == []  # said in the record: nothing proposed
    assert spec[2].spec_rounds and spec[3].spec_rounds
    again = runner.generate(requests, params, [], config, load_drafter(runner, tiny_checkpoint))
    assert again[3].output_token_ids == spec[3].output_token_ids  # a seed reproduces a sampled answer


@pytest.fixture(scope="module")
def wide_runner(tiny_checkpoint: Path) -> ModelRunner:
    runner = ModelRunner(tiny_checkpoint, max_batch_size=64, max_seq_len=512)
    runner.add_decode_buckets(verify_buckets(runner.buckets, 2))
    return runner


def first_tokens(runner, request, config, drafter, samples: int = 1200) -> list[Counter]:
    """Counts of each of the first 3 generated tokens over `samples` seeds (temperature 1, top_k 6)."""
    params = [
        SamplingParams(max_new_tokens=3, temperature=1.0, top_k=6, seed=s, ignore_eos=True) for s in range(samples)
    ]
    results = runner.generate([request] * samples, params, [], config, drafter)
    counts = [Counter() for _ in range(3)]
    for r in results:
        for position, token in enumerate(r.output_token_ids):
            counts[position][token] += 1
    return counts


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampling_keeps_each_position_distribution(
    wide_runner: ModelRunner,
    tiny_checkpoint: Path,
    draft_path: Path,
    method: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 200 of the 471 ordinary tokens, shuffled: a sampled token is often among them, and the n-gram rule then
    # proposes the token after it, so most rounds have proposals for the rule to judge.
    ordinary = [t for t in range(wide_runner.config.text.vocab_size) if t < min(wide_runner.config.eos_token_ids)]
    order = torch.randperm(len(ordinary), generator=torch.Generator().manual_seed(0)).tolist()
    request = PreparedRequest("r", [ordinary[i] for i in order[:200]], None, None)
    plain = first_tokens(wide_runner, request, None, None)
    config = SpeculativeConfig(
        method=method,
        num_speculative_tokens=2,
        model=str(draft_path) if method == "draft" else None,
        min_acceptance=0.0,
    )

    def drafter():
        return load_drafter(wide_runner, draft_path) if method == "draft" else None

    spec = first_tokens(wide_runner, request, config, drafter())
    for position in range(3):
        assert chi_square_p(plain[position], spec[position]) > ALPHA, position
    monkeypatch.setattr("model.batch.accept", wrong_accept)
    wrong = first_tokens(wide_runner, request, config, drafter())
    assert min(chi_square_p(plain[p], wrong[p]) for p in (1, 2)) < ALPHA


# ----------------------------------------------------------------------------- the draft checkpoint
def test_a_draft_with_another_tokenizer_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    draft = tmp_path / "draft"
    shutil.copytree(tiny_checkpoint, draft)
    tokenizer = json.loads((draft / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    token = sorted(vocab, key=vocab.get)[300]
    vocab[token + "x"] = vocab.pop(token)
    (draft / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(DraftMismatch, match="tokens only in the target.*" + repr(token).strip("'")[:4]):
        check_draft(tiny_checkpoint, draft)


def test_a_draft_with_more_embedding_rows_is_taken(tiny_checkpoint: Path, tmp_path: Path) -> None:
    draft = tmp_path / "draft"
    shutil.copytree(tiny_checkpoint, draft)
    config = json.loads((draft / "config.json").read_text())
    config["vocab_size"] += 64  # as Qwen2.5-VL-72B's 152,064 rows against the 3B's 151,936
    (draft / "config.json").write_text(json.dumps(config))
    check_draft(tiny_checkpoint, draft)
    assert speculative.METHODS == ("ngram", "draft")
