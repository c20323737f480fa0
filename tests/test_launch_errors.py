"""Launch-level errors: each names what was asked, exits non-zero and leaves no actor or placement group."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from cluster import launch
from tests.ray_helpers import REPO, TINY_CONF, live_placement_groups, named_actors, tiny_model

NAMESPACE = "test-launch-errors"


@pytest.fixture(scope="module")
def broken_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of the tiny checkpoint: one whose index names a missing shard, one without a tokenizer."""
    root = tmp_path_factory.mktemp("broken")
    good = tiny_model()
    missing_shard = root / "missing-shard"
    shutil.copytree(good, missing_shard)
    index = {
        "metadata": {},
        "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors", "model.norm.weight": "model.safetensors"},
    }
    (missing_shard / "model.safetensors.index.json").write_text(json.dumps(index))
    no_tokenizer = root / "no-tokenizer"
    shutil.copytree(good, no_tokenizer)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (no_tokenizer / name).unlink(missing_ok=True)
    return {"missing_shard": missing_shard, "no_tokenizer": no_tokenizer, "no_dir": root / "does-not-exist"}


def _launch(capsys: pytest.CaptureFixture, *overrides: str) -> tuple[int, str]:
    # A fresh output_path: results of an earlier run in the default one would stop the launch first.
    output = Path(tempfile.mkdtemp()) / "results.jsonl"
    argv = [
        str(TINY_CONF),
        f"ray.namespace={NAMESPACE}",
        "ray.placement_timeout_s=5",
        f"output_path={output}",
        *overrides,
    ]
    rc = launch.main(argv)
    return rc, capsys.readouterr().err


def _assert_nothing_left() -> None:
    assert named_actors(NAMESPACE) == []
    assert live_placement_groups(NAMESPACE) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["bogus_key=1"], ["unknown config key 'bogus_key'"]),
        (["data_config.batch_size=many"], ["data_config.batch_size", "many"]),
        (["world_size=8"], ["cannot place 4 group(s) x 2 bundle(s) x {CPU: 1}", "CPU: 4"]),
        (["device=cuda"], ["GPU", "absent on every node"]),
        (["world_size=3", "parallel_config.tp_size=3"], ["parallel_config.tp_size=3", "num_attention_heads=4"]),
    ],
)
def test_config_and_placement_errors(local_ray, capsys, overrides, expected):
    rc, err = _launch(capsys, f"model_path={tiny_model()}", *overrides)
    assert rc != 0
    for text in expected:
        assert text in err, err
    _assert_nothing_left()


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("no_dir", "no such directory"),
        ("missing_shard", "model-00002-of-00002.safetensors"),
        ("no_tokenizer", "has no tokenizer"),
    ],
)
def test_model_file_errors(local_ray, capsys, broken_checkpoints, which, expected):
    path = broken_checkpoints[which]
    rc, err = _launch(capsys, f"model_path={path}")
    assert rc != 0 and expected in err and str(path) in err, err
    _assert_nothing_left()


def test_placement_timeout_names_the_request(local_ray, capsys):
    """The cluster could hold the groups, but other work holds the CPUs: fail within the timeout."""
    holder = placement_group([{"CPU": 3}], name="other-work")
    ray.get(holder.ready(), timeout=30)
    try:
        t0 = time.monotonic()
        rc, err = _launch(capsys, f"model_path={tiny_model()}", "ray.placement_timeout_s=2")
        elapsed = time.monotonic() - t0
    finally:
        remove_placement_group(holder)
    assert rc != 0 and elapsed < 30, elapsed
    assert "placement groups not ready after" in err and "1 group(s) x 2 bundle(s) x {CPU: 1}" in err, err
    _assert_nothing_left()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["bogus_key=1"], "unknown config key 'bogus_key'"),
        (["model_path=/nonexistent/tiny"], "model_path='/nonexistent/tiny': no such directory"),
    ],
)
def test_exit_status_of_the_command(overrides, expected):
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.launch", str(TINY_CONF), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]


def test_one_unwrap_takes_the_actors_exception_out_of_nested_task_errors():
    """Launch, the server and the router take an actor's exception out of Ray's wrappers by one rule."""
    from ray.exceptions import RayActorError, RayTaskError

    from actors import router
    from actors.errors import RequestError, unwrap
    from cluster import serve

    original = RequestError("'stop' must be a string or a list of strings, got [1]", "stop")
    once = RayTaskError("generate", "traceback", original).as_instanceof_cause()  # as ray.get raises it
    twice = RayTaskError("stream", "traceback", RayTaskError("generate", "traceback", original))
    assert unwrap(once) is original and unwrap(twice) is original
    odd = RuntimeError("boom")
    odd.cause = "not an exception"
    died = RayActorError()
    assert unwrap(odd) is odd and unwrap(died) is died
    assert launch.unwrap is serve.unwrap is router.unwrap is unwrap
    error = serve._engine_error(twice)  # a nested task error still answers with the request's own status and field
    assert (error.status, error.param) == (400, "stop")
