"""The capacity planner: its cost model's arithmetic, its simulated clock, and that it runs the engine's scheduler."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from actors import clock
from actors.scheduler import GroupScheduler
from cluster.tools import cost_model, sim_calibrate, sim_loop, simulate
from cluster.tools.hardware import hardware
from cluster.tools.model_shapes import model_shape
from cluster.tools.sim_workloads import smart_resize
from model.config import ModelConfig

SHAPE_72B = model_shape("qwen2.5-vl-72b")
A3 = hardware("a3")


def test_decode_step_of_the_72b_at_tp_8_on_a3_by_hand() -> None:
    # 8 rows, each at 1,000 tokens of KV after the step, bf16, captured graph.
    # Linear weights per layer: 8192 x (8192 + 2 x 8 x 128) + 8192^2 + 3 x 8192 x 29568 = 877,658,112.
    # Weights per rank: (80 x 877,658,112 x 2 + 152,064 x 8192 x 2 (LM head)) / 8 = 17,864,589,312 bytes.
    # KV per token per rank: 2 x 80 layers x 1 KV head x 128 x 2 bytes = 40,960; read 8 x 1,000, write 8.
    cost = cost_model.decode_step(SHAPE_72B, A3, 8, "bf16", [1000] * 8, graph=True)
    assert cost.weight_bytes == 17_864_589_312
    assert cost.kv_bytes == 40_960 * 8_008 == 328_007_680
    # FLOPs: linear 2 x 8 x 80 x 877,658,112 / 8 = 140,425,297,920; attention 8 x 4 x 80 x 8 heads x 128 x 1 x 1,000
    # = 2,621,440,000; LM head 2 x 8 x 152,064 x 8192 / 8 = 2,491,416,576.
    assert cost.flops == 140_425_297_920 + 2_621_440_000 + 2_491_416_576
    # Memory bound: 18,192,596,992 bytes / (1.6e12 B/s x 0.8) = 14.2130 ms; compute 145.5 GFLOP / (390e12 x 0.55)
    # = 0.6785 ms; all-reduces 160 x (10 us + 1.75 x 131,072 B / 196e9 B/s) = 1.7873 ms; fixed 0.3 + 80 x 0.005 ms.
    assert cost.memory_s == pytest.approx(0.0142129664)
    assert cost.compute_s == pytest.approx(6.7850e-4, rel=1e-4)
    assert cost.comm_s == pytest.approx(1.78725e-3, rel=1e-5)
    assert cost.fixed_s == pytest.approx(0.7e-3)
    assert cost.seconds == pytest.approx(0.0142129664 + 1.78725e-3 + 0.7e-3, rel=1e-6)


def test_prefill_step_of_the_72b_at_tp_8_on_a3_by_hand() -> None:
    # One first prompt chunk of 2,048 tokens, no decode rows, eager.
    cost = cost_model.prefill_step(SHAPE_72B, A3, 8, "bf16", [(2048, 2048)], [])
    assert cost.weight_bytes == 17_864_589_312
    assert cost.kv_bytes == 40_960 * 4_096  # read its own 2,048 (an upper bound), write 2,048
    # FLOPs: linear 2 x 2,048 x 80 x 877,658,112 / 8 = 35,948,876,267,520; attention (causal) 4 x 80 x 8 x 128 x
    # 2,048 x 2,049 / 2 = 687,530,311,680; LM head for its one sampled row 2 x 152,064 x 8,192 / 8 = 311,427,072.
    assert cost.flops == 35_948_876_267_520 + 687_530_311_680 + 311_427_072
    # Compute bound: 36.64 TFLOP / (390e12 x 0.55) = 170.80 ms; all-reduces 160 x (10 us + 1.75 x 33,554,432 B /
    # 196e9) = 49.535 ms; eager fixed cost 1 ms + 80 x 0.15 ms = 13 ms.
    assert cost.compute_s == pytest.approx(0.1708006, rel=1e-6)
    assert cost.memory_s < cost.compute_s
    assert cost.comm_s == pytest.approx(0.0495349, rel=1e-6)
    assert cost.fixed_s == pytest.approx(0.013)
    assert cost.seconds == pytest.approx(0.2333355, rel=1e-6)


def test_w8a8_halves_the_linear_weights_and_keeps_the_lm_head() -> None:
    bf16 = cost_model.weight_bytes(SHAPE_72B, "bf16", 8)
    w8a8 = cost_model.weight_bytes(SHAPE_72B, "w8a8", 8)
    assert bf16 - w8a8 == 80 * 877_658_112 / 8
    with pytest.raises(ValueError, match="--weights='fp8'"):
        cost_model.weight_bytes(SHAPE_72B, "fp8", 8)


def test_the_simulated_clock_jumps_to_the_next_timer() -> None:
    async def main() -> list[float]:
        start = clock.wall()

        async def wake(delay: float) -> float:
            await asyncio.sleep(delay)
            return clock.wall() - start

        return await asyncio.gather(wake(3600.0), wake(2.5), wake(0.0))

    assert sim_loop.run(main()) == [3600.0, 2.5, 0.0]


def plan_args(*extra: str) -> list[str]:
    return [
        "conf/qwen2_5_vl_72b.yaml",
        "--model-shape",
        "qwen2.5-vl-72b",
        "--hardware",
        "a3",
        "--workload",
        "chat",
        "--rate",
        "4",
        "--requests",
        "24",
        *extra,
    ]


def run_plan(*extra: str) -> dict:
    [plan] = simulate.plans(simulate.build_parser().parse_intermixed_args(plan_args(*extra)))
    return simulate.simulate(plan)


def figures(summary: dict) -> dict:
    keys = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "queue_ms", "output_throughput_tok_s", "wall_s", "kv_blocks")
    return {k: summary[k] for k in keys}


def test_same_seed_same_figures_another_seed_others() -> None:
    first, again, other = run_plan("--seed", "3"), run_plan("--seed", "3"), run_plan("--seed", "4")
    assert first["requests_ok"] == 24 and first["requests_failed"] == 0
    assert figures(first) == figures(again)
    assert figures(first) != figures(other)


def test_the_simulation_runs_the_engines_own_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    before = run_plan("--seed", "1")
    calls = []
    original = GroupScheduler.schedule

    def schedule(self: GroupScheduler):  # the engine's method, changed: one prompt token per round at most
        calls.append(1)
        self.token_budget = self.max_running + 1
        return original(self)

    monkeypatch.setattr(GroupScheduler, "schedule", schedule)
    after = run_plan("--seed", "1")
    assert calls
    assert after["ttft_ms"]["mean"] > before["ttft_ms"]["mean"]


def test_cli_writes_the_summary_schema(tmp_path, capsys) -> None:
    out = tmp_path / "sim.json"
    assert simulate.main([*plan_args("--goodput", "ttft_ms:2000", "tpot_ms:50"), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "queue_ms"):
        assert set(summary[key]) == {"mean", "median", "p90", "p99"}
    for key in ("output_throughput_tok_s", "request_throughput", "preemptions", "prefix_cache_hit_rate"):
        assert key in summary
    assert summary["hardware"]["name"] == "a3" and summary["model_shape"]["name"] == "qwen2.5-vl-72b"
    assert summary["weights"] == "bf16" and summary["workload"] == "chat"
    assert 0 < summary["request_goodput"] <= summary["request_throughput"]
    assert "Serving Benchmark Result" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--hardware", "tpu", "--hardware='tpu'"),
        ("--workload", "random:10", "--workload='random:10'"),
        ("--model-shape", "qwen9", "--model-shape='qwen9'"),
    ],
)
def test_bad_flags_name_the_value(flag: str, value: str, message: str, capsys) -> None:
    args = plan_args()
    args[args.index(flag) + 1] = value
    with pytest.raises(SystemExit):
        simulate.main(args)
    assert message in capsys.readouterr().err


def test_qwen_resize_by_hand() -> None:
    # 1000 x 1500 pixels: sides rounded to multiples of 28 (1008 x 1512), within the pixel limits: 36 x 54 tokens.
    assert smart_resize(1000, 1500) == (1008, 1512)
    # 4032 x 3024 (12.2 MP) is under 16,384 x 28^2 = 12.8 MP: rounded only.
    assert smart_resize(4032, 3024) == (4032, 3024)
    # 10,000 x 10,000 scales by sqrt(1e8 / 12,845,056) = 2.790 and floors to multiples of 28: 127 x 28 = 3,556 a side.
    assert smart_resize(10_000, 10_000) == (3556, 3556)


def test_a_request_file_becomes_token_counts_and_image_spans() -> None:
    [plan] = simulate.plans(
        simulate.build_parser().parse_intermixed_args(
            [
                "conf/tiny_cpu.yaml",
                "--model-shape",
                str(simulate.tokenizer_checkpoint()),
                "--hardware",
                "cpu-here",
                "--workload",
                "dataset/sample_vl.jsonl",
                "--requests",
                "4",
            ]
        )
    )
    assert plan.shape.layers == ModelConfig.from_pretrained(simulate.tokenizer_checkpoint()).text.num_hidden_layers
    assert len(plan.requests) == 4 and any(r.images for r in plan.requests)
    image_token = next(r.prompt_ids[r.images[0][0]] for r in plan.requests if r.images)
    for request in plan.requests:
        for (start, end, _), (t, h, w) in zip(request.images, request.grids):
            assert end - start == t * h * w // 4  # one token per 2 x 2 patches
            assert set(request.prompt_ids[start:end]) == {image_token}


def test_a_profile_file_is_read_and_a_bad_one_named(tmp_path) -> None:
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({**hardware("cpu-here").to_dict(), "bandwidth_efficiency": 0.25, "calibration": []}))
    assert hardware(str(path)).bandwidth_efficiency == 0.25
    path.write_text("{}")
    with pytest.raises(ValueError, match="cpu.json"):
        hardware(str(path))


def test_products_of_few_rows_run_at_their_share_of_the_rate() -> None:
    cpu = dataclasses.replace(hardware("a3"), gemm_half_rows=36.0)
    shape = model_shape("qwen2.5-vl-72b")
    one, four = (cost_model.decode_step(shape, hw, 8, "bf16", [1000] * 4, graph=True) for hw in (hardware("a3"), cpu))
    assert one.memory_s == four.memory_s and one.flops == four.flops
    # 4 rows (linears and LM head alike) at 4 / (4 + 36) of the rate: 10x the arithmetic time of the full rate,
    # less the attention, which runs at the full rate either way
    attention = 4 * shape.layers * shape.heads / 8 * shape.head_dim * 4 * (1000 - 1 + 1)
    full = one.compute_s - attention / (hardware("a3").bf16_flops * hardware("a3").flops_efficiency)
    assert four.compute_s - (one.compute_s - full) == pytest.approx(10 * full)
    single = [cost_model.decode_step(shape, hw, 8, "bf16", [1000], graph=True) for hw in (hardware("a3"), cpu)]
    assert single[0].compute_s == single[1].compute_s  # one row: a matrix-vector product, full rate
    assert cost_model.rows_rate(hardware("a3"), 4) == 1.0  # accelerators: every product at the full rate


def test_calibration_recovers_the_rate_it_was_given() -> None:
    shape = model_shape("qwen2.5-vl-3b")
    truth = dataclasses.replace(hardware("cpu-here"), flops_efficiency=0.7, gemm_half_rows=30.0)
    few, many = [(1, 40)] * 4, [(256, 256)]

    def seconds(rows):
        return cost_model.forward(shape, truth, 1, "fp32", rows, graph=False).compute_s

    half_rows, efficiency = sim_calibrate.fit_products(
        shape, hardware("cpu-here"), (few, seconds(few)), (many, seconds(many))
    )
    assert half_rows == pytest.approx(30.0, abs=0.02)
    assert efficiency == pytest.approx(0.7, rel=1e-3)


def test_the_validation_judges_each_figure_against_its_target() -> None:
    from cluster.tools.sim_validate import compare

    real = {"ttft_ms": {"mean": 100.0, "median": 100.0, "p99": 200.0},
            "tpot_ms": {"mean": 10.0, "median": 10.0, "p99": 20.0}, "output_throughput_tok_s": 50.0}  # fmt: skip
    simulated = {"ttft_ms": {"mean": 125.0, "median": 126.0, "p99": 290.0},
                 "tpot_ms": {"mean": 8.0, "median": 10.0, "p99": 31.0}, "output_throughput_tok_s": 37.0}  # fmt: skip
    rows = {row["figure"]: row for row in compare(real, simulated)}
    assert rows["ttft_ms mean"]["within"] and not rows["ttft_ms median"]["within"]  # 25% in, 26% out
    assert rows["ttft_ms p99"]["within"] and not rows["tpot_ms p99"]["within"]  # p99s: 50%
    assert rows["tpot_ms mean"]["error"] == pytest.approx(-0.2)
    assert not rows["output_throughput_tok_s"]["within"]


def test_the_validation_simulates_the_checkpoint_with_every_profile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With --calibrate the fitted profile is a second profile of the same checkpoint's simulation (the real runs,
    the calibration and the simulations stubbed: the wiring of `main` is what is checked)."""
    from cluster.tools import bench, sim_calibrate, sim_validate, tiny_checkpoint
    from cluster.tools.hardware import hardware

    checkpoint = tmp_path / "small"
    summary = {"ttft_ms": {"mean": 1.0, "median": 1.0, "p99": 1.0},
               "tpot_ms": {"mean": 1.0, "median": 1.0, "p99": 1.0}, "output_throughput_tok_s": 1.0}  # fmt: skip
    calls = []
    monkeypatch.setattr(bench, "bench_image", lambda directory: tmp_path / "image.png")
    monkeypatch.setattr(tiny_checkpoint, "build_tiny_checkpoint", lambda directory, spec: checkpoint)
    monkeypatch.setattr(sim_validate, "real_runs", lambda path, requests: {"static": summary, "continuous": summary})
    monkeypatch.setattr(sim_calibrate, "calibrate", lambda: (hardware("cpu-here"), []))
    monkeypatch.setattr(
        sim_validate, "simulated", lambda path, requests, profile, policy: calls.append((path, profile)) or summary
    )
    assert sim_validate.main(["--calibrate", "--json", str(tmp_path / "out.json")]) == 0
    assert [path for path, _ in calls] == [checkpoint] * 4
    profiles = [profile for _, profile in calls]  # per policy: the named profile, then the fitted one
    assert profiles[0] == profiles[2] == "cpu-here" and profiles[1] == profiles[3]
    assert profiles[1].endswith("calibrated.json")
