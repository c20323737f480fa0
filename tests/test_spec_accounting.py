"""Speculative decoding around the model: the config section, the per-batch-size gate, the scheduler's blocks
and counts in flight, and what records, the run summary and the metrics say of proposals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from actors.records import add_speculation, new_record
from actors.scheduler import GroupScheduler, Sequence
from actors.spec_gate import SpecGate, bucket
from cluster.config import ConfigError, load_config
from cluster.launch import engine_config
from cluster.report import format_summary, summarize


# ----------------------------------------------------------------------------- the config section
def test_speculation_is_off_by_default_and_keys_reach_the_workers(tiny_checkpoint: Path) -> None:
    assert engine_config(load_config(None, [f"model_path={tiny_checkpoint}"])).worker.speculative is None
    cfg = load_config(None, [f"model_path={tiny_checkpoint}", "speculative.method=ngram", "speculative.num_tokens=4"])
    spec = engine_config(cfg).worker.speculative
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max) == (
        "ngram",
        4,
        1,
        4,
    )
    cfg = load_config(
        None,
        [
            f"model_path={tiny_checkpoint}",
            "world_size=2",
            "parallel_config.tp_size=2",
            "speculative.method=draft",
            "speculative.num_speculative_tokens=3",
            f"speculative.model={tiny_checkpoint}",
        ],
    )
    spec = engine_config(cfg).worker.speculative
    assert (spec.method, spec.model, spec.draft_tensor_parallel_size) == ("draft", str(tiny_checkpoint), 2)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["speculative.method=eagle", "speculative.num_tokens=2"], "speculative.method='eagle'"),
        (["speculative.method=ngram"], "speculative.num_speculative_tokens is required"),
        (["speculative.method=ngram", "speculative.num_tokens=16"], "num_speculative_tokens=16"),
        (
            ["speculative.method=ngram", "speculative.num_tokens=2", "speculative.num_speculative_tokens=3"],
            "disagree",
        ),
        (["speculative.num_tokens=2"], "speculative.num_tokens=2 is set but speculative.method is null"),
        (["speculative.method=draft", "speculative.num_tokens=2"], "needs speculative.model"),
        (
            ["speculative.method=draft", "speculative.num_tokens=2", "speculative.model=/nowhere"],
            "not a checkpoint directory",
        ),
        (
            [
                "speculative.method=ngram",
                "speculative.num_tokens=2",
                "speculative.prompt_lookup_min=3",
                "speculative.prompt_lookup_max=2",
            ],
            "prompt_lookup_min=3",
        ),
    ],
)
def test_bad_speculative_keys_are_named(tiny_checkpoint: Path, overrides: list[str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_config(None, [f"model_path={tiny_checkpoint}", *overrides])


def test_a_draft_tp_other_than_one_or_the_targets_is_refused(tiny_checkpoint: Path) -> None:
    base = [f"model_path={tiny_checkpoint}", "world_size=2", "parallel_config.tp_size=2"]
    draft = ["speculative.method=draft", "speculative.num_tokens=2", f"speculative.model={tiny_checkpoint}"]
    with pytest.raises(ConfigError, match="draft_tensor_parallel_size=4 must be 1 or the target's tp_size=2"):
        load_config(None, [*base, *draft, "speculative.draft_tensor_parallel_size=4"])
    assert engine_config(load_config(None, [*base, *draft, "speculative.draft_tensor_parallel_size=1"]))


def test_a_draft_whose_tokenizer_differs_is_refused_when_the_config_loads(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    draft = tmp_path / "draft"
    shutil.copytree(tiny_checkpoint, draft)
    (draft / "tokenizer.json").write_text((draft / "tokenizer.json").read_text().replace('"hello"', '"hullo"', 1))
    text = (draft / "tokenizer.json").read_text()
    if '"hullo"' not in text:  # the tiny vocabulary has no "hello": rename its first ordinary token instead
        text = text.replace('"!"', '"!!!"', 1)
        (draft / "tokenizer.json").write_text(text)
    overrides = ["speculative.method=draft", "speculative.num_tokens=2", f"speculative.model={draft}"]
    with pytest.raises(ConfigError, match="does not share the target's tokenizer"):
        load_config(None, [f"model_path={tiny_checkpoint}", *overrides])


# ----------------------------------------------------------------------------- the gate
def test_the_gate_tries_both_then_keeps_the_faster_and_probes_the_other() -> None:
    gate = SpecGate(k=3, probe_every=4)
    assert gate.tokens(1) == 3  # nothing known: speculate
    gate.observe(1, True, 0.1, 3)  # 30 tokens/s speculating
    assert gate.tokens(1) == 0  # plain not measured yet
    gate.observe(1, False, 0.1, 1)  # 10 tokens/s plain
    picks = [gate.tokens(1) for _ in range(8)]
    assert picks.count(3) == 6 and picks.count(0) == 2  # the faster, and the other every 4th call
    gate.observe(16, True, 1.0, 16)
    gate.observe(16, False, 0.5, 16)  # at 16 rows plain is faster
    assert [gate.tokens(9) for _ in range(4)] == [0, 0, 0, 3]  # 9 rows share the bucket of 16; its 4th probes
    assert bucket(0) == bucket(1) == 1 and bucket(5) == 8 and bucket(16) == 16


# ----------------------------------------------------------------------------- the scheduler
def _decoding(sched: GroupScheduler, request_id: str, prompt: int, max_new: int) -> Sequence:
    first = 1 + 1000 * (ord(request_id[0]) - ord("a"))  # prompts that share no prefix
    seq = Sequence(request_id, list(range(first, first + prompt)), max_new)
    sched.add(seq)
    plan = sched.schedule()
    assert plan.chunks[0][0] is seq
    sched.prefilled(seq, prompt)
    sched.append(seq, [7])
    return seq


def test_a_speculative_call_holds_blocks_for_k_plus_one_positions_a_step() -> None:
    sched = GroupScheduler(4, 64, 4, token_budget=64, decode_steps_per_call=2)
    seq = _decoding(sched, "a", 8, 40)
    sched.spec_tokens = 3
    plan = sched.schedule()
    assert plan.spec_tokens == 3 and plan.decode_steps == 2 and plan.made == {"a": 8}
    assert seq.in_flight == 8
    assert sched.pool.held("a") * 4 >= seq.num_computed + 8  # positions 8..15 of the two rounds
    sched.returned(plan, {"a": 5})  # the rounds kept 5 of the 8 they could make
    sched.append(seq, [1, 2, 3, 4, 5])
    assert seq.in_flight == 0 and seq.num_computed == 8 + 5


def test_near_its_end_a_row_counts_only_what_it_can_still_make() -> None:
    sched = GroupScheduler(4, 64, 4, token_budget=64, decode_steps_per_call=4)
    seq = _decoding(sched, "a", 8, 3)  # 2 tokens left
    sched.spec_tokens = 3
    plan = sched.schedule()
    assert plan.made == {"a": 2} and seq.in_flight == 2
    assert sched.pool.held("a") * 4 <= 12  # never more than prompt + max_new_tokens positions


def test_without_blocks_for_k_plus_one_positions_the_call_decodes_plainly() -> None:
    sched = GroupScheduler(4, 9, 4, token_budget=64, decode_steps_per_call=1)  # 8 blocks besides the null one
    _decoding(sched, "a", 10, 20)  # 11 tokens: 3 blocks
    _decoding(sched, "b", 18, 2)  # 19 tokens: 5 blocks, and nothing left
    assert sched.pool.num_free() == 0
    sched.spec_tokens = 3
    plan = sched.schedule()  # a's round would write positions 10..13: a 4th block
    assert plan.spec_tokens == 0 and plan.decode_steps == 1 and plan.made == {"a": 1, "b": 1}
    assert sched.preemptions == 0


# ----------------------------------------------------------------------------- what is seen from outside
def test_records_and_the_summary_carry_acceptance_by_position() -> None:
    a, b = new_record("a", 0.0), new_record("b", 0.0)
    for record in (a, b):
        record.update(output_token_ids=[1, 2, 3], prompt_tokens=4, ttft_s=0.1, e2e_s=0.3, tpot_s=0.1)
    assert (a["spec_proposed_tokens"], a["spec_accepted_tokens"], a["spec_rounds"]) == (0, 0, 0)
    add_speculation(a, [(3, 3), (3, 1)])
    add_speculation(b, [(2, 0)])
    assert (a["spec_proposed_tokens"], a["spec_accepted_tokens"], a["spec_rounds"]) == (6, 4, 2)
    assert a["spec_by_position"] == [[2, 2], [2, 1], [2, 1]]
    summary = summarize([a, b], wall_s=1.0)
    assert summary["spec_proposed_tokens"] == 8 and summary["spec_accepted_tokens"] == 4
    assert summary["spec_acceptance_rate"] == 0.5
    assert summary["spec_mean_acceptance_length"] == pytest.approx(1 + 4 / 3)
    assert summary["spec_acceptance_by_position"] == [pytest.approx(2 / 3), pytest.approx(1 / 3), 0.5]
    text = format_summary(summary)
    assert "Mean acceptance length:" in text and "0.67 0.33 0.50" in text
    plain = summarize([new_record("c", 0.0)], wall_s=1.0)
    assert plain["spec_mean_acceptance_length"] is None and "acceptance" not in format_summary(plain)


def test_the_metrics_count_rounds_and_tokens_by_position(monkeypatch: pytest.MonkeyPatch) -> None:
    from actors import metrics as metrics_module

    counted: list[tuple[str, float, dict]] = []

    class Recorder:
        def __init__(self, name: str, *args: object, **kwargs: object) -> None:
            self.name = name

        def inc(self, value: float, tags: dict) -> None:
            counted.append((self.name, value, tags))

        set = observe = inc

    for kind in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(metrics_module, kind, Recorder)
    metrics = metrics_module.EngineMetrics()
    metrics.record_speculation(1, [(3, 3), (3, 1), (2, 0)])
    got = {(name, tags.get("position")): value for name, value, tags in counted}
    assert got[("qwen_vl_spec_rounds", None)] == 3
    assert [got[("qwen_vl_spec_proposed_tokens", p)] for p in "123"] == [3, 3, 2]
    assert [got[("qwen_vl_spec_accepted_tokens", p)] for p in "12"] == [2, 1]
    assert ("qwen_vl_spec_accepted_tokens", "3") in got  # (3, 3) accepted its third
