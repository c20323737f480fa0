"""Run summary, printed table, latency plot and per-request JSONL records.

Metric definitions follow vLLM's serving benchmark:

- queue: arrival to first scheduling on a DP group;
- TTFT: request start to first output token;
- TPOT (per request): ``(e2e - ttft) / (output_tokens - 1)``, undefined below two tokens;
- ITL: gaps between successive output tokens, pooled over all requests;
- E2E: request start to last output token;
- output throughput: total output tokens / wall seconds.

Latency statistics (mean, median, p99 with numpy's linear percentile) and token totals cover
successful requests only; failed requests are counted but excluded, as vLLM does.

Beside the latency histograms, the report draws a request timeline from the records' Unix timestamps
(``arrival_time``, ``scheduled_time``, ``first_token_time``, ``end_time``): one row per request, its
queue, vision-encode + prefill and decode spans shaded in its DP group's colour.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actors.metrics import generated_tokens
from cluster.results import atomic_write_bytes, json_default

Record = dict[str, Any]
Stats = dict[str, float | None]

LATENCY_METRICS = ("queue", "ttft", "tpot", "itl", "e2e")

_METRIC_TITLES = {
    "queue": ("Queue Time", "Queue"),
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2e": ("End-to-end Latency", "E2E"),
}
_WIDTH = 50
_LABEL_WIDTH = 40


def speculation_summary(records: list[dict]) -> dict[str, Any]:
    """Speculative decoding over the records: tokens proposed and accepted, rounds, the acceptance rate, the
    mean acceptance length (tokens a round yields: 1 + accepted / rounds, vLLM's definition) and the
    acceptance rate at each position of a round."""
    proposed = sum(int(r.get("spec_proposed_tokens") or 0) for r in records)
    accepted = sum(int(r.get("spec_accepted_tokens") or 0) for r in records)
    rounds = sum(int(r.get("spec_rounds") or 0) for r in records)
    positions: list[list[int]] = []
    for r in records:
        for i, (p, a) in enumerate(r.get("spec_by_position") or ()):
            if i == len(positions):
                positions.append([0, 0])
            positions[i][0] += p
            positions[i][1] += a
    return {
        "spec_proposed_tokens": proposed,
        "spec_accepted_tokens": accepted,
        "spec_acceptance_rate": accepted / proposed if proposed else None,
        "spec_mean_acceptance_length": 1 + accepted / rounds if rounds else None,
        "spec_acceptance_by_position": [a / p if p else None for p, a in positions],
    }


def _speculation_lines(summary: dict[str, Any], line: Any) -> list[str]:
    if not summary.get("spec_proposed_tokens"):
        return []
    by_position = " ".join(f"{x:.2f}" for x in summary.get("spec_acceptance_by_position") or () if x is not None)
    return [
        line("Speculative tokens proposed:", summary.get("spec_proposed_tokens")),
        line("Speculative tokens accepted:", summary.get("spec_accepted_tokens")),
        line("Mean acceptance length:", summary.get("spec_mean_acceptance_length"), ".2f"),
        line("Acceptance by position:", by_position),
    ]


def summarize(
    records: Sequence[Record],
    wall_s: float,
    phases: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Aggregate per-request records into the run summary.

    Args:
        records: per-request dicts with ``id``, ``output_token_ids``, ``prompt_tokens``,
            ``ttft_s``, ``tpot_s``, ``e2e_s``, ``error`` and optionally ``queue_s``, ``itl_s`` and the
            ``*_time`` timestamps.
        wall_s: wall-clock seconds of the measured run.
        phases: phase timings in seconds (``vision_encode_s``, ``prefill_s``, ...), copied as is.
        extra: further top-level entries (for example a config summary); must not reuse a
            computed key.

    Returns:
        A JSON-serialisable dict: ``requests_ok``, ``requests_failed``, ``requests_total``,
        ``input_tokens``, ``output_tokens``, ``queue_ms``/``ttft_ms``/``tpot_ms``/``itl_ms``/``e2e_ms``
        (each ``{"mean", "median", "p99"}``, values ``None`` without data), ``output_throughput_tok_s``,
        ``total_token_throughput_tok_s``, ``request_throughput``, ``cached_tokens`` and
        ``prefix_cache_hit_rate`` (prompt tokens served from the prefix cache, and their share of
        ``input_tokens``), ``preemptions``, ``video_frames`` and ``video_decode_s`` (sums over the
        records), ``wall_s``, ``phases``,
        ``timeline_requests`` (records with the timestamps the timeline needs), then the ``extra`` entries.
    """
    if not math.isfinite(wall_s) or wall_s < 0:
        raise ValueError(f"wall_s must be a finite non-negative number, got {wall_s!r}")
    ok = [r for r in records if r.get("error") is None]
    input_tokens = sum(int(r.get("prompt_tokens") or 0) for r in ok)
    output_tokens = sum(generated_tokens(r) for r in ok)  # every choice's, for n > 1
    cached = sum(int(r.get("cached_tokens") or 0) for r in ok)
    samples = latency_samples_ms(records)

    def per_second(count: int) -> float | None:
        return count / wall_s if wall_s > 0 else None

    summary: dict[str, Any] = {
        "requests_ok": len(ok),
        "requests_failed": len(records) - len(ok),
        "requests_total": len(records),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        **{f"{m}_ms": latency_stats(samples[m]) for m in LATENCY_METRICS},
        "output_throughput_tok_s": per_second(output_tokens),
        "total_token_throughput_tok_s": per_second(input_tokens + output_tokens),
        "request_throughput": per_second(len(ok)),
        "cached_tokens": cached,
        "prefix_cache_hit_rate": cached / input_tokens if input_tokens else None,
        "preemptions": sum(int(r.get("preemptions") or 0) for r in records),
        "video_frames": sum(sum(r.get("video_frames") or ()) for r in ok),
        "video_decode_s": sum(r.get("video_decode_s") or 0.0 for r in records),
        **speculation_summary(ok),
        "wall_s": float(wall_s),
        "phases": dict(phases or {}),
        "timeline_requests": sum(1 for r in records if _on_timeline(r)),
    }
    clashes = sorted(set(extra or {}) & set(summary))
    if clashes:
        raise ValueError(f"extra must not override computed summary keys: {clashes}")
    summary.update(extra or {})
    return summary


def latency_samples_ms(records: Sequence[Record]) -> dict[str, list[float]]:
    """Per-metric latency samples in milliseconds over successful requests.

    TPOT comes from the record's ``tpot_s``, or from ``(e2e - ttft) / (n - 1)`` when the
    record leaves it out and has at least two output tokens; queue time likewise from ``queue_s`` or
    ``scheduled_time - arrival_time``. ITL pools every ``itl_s`` gap.
    """
    out: dict[str, list[float]] = {m: [] for m in LATENCY_METRICS}
    for r in records:
        if r.get("error") is not None:
            continue
        ttft, e2e, tpot, queue = r.get("ttft_s"), r.get("e2e_s"), r.get("tpot_s"), r.get("queue_s")
        n_out = len(r.get("output_token_ids") or ())
        if tpot is None and ttft is not None and e2e is not None and n_out >= 2:
            tpot = (e2e - ttft) / (n_out - 1)
        if queue is None and r.get("scheduled_time") is not None and r.get("arrival_time") is not None:
            queue = r["scheduled_time"] - r["arrival_time"]
        for metric, value in (("queue", queue), ("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
            if value is not None:
                out[metric].append(float(value) * 1e3)
        out["itl"].extend(float(g) * 1e3 for g in r.get("itl_s") or ())
    return out


def latency_stats(values_ms: Sequence[float]) -> Stats:
    """{"mean", "median", "p99"} of millisecond samples (numpy's linear percentile); None without data."""
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
        *_timeline_line(summary, line),
        line("Benchmark duration (s):", summary.get("wall_s"), ".2f"),
        line("Total input tokens:", summary.get("input_tokens")),
        line("Total generated tokens:", summary.get("output_tokens")),
        line("Request throughput (req/s):", summary.get("request_throughput"), ".2f"),
        line("Output token throughput (tok/s):", summary.get("output_throughput_tok_s"), ".2f"),
        line("Total token throughput (tok/s):", summary.get("total_token_throughput_tok_s"), ".2f"),
        line("Prefix cache hit rate:", summary.get("prefix_cache_hit_rate"), ".2%"),
        line("Preemptions:", summary.get("preemptions")),
        *_speculation_lines(summary, line),
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
            line(f"{name}:", value, ".4f" if isinstance(value, float) else "") for name, value in phases.items()
        )
    lines.append(header("", "="))
    return "\n".join(lines)


def _timeline_line(summary: dict[str, Any], line: Any) -> list[str]:
    """A line only when some requests are missing from the timeline (records without timestamps)."""
    placed, total = summary.get("timeline_requests"), summary.get("requests_total")
    if placed is None or placed == total:
        return []
    return [line("Requests on timeline:", "none" if placed == 0 else f"{placed} of {total}")]


def write_report(records: Sequence[Record], summary: dict[str, Any], results_path: Path) -> dict[str, Path | None]:
    """Write ``<stem>.summary.json``, ``<stem>.latency.png`` and ``<stem>.timeline.png`` beside ``results_path``.

    Returns:
        ``{"summary": path of the JSON, "plot": latency PNG, "timeline": timeline PNG}``; ``"timeline"``
        is ``None`` (and no file is written) when no record carries the timestamps a row needs.
    """
    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path = results_path.with_name(f"{results_path.stem}.summary.json")
    plot_path = results_path.with_name(f"{results_path.stem}.latency.png")
    timeline_path: Path | None = results_path.with_name(f"{results_path.stem}.timeline.png")
    atomic_write_bytes(summary_path, (json.dumps(summary, indent=2, default=json_default) + "\n").encode())
    _plot_latency(records, summary, plot_path)
    if plot_timeline(records, timeline_path) is None:
        timeline_path.unlink(missing_ok=True)  # no stale picture from an earlier run
        timeline_path = None
    return {"summary": summary_path, "plot": plot_path, "timeline": timeline_path}


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
        stats = latency_stats(values)
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
    atomic_write_bytes(path, png.getvalue())


# Request timeline ------------------------------------------------------------------------------------

TIMELINE_SPANS = ("video", "queue", "prefill", "decode")
_SPAN_LABELS = {"video": "video decode", "queue": "queue", "prefill": "vision encode + prefill", "decode": "decode"}
_SPAN_SHADES = {"video": 0.15, "queue": 0.28, "prefill": 0.55, "decode": 0.85}  # lightest to dark within a DP hue
_DP_COLORMAPS = ("Blues", "Oranges", "Greens", "Purples", "RdPu", "YlOrBr", "BuGn", "PuBu")
_NO_DP_COLORMAP = "Greys"  # requests that never reached a DP group
_STATUS_MARKERS = {"failed": ("X", "#d62728"), "aborted": ("D", "black")}
_MAX_ROW_LABELS = 60


@dataclass(frozen=True)
class TimelineRow:
    """One request on the timeline: its spans as ``(kind, start, end)`` in seconds since the first arrival."""

    id: str
    dp_rank: int | None
    status: str  # "ok", "failed" (error set) or "aborted" (finish_reason "abort")
    spans: tuple[tuple[str, float, float], ...]
    end: float


def _on_timeline(record: Record) -> bool:
    return record.get("arrival_time") is not None and record.get("end_time") is not None


def timeline_rows(records: Sequence[Record]) -> tuple[list[TimelineRow], float | None]:
    """The timeline's rows, sorted by arrival, and the Unix time of the first arrival (their zero).

    A row needs ``arrival_time`` and ``end_time``; records without them (older result files) are left
    out. The spans are video decode (its first ``video_decode_s`` after arrival, for a request with videos:
    decoding and sampling happen while it is prepared), queue (to ``scheduled_time``), prefill (``scheduled_time`` to
    ``first_token_time``, vision encode included) and decode (first token to end); a request that
    failed or was aborted early lacks the later timestamps and so the later spans.
    """
    placed = sorted((r for r in records if _on_timeline(r)), key=lambda r: (r["arrival_time"], str(r.get("id"))))
    if not placed:
        return [], None
    t0 = float(placed[0]["arrival_time"])
    rows = []
    for r in placed:
        arrival, end = float(r["arrival_time"]) - t0, float(r["end_time"]) - t0
        marks = [
            (kind, r.get(key))
            for kind, key in (("queue", "arrival_time"), ("prefill", "scheduled_time"), ("decode", "first_token_time"))
        ]
        if r.get("video_decode_s"):
            marks[0] = ("queue", float(r["arrival_time"]) + float(r["video_decode_s"]))
            marks.insert(0, ("video", r["arrival_time"]))
        starts: list[tuple[str, float]] = []
        for kind, t in marks:  # clamped into [arrival, end] and non-decreasing
            if t is not None:
                starts.append((kind, min(max(float(t) - t0, starts[-1][1] if starts else arrival), end)))
        spans = tuple(
            (kind, start, next_start)
            for (kind, start), (_, next_start) in zip(starts, [*starts[1:], ("end", end)])
            if next_start > start
        )
        status = "failed" if r.get("error") is not None else "aborted" if r.get("finish_reason") == "abort" else "ok"
        dp_rank = r.get("dp_rank")
        rows.append(TimelineRow(str(r.get("id")), None if dp_rank is None else int(dp_rank), status, spans, end))
    return rows, t0


def timeline_colors(dp_rank: int | None) -> dict[str, str]:
    """The three shades (hex) of a DP group's hue: light queue, medium prefill, dark decode."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    name = _NO_DP_COLORMAP if dp_rank is None else _DP_COLORMAPS[dp_rank % len(_DP_COLORMAPS)]
    return {kind: to_hex(colormaps[name](shade)) for kind, shade in _SPAN_SHADES.items()}


def plot_timeline(records: Sequence[Record], path: Path) -> dict[str, Any] | None:
    """Draw the request timeline PNG at ``path``; ``None`` (nothing written) if no record can be placed.

    Returns:
        What was drawn: ``rows``, ``skipped`` (records without timestamps), ``rows_per_dp``
        (``{dp_rank: rows}``), ``colors`` (``{dp_rank: {span: hex}}``), ``marked``
        (``{"failed": n, "aborted": n}``) and ``size_px`` (``(width, height)`` of the PNG).
    """
    from matplotlib.figure import Figure
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows, t0 = timeline_rows(records)
    if not rows:
        return None
    dp_ranks = sorted({row.dp_rank for row in rows}, key=lambda d: (d is None, d or 0))
    colors = {d: timeline_colors(d) for d in dp_ranks}
    height_in = min(18.0, max(3.5, 1.6 + 0.24 * len(rows)))
    fig = Figure(figsize=(12, height_in), dpi=100, layout="constrained")
    ax = fig.subplots()
    for d in dp_ranks:
        for kind in TIMELINE_SPANS:
            bars = [
                (y, start, end)
                for y, row in enumerate(rows)
                if row.dp_rank == d
                for k, start, end in row.spans
                if k == kind
            ]
            if bars:
                y, start, end = (np.array(v) for v in zip(*bars))
                ax.barh(y, end - start, left=start, height=0.8, color=colors[d][kind], linewidth=0)
    marked = {}
    for status, (marker, color) in _STATUS_MARKERS.items():
        ys = [y for y, row in enumerate(rows) if row.status == status]
        marked[status] = len(ys)
        if ys:
            ax.plot(
                [rows[y].end for y in ys],
                ys,
                linestyle="none",
                marker=marker,
                color=color,
                markersize=8,
                markeredgecolor="white",
                markeredgewidth=0.6,
            )
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first arrival on top
    if len(rows) <= _MAX_ROW_LABELS:
        ax.set_yticks(range(len(rows)), [row.id for row in rows], fontsize=8)
        for label, row in zip(ax.get_yticklabels(), rows):
            if row.status != "ok":
                label.set_color(_STATUS_MARKERS[row.status][1])
    else:
        ax.set_yticks([])
    ax.set_ylabel(f"requests, by arrival (n={len(rows)})")
    start_utc = np.datetime64(int(t0), "s").astype(str).replace("T", " ")
    ax.set_xlabel(f"seconds since the first arrival ({start_utc} UTC)")
    ax.set_xlim(0, max(row.end for row in rows) * 1.02 or 1.0)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)

    handles: list[Any] = [tuple(Patch(color=colors[d][k]) for k in TIMELINE_SPANS) for d in dp_ranks]
    labels = ["no DP group" if d is None else f"DP {d}" for d in dp_ranks]
    for status, (marker, color) in _STATUS_MARKERS.items():
        if marked[status]:
            handles.append(Line2D([], [], linestyle="none", marker=marker, color=color, markersize=8))
            labels.append(f"{status} ({marked[status]})")
    legend = ax.legend(
        handles,
        labels,
        handler_map={tuple: HandlerTuple(ndivide=None, pad=0)},
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
        alignment="left",
        title="shades, light to dark:\n" + "\n".join(_SPAN_LABELS[k] for k in TIMELINE_SPANS),
    )
    legend.get_title().set_fontsize(8)
    skipped = len(records) - len(rows)
    groups = sum(1 for d in dp_ranks if d is not None)
    fig.suptitle(
        f"Request timeline: {len(rows)} requests on {groups} DP group{'s' if groups != 1 else ''}"
        + (f"; {skipped} without timestamps not shown" if skipped else "")
    )
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    atomic_write_bytes(Path(path), png.getvalue())
    rows_per_dp = {d: sum(1 for row in rows if row.dp_rank == d) for d in dp_ranks}
    return {
        "rows": len(rows),
        "skipped": skipped,
        "rows_per_dp": rows_per_dp,
        "colors": colors,
        "marked": marked,
        "size_px": (round(12 * 100), round(height_in * 100)),
    }
