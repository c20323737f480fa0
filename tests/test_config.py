"""Loading and validating the run config (cluster/config.py)."""

from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, RunConfig, load_config, main
from cluster.launch import engine_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_with_overrides_only(tmp_path: Path) -> None:
    cfg = load_config(None, [f"model_path={tmp_path}"])
    assert isinstance(cfg, RunConfig)
    assert cfg.model_path == str(tmp_path)
    assert (cfg.device, cfg.dtype, cfg.world_size, cfg.exe_mode) == ("cpu", "float32", 1, "eager")
    assert cfg.parallel_config.tp_size == 1 and cfg.parallel_config.vision_mode == "dp"
    data = cfg.data_config
    assert (data.dataset, data.input_max_len, data.max_new_tokens, data.batch_size) == (
        "default",
        2048,
        32,
        4,
    )
    assert (data.temperature, data.top_p, data.seed, data.num_samples) == (0.0, 1.0, 0, None)
    assert cfg.ray.address is None and cfg.ray.namespace == "qwen2_5_vl"
    assert cfg.ray.placement_timeout_s == 120 and cfg.ray.num_cpus_per_worker == 1
    assert cfg.dist_env == {} and cfg.profile is False
    assert cfg.output_path == "outputs/results.jsonl"


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "model_path: /m\nworld_size: 8\nparallel_config:\n  tp_size: 2\n"
        "data_config:\n  batch_size: 2\ndist_env:\n  HCCL_CONNECT_TIMEOUT: 1200\n",
    )
    cfg = load_config(path, ["parallel_config.tp_size=4", "data_config.temperature=0.7", "ray.address=auto"])
    assert cfg.world_size == 8 and cfg.tp_size == 4 and cfg.dp_size == 2
    assert cfg.data_config.batch_size == 2 and cfg.data_config.temperature == pytest.approx(0.7)
    assert cfg.ray.address == "auto"
    assert cfg.dist_env == {"HCCL_CONNECT_TIMEOUT": "1200"}
    as_dict = cfg.to_dict()
    assert as_dict["parallel_config"] == {"tp_size": 4, "vision_mode": "dp"}
    assert as_dict["ray"]["address"] == "auto"


def test_relative_model_path_resolved_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["model_path=ckpt/m"]).model_path == str(tmp_path / "ckpt" / "m")


def test_tilde_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["model_path=~/models/x"])
    assert cfg.model_path == str(tmp_path / "models" / "x")


def test_shipped_configs_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    big = load_config(REPO / "conf" / "qwen2_5_vl_72b.yaml")
    assert (big.device, big.dtype, big.world_size, big.tp_size, big.dp_size) == ("npu", "bfloat16", 16, 8, 2)
    assert big.exe_mode == "graph" and big.parallel_config.vision_mode == "dp"
    assert big.data_config.dataset == "vision-arena-bench-v0.1"
    assert (big.data_config.batch_size, big.data_config.max_new_tokens, big.data_config.input_max_len) == (
        32,
        128,
        4096,
    )
    assert big.dist_env["HCCL_CONNECT_TIMEOUT"] == "1200"

    tiny = load_config(REPO / "conf" / "tiny_cpu.yaml")
    assert tiny.model_path == str(tmp_path / ".cache" / "qwen2_5_vl_ray" / "tiny-qwen2.5-vl")
    assert (tiny.device, tiny.dtype, tiny.world_size, tiny.tp_size, tiny.dp_size) == (
        "cpu",
        "float32",
        2,
        2,
        1,
    )
    assert tiny.output_path == "outputs/tiny_cpu/results.jsonl"
    assert (tiny.data_config.batch_size, tiny.data_config.max_new_tokens) == (4, 16)


