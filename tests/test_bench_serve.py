"""The serving benchmark's overhead arithmetic, on made-up records (no server)."""

from __future__ import annotations

import asyncio

import pytest

from cluster.tools.bench_serve import idle_overhead, media_dir, paired_overhead


def _record(ttft_s: float | None, e2e_s: float | None, error: str | None = None) -> dict:
    return {"ttft_s": ttft_s, "e2e_s": e2e_s, "error": error}


def test_paired_overhead_takes_each_bodys_mean_per_path() -> None:
    http = [[_record(0.110, 0.5), _record(0.130, 0.7)], [_record(0.2, 1.0)], [_record(None, None, "boom")]]
    ray_api = [[_record(0.100, 0.5)], [_record(0.2, 1.1), _record(0.2, 0.9)], [_record(0.1, 0.2)]]
    out = paired_overhead(http, ray_api)
    assert out["requests"] == 2  # the third body has no good HTTP record
    assert out["ttft_ms"]["mean"] == pytest.approx((20.0 + 0.0) / 2)
    assert out["e2e_ms"]["median"] == pytest.approx((100.0 + 0.0) / 2)


def test_idle_overhead_pairs_each_body_once_per_path() -> None:
    sent: list[tuple[str, str]] = []

    def path(name: str, ttft_s: float):
        async def send(body: dict, request_id: str) -> dict:
            sent.append((name, body["id"]))
            return _record(None, None, "down") if body["id"] == "b2" and name == "http" else _record(ttft_s, 2 * ttft_s)

        return send

    bodies = [{"id": "b0"}, {"id": "b1"}, {"id": "b2"}]
    out = asyncio.run(idle_overhead({"http": path("http", 0.013), "ray_api": path("ray_api", 0.010)}, bodies, 4))
    assert sent == [
        ("http", "b0"), ("ray_api", "b0"), ("ray_api", "b1"), ("http", "b1"),
        ("http", "b2"), ("ray_api", "b2"), ("ray_api", "b0"), ("http", "b0"),
    ]  # fmt: skip
    assert (out["pairs"], out["pairs_failed"]) == (4, 1)
    assert out["ttft_ms"]["median"] == pytest.approx(3.0) and out["e2e_ms"]["mean"] == pytest.approx(6.0)


def test_media_dir_holds_every_image(tmp_path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    requests = [{"images": [str(tmp_path / "a" / "x.png")]}, {"images": []}, {"images": [str(tmp_path / "a/b/y.png")]}]
    assert media_dir(requests) == str((tmp_path / "a").resolve())
    assert media_dir([{"images": []}]) is None
