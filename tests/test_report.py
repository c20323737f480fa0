"""Tests for cluster.report: summary figures against hand computation, plot and records files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster.report import RECORD_KEY_ORDER, format_summary, summarize, write_records, write_report


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
    assert any(
        line.startswith("Output token throughput (tok/s):") and line.endswith("10.00") for line in lines
    )
    assert any(line.startswith("warmup_s:") and line.endswith("1.2500") for line in lines)


def test_write_report_files(records: list[dict], tmp_path: Path) -> None:
    summary = summarize(records, wall_s=2.0, extra={"config": {"tp": 2, "path": tmp_path}})
    results = tmp_path / "out" / "run1.jsonl"
    paths = write_report(records, summary, results)
    assert paths == {
        "summary": tmp_path / "out" / "run1.summary.json",
        "plot": tmp_path / "out" / "run1.latency.png",
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


def test_write_records_round_trip_and_key_order(records: list[dict], tmp_path: Path) -> None:
    records[0]["output_text"] = "héllo"
    records[0]["zeta"] = np.float32(0.5)
    records[0]["alpha"] = np.int64(3)
    path = write_records(records, tmp_path / "nested" / "dir" / "results.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(records)
    loaded = [json.loads(line) for line in lines]
    assert list(loaded[0]) == [
        "id",
        "output_token_ids",
        "output_text",
        "prompt_tokens",
        "ttft_s",
        "tpot_s",
        "e2e_s",
        "error",
        "alpha",
        "itl_s",
        "zeta",
    ]
    assert list(loaded[4]) == [k for k in RECORD_KEY_ORDER if k != "output_text"]
    assert loaded[0]["output_text"] == "héllo"
    assert (loaded[0]["alpha"], loaded[0]["zeta"]) == (3, 0.5)
    for original, back in zip(records[1:], loaded[1:], strict=True):
        assert back == original
    assert [p.name for p in path.parent.iterdir()] == ["results.jsonl"]


def test_write_records_failure_keeps_previous_file(records: list[dict], tmp_path: Path) -> None:
    path = write_records(records, tmp_path / "results.jsonl")
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_records([*records, {"id": "odd", "payload": object()}], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]
