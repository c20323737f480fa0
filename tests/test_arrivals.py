"""Arrival times of `data_config.request_rate`: a Poisson process, for the launch driver and the serving benchmark.

Both drivers turn the rate into per-request send offsets (cluster/launch.py for `cluster.launch`,
cluster/tools/bench_serve.py for the HTTP benchmark). Checked against what a Poisson process of that rate
is: independent exponential gaps of mean 1/rate (about 63% of them shorter than the mean), and counts per
second whose variance equals their mean; the seed fixes the draw.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable

import pytest

from cluster.launch import arrival_offsets as launch_offsets
from cluster.tools.bench_serve import arrival_offsets as bench_offsets

OFFSETS = {"launch": launch_offsets, "bench_serve": bench_offsets}
N = 20_000


@pytest.fixture(params=sorted(OFFSETS))
def offsets(request: pytest.FixtureRequest) -> Callable[[int, float, int], list[float]]:
    return OFFSETS[request.param]


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_gaps_are_exponential_at_the_rate(offsets, rate: float) -> None:
    times = offsets(N, rate, 0)
    assert len(times) == N and times[0] == 0.0
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.03)  # 4 standard errors at N
    assert statistics.stdev(gaps) == pytest.approx(mean, rel=0.05)  # an exponential's sd is its mean
    assert sum(g < 1 / rate for g in gaps) / len(gaps) == pytest.approx(0.632, abs=0.015)  # 1 - 1/e


def test_counts_per_second_have_the_variance_of_a_poisson_count(offsets) -> None:
    rate = 4.0
    times = offsets(N, rate, 1)
    seconds = int(times[-1])
    per_second = Counter(int(t) for t in times if t < seconds)
    counts = [per_second.get(s, 0) for s in range(seconds)]
    assert statistics.fmean(counts) == pytest.approx(rate, rel=0.03)
    assert statistics.pvariance(counts) / statistics.fmean(counts) == pytest.approx(1.0, abs=0.1)


def test_the_seed_fixes_the_draw_and_inf_sends_everything_at_once(offsets) -> None:
    assert offsets(50, 2.0, 7) == offsets(50, 2.0, 7)
    assert offsets(50, 2.0, 7) != offsets(50, 2.0, 8)
    assert offsets(5, float("inf"), 7) == [0.0] * 5
