"""Run configuration: a structured omegaconf schema loaded from YAML plus ``key=value`` overrides.

Every key is declared here; an unknown key, a value of the wrong type or a value out of range fails
at load time with a :class:`ConfigError` naming the full dotted key and the offending value.

Usage::

    python -m cluster.config conf/tiny_cpu.yaml parallel_config.tp_size=1 world_size=1
"""

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from actors.config import PHASE_CALLS
from actors.steps_per_call import AUTO
from cluster.generation_config import GENERATION_CONFIG_MODES, apply_generation_config, explicit_keys
from cluster.speculative_config import SpeculativeSection, speculative_config
from model.device import DTYPES as TORCH_DTYPES
from model.npu_ops import DECODE_ATTENTION
from model.quant import QUANTIZATION_MODES
from model.sampling import MAX_REPETITION_PENALTY

DEVICES = ("cpu", "cuda", "npu")
DTYPES = tuple(TORCH_DTYPES)
EXE_MODES = ("eager", "graph")
VISION_MODES = ("tp", "dp")
KNOWN_DATASETS = ("default", "vision-arena-bench-v0.1")
DATASET_FILE_SUFFIXES = (".jsonl", ".json")
POLICIES = ("continuous", "static")
SERVE_INGRESSES = ("auto", "haproxy", "proxy")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the dotted key and the value."""


@dataclass
class ParallelConfig:
    """How the model is split across workers.

    tp_size: tensor-parallel degree of the language model; ranks of one TP group share a node.
    vision_mode: "dp" runs the whole vision tower on every rank of a TP group, each rank encoding
        a share of the images; "tp" shards the vision tower like the language model.
    """

    tp_size: int = 1
    vision_mode: str = "dp"


@dataclass
class DataConfig:
    """Which requests to run and how to sample them.

    dataset: "default" (built-in prompts), "vision-arena-bench-v0.1" (read from dataset_dir), or
        a path to a .jsonl file of requests (or a .json file holding an array of them).
    dataset_dir: where vision-arena-bench-v0.1 lives; when left at the default and that folder does
        not exist, dataset/vision_arena_bench (the original sample's layout).
    num_samples: how many requests to take from the dataset (None = all).
    input_max_len: longest prompt in tokens, image tokens included.
    max_new_tokens: tokens generated per request.
    temperature: 0 means greedy decoding. temperature, top_p, top_k (0: all tokens) and
        repetition_penalty are the defaults of requests that do not set them; those the user leaves
        unset come from the checkpoint's generation_config.json (see RunConfig.generation_config).
    batch_size: the most requests running at once per DP group (KV memory is set by kv_cache).
    max_images_per_prompt: a request with more images than this gets an error record.
    max_videos_per_prompt: a request with more videos than this gets an error record.
    ignore_eos: keep generating past the end-of-sequence token up to max_new_tokens.
    request_rate: arrivals per second for `cluster.launch` (Poisson, seeded by `seed`); inf sends
        every request at once.
    """

    dataset: str = "default"
    dataset_dir: str = "dataset/vision-arena-bench-v0.1"
    num_samples: int | None = None
    input_max_len: int = 2048
    max_new_tokens: int = 32
    batch_size: int = 4
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    max_images_per_prompt: int = 8
    max_videos_per_prompt: int = 2
    ignore_eos: bool = False
    request_rate: float = float("inf")


@dataclass
class SchedulerConfig:
    """How the Coordinator schedules the phases on each DP group.

    policy: "continuous" admits waiting requests whenever KV blocks and batch_size allow;
        "static" runs batches of batch_size to completion, one batch per group at a time.
    prefill_chunk_tokens: the token budget of one round: decode tokens of the running requests
        plus prompt chunks, computed in one forward; longer prompts are split over rounds.
    decode_steps_per_call: pure-decode steps per call to the workers: an integer, or "auto" (with
        async_scheduling one, so every token streams as it is made; without, as many as keep
        orchestration under 2% of a call, from each group's measured step time and per-call overhead;
        actors/steps_per_call.py). Waiting requests are admitted between calls.
    max_decode_call_ms: with "auto" and no async_scheduling, the longest a pure-decode call may run:
        the bound on how long a request that arrives mid-call waits to be admitted.
    async_scheduling: plan and start each group's next step call while a pure-decode call still runs
        (the workers keep the sampled tokens, so the plan needs only their count): the Coordinator's
        round and the call's Ray cost overlap the device step, and the workers go from one call to the
        next without waiting for it. false: each call returns before the next is planned.
    max_decode_stall: how much longer than a pure-decode step a round that carries decode rows may
        take because of its prompt chunks (0.5: at most 1.5x a step); the prompt tokens of such a
        round are capped from the measured step times (at least one KV block per round, never more than
        prefill_chunk_tokens). null: no cap, prompts take the whole budget.
    encoder_budget_tokens: the vision encode of one round, in image-pad tokens (merged patches, as
        vLLM's max_num_encoder_input_tokens counts them): the images of newly admitted requests, and a
        video's temporal slices, are encoded over as many rounds as the budget needs (at least one image
        or slice a round), decoding requests getting their step in each. null: every admitted request's
        images are encoded before the round's step, however many.
    """

    policy: str = "continuous"
    prefill_chunk_tokens: int = 2048
    decode_steps_per_call: Union[int, str] = "auto"  # noqa: UP007 (omegaconf reads typing.Union, not `|`)
    max_decode_call_ms: float = 500.0
    async_scheduling: bool = True
    max_decode_stall: float | None = 0.5
    encoder_budget_tokens: int | None = 2048


@dataclass
class KVCacheConfig:
    """The paged KV cache of each rank: a pool of fixed-size blocks shared by a DP group's requests.

    block_size: tokens per block; null takes the device's default (npu 128, what its paged attention
        kernel is used with; cuda and cpu 16).
    num_blocks: blocks in the pool (one of them reserved as the null block); null sizes it by
        memory_gb, or, with both null, to hold batch_size sequences of input_max_len +
        max_new_tokens (the memory of one worst-case slot per running request).
    memory_gb: the pool's size per rank in GiB (keys and values of every layer of that rank),
        turned into a block count; ignored when num_blocks is set.
    """

    block_size: int | None = None
    num_blocks: int | None = None
    memory_gb: float | None = None


@dataclass
class ServeConfig:
    """The OpenAI-compatible HTTP server (`python -m cluster.serve`).

    host, port: where the server listens.
    api_key: when set, requests must carry `Authorization: Bearer <api_key>`.
    model_name: the model id clients use (default: the checkpoint directory's name).
    ingress: what receives the HTTP requests: "haproxy" (Serve's HAProxy ingress, which forwards
        each connection straight to the replica's own HTTP server), "proxy" (Serve's Python HTTP
        proxy, which relays every request and streamed chunk through Ray calls) or "auto" (haproxy
        where its binary is installed, else proxy).
    allowed_local_media_path: a directory: image parts given as a local path or file:// URL must be
        absolute and resolve (symlinks followed) inside it, else 400. null (default): no local paths
        nor file:// URLs at all (400). Datasets run by cluster.launch read local images regardless.
    allowed_media_domains: host names that http(s) image URLs may point at, on every redirect hop,
        else 400; null: any public host.
    allow_private_media_urls: let image URLs reach loopback, private, link-local, multicast and
        other non-public addresses (default false: refused with 400 before any connection; see
        docs/SECURITY.md).
    media_connect_timeout_s, media_read_timeout_s: bounds on each fetch hop's connect and on its
        whole answer (a source that sends slower is cut, 400).
    max_media_bytes: largest image body fetched (400 beyond); max_media_redirects: most redirects
        followed for one image URL, each hop checked again.
    max_request_bytes: largest request body (413 before it is parsed); sized for a few large
        base64 images.
    max_request_pixels: total width x height of a request's images, read from their headers (400).
    max_queued_requests: chat requests that may wait beyond those the engine runs
        (data_config.batch_size per DP group); more get 503 with Retry-After: retry_after_s.
    queue_timeout_s: a request that gets no token within this many seconds is dropped with 503
        (a stream gets the error as its last event); null: no limit.
    max_video_bytes: largest video fetched or read (400 beyond); max_video_seconds: longest video
        accepted (400 beyond). They bound cluster.launch's videos too.
    grammar_cache_size: distinct structured-output grammars whose check is kept (actors/grammars.py);
        these two keys hold for request files run by cluster.launch too.
    grammar_compile_timeout_s: a grammar not checked within this many seconds is refused (400).
    max_n: the most choices (`n`) one chat request may ask for (400 naming `n` beyond); the engine also
        refuses more than data_config.batch_size, the sequences a DP group runs at once.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    ingress: str = "auto"
    allowed_local_media_path: str | None = None
    allowed_media_domains: list[str] | None = None
    allow_private_media_urls: bool = False
    media_connect_timeout_s: float = 5.0
    media_read_timeout_s: float = 10.0
    max_media_bytes: int = 32 * 1024 * 1024
    max_media_redirects: int = 3
    max_request_bytes: int = 64 * 1024 * 1024
    max_request_pixels: int = 100_000_000
    max_queued_requests: int = 256
    queue_timeout_s: float | None = None
    retry_after_s: float = 5.0
    max_video_bytes: int = 256 * 1024 * 1024
    max_video_seconds: float = 3600.0
    grammar_cache_size: int = 256
    grammar_compile_timeout_s: float = 10.0
    max_n: int = 8


@dataclass
class RayConfig:
    """How the driver reaches Ray and how long it waits for it.

    address: None connects to an existing cluster when RAY_ADDRESS is set or one is running and
        starts a local one otherwise; "auto" must connect to an existing cluster; "local" always
        starts a new local cluster; anything else is passed to ``ray.init(address=...)``.
    placement_timeout_s: how long to wait for placement groups before failing.
    rendezvous_timeout_s: how long workers wait for the process group to form.
    worker_timeout_s: bound on each phase call to the workers (load, prefill, decode, ...).
    max_group_restarts: how many times a DP group whose worker died is rebuilt in the background.
    group_coordinators: one Coordinator actor per DP group, behind the named `coordinator`, which
        then only routes (actors/router.py): the per-token work spreads over a process per group.
        For many DP groups at high token rates; waiting requests of a failed group then wait for its
        rebuild instead of moving to another group.
    phase_calls: how each DP group's calls (load, warm-up, encode, step, ...) reach its workers.
        "socket" (the default): one TCP connection per worker, opened with a token the worker hands out
        through an ordinary Ray call; a blocked read costs no CPU while the group is idle, and a call costs
        about a tenth of an ordinary actor call (actors/socket_group.py; docs/architecture.md, "Phase
        calls"). "compiled": one Ray Compiled Graph per group (a beta Ray API); Ray's channels poll,
        so every worker's graph loop and a reader thread in the Coordinator keep a core busy for as long
        as the graph lives. "ordinary": an ordinary Ray actor call per worker and call.
    compiled_graphs: the older switch for the same choice, honoured when set (null: not set): true is
        phase_calls "compiled", false is "ordinary", "auto" is "compiled" on npu and cuda and "ordinary"
        on cpu. Set one of the two keys, not both.
    num_cpus_per_worker: CPUs each worker holds; on npu/cuda a worker also holds one accelerator.
    log_to_driver: forward worker logs to the driver's output.
    """

    address: str | None = None
    namespace: str = "qwen2_5_vl"
    placement_timeout_s: float = 120.0
    rendezvous_timeout_s: float = 300.0
    worker_timeout_s: float = 600.0
    max_group_restarts: int = 3
    group_coordinators: bool = False
    phase_calls: str = "socket"
    compiled_graphs: Optional[Union[bool, str]] = None  # noqa: UP007, UP045 (omegaconf reads typing.Union, not `|`)
    num_cpus_per_worker: float = 1.0
    log_to_driver: bool = True


@dataclass
class RunConfig:
    """One inference run.

    model_path: checkpoint directory (``~`` expanded, relative paths resolved against the
        current directory at load time).
    device: cpu | cuda | npu.
    dtype: float32 | bfloat16 | float16 (float16 is not allowed on cpu).
    world_size: number of workers; a multiple of parallel_config.tp_size.
    exe_mode: "eager", or "graph" to run decode as a captured/compiled graph.
    dist_env: environment variables set in every worker (HCCL_SOCKET_IFNAME, HCCL_IF_IP,
        HCCL_CONNECT_TIMEOUT, GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, ...).
    profile: write a torch profiler trace per worker for one batch into profile_dir.
    vision_cache_mb: bytes (in MiB) of image embeddings each DP group keeps to reuse for an image
        sent again; 0 turns the cache off.
    prefix_caching: keep the KV blocks of finished requests, keyed by their tokens and the images
        behind them, and reuse the longest cached prefix of a new request instead of computing it.
    kv_cache: the paged KV pool (KVCacheConfig).
    fused_ops: use the device's fused kernels (RMSNorm, rotary, SwiGLU, decode attention); null
        takes the device table's default (on for npu, off elsewhere).
    decode_attention: how decode attention reads the paged KV cache with the fused ops: "paged" (null,
        the default) hands npu_fused_infer_attention_score the block tables and each row's KV length;
        "paged_mask" makes the same call as vllm-ascend's decode does (sparse_mode 3, its 2048 x 2048 mask);
        "gather" copies the live blocks into a contiguous tensor first (the way back if a CANN release
        refuses the paged call; docs/npu.md). "paged" and "paged_mask" need the fused ops (npu).
    quantization: "auto" loads a quantized checkpoint (one with msmodelslim's
        quant_model_description.json: W8A8 / W8A8_DYNAMIC int8 layers) as it describes; "none"
        refuses one, an error naming this key. Float checkpoints load the same under both.
    resume: skip requests whose ids already have a successful record in output_path.
    resume_failed: with resume, run again the requests whose earlier record failed.
    interrupt_grace_s: on Ctrl-C or SIGTERM, how long running requests may finish before they are
        aborted.
    generation_config: "auto" takes the sampling defaults the user did not set from the checkpoint's
        generation_config.json (cluster/generation_config.py); "none" ignores it.
    speculative: speculative decoding, off by default (cluster/speculative_config.py).
    """

    model_path: str = MISSING
    device: str = "cpu"
    dtype: str = "float32"
    world_size: int = 1
    exe_mode: str = "eager"
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    data_config: DataConfig = field(default_factory=DataConfig)
    output_path: str = "outputs/results.jsonl"
    ray: RayConfig = field(default_factory=RayConfig)
    dist_env: dict[str, str] = field(default_factory=dict)
    profile: bool = False
    profile_dir: str = "outputs/profile"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    vision_cache_mb: int = 512
    prefix_caching: bool = True
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    fused_ops: bool | None = None
    decode_attention: str | None = None
    quantization: str = "auto"
    resume: bool = False
    resume_failed: bool = True
    interrupt_grace_s: float = 30.0
    generation_config: str = "auto"
    speculative: SpeculativeSection = field(default_factory=SpeculativeSection)

    @property
    def tp_size(self) -> int:
        """Tensor-parallel degree (``parallel_config.tp_size``)."""
        return self.parallel_config.tp_size

    @property
    def dp_size(self) -> int:
        """Number of data-parallel groups: ``world_size // tp_size``."""
        return self.world_size // self.parallel_config.tp_size

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain nested dicts (what the YAML would hold)."""
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config: schema defaults, then the YAML file at ``path`` (if any), then ``overrides``.

    Overrides are omegaconf dotlist entries such as ``parallel_config.tp_size=2``.
    Raises :class:`ConfigError` for a missing file, unknown keys, bad types and bad values.
    """
    merged: DictConfig = OmegaConf.structured(RunConfig)
    if path is not None:
        merged = _merge_yaml(merged, Path(path))
    for item in overrides or []:
        merged = _merge_override(merged, item)
    try:
        cfg = OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is required but not set") from e
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e, None)) from e
    assert isinstance(cfg, RunConfig)
    _normalize_paths(cfg)
    _check_choice("generation_config", cfg.generation_config, GENERATION_CONFIG_MODES)
    apply_generation_config(cfg, explicit_keys(path, overrides))
    _validate(cfg)
    return cfg


