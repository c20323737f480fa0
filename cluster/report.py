"""Run summary, printed table, latency plot and per-request JSONL records.

Metric definitions follow vLLM's serving benchmark:

- TTFT: request start to first output token;
- TPOT (per request): ``(e2e - ttft) / (output_tokens - 1)``, undefined below two tokens;
- ITL: gaps between successive output tokens, pooled over all requests;
- E2E: request start to last output token;
- output throughput: total output tokens / wall seconds.

Latency statistics (mean, median, p99 with numpy's linear percentile) and token totals cover
successful requests only; failed requests are counted but excluded, as vLLM does.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Record = dict[str, Any]
Stats = dict[str, float | None]

RECORD_KEY_ORDER = (
    "id",
    "output_token_ids",
    "output_text",
    "prompt_tokens",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "error",
)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")

_METRIC_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2e": ("End-to-end Latency", "E2E"),
}
_WIDTH = 50
_LABEL_WIDTH = 40


def summarize(
    records: Sequence[Record],
    wall_s: float,
    phases: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Aggregate per-request records into the run summary.

    Args:
        records: per-request dicts with ``id``, ``output_token_ids``, ``prompt_tokens``,
            ``ttft_s``, ``tpot_s``, ``e2e_s``, ``error`` and optionally ``itl_s``.
        wall_s: wall-clock seconds of the measured run.
        phases: phase timings in seconds (``vision_encode_s``, ``prefill_s``, ...), copied as is.
        extra: further top-level entries (for example a config summary); must not reuse a
            computed key.

    Returns:
        A JSON-serialisable dict: ``requests_ok``, ``requests_failed``, ``requests_total``,
        ``input_tokens``, ``output_tokens``, ``ttft_ms``/``tpot_ms``/``itl_ms``/``e2e_ms`` (each
        ``{"mean", "median", "p99"}``, values ``None`` without data), ``output_throughput_tok_s``,
        ``total_token_throughput_tok_s``, ``request_throughput``, ``wall_s``, ``phases``, then
        the ``extra`` entries.
    """
    if not math.isfinite(wall_s) or wall_s < 0:
        raise ValueError(f"wall_s must be a finite non-negative number, got {wall_s!r}")
    ok = [r for r in records if r.get("error") is None]
    input_tokens = sum(int(r.get("prompt_tokens") or 0) for r in ok)
    output_tokens = sum(len(r.get("output_token_ids") or ()) for r in ok)
    samples = latency_samples_ms(records)

    def per_second(count: int) -> float | None:
        return count / wall_s if wall_s > 0 else None

    summary: dict[str, Any] = {
        "requests_ok": len(ok),
        "requests_failed": len(records) - len(ok),
        "requests_total": len(records),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        **{f"{m}_ms": _stats(samples[m]) for m in LATENCY_METRICS},
        "output_throughput_tok_s": per_second(output_tokens),
        "total_token_throughput_tok_s": per_second(input_tokens + output_tokens),
        "request_throughput": per_second(len(ok)),
        "wall_s": float(wall_s),
        "phases": dict(phases or {}),
    }
    clashes = sorted(set(extra or {}) & set(summary))
    if clashes:
        raise ValueError(f"extra must not override computed summary keys: {clashes}")
    summary.update(extra or {})
    return summary


def latency_samples_ms(records: Sequence[Record]) -> dict[str, list[float]]:
    """Per-metric latency samples in milliseconds over successful requests.

    TPOT comes from the record's ``tpot_s``, or from ``(e2e - ttft) / (n - 1)`` when the
    record leaves it out and has at least two output tokens. ITL pools every ``itl_s`` gap.
    """
    out: dict[str, list[float]] = {m: [] for m in LATENCY_METRICS}
    for r in records:
        if r.get("error") is not None:
            continue
        ttft, e2e, tpot = r.get("ttft_s"), r.get("e2e_s"), r.get("tpot_s")
        n_out = len(r.get("output_token_ids") or ())
        if tpot is None and ttft is not None and e2e is not None and n_out >= 2:
            tpot = (e2e - ttft) / (n_out - 1)
        for metric, value in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
            if value is not None:
                out[metric].append(float(value) * 1e3)
        out["itl"].extend(float(g) * 1e3 for g in r.get("itl_s") or ())
    return out


