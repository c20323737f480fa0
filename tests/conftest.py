"""The test suite's fixtures and its two lanes.

Fixtures: tiny checkpoints, generated images, prompts, a cached transformers reference, and a
private local Ray cluster per module. Checkpoints are built once per session into a temporary
directory; transformers' reference model of each is loaded once and its outputs memoized
(tests/reference.py).

Lanes: every test that starts Ray, a subprocess or a multi-process group is marked
``integration`` at collection (see :func:`pytest_collection_modifyitems`), and the slowest of them
(SLOW_TESTS: restarts, kills and a second server, half a minute or more each) also ``slow``. ``make test-fast``
runs ``pytest -m "not integration"``, ``make test`` runs ``-m "not slow"``, ``make test-slow`` the
slow ones and ``make test-all`` everything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster.tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint, preset
from model.processor import PreparedRequest, PromptBuilder
from tests.reference import HFReference

# Modules whose every test starts Ray, subprocesses or a multi-process group.
INTEGRATION_MODULES = frozenset(
    {
        "test_bench",
        "test_e2e",
        "test_job_submit",
        "test_launch_errors",
        "test_launch_run",
        "test_metrics",
        "test_reliability",
        "test_results_launch",
        "test_selfcheck",
        "test_tensor_parallel",
        "test_topology",
    }
)
# Tests that do so inside otherwise fast modules: "<module file>::<test, class or test[param]>".
INTEGRATION_TESTS = frozenset(
    {
        "test_graph.py::test_graph_matches_eager_tp2",
        "test_loader.py::test_tp2_rank_loads_about_half_the_memory",
        "test_placement.py::TestLocalRay",
        "test_placement.py::test_two_node_cluster_keeps_tp_groups_on_one_node",
    }
)
# The slowest integration tests (each restarts engines or kills processes for 25-75 s on 2 cores, runs a
# benchmark tool, or a whole first-use path: quantize then launch, the 72B preset on a cluster without
# torch_npu), kept out of `make test` so that it stays within its time budget; `make test-slow` runs them.
SLOW_TESTS = frozenset(
    {
        "test_selfcheck.py::test_selfcheck_cpu_passes",
        "test_speculative.py::test_sampling_keeps_each_position_distribution",
        "test_reliability.py::test_keyboard_interrupt_releases_everything_and_start_works_again",
        "test_reliability.py::test_worker_killed_mid_decode_then_rebuild",
        "test_job_submit.py::test_job_with_overrides",
        "test_serve_proxy.py::test_auto_falls_back_to_the_python_proxy",
        "test_quant_launch.py::test_quantize_then_launch_serves_every_request",
        "test_preflight_ray.py::test_72b_preset_without_torch_npu_stops_at_the_preflight",
        # Kills of a worker or a driver mid-run (the faster restart and signal tests stay in `make test`).
        "test_reliability.py::test_launch_records_every_request_when_a_worker_dies",
        "test_results_launch.py::test_a_killed_driver_keeps_its_records_and_a_resume_completes_them",
        # The benchmark tools' own runs (a quick decode benchmark, the vision benchmark's two engines).
        "test_bench.py::test_every_engine_and_field",
        "test_bench.py::test_ratios_come_from_measured_values",
        "test_vision_bench.py::test_bench_runs_both_engines_and_prints_one_json_line",
        # A second server with the safe defaults (its own engine), and four engines of the prefix-cache module.
        "test_serve_limits.py::test_local_files_are_refused_by_default",
        "test_serve_limits.py::test_loopback_urls_are_refused_before_any_connection",
        "test_serve_limits.py::test_a_body_over_the_limit_is_refused_before_it_is_read",
        "test_serve_limits.py::test_a_full_queue_answers_503_while_queued_requests_complete",
        "test_prefix_cache.py::test_greedy_tokens_are_identical_with_caching_on_and_off_and_match_transformers",
        "test_prefix_cache.py::test_cached_tokens_show_where_the_prefix_cache_hit",
        "test_prefix_cache.py::test_a_run_forced_to_preempt_gives_the_same_tokens",
        "test_prefix_cache.py::test_no_block_leaks_after_hundreds_of_random_requests",
        "test_prefix_cache.py::test_a_request_that_could_never_fit_fails_at_submit",
    }
)
# Modules split test by test above; any module in neither list is integration as a whole when its
# source starts Ray or processes, so that a new module cannot slip a Ray cluster into the fast lane.
SPLIT_MODULES = frozenset(entry.split(".py::")[0] for entry in INTEGRATION_TESTS)
STARTS_PROCESSES = re.compile(
    r"ray\.init|init_local_ray|local_ray|cluster_utils|serve\.run|subprocess|multiprocessing|mp\.spawn"
)


def _starts_processes(path: Path, cache: dict[Path, bool]) -> bool:
    if path not in cache:
        cache[path] = bool(STARTS_PROCESSES.search(path.read_text(encoding="utf-8")))
    return cache[path]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark as ``integration`` every test that starts Ray, subprocesses or process groups, and as
    ``slow`` those in SLOW_TESTS."""
    scanned: dict[Path, bool] = {}
    for item in items:
        module = item.path.stem
        local_id = f"{item.path.name}::{item.nodeid.split('::', 1)[-1]}"
        if module in INTEGRATION_MODULES or "local_ray" in getattr(item, "fixturenames", ()):
            integration = True
        elif module in SPLIT_MODULES:
            integration = any(local_id == t or local_id.startswith((t + "::", t + "[")) for t in INTEGRATION_TESTS)
        else:
            integration = _starts_processes(item.path, scanned)
        if integration:
            item.add_marker(pytest.mark.integration)
        if any(local_id == t or local_id.startswith(t + "[") for t in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


# Checkpoints by name: the shapes are cluster.tools.tiny_checkpoint's presets ("odd" and "tp_odd" differ
# from the default on every axis that can vary), and two layouts of the default.
CHECKPOINT_SPECS: dict[str, TinySpec] = {
    "default": preset("default"),
    "sharded": preset("default", num_shards=3),
    "transformers5": preset("default", layout="transformers5"),
    "odd": preset("odd"),
    "tp_odd": preset("tp_odd"),
}

# Test images by name: (width, height). "small" is below min_pixels and gets scaled up; "large"
# is above max_pixels and gets scaled down; none is a multiple of the 112-pixel window.
IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "wide": (150, 100),
    "tall": (90, 200),
    "small": (40, 30),
    "large": (330, 250),
}

