"""Checks every path of a DP group's calls passes (tests/test_socket_group.py, tests/test_compiled_group.py), on a
group of real ShardWorkers on the tiny checkpoint at tp 2 (dp rank 0): the same tokens as ordinary actor calls
to the same workers, and a raising method answered as a CallError while the group goes on; and the fixtures and
the rebuild both modules use (`group_fixtures`, `rebuild`)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
import ray

from actors.config import EngineConfig, WorkerConfig
from actors.group_factory import make_worker_group
from actors.groups import CallError, WorkerGroup
from cluster.tools.bench_calls import admit_args, decode_args
from model.processor import PromptBuilder
from tests.probe_workers import SIGNAL, Signal
from tests.ray_helpers import tiny_model

NEW_TOKENS = 6


async def generate(call, request, request_id: str, block_size: int) -> list[list[int]]:
    """Encode (if the request has images), admit and prefill, then decode: each rank's tokens."""
    if request.pixel_values is not None:
        await call("encode", [dataclasses.replace(request, request_id=request_id)], False)
    outs = [await call("step", *admit_args(request, request_id, NEW_TOKENS, block_size, []))]
    for _ in range(NEW_TOKENS - 1):
        outs.append(await call("step", *decode_args(request_id)))
    await call("step", [request_id], [], [], {}, [], [], 1)  # release
    return [[t for out in outs for t in out[rank]["outputs"][request_id]["tokens"]] for rank in range(2)]


def check_same_answers_as_ordinary_calls(loop: asyncio.AbstractEventLoop, group, raw_requests: dict) -> None:
    """A text and an image request give every rank the tokens that ordinary actor calls to the same workers give."""
    ordinary = lambda *args: WorkerGroup.call(group, *args)  # noqa: E731 -- the same workers, actor calls
    builder = PromptBuilder.from_pretrained(tiny_model())
    block_size = group.cfg.worker.kv_pool()[1]
    assert loop.run_until_complete(group.call("node_info")) == loop.run_until_complete(ordinary("node_info"))
    for name in ("text", "one_image"):
        request = builder.build(raw_requests[name])
        expected = loop.run_until_complete(generate(ordinary, request, f"{name}-ordinary", block_size))
        got = loop.run_until_complete(generate(group.call, request, f"{name}-{type(group).__name__}", block_size))
        assert got == expected, name
        assert got[0] == got[1] and len(got[0]) == NEW_TOKENS, got


def check_a_raising_method_is_a_call_error(loop: asyncio.AbstractEventLoop, group) -> None:
    """Every rank raises (no such request; no such method): a CallError naming rank 0, and the group goes on."""
    chunk_of_nobody = ([], [], [], {"nobody": (0, [1])}, [("nobody", 0, 1)], [], 1)
    with pytest.raises(CallError) as info:
        loop.run_until_complete(group.call("step", *chunk_of_nobody))
    message = str(info.value)
    assert "shard-worker-0 (rank 0) of dp group 0 failed in 'step'" in message, message
    assert "ValueError" in message and "'nobody'" in message, message
    with pytest.raises(CallError, match="AttributeError"):
        loop.run_until_complete(group.call("no_such_method"))
    infos = loop.run_until_complete(group.call("node_info"))
    assert [i["rank"] for i in infos] == [0, 1] and group.failure is None


# ----------------------------------------------------------------------------- fixtures
def group_fixtures(
    group_class: type[WorkerGroup], probe_group_class: type[WorkerGroup], namespace: str, phase_calls: str
):
    """A group test module's module-scoped fixtures, to assign to its names `loop, cfg, model_group, signal,
    probe_group`: one event loop; the tiny checkpoint at tp 2 with `phase_calls`; a group of real ShardWorkers
    (dp rank 0) that `make_worker_group` makes from that config, checked to be `group_class`; the probe workers'
    signal actor in `namespace`; and a `probe_group_class` group (dp rank 1: ranks 2 and 3)."""

    @pytest.fixture(scope="module")
    def loop(local_ray) -> Iterator[asyncio.AbstractEventLoop]:
        loop = asyncio.new_event_loop()
        yield loop
        loop.close()

    @pytest.fixture(scope="module")
    def cfg() -> EngineConfig:
        worker = WorkerConfig(str(tiny_model()), "cpu", "float32", "eager", "dp", 2, 256)
        return EngineConfig(
            worker, 2, 2, {"num_cpus": 1}, namespace, 128, 1, worker_timeout_s=60, phase_calls=phase_calls
        )

    @pytest.fixture(scope="module")
    def model_group(loop, cfg) -> Iterator[WorkerGroup]:
        group = make_worker_group(0, cfg, [None, None])
        assert type(group) is group_class
        loop.run_until_complete(group.start())
        yield group
        loop.run_until_complete(group.kill())

    @pytest.fixture(scope="module")
    def signal(local_ray) -> Iterator[ray.actor.ActorHandle]:
        handle = Signal.options(name=SIGNAL, namespace=namespace).remote()
        yield handle
        ray.kill(handle)

    @pytest.fixture(scope="module")
    def probe_group(loop, cfg) -> Iterator[WorkerGroup]:
        group = probe_group_class(1, cfg, [None, None])  # ranks 2 and 3
        loop.run_until_complete(group.start())
        yield group
        loop.run_until_complete(group.kill())

    return loop, cfg, model_group, signal, probe_group


def rebuild(loop: asyncio.AbstractEventLoop, group: WorkerGroup) -> None:
    """`kill`, then `start`; `load` and `warmup` came through the group's own path (the only calls `dispatch`
    counts, read here through ordinary actor calls), so that all of a worker's torch work runs on one thread."""
    loop.run_until_complete(group.kill())
    loop.run_until_complete(group.start())
    states = loop.run_until_complete(WorkerGroup.call(group, "dispatch_state"))
    assert [done for done, _, _ in states] == [2, 2], states