def _stats(values_ms: Sequence[float]) -> Stats:
    if not values_ms:
        return {"mean": None, "median": None, "p99": None}
    a = np.asarray(values_ms, dtype=np.float64)
    return {
        "mean": float(np.mean(a)),
        "median": float(np.median(a)),
        "p99": float(np.percentile(a, 99, method="linear")),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Render a summary as the fixed-width block vLLM's ``benchmark_serving`` prints."""

    def line(label: str, value: Any, fmt: str = "") -> str:
        text = "n/a" if value is None else format(value, fmt)
        return f"{label:<{_LABEL_WIDTH}}{text:>{_WIDTH - _LABEL_WIDTH}}"

    def header(title: str, fill: str) -> str:
        return title.center(_WIDTH, fill)

    lines = [
        header(" Serving Benchmark Result ", "="),
        line("Successful requests:", summary.get("requests_ok")),
        line("Failed requests:", summary.get("requests_failed")),
        line("Benchmark duration (s):", summary.get("wall_s"), ".2f"),
        line("Total input tokens:", summary.get("input_tokens")),
        line("Total generated tokens:", summary.get("output_tokens")),
        line("Request throughput (req/s):", summary.get("request_throughput"), ".2f"),
        line("Output token throughput (tok/s):", summary.get("output_throughput_tok_s"), ".2f"),
        line("Total token throughput (tok/s):", summary.get("total_token_throughput_tok_s"), ".2f"),
    ]
    for metric in LATENCY_METRICS:
        title, short = _METRIC_TITLES[metric]
        stats = summary.get(f"{metric}_ms") or {}
        lines.append(header(title, "-"))
        lines.append(line(f"Mean {short} (ms):", stats.get("mean"), ".2f"))
        lines.append(line(f"Median {short} (ms):", stats.get("median"), ".2f"))
        lines.append(line(f"P99 {short} (ms):", stats.get("p99"), ".2f"))
    phases = summary.get("phases") or {}
    if phases:
        lines.append(header("Phases", "-"))
        lines.extend(
            line(f"{name}:", value, ".4f" if isinstance(value, float) else "")
            for name, value in phases.items()
        )
    lines.append(header("", "="))
    return "\n".join(lines)


def write_report(records: Sequence[Record], summary: dict[str, Any], results_path: Path) -> dict[str, Path]:
    """Write ``<stem>.summary.json`` and ``<stem>.latency.png`` beside ``results_path``.

    Returns:
        ``{"summary": path of the JSON, "plot": path of the PNG}``.
    """
    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path = results_path.with_name(f"{results_path.stem}.summary.json")
    plot_path = results_path.with_name(f"{results_path.stem}.latency.png")
    _atomic_write_bytes(summary_path, (json.dumps(summary, indent=2, default=_json_default) + "\n").encode())
    _plot_latency(records, summary, plot_path)
    return {"summary": summary_path, "plot": plot_path}


def _plot_latency(records: Sequence[Record], summary: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    samples = latency_samples_ms(records)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("ttft", "tpot"), strict=True):
        title, short = _METRIC_TITLES[metric]
        values = samples[metric]
        ax.set_title(f"{title} (n={len(values)})")
        ax.set_xlabel(f"{short} (ms)")
        ax.set_ylabel("requests")
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        stats = _stats(values)
        ax.hist(values, bins=min(30, max(5, len(values))), color="tab:blue", alpha=0.75)
        ax.axvline(stats["median"], color="black", linestyle="--", label=f"median {stats['median']:.2f} ms")
        ax.axvline(stats["p99"], color="tab:red", linestyle=":", label=f"p99 {stats['p99']:.2f} ms")
        ax.legend(loc="upper right")
    throughput = summary.get("output_throughput_tok_s")
    fig.suptitle(
        f"requests ok {summary.get('requests_ok')}, failed {summary.get('requests_failed')}; "
        f"output throughput {'n/a' if throughput is None else f'{throughput:.2f}'} tok/s"
    )
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    _atomic_write_bytes(path, png.getvalue())


def write_records(records: Sequence[Record], path: Path) -> Path:
    """Write one JSON line per record, atomically, keys in :data:`RECORD_KEY_ORDER` then sorted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(_ordered(r), default=_json_default, ensure_ascii=False) + "\n" for r in records]
    _atomic_write_bytes(path, "".join(lines).encode())
    return path


def _ordered(record: Record) -> Record:
    known = {k: record[k] for k in RECORD_KEY_ORDER if k in record}
    rest = {k: record[k] for k in sorted(record) if k not in known}
    return {**known, **rest}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