# Requests by name: prompt text and image names.
PROMPTS: dict[str, tuple[str, list[str]]] = {
    "text": ("Hello there, tell me a story.", []),
    "text_long": (
        "Describe the weather today and tomorrow, then summarize the report and explain "
        "why the team decided to change the design of the model.",
        [],
    ),
    "one_image": ("What is in this photo?", ["wide"]),
    "small_image": ("Describe the image in detail.", ["small"]),
    "two_images": ("Compare the first image and the second image.", ["tall", "large"]),
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """checkpoint(name) -> path of the tiny checkpoint CHECKPOINT_SPECS[name], built on first use."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_tiny_checkpoint(root / name, CHECKPOINT_SPECS[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint: Callable[[str], Path]) -> Path:
    """The default tiny checkpoint."""
    return checkpoint("default")


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seeded random RGB images of different sizes, saved as PNG: name -> path."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (width, height) in IMAGE_SIZES.items():
        # Smooth gradients plus noise, so the vision tower sees structure as well as texture.
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        paths[name] = root / f"{name}.png"
        Image.fromarray(pixels).save(paths[name])
    return paths


@pytest.fixture(scope="session")
def raw_requests(sample_images: dict[str, Path]) -> dict[str, dict]:
    """PROMPTS as engine request dicts ``{"id", "prompt", "images"}``: name -> request."""
    return {
        name: {"id": name, "prompt": prompt, "images": [str(sample_images[i]) for i in images]}
        for name, (prompt, images) in PROMPTS.items()
    }


@pytest.fixture(scope="session")
def prepared(raw_requests: dict[str, dict]) -> Callable[[Path], dict[str, PreparedRequest]]:
    """prepared(checkpoint path) -> PROMPTS built with that checkpoint's tokenizer and processor."""
    cache: dict[Path, dict[str, PreparedRequest]] = {}

    def get(path: Path) -> dict[str, PreparedRequest]:
        if path not in cache:
            builder = PromptBuilder.from_pretrained(path)
            cache[path] = {name: builder.build(request) for name, request in raw_requests.items()}
        return cache[path]

    return get


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the tiny model's
    ops are microseconds of work, and on a shared machine a second thread's hand-offs cost many times that."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hf_reference() -> HFReference:
    """transformers' model per checkpoint, with memoized generations and logits."""
    return HFReference()


@pytest.fixture(scope="module")
def local_ray(request: pytest.FixtureRequest) -> Iterator[None]:
    """A private local Ray cluster for the module, shut down after it.

    A module sets ``RAY_NUM_CPUS`` (default 4) and ``RAY_INIT_KWARGS`` (extra ``ray.init`` arguments)
    to shape it. Ray is imported here, not at the top, so that modules without Ray never pay for it.
    """
    import ray

    from tests.ray_helpers import init_local_ray

    module = request.module
    init_local_ray(num_cpus=getattr(module, "RAY_NUM_CPUS", 4), **getattr(module, "RAY_INIT_KWARGS", {}))
    yield
    ray.shutdown()
