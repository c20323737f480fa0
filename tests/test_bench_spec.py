"""The speculative benchmark's workload (finding the loop a greedy answer falls into) and its draft-friendly target."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.tools.bench_spec import main, measure, periodic_tail, scale_tail
from cluster.tools.draft_checkpoint import cut_draft
from model.draft import load_drafter
from model.processor import PromptBuilder
from model.runner import ModelRunner, batch_buckets
from model.speculative import SpeculativeConfig, verify_buckets


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([5, 6, 7, 9, 9, 9, 9], (3, 1)),  # a run of one token
        ([1, 2, 3, 4, 5, 3, 4, 5, 3, 4], (2, 3)),  # a cycle of three, entered at 2
        ([1, 2, 3, 4], (4, 1)),  # no loop
        ([8, 8], (0, 1)),
        ([], (0, 1)),
    ],
)
def test_periodic_tail_is_the_longest_looping_end(tokens: list[int], expected: tuple[int, int]) -> None:
    assert periodic_tail(tokens) == expected


def test_bad_workload_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--workload", "copy"])
    assert "--workload" in capsys.readouterr().err


def test_a_scaled_tail_makes_the_cut_a_draft_the_target_accepts(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """--tail-scale: with the layers past the draft's adding little, the first layers' proposals are taken."""
    builder = PromptBuilder.from_pretrained(tiny_checkpoint)
    request = builder.build({"id": "text", "prompt": "Describe a lighthouse in the fog at night."})
    draft = cut_draft(tiny_checkpoint, tmp_path / "draft", layers=2)
    config = SpeculativeConfig("draft", 3, model=str(draft))
    rates = {}
    for scale in (1.0, 1e-4):
        runner = ModelRunner(tiny_checkpoint, max_batch_size=1, max_seq_len=256)
        runner.add_decode_buckets(verify_buckets(batch_buckets(1), 3))
        if scale != 1.0:
            scale_tail(runner, 2, scale)
        plain = measure(runner, request, 24, 1)
        spec = measure(runner, request, 24, 1, config, load_drafter(runner, draft))
        assert spec["tokens"] == plain["tokens"]  # the same greedy answer either way
        rates[scale] = spec["acceptance_rate"]
    assert rates[1e-4] >= 0.9 and rates[1e-4] > rates[1.0], rates
