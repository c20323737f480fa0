"""`python -m cluster.tools.bench --quick` on the tiny checkpoint: every engine and field is in bench.json, and the
ratios and roofline fractions are computed from the measured values. No timing thresholds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.tools.bench import ENGINES

FIELDS = (
    "ttft_ms_median",
    "tpot_ms_median",
    "tpot_ms_p90",
    "output_tokens_per_s",
    "output_tokens",
    "wall_s",
    "tpot_ratio_vs_hf",
    "ttft_ratio_vs_hf",
    "throughput_ratio_vs_hf",
    "roofline_ms",
    "roofline_fraction",
    "tokens_match_hf",
)
BATCHES = ("1", "2")
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.tools.bench",
            "--quick",
            "--checkpoints",
            "tiny",
            "--batch-sizes",
            ",".join(BATCHES),
            "--new-tokens",
            str(NEW_TOKENS),
            "--out",
            str(out),
            "--cache-dir",
            str(out / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), proc.stdout, out


def test_every_engine_and_field(bench: tuple[dict, str, Path]) -> None:
    report, stdout, out = bench
    assert (out / "bench.png").stat().st_size > 0
    assert report["bandwidth"]["copy_gb_s"] > 0 and report["bandwidth"]["read_gb_s"] > 0
    engines = report["checkpoints"]["tiny"]["engines"]
    assert set(engines) == set(ENGINES)
    for skipped in ("hf_static_compile", "ray_tp1_graph"):
        assert "quick" in engines[skipped]["skipped"]
    for engine in set(ENGINES) - {"hf_static_compile", "ray_tp1_graph"}:
        assert sorted(engines[engine]["batches"]) == list(BATCHES), engine
        for batch, m in engines[engine]["batches"].items():
            assert set(FIELDS) <= set(m), (engine, batch)
            assert m["output_tokens"] == NEW_TOKENS * max(int(batch), 2)
            assert f"tiny       {engine:<18} {batch:>5}" in stdout
            # Every engine, in-process or through Ray, serves transformers' greedy tokens.
            assert m["tokens_match_hf"] is True, (engine, batch)
    assert engines["ours_graph"]["capture_s"] > 0


def test_ratios_come_from_measured_values(bench: tuple[dict, str, Path]) -> None:
    report, _, _ = bench
    ckpt = report["checkpoints"]["tiny"]
    engines, copy_bw = ckpt["engines"], report["bandwidth"]["copy_gb_s"] * 1e9
    for b in BATCHES:
        hf = engines["hf"]["batches"][b]
        step_bytes = ckpt["decode_bytes"]["per_step"][b]
        d = ckpt["decode_bytes"]
        assert step_bytes == pytest.approx(
            d["weights_bytes"] + d["lm_head_bytes"] + int(b) * d["kv_bytes_per_token"] * d["mean_context"]
        )
        for engine in ("hf", "ours_eager", "ours_graph", "ray_tp1"):
            m = engines[engine]["batches"][b]
            assert m["tpot_ratio_vs_hf"] == pytest.approx(m["tpot_ms_median"] / hf["tpot_ms_median"])
            assert m["ttft_ratio_vs_hf"] == pytest.approx(m["ttft_ms_median"] / hf["ttft_ms_median"])
            assert m["throughput_ratio_vs_hf"] == pytest.approx(m["output_tokens_per_s"] / hf["output_tokens_per_s"])
            assert m["roofline_ms"] == pytest.approx(1e3 * step_bytes / copy_bw)
            assert m["roofline_fraction"] == pytest.approx(m["roofline_ms"] / m["tpot_ms_median"])
            assert m["output_tokens_per_s"] == pytest.approx(m["output_tokens"] / m["wall_s"])
        ray = engines["ray_tp1"]["batches"][b]
        assert ray["tpot_ratio_vs_in_process"] == pytest.approx(
            ray["tpot_ms_median"] / engines["ours_eager"]["batches"][b]["tpot_ms_median"]
        )