def test_missing_model_path() -> None:
    with pytest.raises(ConfigError, match="model_path"):
        load_config(None)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "override, key",
    [
        ("worldsize=2", "worldsize"),
        ("parallel_config.tp_sz=2", "parallel_config.tp_sz"),
        ("ray.adress=x", "ray.adress"),
    ],
)
def test_unknown_key_in_override(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(None, ["model_path=/m", override])


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "model_path: /m\ndata_config:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match="'data_config.batchsize'"):
        load_config(path)
    path = _write(tmp_path, "model_path: /m\nnum_gpus: 3\n")
    with pytest.raises(ConfigError, match="'num_gpus'"):
        load_config(path)


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"world_size.*'abc'"):
        load_config(None, ["model_path=/m", "world_size=abc"])
    with pytest.raises(ConfigError, match=r"data_config\.batch_size.*'many'"):
        load_config(_write(tmp_path, "model_path: /m\ndata_config:\n  batch_size: many\n"))
    with pytest.raises(ConfigError, match="parallel_config"):
        load_config(None, ["model_path=/m", "parallel_config=3"])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (
            ["world_size=6", "parallel_config.tp_size=4"],
            r"parallel_config\.tp_size=4: must divide world_size=6",
        ),
        (
            ["world_size=2", "parallel_config.tp_size=4"],
            r"parallel_config\.tp_size=4: must be <= world_size=2",
        ),
        (["world_size=0"], r"world_size=0"),
        (["parallel_config.tp_size=0"], r"parallel_config\.tp_size=0"),
        (["device=tpu"], r"device='tpu': must be one of cpu, cuda, npu"),
        (["dtype=int8"], r"dtype='int8'"),
        (["exe_mode=ge_graph"], r"exe_mode='ge_graph'"),
        (["decode_attention=ring"], r"decode_attention='ring': must be one of paged, gather"),
        (["decode_attention=paged"], r"decode_attention='paged': needs the fused ops on npu"),
        (["device=npu", "fused_ops=false", "decode_attention=paged"], r"decode_attention='paged': needs the fused"),
        (["scheduler.max_decode_stall=-0.5"], r"scheduler\.max_decode_stall=-0\.5: must be >= 0"),
        (["scheduler.encoder_budget_tokens=0"], r"scheduler\.encoder_budget_tokens=0: must be >= 1"),
        (["scheduler.encoder_budget_tokens=lots"], r"scheduler\.encoder_budget_tokens.*'lots'"),
        (["parallel_config.vision_mode=pp"], r"parallel_config\.vision_mode='pp'"),
        (["data_config.dataset=prompts.csv"], r"data_config\.dataset='prompts\.csv'"),
        (["data_config.temperature=-0.1"], r"data_config\.temperature=-0\.1"),
        (["data_config.top_p=0"], r"data_config\.top_p=0\.0"),
        (["data_config.top_p=1.5"], r"data_config\.top_p=1\.5"),
        (["data_config.batch_size=0"], r"data_config\.batch_size=0"),
        (["data_config.num_samples=0"], r"data_config\.num_samples=0"),
        (["ray.placement_timeout_s=0"], r"ray\.placement_timeout_s=0"),
        (["ray.compiled_graphs=sometimes"], r"ray\.compiled_graphs='sometimes': must be null, true, false or 'auto'"),
        (["ray.phase_calls=zmq"], r"ray\.phase_calls='zmq': must be one of socket, compiled, ordinary"),
        (["ray.phase_calls=ordinary", "ray.compiled_graphs=true"], r"set ray\.phase_calls='ordinary' or this key"),
        (["dist_env.1BAD=x"], r"dist_env\.1BAD"),
        (["dist_env.HCCL.X=1"], r"dist_env\.HCCL"),
        (["serve.ingress=nginx"], r"serve\.ingress='nginx': must be one of auto, haproxy, proxy"),
        (["serve.allowed_local_media_path=media"], r"serve\.allowed_local_media_path='media': must be an existing"),
        (["serve.allowed_local_media_path=/no/such/dir"], r"serve\.allowed_local_media_path='/no/such/dir'"),
        (["serve.allowed_media_domains=[a.com,'http://b.com']"], r"serve\.allowed_media_domains\[1\]='http://b\.com'"),
        (["serve.media_read_timeout_s=0"], r"serve\.media_read_timeout_s=0\.0: must be > 0"),
        (["serve.max_request_bytes=0"], r"serve\.max_request_bytes=0: must be >= 1"),
        (["serve.max_media_redirects=-1"], r"serve\.max_media_redirects=-1"),
        (["serve.max_queued_requests=-1"], r"serve\.max_queued_requests=-1: must be >= 0"),
        (["serve.queue_timeout_s=0"], r"serve\.queue_timeout_s=0\.0: must be null or > 0"),
    ],
)
def test_bad_values(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, ["model_path=/m", *overrides])


@pytest.mark.parametrize(
    ("overrides", "calls"),
    [
        ([], "socket"),  # the default on every device
        (["device=npu"], "socket"),
        (["ray.phase_calls=compiled"], "compiled"),
        (["ray.phase_calls=ordinary"], "ordinary"),
        # the older switch, when set: "auto" is compiled graphs on an accelerator, ordinary calls on cpu
        (["ray.compiled_graphs=auto"], "ordinary"),
        (["device=npu", "ray.compiled_graphs=auto"], "compiled"),
        (["device=cuda", "ray.compiled_graphs=auto"], "compiled"),
        (["ray.compiled_graphs=true"], "compiled"),
        (["device=npu", "ray.compiled_graphs=false"], "ordinary"),
    ],
)
def test_phase_calls_and_the_older_switch(overrides: list[str], calls: str) -> None:
    cfg = load_config(None, ["model_path=/m", *overrides])
    assert engine_config(cfg).phase_calls == calls