def phase_calls(cfg: RunConfig) -> str:
    """How the DP groups' calls reach their workers: `ray.phase_calls`, unless the older `ray.compiled_graphs`
    is set (see RayConfig)."""
    setting = cfg.ray.compiled_graphs
    if setting is None:
        return cfg.ray.phase_calls
    compiled = setting if isinstance(setting, bool) else cfg.device != "cpu"
    return "compiled" if compiled else "ordinary"


def _describe(e: OmegaConfBaseException, fallback_key: str | None) -> str:
    key = getattr(e, "full_key", None) or fallback_key
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, ConfigKeyError):
        return f"unknown config key '{key}': {reason}"
    return f"bad value for config key '{key}': {reason}" if key else f"bad config: {reason}"


def _merge_yaml(base: DictConfig, path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from e
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    for key in loaded:
        try:
            base = OmegaConf.merge(base, OmegaConf.masked_copy(loaded, [str(key)]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{_describe(e, str(key))} (in {path})") from e
    return base


def _merge_override(base: DictConfig, item: str) -> DictConfig:
    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.merge(base, OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{_describe(e, key.strip())} (override '{item}')") from e


def _normalize_paths(cfg: RunConfig) -> None:
    cfg.model_path = str(Path(cfg.model_path).expanduser().resolve())
    data = cfg.data_config
    if data.dataset.endswith(DATASET_FILE_SUFFIXES):
        data.dataset = str(Path(data.dataset).expanduser())
    data.dataset_dir = str(Path(data.dataset_dir).expanduser())
    cfg.output_path = str(Path(cfg.output_path).expanduser())
    cfg.profile_dir = str(Path(cfg.profile_dir).expanduser())


def _fail(key: str, value: object, why: str) -> None:
    raise ConfigError(f"{key}={value!r}: {why}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, f"must be one of {', '.join(choices)}")


def _check_min(key: str, value: float, lowest: float) -> None:
    if value < lowest:
        _fail(key, value, f"must be >= {lowest}")


def _validate(cfg: RunConfig) -> None:
    if not cfg.model_path:
        _fail("model_path", cfg.model_path, "must not be empty")
    _check_choice("device", cfg.device, DEVICES)
    _check_choice("dtype", cfg.dtype, DTYPES)
    _check_choice("quantization", cfg.quantization, QUANTIZATION_MODES)
    if cfg.device == "cpu" and cfg.dtype == "float16":
        _fail("dtype", cfg.dtype, "float16 is not supported with device='cpu'; use float32 or bfloat16")
    _check_choice("exe_mode", cfg.exe_mode, EXE_MODES)
    if cfg.decode_attention is not None:
        _check_choice("decode_attention", cfg.decode_attention, DECODE_ATTENTION)
        if cfg.decode_attention in ("paged", "paged_mask") and (cfg.device != "npu" or cfg.fused_ops is False):
            _fail("decode_attention", cfg.decode_attention, "needs the fused ops on npu (fused_ops not false)")

    par = cfg.parallel_config
    _check_min("world_size", cfg.world_size, 1)
    _check_min("parallel_config.tp_size", par.tp_size, 1)
    if par.tp_size > cfg.world_size:
        _fail("parallel_config.tp_size", par.tp_size, f"must be <= world_size={cfg.world_size}")
    if cfg.world_size % par.tp_size:
        _fail("parallel_config.tp_size", par.tp_size, f"must divide world_size={cfg.world_size}")
    _check_choice("parallel_config.vision_mode", par.vision_mode, VISION_MODES)

    data = cfg.data_config
    if data.dataset not in KNOWN_DATASETS and not data.dataset.endswith(DATASET_FILE_SUFFIXES):
        _fail(
            "data_config.dataset",
            data.dataset,
            f"must be one of {', '.join(KNOWN_DATASETS)} or a path to a .jsonl or .json file",
        )
    if data.num_samples is not None:
        _check_min("data_config.num_samples", data.num_samples, 1)
    for name in ("input_max_len", "max_new_tokens", "batch_size"):
        _check_min(f"data_config.{name}", getattr(data, name), 1)
    _check_min("data_config.max_images_per_prompt", data.max_images_per_prompt, 0)
    _check_min("data_config.max_videos_per_prompt", data.max_videos_per_prompt, 0)
    _check_min("data_config.seed", data.seed, 0)
    _check_min("data_config.temperature", data.temperature, 0.0)
    _check_min("data_config.top_k", data.top_k, -1)
    if not 0.0 < data.repetition_penalty <= MAX_REPETITION_PENALTY:
        _fail("data_config.repetition_penalty", data.repetition_penalty, f"must be in (0, {MAX_REPETITION_PENALTY:g}]")
    if not data.request_rate > 0:
        _fail("data_config.request_rate", data.request_rate, "must be > 0 (inf sends every request at once)")

    sched = cfg.scheduler
    _check_choice("scheduler.policy", sched.policy, POLICIES)
    _check_min("scheduler.prefill_chunk_tokens", sched.prefill_chunk_tokens, 1)
    steps = sched.decode_steps_per_call
    if steps != AUTO:
        if isinstance(steps, str):
            _fail("scheduler.decode_steps_per_call", steps, f"must be an integer >= 1 or {AUTO!r}")
        _check_min("scheduler.decode_steps_per_call", steps, 1)
    if not sched.max_decode_call_ms > 0:
        _fail("scheduler.max_decode_call_ms", sched.max_decode_call_ms, "must be > 0")
    if sched.max_decode_stall is not None:
        _check_min("scheduler.max_decode_stall", sched.max_decode_stall, 0.0)
    if sched.encoder_budget_tokens is not None:
        _check_min("scheduler.encoder_budget_tokens", sched.encoder_budget_tokens, 1)

    kv = cfg.kv_cache
    if kv.block_size is not None and not 1 <= kv.block_size <= 1024:
        _fail("kv_cache.block_size", kv.block_size, "must be null or in 1..1024")
    if kv.num_blocks is not None:
        _check_min("kv_cache.num_blocks", kv.num_blocks, 2)
    if kv.memory_gb is not None and not kv.memory_gb > 0:
        _fail("kv_cache.memory_gb", kv.memory_gb, "must be null or > 0")

    serve = cfg.serve
    if not serve.host:
        _fail("serve.host", serve.host, "must not be empty")
    if not 0 < serve.port < 65536:
        _fail("serve.port", serve.port, "must be in 1..65535")
    if serve.api_key is not None and not serve.api_key:
        _fail("serve.api_key", serve.api_key, "must be null or a non-empty string")
    _check_choice("serve.ingress", serve.ingress, SERVE_INGRESSES)
    if serve.allowed_local_media_path is not None:
        media_dir = Path(serve.allowed_local_media_path).expanduser()
        if not media_dir.is_absolute() or not media_dir.is_dir():
            why = "must be an existing absolute directory"
            _fail("serve.allowed_local_media_path", serve.allowed_local_media_path, why)
        serve.allowed_local_media_path = str(media_dir.resolve())
    if serve.allowed_media_domains is not None:
        for i, domain in enumerate(serve.allowed_media_domains):
            if not domain or "/" in domain or ":" in domain:
                _fail(f"serve.allowed_media_domains[{i}]", domain, "must be a host name such as images.example.com")
        serve.allowed_media_domains = [d.lower() for d in serve.allowed_media_domains]
    for name in ("media_connect_timeout_s", "media_read_timeout_s", "retry_after_s"):
        if not getattr(serve, name) > 0:
            _fail(f"serve.{name}", getattr(serve, name), "must be > 0")
    for name in ("max_media_bytes", "max_request_bytes", "max_request_pixels", "max_video_bytes"):
        _check_min(f"serve.{name}", getattr(serve, name), 1)
    if not serve.max_video_seconds > 0:
        _fail("serve.max_video_seconds", serve.max_video_seconds, "must be > 0")
    _check_min("serve.max_media_redirects", serve.max_media_redirects, 0)
    _check_min("serve.max_queued_requests", serve.max_queued_requests, 0)
    _check_min("serve.grammar_cache_size", serve.grammar_cache_size, 1)
    _check_min("serve.max_n", serve.max_n, 1)
    if not serve.grammar_compile_timeout_s > 0:
        _fail("serve.grammar_compile_timeout_s", serve.grammar_compile_timeout_s, "must be > 0")
    if serve.queue_timeout_s is not None and not serve.queue_timeout_s > 0:
        _fail("serve.queue_timeout_s", serve.queue_timeout_s, "must be null or > 0")
    _check_min("vision_cache_mb", cfg.vision_cache_mb, 0)
    _check_min("interrupt_grace_s", cfg.interrupt_grace_s, 0.0)
    if not 0.0 < data.top_p <= 1.0:
        _fail("data_config.top_p", data.top_p, "must be in (0, 1]")

    ray_cfg = cfg.ray
    if ray_cfg.address is not None and not ray_cfg.address.strip():
        _fail("ray.address", ray_cfg.address, "must be null, 'auto', 'local' or a cluster address")
    if not ray_cfg.namespace:
        _fail("ray.namespace", ray_cfg.namespace, "must not be empty")
    for name in ("placement_timeout_s", "rendezvous_timeout_s", "worker_timeout_s"):
        value = getattr(ray_cfg, name)
        if value <= 0:
            _fail(f"ray.{name}", value, "must be > 0")
    _check_min("ray.max_group_restarts", ray_cfg.max_group_restarts, 0)
    _check_choice("ray.phase_calls", ray_cfg.phase_calls, PHASE_CALLS)
    setting = ray_cfg.compiled_graphs
    if setting is not None and not isinstance(setting, bool) and setting != AUTO:
        _fail("ray.compiled_graphs", setting, f"must be null, true, false or {AUTO!r}")
    if setting is not None and ray_cfg.phase_calls != RayConfig.phase_calls:
        _fail("ray.compiled_graphs", setting, f"set ray.phase_calls={ray_cfg.phase_calls!r} or this key, not both")
    if cfg.device == "cpu" and ray_cfg.num_cpus_per_worker <= 0:
        _fail("ray.num_cpus_per_worker", ray_cfg.num_cpus_per_worker, "must be > 0 on device 'cpu'")
    _check_min("ray.num_cpus_per_worker", ray_cfg.num_cpus_per_worker, 0.0)

    try:
        speculative_config(cfg.speculative, cfg.model_path, par.tp_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e

    for name, value in cfg.dist_env.items():
        if not _ENV_NAME.match(name):
            _fail(f"dist_env.{name}", value, "key is not a valid environment variable name")
        if not isinstance(value, str):
            _fail(f"dist_env.{name}", value, "value must be a string")


def main(argv: list[str] | None = None) -> int:
    """Print the resolved config for ``CONF [key=value ...]`` as YAML; exit status 2 on a bad config."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m cluster.config CONF [key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args[0], args[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict())), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
