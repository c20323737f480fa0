"""Node preflight refusals and their messages (cluster/preflight.py), and reprs of half-initialised actors."""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import pytest

from actors.coordinator import Coordinator
from actors.shard_worker import ShardWorker
from cluster.preflight import CANN_ENV, PreflightError, format_failure, node_problems, release

CANN = {name: "/usr/local/Ascend/ascend-toolkit/latest" for name in CANN_ENV}


def importer(torch_version: str = "2.13.0+cpu", npu_version: str | None = "2.13.0", torch_error: str = ""):
    """An import function that knows torch (and torch_npu when `npu_version` is given)."""

    def load(name: str) -> ModuleType | SimpleNamespace:
        if name == "torch":
            if torch_error:
                raise OSError(torch_error)
            return SimpleNamespace(__version__=torch_version, cuda=SimpleNamespace(is_available=lambda: False))
        if name == "torch_npu" and npu_version is not None:
            return SimpleNamespace(__version__=npu_version)
        raise ModuleNotFoundError(f"No module named {name!r}")

    return load


def test_a_ready_npu_node_has_no_problems() -> None:
    assert node_problems("npu", "graph", CANN, {}, importer()) == []
    assert node_problems("npu", "eager", CANN, {}, importer("2.13.0", "2.13.0.post2")) == []


def test_missing_torch_npu_names_the_package_and_the_fix() -> None:
    (problem,) = node_problems("npu", "eager", CANN, {}, importer(npu_version=None))
    assert "torch_npu does not import" in problem and "No module named 'torch_npu'" in problem
    assert "pip install '.[npu]'" in problem and "torch_npu==2.13.0" in problem and "ray start" in problem


def test_missing_cann_environment_names_the_variables_and_set_env() -> None:
    (problem,) = node_problems("npu", "eager", {"ASCEND_HOME_PATH": "/x"}, {}, importer())
    assert "ASCEND_OPP_PATH unset" in problem and "ASCEND_HOME_PATH" not in problem.split("unset")[0]
    assert "set_env.sh" in problem and "ray start" in problem


def test_version_mismatch() -> None:
    (problem,) = node_problems("npu", "eager", CANN, {}, importer("2.12.1", "2.13.0"))
    assert problem.startswith("torch_npu 2.13.0 needs torch 2.13.0.*, this node has torch 2.12.1")


def test_torch_that_does_not_import_is_reported_with_the_cann_fix() -> None:
    problems = node_problems("npu", "eager", {}, {}, importer(torch_error="libhccl.so: cannot open shared object"))
    assert len(problems) == 2 and "CANN's environment is missing" in problems[0]
    assert problems[1].startswith("import torch fails: OSError: libhccl.so") and "set_env.sh" in problems[1]


def test_graph_mode_variables_are_checked_in_the_workers_environment() -> None:
    (problem,) = node_problems("npu", "graph", {**CANN, "TASK_QUEUE_ENABLE": "2"}, {}, importer())
    assert "TASK_QUEUE_ENABLE=2 in the environment breaks exe_mode=graph on npu" in problem
    assert node_problems("npu", "eager", {**CANN, "TASK_QUEUE_ENABLE": "2"}, {}, importer()) == []


def test_cuda_without_a_device() -> None:
    (problem,) = node_problems("cuda", "eager", {}, {}, importer())
    assert "sees no CUDA device" in problem
    assert node_problems("cpu", "graph", {}, {}, importer()) == []


def test_release() -> None:
    assert release("2.13.0+cpu") == release("2.13.0.post1") == release("2.13.0rc1") == (2, 13, 0)
    assert release("unknown") == ()


def test_failure_message_names_each_failing_node() -> None:
    reports = [
        {"node_ip": "10.0.0.1", "node_id": "a" * 40, "problems": []},
        {"node_ip": "10.0.0.2", "node_id": "b" * 40, "problems": ["torch_npu does not import", "CANN"]},
    ]
    message = format_failure("npu", reports)
    assert message == (
        "preflight for device npu failed on 1 of 2 node(s): "
        f"node 10.0.0.2 ({'b' * 12}): torch_npu does not import / CANN"
    )
    assert format_failure("npu", reports[:1]) is None
    assert issubclass(PreflightError, RuntimeError)


@pytest.mark.parametrize("actor", [ShardWorker, Coordinator])
def test_repr_of_a_half_initialised_actor(actor: type) -> None:
    """Ray labels an error raised in __init__ with the actor's repr: it must not raise itself."""
    text = repr(actor.__new__(actor))
    assert text in ("ShardWorker(rank=?, tp=?/?, dp=?, device=unbound)", "Coordinator(not initialised)")
    worker = ShardWorker.__new__(ShardWorker)
    worker.rank, worker.tp_rank, worker.tp_size, worker.dp_rank = 3, 1, 2, 1  # __init__ failed at binding
    assert repr(worker) == "ShardWorker(rank=3, tp=1/2, dp=1, device=unbound)"


def test_eager_buckets_in_the_summary_and_the_selfcheck() -> None:
    """Worker stats -> the summary's eager_decode_buckets and the line the launch and the self-check print."""
    from cluster.launch import eager_decode_buckets, format_eager

    workers = [
        {"rank": 0, "warmup_s": 1.0, "eager_buckets": [{"batch": 8, "length": 4224, "error": "RuntimeError: 507009"}]},
        {"rank": 1, "warmup_s": 1.0, "eager_buckets": []},
        {"rank": 2, "warmup_s": 1.0},  # a worker that reports no capture (eager mode, cpu)
    ]
    eager = eager_decode_buckets(workers)
    assert eager == [{"rank": 0, "batch": 8, "length": 4224, "error": "RuntimeError: 507009"}]
    assert format_eager(eager) == "rank 0: batch 8 x 4224 (RuntimeError: 507009)"
    assert eager_decode_buckets(workers[1:]) == []
