"""The speculative-decoding projection: tokens per round, a round's parts against the cost model, and its CLI."""

from __future__ import annotations

import json

import pytest

from cluster.tools import cost_model, spec_projection
from cluster.tools.hardware import hardware
from cluster.tools.model_shapes import model_shape

TARGET = model_shape("qwen2.5-vl-72b")
DRAFT_3B = model_shape("qwen2.5-vl-3b")
DRAFT_7B = model_shape("qwen2.5-vl-7b")
A3 = hardware("a3")


def setup(draft=DRAFT_3B, draft_tp=8, weights="w8a8", contexts=(1200,), tp=8) -> spec_projection.Setup:
    return spec_projection.Setup(TARGET, draft, A3, tp, draft_tp, weights, weights, tuple(contexts))


def expected_tokens_by_outcome(alpha: float, k: int) -> float:
    """E[tokens] summed over outcomes: i proposals accepted then one rejected (i + 1 tokens, the corrected one
    included), or all k accepted (k + 1 tokens, the bonus included)."""
    rejected = sum((i + 1) * alpha**i * (1 - alpha) for i in range(k))
    return rejected + (k + 1) * alpha**k


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.637, 0.853, 0.99, 1.0])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_tokens_per_round_is_the_expectation_over_outcomes(alpha: float, k: int) -> None:
    assert spec_projection.tokens_per_round(alpha, k) == pytest.approx(expected_tokens_by_outcome(alpha, k))


def test_alpha_for_inverts_tokens_per_round_and_names_bad_values() -> None:
    for length, k in [(2.3, 3), (3.2, 3), (3.2, 5), (1.5, 1)]:
        alpha = spec_projection.alpha_for(length, k)
        assert spec_projection.tokens_per_round(alpha, k) == pytest.approx(length, abs=1e-9)
    # 1 + a + a^2 + a^3 = 3.2 at k = 3 has its root near 0.853.
    assert spec_projection.alpha_for(3.2, 3) == pytest.approx(0.853, abs=1e-3)
    with pytest.raises(ValueError, match="acceptance length 3.2 at k=2"):
        spec_projection.alpha_for(3.2, 2)  # 3 tokens at most
    with pytest.raises(ValueError, match="alpha=1.5"):
        spec_projection.tokens_per_round(1.5, 3)


def test_verification_is_the_decode_step_over_b_times_k_plus_1_rows() -> None:
    contexts, k = [1200, 300], 4
    rows = [1200, 1201, 1202, 1203, 1204, 300, 301, 302, 303, 304]
    verify = spec_projection.verify_step(TARGET, A3, 8, "w8a8", contexts, k)
    assert verify == cost_model.decode_step(TARGET, A3, 8, "w8a8", rows, graph=True)
    # Every row reads its sequence's KV: 40,960 bytes per token per rank (80 layers x 1 KV head x 128 x 2 x 2),
    # over each row's context plus the one new token it writes.
    assert verify.kv_bytes == 40_960 * (sum(rows) + len(rows))
    r = spec_projection.spec_round(setup(contexts=contexts), k, 0.8, 3.2)
    assert r.verify_s == verify.seconds
    assert r.round_s == pytest.approx(r.draft_s + r.verify_s)
    assert r.tpot_s == pytest.approx(r.round_s / spec_projection.tokens_per_round(0.8, k))


def test_the_draft_runs_k_steps_the_first_over_two_tokens_a_row() -> None:
    steps = spec_projection.draft_steps(DRAFT_3B, A3, 8, "bf16", [1200], 3)
    assert len(steps) == 3
    assert steps[0] == cost_model.decode_step(DRAFT_3B, A3, 8, "bf16", [1199, 1200], graph=True)
    assert steps[2] == cost_model.decode_step(DRAFT_3B, A3, 8, "bf16", [1202], graph=True)


def test_one_token_per_round_is_slower_than_plain_decode_and_acceptance_helps() -> None:
    contexts = [1200]
    for weights in ("bf16", "w8a8"):
        plain = spec_projection.plain_tpot_s(TARGET, A3, 8, weights, contexts)
        for draft, draft_tp in [(DRAFT_3B, 1), (DRAFT_3B, 8), (DRAFT_7B, 4)]:
            tpots = []
            for alpha in (0.0, 0.5, 0.8, 0.95):
                r = spec_projection.spec_round(setup(draft, draft_tp, weights, contexts), 4, alpha, 0)
                tpots.append(r.tpot_s)
            assert tpots[0] > plain  # nothing accepted: a decode step plus the draft's steps per token
            assert tpots == sorted(tpots, reverse=True)


def test_more_proposals_cost_more_per_round() -> None:
    rounds = [spec_projection.spec_round(setup(), k, 0.8, 3.2) for k in range(1, 8)]
    assert [r.draft_s for r in rounds] == sorted(r.draft_s for r in rounds)
    assert [r.verify_s for r in rounds] == sorted(r.verify_s for r in rounds)


def test_floors_and_the_7b_drafts_reads() -> None:
    # The 72B at TP 8 on a3 at 1.6 TB/s: 17.86 GB per rank in bf16 (11.2 ms), 9.09 GB in w8a8 (5.7 ms).
    assert spec_projection.floor_s(TARGET, A3, 8, "bf16") == pytest.approx(17_864_589_312 / 1.6e12)
    assert spec_projection.floor_s(TARGET, A3, 8, "w8a8") == pytest.approx(0.005680, abs=1e-5)
    # A 7B draft at TP 1 reads its layers' matrices, 3584 x (3584 + 2 x 4 x 128) + 3584^2 + 3 x 3584 x 18944 =
    # 233,046,016 a layer, and its 152,064 x 3,584 LM head, at 2 bytes: 14.14 GB a token.
    assert cost_model.linear_params_per_layer(DRAFT_7B) == 233_046_016
    assert cost_model.weight_bytes(DRAFT_7B, "bf16", 1) == (28 * 233_046_016 + 152_064 * 3_584) * 2 == 14_140_571_648


def test_a_draft_tp_that_does_not_shard_is_refused() -> None:
    with pytest.raises(ValueError, match="tp=8 does not shard qwen2.5-vl-7b"):
        setup(DRAFT_7B, 8)
    with pytest.raises(ValueError, match="draft tp=8: must be 1 or divide the target.s tp=4"):
        setup(DRAFT_3B, 8, tp=4)
    with pytest.raises(ValueError, match="round_fixed_s=-1"):
        spec_projection.Setup(TARGET, DRAFT_3B, A3, 8, 8, "bf16", "bf16", (1200,), -1)


def test_the_best_k_is_the_lowest_tpot_and_the_reference_k_yields_l() -> None:
    p = spec_projection.project(setup(), 3.2, reference_k=3)
    assert p.best.tpot_s == min(r.tpot_s for r in p.rounds)
    assert p.at_reference.k == 3
    assert p.at_reference.tokens == pytest.approx(3.2)


def test_the_cli_prints_the_table_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "spec.json"
    assert spec_projection.main(["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "w8a8    qwen2.5-vl-3b    8  3.2" in printed
    result = json.loads(out.read_text())
    # 2 weights x (3B at TP 1, 4, 8 + 7B at TP 1, 4) x 2 acceptance lengths; the 7B at TP 8 is skipped.
    assert len(result["rows"]) == 20
    assert len(result["skipped"]) == 4
    assert all(len(row["by_k"]) == 7 for row in result["rows"])
    with pytest.raises(SystemExit):
        spec_projection.main(["--tp", "3"])
    assert "tp=3 does not shard qwen2.5-vl-72b" in capsys.readouterr().err
