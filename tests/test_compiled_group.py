"""CompiledWorkerGroup: phase calls through one Ray Compiled Graph give the ordinary calls' answers and fail
as they do (CallError for a raising method, GroupFailure naming the rank for a death or a hang), and a
group rebuilt after a failure compiles a fresh graph and serves again.

One local Ray cluster and one event loop serve the module (a graph is executed only from the loop that
compiled it). Two groups: real ShardWorkers on the tiny checkpoint (tp 2), and model-free workers
(`ProbeWorker`) whose calls wait on a signal actor, so that a call is in flight for as long as a test
needs, without sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import threading
import time

import pytest
import ray
import torch
from ray.dag.compiled_dag_node import CompiledDAG

from actors.compiled_group import POLLING_THREADS, PROBE_S, CompiledWorkerGroup
from actors.group_factory import make_worker_group
from actors.groups import GroupFailure, WorkerGroup, as_future
from actors.shard_worker import worker_actor_name
from tests.group_checks import (
    check_a_raising_method_is_a_call_error,
    check_same_answers_as_ordinary_calls,
    group_fixtures,
    rebuild,
)
from tests.probe_workers import ProbeWorker, digest_of
from tests.ray_helpers import named_actors, wait_for

NAMESPACE = "test-compiled-group"
RAY_NUM_CPUS = 8  # conftest's local_ray: 2 model workers, 2 probe workers, headroom


class Probe(ProbeWorker):
    signal_namespace = NAMESPACE


class ProbeGroup(CompiledWorkerGroup):
    worker_class = Probe


loop, cfg, model_group, signal, probe_group = group_fixtures(CompiledWorkerGroup, ProbeGroup, NAMESPACE, "compiled")


@pytest.fixture(autouse=True)
def _quiet_graph_logs(monkeypatch) -> None:
    """Keep Ray's logs of dead workers out of pytest's records: their tracebacks would hold the old graphs."""
    monkeypatch.setattr(logging.getLogger("ray.dag.compiled_dag_node"), "disabled", True)


def _nothing_left_behind() -> bool:
    """No torn-down graph is still in memory, and every channel or monitor thread belongs to a live graph
    (a live graph that has run has three: its input writer, its output reader and its monitor)."""
    gc.collect()
    graphs = [o for o in gc.get_objects() if type(o) is CompiledDAG]
    threads = sum(t.name.startswith(("channel.", "CompiledGraphMonitor")) for t in threading.enumerate())
    return all(not g.is_teardown for g in graphs) and threads == 3 * len(graphs)


# ----------------------------------------------------------------------------- same answers
def test_compiled_calls_give_the_ordinary_calls_answers(loop, model_group, raw_requests):
    check_same_answers_as_ordinary_calls(loop, model_group, raw_requests)


def test_a_raising_method_is_a_call_error_and_the_group_goes_on(loop, model_group):
    check_a_raising_method_is_a_call_error(loop, model_group)


def test_multi_megabyte_arguments_round_trip(loop, probe_group):
    group = probe_group
    for megabytes in (6, 24):  # past the channels' initial size, then past the size they grew to
        tensor = torch.randn(megabytes << 18)  # float32: 4 bytes each
        assert loop.run_until_complete(group.call("digest", tensor)) == [digest_of(tensor)] * 2
    kept = torch.randn(3 << 18)
    loop.run_until_complete(group.call("keep", kept))
    loop.run_until_complete(group.call("digest", torch.zeros(4 << 18)))  # the channel holds another message
    assert loop.run_until_complete(group.call("kept_digest")) == [digest_of(kept)] * 2
    assert loop.run_until_complete(group.call("echo", "small")) == ["small", "small"]


def test_the_graphs_polling_threads_run_only_on_idle_cores(loop, probe_group):
    """Ray's asyncio graph polls its channels in threads of the executing process for the whole of each call;
    after a call they run under SCHED_IDLE, so that they never take a core from the workers or the server."""
    assert loop.run_until_complete(probe_group.call("echo", 1)) == [1, 1]
    polling = [t for t in threading.enumerate() if t.name.startswith(POLLING_THREADS)]
    assert any(t.name.startswith(POLLING_THREADS[0]) for t in polling), [t.name for t in threading.enumerate()]
    assert {os.sched_getscheduler(t.native_id) for t in polling} == {os.SCHED_IDLE}
    others = [t for t in threading.enumerate() if not t.name.startswith(POLLING_THREADS)]
    assert os.SCHED_IDLE not in {os.sched_getscheduler(t.native_id) for t in others}


# ----------------------------------------------------------------------------- failures
def test_a_worker_killed_mid_call_fails_naming_it_and_a_rebuild_serves(loop, probe_group, signal):
    group = probe_group
    graph = group.graph
    arrived = ray.get(signal.arrivals.remote(0))
    call = loop.create_task(group.call("wait_on", 3))
    loop.run_until_complete(as_future(signal.arrivals.remote(arrived + 1)))  # rank 3 is inside the call
    killed = time.monotonic()
    ray.kill(ray.get_actor(worker_actor_name(3), namespace=NAMESPACE), no_restart=True)
    with pytest.raises(GroupFailure) as info:
        loop.run_until_complete(call)
    assert time.monotonic() - killed < 10
    assert "shard-worker-3 (rank 3) of dp group 1 died" in str(info.value), str(info.value)
    with pytest.raises(GroupFailure, match="cannot run 'echo'"):
        loop.run_until_complete(group.call("echo", 1))
    del info, call  # their tracebacks hold the old graph

    rebuild(loop, group)
    assert graph.is_teardown and group.graph is not graph
    del graph
    assert loop.run_until_complete(group.call("echo", 2)) == [2, 2]
    mine = [n for n in named_actors(NAMESPACE) if n in (worker_actor_name(2), worker_actor_name(3))]
    assert mine == [worker_actor_name(2), worker_actor_name(3)]
    assert wait_for(_nothing_left_behind, 10)  # once Ray's own threads of the old graph have ended


def test_a_hang_past_the_timeout_fails_the_call_naming_the_rank(loop, probe_group, signal):
    group = probe_group
    arrived = ray.get(signal.arrivals.remote(0))
    start = time.monotonic()
    with pytest.raises(GroupFailure) as info:
        loop.run_until_complete(group.call("wait_on", 2, timeout_s=1.5))
    elapsed = time.monotonic() - start
    assert ray.get(signal.arrivals.remote(arrived + 1)) == arrived + 1
    message = str(info.value)
    assert "did not finish 'wait_on' within 1.5s" in message and "rank(s) [2] still running" in message, message
    assert 1.5 <= elapsed < 1.5 + 2 * PROBE_S + 5, elapsed
    del info
    start = time.monotonic()
    rebuild(loop, group)  # kill ends the teardown the hung rank holds up
    assert time.monotonic() - start < 40
    assert loop.run_until_complete(group.call("echo", "again")) == ["again", "again"]
    assert wait_for(_nothing_left_behind, 10)


def test_a_rank_that_raised_while_its_peer_waits_fails_the_group_at_once(loop, probe_group, signal):
    """Also as the group loop runs ahead: the next execution is started before the failing one returns. The rank
    that raised has moved on to it, yet the check on the ranks still finds what it raised in the call waited
    on (worker_timeout_s is 60 s: the probe, not the timeout, ends it; the timeout's message says "did not
    finish")."""
    group = probe_group

    async def two_calls() -> list:
        first = asyncio.ensure_future(group.call("raise_or_wait", 2))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(group.call("echo", "next"))
        return await asyncio.gather(first, second, return_exceptions=True)

    start = time.monotonic()
    first, second = loop.run_until_complete(two_calls())
    assert time.monotonic() - start < 3 * PROBE_S + 5
    assert isinstance(first, GroupFailure), first
    message = str(first)
    assert "shard-worker-2 (rank 2) of dp group 1 failed in 'raise_or_wait'" in message, message
    assert "ValueError: rank 2 refuses" in message, message
    assert isinstance(second, GroupFailure), second
    del first, second
    rebuild(loop, group)
    assert loop.run_until_complete(group.call("echo", 3)) == [3, 3]


def test_the_factory_follows_the_config(cfg):
    assert type(make_worker_group(0, cfg, [None, None])) is CompiledWorkerGroup
    plain = make_worker_group(0, dataclasses.replace(cfg, phase_calls="ordinary"), [None, None])
    assert type(plain) is WorkerGroup
    with pytest.raises(ValueError, match="phase_calls='zmq': must be one of socket, compiled, ordinary"):
        make_worker_group(0, dataclasses.replace(cfg, phase_calls="zmq"), [None, None])


def test_kill_tears_the_graph_down(loop, probe_group):
    group = probe_group  # the module's last use of it
    graph = group.graph
    loop.run_until_complete(group.kill())
    assert graph.is_teardown and group.graph is None and not group.alive
    del graph
    assert not [n for n in named_actors(NAMESPACE) if n in (worker_actor_name(2), worker_actor_name(3))]
    with pytest.raises(GroupFailure, match="cannot run 'echo'"):
        loop.run_until_complete(group.call("echo", 1))
    assert wait_for(_nothing_left_behind, 10)