def test_float16_rejected_on_cpu_only() -> None:
    with pytest.raises(ConfigError, match=r"dtype='float16'.*device='cpu'"):
        load_config(None, ["model_path=/m", "dtype=float16"])
    assert load_config(None, ["model_path=/m", "dtype=bfloat16"]).dtype == "bfloat16"
    assert load_config(None, ["model_path=/m", "device=npu", "dtype=float16"]).dtype == "float16"


def test_jsonl_dataset_and_nullable_fields() -> None:
    cfg = load_config(None, ["model_path=/m", "data_config.dataset=data/x.jsonl", "data_config.num_samples=5"])
    assert cfg.data_config.dataset == "data/x.jsonl" and cfg.data_config.num_samples == 5
    assert load_config(None, ["model_path=/m", "data_config.num_samples=null"]).data_config.num_samples is None


def test_cli_prints_yaml(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main([str(REPO / "conf" / "tiny_cpu.yaml"), "data_config.max_new_tokens=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data_config"]["max_new_tokens"] == 7
    assert printed["parallel_config"]["tp_size"] == 2
    assert main([str(REPO / "conf" / "tiny_cpu.yaml"), "world_size=abc"]) == 2
    assert "world_size" in capsys.readouterr().err


def test_serve_media_policy_is_normalized(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "model_path=/m",
            f"serve.allowed_local_media_path={tmp_path}",
            "serve.allowed_media_domains=[IMG.Example.com]",
        ],
    )
    assert cfg.serve.allowed_local_media_path == str(tmp_path.resolve())
    assert cfg.serve.allowed_media_domains == ["img.example.com"]
    assert load_config(None, ["model_path=/m"]).serve.allowed_media_domains is None


def test_max_decode_stall_reaches_the_engine_config_and_null_turns_the_cap_off() -> None:
    assert engine_config(load_config(None, ["model_path=/m", "scheduler.max_decode_stall=0.5"])).max_decode_stall == 0.5
    assert (
        engine_config(load_config(None, ["model_path=/m", "scheduler.max_decode_stall=null"])).max_decode_stall is None
    )


def test_encoder_budget_reaches_the_engine_config_and_null_lifts_it() -> None:
    assert engine_config(load_config(None, ["model_path=/m"])).encoder_budget_tokens == 2048
    tokens = engine_config(load_config(None, ["model_path=/m", "scheduler.encoder_budget_tokens=300"]))
    assert tokens.encoder_budget_tokens == 300
    unbounded = engine_config(load_config(None, ["model_path=/m", "scheduler.encoder_budget_tokens=null"]))
    assert unbounded.encoder_budget_tokens is None


@pytest.mark.parametrize(("tp", "dtype"), [(1, "float32"), (2, "float32"), (2, "bfloat16"), (4, "float32")])
def test_kv_cache_memory_gb_sizes_the_pool_the_workers_allocate(tiny_checkpoint: Path, tp: int, dtype: str) -> None:
    """kv_cache.memory_gb becomes the most blocks whose keys and values, as a rank's runner allocates them
    (tp 2 holds half the checkpoint's 2 KV heads per rank; tp 4 replicates one), fit in that many GiB."""
    from model.parallel import ParallelContext
    from model.runner import ModelRunner

    memory_gb = 0.002
    overrides = [f"model_path={tiny_checkpoint}", f"world_size={tp}", f"parallel_config.tp_size={tp}"]
    cfg = load_config(None, [*overrides, f"dtype={dtype}", "kv_cache.block_size=8", f"kv_cache.memory_gb={memory_gb}"])
    blocks, block_size = engine_config(cfg).worker.kv_pool()
    assert block_size == 8
    runner = ModelRunner(
        tiny_checkpoint, ParallelContext(0, tp), dtype=dtype, max_seq_len=64, num_kv_blocks=blocks, kv_block_size=8
    )
    pool = sum(t.nbytes for t in runner.cache.keys + runner.cache.values)
    assert runner.cache.num_blocks == blocks
    assert pool <= memory_gb * 2**30 < pool + pool // blocks, (blocks, pool)


def test_kv_cache_num_blocks_wins_and_a_pool_under_two_blocks_is_refused(tiny_checkpoint: Path) -> None:
    base = [f"model_path={tiny_checkpoint}", "world_size=1", "parallel_config.tp_size=1", "kv_cache.block_size=8"]
    both = engine_config(load_config(None, [*base, "kv_cache.num_blocks=7", "kv_cache.memory_gb=1"]))
    assert both.worker.kv_pool() == (7, 8)
    default = engine_config(load_config(None, [*base, "data_config.batch_size=3", "data_config.input_max_len=30"]))
    assert default.worker.num_kv_blocks is None  # sized for batch_size sequences of max_seq_len
    with pytest.raises(ConfigError, match=r"kv_cache.memory_gb=1e-06: holds 0 KV blocks of \d+ bytes; at least 2"):
        engine_config(load_config(None, [*base, "kv_cache.memory_gb=0.000001"]))
