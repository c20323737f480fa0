"""SocketWorkerGroup (`ray.phase_calls: socket`): calls over a socket per rank give the ordinary calls' answers,
in order when several are written ahead, and fail as they do (CallError for a raising method, GroupFailure
naming the rank for a death, a hang, or a rank that raised while its peer waits); a rebuilt group connects
afresh and serves; an idle group's call threads sleep in the kernel.

One local Ray cluster and one event loop serve the module. Two groups: real ShardWorkers on the tiny
checkpoint (tp 2), and model-free workers (tests/probe_workers.py) whose calls wait on a signal actor, so
that a call is in flight for as long as a test needs, without sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import pytest
import ray
import torch

from actors.group_factory import make_worker_group
from actors.groups import GroupFailure, WorkerGroup, as_future
from actors.shard_worker import worker_actor_name
from actors.socket_group import SocketWorkerGroup
from tests.group_checks import (
    check_a_raising_method_is_a_call_error,
    check_same_answers_as_ordinary_calls,
    group_fixtures,
    rebuild,
)
from tests.probe_workers import ProbeWorker, digest_of
from tests.ray_helpers import named_actors

NAMESPACE = "test-socket-group"
RAY_NUM_CPUS = 8  # conftest's local_ray: 2 model workers, 2 probe workers, headroom


class Probe(ProbeWorker):
    signal_namespace = NAMESPACE

    def call_thread_cpu_s(self) -> float:
        """CPU seconds this worker's call-socket thread has used (Linux /proc: user + system clock ticks)."""
        with open(f"/proc/self/task/{self.call_server.thread.native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


class ProbeGroup(SocketWorkerGroup):
    worker_class = Probe


loop, cfg, model_group, signal, probe_group = group_fixtures(SocketWorkerGroup, ProbeGroup, NAMESPACE, "socket")


def _ordinary(group: SocketWorkerGroup):
    return lambda *args: WorkerGroup.call(group, *args)  # the same workers, through ordinary actor calls


# ----------------------------------------------------------------------------- same answers
def test_socket_calls_give_the_ordinary_calls_answers(loop, model_group, raw_requests):
    check_same_answers_as_ordinary_calls(loop, model_group, raw_requests)


def test_a_raising_method_is_a_call_error_and_the_group_goes_on(loop, model_group):
    check_a_raising_method_is_a_call_error(loop, model_group)


def test_calls_written_ahead_come_back_in_order(loop, probe_group):
    async def many() -> list:
        return await asyncio.gather(*(probe_group.call("echo", i) for i in range(50)))

    assert loop.run_until_complete(many()) == [[i, i] for i in range(50)]


def test_multi_megabyte_arguments_round_trip(loop, probe_group):
    group = probe_group
    for megabytes in (6, 24):
        tensor = torch.randn(megabytes << 18)  # float32: 4 bytes each
        assert loop.run_until_complete(group.call("digest", tensor)) == [digest_of(tensor)] * 2
    kept = torch.randn(3 << 18)
    loop.run_until_complete(group.call("keep", kept))
    assert loop.run_until_complete(group.call("kept_digest")) == [digest_of(kept)] * 2


def test_an_idle_groups_call_threads_sleep(loop, probe_group):
    """A blocked read costs no CPU: over an idle second after a call, every rank's call thread uses at most two
    clock ticks (the tail of the call it just answered); a reader that polled would use about the whole
    second. The second is the interval measured, not a wait for anything."""
    group = probe_group
    ordinary = _ordinary(group)
    assert loop.run_until_complete(group.call("echo", 1)) == [1, 1]
    before = loop.run_until_complete(ordinary("call_thread_cpu_s"))
    time.sleep(1.0)
    after = loop.run_until_complete(ordinary("call_thread_cpu_s"))
    assert all(b - a <= 2 / os.sysconf("SC_CLK_TCK") for a, b in zip(before, after)), (before, after)


# ----------------------------------------------------------------------------- failures
def test_a_worker_killed_mid_call_fails_naming_it_and_a_rebuild_serves(loop, probe_group, signal):
    group = probe_group
    arrived = ray.get(signal.arrivals.remote(0))
    call = loop.create_task(group.call("wait_on", 3))
    queued = loop.create_task(group.call("echo", "behind"))  # written behind the call in flight
    loop.run_until_complete(as_future(signal.arrivals.remote(arrived + 1)))  # rank 3 is inside the call
    killed = time.monotonic()
    ray.kill(ray.get_actor(worker_actor_name(3), namespace=NAMESPACE), no_restart=True)
    with pytest.raises(GroupFailure) as info:
        loop.run_until_complete(call)
    assert time.monotonic() - killed < 10
    assert "shard-worker-3 (rank 3) of dp group 1 died" in str(info.value), str(info.value)
    with pytest.raises(GroupFailure, match="shard-worker-3"):
        loop.run_until_complete(queued)
    with pytest.raises(GroupFailure, match="cannot run 'echo'"):
        loop.run_until_complete(group.call("echo", 1))

    rebuild(loop, group)
    assert loop.run_until_complete(group.call("echo", 2)) == [2, 2]
    mine = [n for n in named_actors(NAMESPACE) if n in (worker_actor_name(2), worker_actor_name(3))]
    assert mine == [worker_actor_name(2), worker_actor_name(3)]


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
    assert 1.5 <= elapsed, elapsed
    rebuild(loop, group)  # kill ends the hung rank
    assert loop.run_until_complete(group.call("echo", "again")) == ["again", "again"]


def test_a_rank_that_raised_while_its_peer_waits_fails_the_group_at_once(loop, probe_group, signal):
    """Also with the next call written behind it (worker_timeout_s is 60 s: PROBE_S after the rank raised, not
    the timeout, ends it)."""
    group = probe_group

    async def two_calls() -> list:
        first = asyncio.ensure_future(group.call("raise_or_wait", 2))
        second = asyncio.ensure_future(group.call("echo", "next"))
        return await asyncio.gather(first, second, return_exceptions=True)

    start = time.monotonic()
    first, second = loop.run_until_complete(two_calls())
    assert time.monotonic() - start < group.cfg.worker_timeout_s
    assert isinstance(first, GroupFailure), first
    message = str(first)
    assert "shard-worker-2 (rank 2) of dp group 1 failed in 'raise_or_wait'" in message, message
    assert "ValueError: rank 2 refuses" in message, message
    assert isinstance(second, GroupFailure), second
    rebuild(loop, group)
    assert loop.run_until_complete(group.call("echo", 3)) == [3, 3]


def test_the_factory_follows_the_config(cfg):
    for setting, kind in (("socket", SocketWorkerGroup), ("ordinary", WorkerGroup)):
        assert type(make_worker_group(0, dataclasses.replace(cfg, phase_calls=setting), [None, None])) is kind


def test_kill_closes_the_connections(loop, probe_group):
    group = probe_group  # the module's last use of it
    clients = list(group.clients)
    loop.run_until_complete(group.kill())
    assert not group.clients and not group.alive and all(c.writer.is_closing() for c in clients)
    assert not [n for n in named_actors(NAMESPACE) if n in (worker_actor_name(2), worker_actor_name(3))]
    with pytest.raises(GroupFailure, match="cannot run 'echo'"):
        loop.run_until_complete(group.call("echo", 1))
