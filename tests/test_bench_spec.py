"""The speculative benchmark's workload: finding the loop a greedy answer falls into."""

from __future__ import annotations

import pytest

from cluster.tools.bench_spec import main, periodic_tail


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
