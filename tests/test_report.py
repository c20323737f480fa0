"""Tests for cluster.report: summary figures against hand computation, plot and records files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster.report import (
    format_summary,
    plot_timeline,
    summarize,
    timeline_colors,
    timeline_rows,
    write_report,
)

T0 = 1_790_000_000.0  # a Unix time: records carry absolute timestamps


def _record(rid: str, n_out: int, prompt: int, ttft: float | None, e2e: float | None, **kw: object) -> dict:
    tpot = (e2e - ttft) / (n_out - 1) if ttft is not None and e2e is not None and n_out >= 2 else None
    return {
        "id": rid,
        "output_token_ids": list(range(n_out)),
        "prompt_tokens": prompt,
        "ttft_s": ttft,
        "tpot_s": tpot,
        "e2e_s": e2e,
        "error": None,
        **kw,
    }


@pytest.fixture()
def records() -> list[dict]:
    return [
        _record("r0", 5, 10, 0.100, 0.500, itl_s=[0.1, 0.1, 0.1, 0.1]),
        _record("r1", 3, 20, 0.200, 0.300, itl_s=[0.04, 0.06]),
        _record("r2", 1, 30, 0.050, 0.050, itl_s=[]),
        _record("r3", 11, 40, 0.400, 1.400, itl_s=[0.1] * 10),
        {
            "id": "bad",
            "output_token_ids": [7, 7],
            "prompt_tokens": 99,
            "ttft_s": 9.0,
            "tpot_s": 9.0,
            "e2e_s": 99.0,
            "error": "image not found: /x.png",
        },
    ]


def _p99(values: list[float]) -> float:
    s = sorted(values)
    pos = 0.99 * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def test_summary_matches_hand_computation(records: list[dict]) -> None:
    summary = summarize(records, wall_s=2.0, phases={"prefill_s": 0.3, "decode_s": 1.5}, extra={"tp": 2})
    assert summary["requests_ok"] == 4
    assert summary["requests_failed"] == 1
    assert summary["requests_total"] == 5
    assert summary["input_tokens"] == 10 + 20 + 30 + 40
    assert summary["output_tokens"] == 5 + 3 + 1 + 11
    assert summary["output_throughput_tok_s"] == pytest.approx(20 / 2.0)
    assert summary["total_token_throughput_tok_s"] == pytest.approx(120 / 2.0)
    assert summary["request_throughput"] == pytest.approx(4 / 2.0)
    assert summary["wall_s"] == 2.0
    assert summary["phases"] == {"prefill_s": 0.3, "decode_s": 1.5}
    assert summary["tp"] == 2

    ttft = [100.0, 200.0, 50.0, 400.0]
    assert summary["ttft_ms"]["mean"] == pytest.approx(sum(ttft) / 4)
    assert summary["ttft_ms"]["median"] == pytest.approx((100.0 + 200.0) / 2)
    assert summary["ttft_ms"]["p99"] == pytest.approx(_p99(ttft))

    tpot = [400.0 / 4, 100.0 / 2, 1000.0 / 10]  # r2 has one token: no TPOT
    assert summary["tpot_ms"]["mean"] == pytest.approx(sum(tpot) / 3)
    assert summary["tpot_ms"]["median"] == pytest.approx(100.0)
    assert summary["tpot_ms"]["p99"] == pytest.approx(_p99(tpot))

    itl = [100.0] * 4 + [40.0, 60.0] + [100.0] * 10
    assert summary["itl_ms"]["mean"] == pytest.approx(sum(itl) / len(itl))
    assert summary["itl_ms"]["median"] == pytest.approx(100.0)
    assert summary["itl_ms"]["p99"] == pytest.approx(_p99(itl))

    e2e = [500.0, 300.0, 50.0, 1400.0]
    assert summary["e2e_ms"]["mean"] == pytest.approx(sum(e2e) / 4)
    assert summary["e2e_ms"]["median"] == pytest.approx(400.0)
    assert summary["e2e_ms"]["p99"] == pytest.approx(float(np.percentile(e2e, 99)))

    json.dumps(summary)


def test_tpot_derived_when_record_omits_it(records: list[dict]) -> None:
    for r in records:
        r["tpot_s"] = None
    summary = summarize(records, wall_s=1.0)
    assert summary["tpot_ms"]["mean"] == pytest.approx((100.0 + 50.0 + 100.0) / 3)


def test_summary_without_data() -> None:
    failed = [{"id": "x", "output_token_ids": [], "prompt_tokens": 3, "error": "boom"}]
    summary = summarize(failed, wall_s=0.0)
    assert (summary["requests_ok"], summary["requests_failed"]) == (0, 1)
    assert summary["output_tokens"] == 0
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert summary[metric] == {"mean": None, "median": None, "p99": None}
    assert summary["output_throughput_tok_s"] is None
    assert summary["phases"] == {}
    text = format_summary(summary)
    assert "n/a" in text


def test_summary_rejects_bad_inputs(records: list[dict]) -> None:
    with pytest.raises(ValueError, match="wall_s"):
        summarize(records, wall_s=-1.0)
    with pytest.raises(ValueError, match="output_tokens"):
        summarize(records, wall_s=1.0, extra={"output_tokens": 1})


def test_format_summary_block(records: list[dict]) -> None:
    text = format_summary(summarize(records, wall_s=2.0, phases={"warmup_s": 1.25}))
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    assert all(len(line) == 50 for line in lines)
    assert "Successful requests:" in text and "Failed requests:" in text
    assert any(line.startswith("Mean TTFT (ms):") and line.endswith("187.50") for line in lines)
    assert any(line.startswith("Output token throughput (tok/s):") and line.endswith("10.00") for line in lines)
    assert any(line.startswith("warmup_s:") and line.endswith("1.2500") for line in lines)


def test_write_report_files(records: list[dict], tmp_path: Path) -> None:
    summary = summarize(records, wall_s=2.0, extra={"config": {"tp": 2, "path": tmp_path}})
    results = tmp_path / "out" / "run1.jsonl"
    paths = write_report(records, summary, results)
    assert paths == {
        "summary": tmp_path / "out" / "run1.summary.json",
        "plot": tmp_path / "out" / "run1.latency.png",
        "timeline": None,  # these records carry no timestamps
    }
    loaded = json.loads(paths["summary"].read_text())
    assert loaded["ttft_ms"] == summary["ttft_ms"]
    assert loaded["config"] == {"tp": 2, "path": str(tmp_path)}

    png = paths["plot"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000
    with Image.open(paths["plot"]) as im:
        im.verify()
    with Image.open(paths["plot"]) as im:
        assert im.width > 500 and im.height > 200
        assert len(im.convert("L").getcolors(maxcolors=256 * 256) or []) > 20
    assert sorted(p.name for p in paths["plot"].parent.iterdir()) == ["run1.latency.png", "run1.summary.json"]


def test_write_report_without_latency_data(tmp_path: Path) -> None:
    failed = [{"id": "x", "output_token_ids": [], "prompt_tokens": 3, "error": "boom"}]
    paths = write_report(failed, summarize(failed, wall_s=1.0), tmp_path / "r.jsonl")
    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG"


# Queue time and the request timeline ------------------------------------------------------------------


def _timed(
    rid: str,
    dp: int | None,
    arrival: float,
    scheduled: float | None,
    first: float | None,
    end: float,
    n_out: int = 8,
    **kw: object,
) -> dict:
    """A record with Unix timestamps at T0 + the given offsets (seconds)."""
    record = _record(
        rid,
        n_out if first is not None else 0,
        50,
        None if first is None else first - arrival,
        None if first is None else end - arrival,
    )
    record.update(
        dp_rank=dp,
        finish_reason="length",
        queue_s=None if scheduled is None else scheduled - arrival,
        arrival_time=T0 + arrival,
        scheduled_time=None if scheduled is None else T0 + scheduled,
        first_token_time=None if first is None else T0 + first,
        end_time=T0 + end,
    )
    record.update(kw)
    return record


def continuous_batching_records() -> list[dict]:
    """Continuous batching on 2 DP groups: short requests slip in while a long one decodes on each group."""
    return [
        _timed("short-4", 0, 2.0, 2.4, 2.6, 3.5),  # queued: its group was full
        _timed("long-0", 0, 0.0, 0.02, 0.6, 6.0, n_out=120),
        _timed("long-1", 1, 0.1, 0.12, 0.75, 5.2, n_out=100),
        _timed("short-0", 0, 0.5, 0.55, 0.8, 1.6),
        _timed("short-1", 1, 0.9, 0.92, 1.1, 2.0),
        _timed("short-2", 0, 1.2, 1.25, 1.45, 2.3),
        _timed("short-3", 1, 1.7, 1.72, 1.9, 2.6),
        _timed("abort-0", 1, 2.2, 2.25, 2.5, 3.0, finish_reason="abort"),
        _timed("bad-image", None, 2.6, None, None, 2.61, error="image not found: /x.png", finish_reason=None),
        _timed("short-5", 0, 3.0, 3.05, 3.3, 4.4),
        _timed("short-6", 1, 3.3, 3.6, 3.8, 4.5),
        _timed("vision-0", 0, 3.6, 3.62, 4.3, 5.0),
        _record("old-file", 4, 10, 0.1, 0.4),  # a record from before the timestamps: not on the timeline
    ]


@pytest.fixture()
def batching_records() -> list[dict]:
    return continuous_batching_records()


def test_summary_reports_queue_time(batching_records: list[dict]) -> None:
    summary = summarize(batching_records, wall_s=6.0)
    # Successful requests only (the aborted one ended without error); the old record has no queue time.
    queue = [400.0, 20.0, 20.0, 50.0, 20.0, 50.0, 20.0, 50.0, 50.0, 300.0, 20.0]
    assert summary["queue_ms"]["mean"] == pytest.approx(np.mean(queue))
    assert summary["queue_ms"]["median"] == pytest.approx(np.median(queue))
    assert summary["queue_ms"]["p99"] == pytest.approx(_p99(queue))
    assert summary["timeline_requests"] == 12
    text = format_summary(summary)
    assert any(
        line.startswith("Mean Queue (ms):") and line.endswith(f"{np.mean(queue):.2f}") for line in text.splitlines()
    )
    assert any(line.startswith("Requests on timeline:") and line.endswith("12 of 13") for line in text.splitlines())


def test_queue_time_from_timestamps_when_record_omits_it(batching_records: list[dict]) -> None:
    for r in batching_records:
        r["queue_s"] = None
    summary = summarize(batching_records, wall_s=6.0)
    # Unix timestamps near 1.79e9 keep about 0.1 microsecond of precision.
    assert summary["queue_ms"]["median"] == pytest.approx(50.0, abs=1e-3)
    assert summary["queue_ms"]["mean"] == pytest.approx(1000.0 / 11, abs=1e-3)


def test_timeline_rows_sorted_by_arrival_with_their_spans(batching_records: list[dict]) -> None:
    rows, t0 = timeline_rows(batching_records)
    assert t0 == T0
    assert [row.id for row in rows] == [
        "long-0",
        "long-1",
        "short-0",
        "short-1",
        "short-2",
        "short-3",
        "short-4",
        "abort-0",
        "bad-image",
        "short-5",
        "short-6",
        "vision-0",
    ]
    by_id = {row.id: row for row in rows}
    long0 = by_id["long-0"]
    assert [kind for kind, _, _ in long0.spans] == ["queue", "prefill", "decode"]
    assert [t for _, a, b in long0.spans for t in (a, b)] == pytest.approx([0.0, 0.02, 0.02, 0.6, 0.6, 6.0], abs=1e-6)
    assert (long0.dp_rank, long0.status, long0.end) == (0, "ok", pytest.approx(6.0))
    short4 = by_id["short-4"]
    assert [t for _, a, b in short4.spans for t in (a, b)] == pytest.approx([2.0, 2.4, 2.4, 2.6, 2.6, 3.5], abs=1e-6)
    # A request that failed before scheduling only queued; an aborted one is marked as such.
    bad = by_id["bad-image"]
    assert (bad.dp_rank, bad.status) == (None, "failed")
    assert [k for k, _, _ in bad.spans] == ["queue"]
    assert [bad.spans[0][1], bad.spans[0][2]] == pytest.approx([2.6, 2.61], abs=1e-6)
    assert by_id["abort-0"].status == "aborted"


def test_timeline_colors_hue_per_group_shade_per_span() -> None:
    def luminance(hex_color: str) -> float:
        r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
        return 0.299 * r + 0.587 * g + 0.114 * b

    groups = [timeline_colors(d) for d in (0, 1, 2, None)]
    assert len({c for group in groups for c in group.values()}) == 16  # no colour shared between groups
    for group in groups:
        assert luminance(group["video"]) > luminance(group["queue"]) > luminance(group["prefill"])
        assert luminance(group["prefill"]) > luminance(group["decode"])


def test_timeline_png_draws_every_row_in_its_group_colours(batching_records: list[dict], tmp_path: Path) -> None:
    info = plot_timeline(batching_records, tmp_path / "t.png")
    assert info is not None
    assert (info["rows"], info["skipped"]) == (12, 1)
    assert info["rows_per_dp"] == {0: 6, 1: 5, None: 1}
    assert info["marked"] == {"failed": 1, "aborted": 1}
    with Image.open(tmp_path / "t.png") as im:
        assert im.size == info["size_px"]
        pixels = {tuple(int(v) for v in p) for p in np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)}
    for dp in (0, 1):
        for span, hex_color in info["colors"][dp].items():
            rgb = tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
            assert rgb in pixels, f"DP {dp} {span} colour {hex_color} not drawn"
    assert (0xD6, 0x27, 0x28) in pixels  # the failed-request marker


def test_timeline_height_grows_with_rows(tmp_path: Path) -> None:
    few = plot_timeline(
        [_timed(f"r{i}", i % 2, i * 0.1, i * 0.1 + 0.01, i * 0.1 + 0.1, i * 0.1 + 0.5) for i in range(10)],
        tmp_path / "few.png",
    )
    many = plot_timeline(
        [_timed(f"r{i}", i % 2, i * 0.1, i * 0.1 + 0.01, i * 0.1 + 0.1, i * 0.1 + 0.5) for i in range(40)],
        tmp_path / "many.png",
    )
    assert few is not None and many is not None
    assert few["size_px"][0] == many["size_px"][0] and many["size_px"][1] > few["size_px"][1]


def test_write_report_writes_the_timeline(batching_records: list[dict], tmp_path: Path) -> None:
    stale = tmp_path / "run.timeline.png"
    paths = write_report(batching_records, summarize(batching_records, wall_s=6.0), tmp_path / "run.jsonl")
    assert paths["timeline"] == stale
    with Image.open(stale) as im:
        assert im.format == "PNG"
    # A later run at the same path whose records carry no timestamps: no timeline, and no stale picture.
    old = [_record("a", 3, 10, 0.1, 0.3)]
    summary = summarize(old, wall_s=1.0)
    paths = write_report(old, summary, tmp_path / "run.jsonl")
    assert paths["timeline"] is None and not stale.exists()
    assert summary["timeline_requests"] == 0
    assert any(
        line.startswith("Requests on timeline:") and line.endswith("none")
        for line in format_summary(summary).splitlines()
    )


def test_a_video_request_starts_with_its_decode_span() -> None:
    record = {
        "id": "video-0",
        "arrival_time": T0,
        "video_decode_s": 0.3,
        "scheduled_time": T0 + 0.5,
        "first_token_time": T0 + 0.9,
        "end_time": T0 + 2.0,
        "dp_rank": 0,
        "error": None,
        "finish_reason": "stop",
    }
    (row,), _ = timeline_rows([record])
    assert [kind for kind, _, _ in row.spans] == ["video", "queue", "prefill", "decode"]
    assert [t for _, a, b in row.spans for t in (a, b)] == pytest.approx([0, 0.3, 0.3, 0.5, 0.5, 0.9, 0.9, 2.0])
