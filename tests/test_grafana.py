"""The Grafana board in conf/grafana/: it queries only series the engine exports, shows every one of them,
and follows the conventions of Ray's generated dashboards (a `${datasource}` variable, a session filter)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from actors.metrics import METRICS, prometheus_series

BOARD = Path(__file__).resolve().parent.parent / "conf" / "grafana" / "qwen_vl_dashboard.json"
SESSION_FILTER = 'SessionName=~"$SessionName"'

_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
_IDENTIFIER = re.compile(r"(?<![\w.$])([A-Za-z_:][\w:]*)\s*(\()?")
_SELECTOR = re.compile(r"\b(ray_\w+)\s*(\{[^{}]*\})?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords or labels."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^{}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = _GROUPING.sub("", text)  # by (...) / on (...) label lists
    return {m.group(1) for m in _IDENTIFIER.finditer(text) if not m.group(2) and m.group(1) not in _KEYWORDS}


def engine_metric(series: str) -> str:
    """`ray_qwen_vl_ttft_seconds_bucket` -> `qwen_vl_ttft_seconds`: Ray's prefix and Prometheus suffixes off."""
    return re.sub(r"_(bucket|sum|count|total)$", "", series.removeprefix("ray_"))


@pytest.fixture(scope="module")
def board() -> dict:
    return json.loads(BOARD.read_text())


def _panels(board: dict) -> list[dict]:
    return [p for p in board["panels"] if p["type"] != "row"]


def _exprs(board: dict) -> list[tuple[str, str]]:
    """(panel title, expression) for every query on the board."""
    return [(p["title"], t["expr"]) for p in _panels(board) for t in p["targets"]]


def _variable_queries(board: dict) -> list[str]:
    return [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]


def test_metric_names_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, phase) (rate(ray_a_bucket{SessionName=~"$S", x="by(y)"}'
        "[$__rate_interval]))) / on (dp_rank) group_left sum(ray_b_total offset 5m) > bool 0"
    )
    assert metric_names(expr) == {"ray_a_bucket", "ray_b_total"}
    assert engine_metric("ray_qwen_vl_requests_total") == "qwen_vl_requests"
    assert engine_metric("ray_qwen_vl_requests_waiting") == "qwen_vl_requests_waiting"


def test_board_queries_only_exported_series(board: dict) -> None:
    exported = {s for name in METRICS for s in prometheus_series(name)}
    queried = {name for _, expr in _exprs(board) for name in metric_names(expr)}
    queried |= {re.match(r"label_values\(\s*(\w+)", q).group(1) for q in _variable_queries(board)}
    assert queried, "the board has no queries"
    # The name without Ray's prefix and the suffixes is a metric the engine creates...
    assert {engine_metric(s) for s in queried} <= set(METRICS)
    # ...and the suffix is the one Ray exports for that kind (a counter as _total, a histogram as _bucket...).
    assert queried <= exported, f"series Ray does not export: {sorted(queried - exported)}"


def test_board_shows_every_exported_metric(board: dict) -> None:
    shown = {engine_metric(name) for _, expr in _exprs(board) for name in metric_names(expr)}
    assert shown == set(METRICS)


def test_board_uses_the_datasource_variable_and_session_filter(board: dict) -> None:
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["SessionName"]["datasource"] == "${datasource}"
    for panel in _panels(board):
        assert panel["datasource"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == "${datasource}", panel["title"]
    for title, expr in _exprs(board):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), (title, expr)
        for series, matchers in _SELECTOR.findall(expr):
            assert SESSION_FILTER in matchers, f"{title}: {series} is not filtered by session"


def _calls(expr: str, function: str) -> list[str]:
    """The argument text of every call of `function` in `expr` (parentheses balanced)."""
    out = []
    for m in re.finditer(rf"\b{function}\(", expr):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            i += 1
        out.append(expr[m.end() : i - 1])
    return out


def test_latency_percentiles_come_from_bucket_series(board: dict) -> None:
    quantiles = 0
    for title, expr in _exprs(board):
        for args in _calls(expr, "histogram_quantile"):
            quantiles += 1
            q, inner = args.split(",", 1)
            assert 0 < float(q) < 1, title
            grouping = re.match(r"\s*sum by \(([^)]*)\)", inner)
            assert grouping and "le" in [g.strip() for g in grouping.group(1).split(",")], f"{title}: not by le"
            assert all(name.endswith("_bucket") for name in metric_names(inner)), title
        assert expr.count("_bucket") == expr.count("histogram_quantile"), f"{title}: _bucket outside a quantile"
    assert quantiles >= 4 * 3  # P50/P90/P99 of TTFT, TPOT, E2E and queue time
    for metric in ("qwen_vl_ttft_seconds", "qwen_vl_tpot_seconds", "qwen_vl_e2e_seconds", "qwen_vl_queue_seconds"):
        panel = next(p for p in _panels(board) if any(f"ray_{metric}_bucket" in t["expr"] for t in p["targets"]))
        assert [t["legendFormat"] for t in panel["targets"]] == ["P50", "P90", "P99", "mean"], metric
        assert panel["fieldConfig"]["defaults"]["unit"] == "s"


def test_per_group_panels_split_by_dp_rank(board: dict) -> None:
    for series in (
        "ray_qwen_vl_requests_waiting",
        "ray_qwen_vl_requests_running",
        "ray_qwen_vl_generated_tokens_total",
        "ray_qwen_vl_vision_cache_hits_total",
        "ray_qwen_vl_vision_cache_misses_total",
    ):
        exprs = [expr for _, expr in _exprs(board) if series in expr]
        assert any(re.search(r"by \([^)]*\bdp_rank\b", expr) for expr in exprs), series


def test_panels_tile_the_grid(board: dict) -> None:
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area
