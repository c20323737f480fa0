"""bench_scheduler's engine configs, without running an engine."""

from __future__ import annotations

from pathlib import Path

from cluster.tools.bench_scheduler import engine_config


def test_set_overrides_come_last_and_win(tiny_checkpoint: Path) -> None:
    base = engine_config(tiny_checkpoint, "continuous", 1, slots=1, exe_mode="graph")
    assert base.ray.phase_calls == "socket" and base.scheduler.decode_steps_per_call == 1
    cfg = engine_config(
        tiny_checkpoint,
        "continuous",
        1,
        slots=1,
        exe_mode="graph",
        extra=["ray.phase_calls=ordinary", "scheduler.decode_steps_per_call=4"],
    )
    assert cfg.ray.phase_calls == "ordinary" and cfg.scheduler.decode_steps_per_call == 4
    assert cfg.exe_mode == "graph" and cfg.data_config.batch_size == 1
