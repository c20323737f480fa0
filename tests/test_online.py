"""The online engine through Ray: continuous batching with requests arriving over time, streaming,
abort, stop strings, several drivers at once, and the static policy for comparison.

Four engines share one local Ray cluster: continuous at tp 1, continuous at tp 2, static at tp 1,
each with 2 KV slots, so that later requests are admitted while earlier ones decode, and dp 2 with a
Coordinator actor per DP group behind the router (`ray.group_coordinators`).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray

from actors.deliveries import Deliveries
from cluster import start, stop
from model.processor import PromptBuilder
from tests.ray_helpers import REPO, tiny_config, wait_for
from tests.reference import Generated, assert_greedy_matches_reference
from tests.test_deliveries import read_all

RAY_NUM_CPUS = 8  # one per worker: the module's four engines hold 6, a test starts a dp 2 engine of its own
SLOTS = 2


def _engine(checkpoint: Path, namespace: str, *overrides: str):
    return start(
        tiny_config(
            checkpoint,
            f"data_config.batch_size={SLOTS}",
            "data_config.max_new_tokens=16",
            "scheduler.prefill_chunk_tokens=24",
            f"ray.namespace={namespace}",
            *overrides,
        )
    )


@pytest.fixture(scope="module")
def engines(local_ray, tiny_checkpoint: Path):
    started = {}
    try:
        # Room for 8,000 new tokens: a request that outlives another driver's start (test_two_drivers...).
        started["tp1"] = _engine(
            tiny_checkpoint, "online-tp1", "world_size=1", "parallel_config.tp_size=1", "data_config.input_max_len=8192"
        )
        started["tp2"] = _engine(tiny_checkpoint, "online-tp2", "world_size=2", "parallel_config.tp_size=2")
        started["static"] = _engine(
            tiny_checkpoint, "online-static", "world_size=1", "parallel_config.tp_size=1", "scheduler.policy=static"
        )
        started["routed"] = _engine(
            tiny_checkpoint, "online-routed", "world_size=2", "parallel_config.tp_size=1", "ray.group_coordinators=true"
        )
        yield started
    finally:
        for coordinator in started.values():
            stop(coordinator)


def _staggered(requests: list[dict], coordinator, gap_s: float = 0.03) -> list[dict]:
    """Send one request every `gap_s` (each its own generate call, as separate callers would) -> records."""
    refs = []
    for request in requests:
        refs.append(coordinator.generate.remote([request]))
        time.sleep(gap_s)
    return [r[0] for r in ray.get(refs, timeout=300)]


def _mixed(raw_requests: dict[str, dict]) -> list[dict]:
    lengths = [3, 12, 6, 9, 16, 4, 10, 7, 14, 5]
    names = list(raw_requests) * 2
    return [
        {**raw_requests[name], "id": f"{name}-{i}", "max_new_tokens": n}
        for i, (name, n) in enumerate(zip(names, lengths))
    ]


@dataclass
class Joined:
    records: list[dict]  # the mixed requests' records, in request order
    decoding: dict  # the final record of the request that decoded while all of them ran


@pytest.fixture(scope="module")
def joined_tp1(engines, raw_requests) -> Joined:
    """The mixed requests, sent once another request decodes, which is aborted only after they all ended:
    every one of them was admitted into a batch with a request decoding in it, whatever the timings."""
    coordinator = engines["tp1"]
    decoding = {"id": "decoding", "prompt": "Tell me a long story.", "max_new_tokens": 8000, "ignore_eos": True}
    stream = coordinator.stream.options(num_returns="streaming").remote(decoding)
    assert ray.get(next(stream), timeout=120)["token_ids"]  # it decodes
    try:
        records = _staggered(_mixed(raw_requests), coordinator)
    finally:
        assert ray.get(coordinator.abort.remote("decoding"), timeout=30) is True
    return Joined(records, [ray.get(ref, timeout=60) for ref in stream][-1])


@pytest.fixture(scope="module")
def continuous_tp1(joined_tp1) -> list[dict]:
    return joined_tp1.records


def test_continuous_batching_matches_transformers(joined_tp1, raw_requests, tiny_checkpoint, hf_reference):
    requests = _mixed(raw_requests)
    records, decoding = joined_tp1.records, joined_tp1.decoding
    assert all(r["error"] is None for r in records), [r["error"] for r in records]
    # Each was admitted, and ended, while the other request decoded: it ended by the abort sent after them all.
    assert decoding["finish_reason"] == "abort" and 0 < len(decoding["output_token_ids"]) < 8000, decoding
    assert all(decoding["scheduled_time"] < r["scheduled_time"] for r in records), [r["id"] for r in records]
    builder = PromptBuilder.from_pretrained(tiny_checkpoint)
    eos = builder.eos_token_ids
    outputs = [
        Generated(record["id"], builder.build(raw), record["output_token_ids"], raw["max_new_tokens"], eos)
        for record, raw in zip(records, requests)
    ]
    assert_greedy_matches_reference(hf_reference, tiny_checkpoint, outputs)


def test_tp2_and_static_policy_give_the_same_tokens(engines, continuous_tp1, raw_requests):
    requests = _mixed(raw_requests)
    tp2 = _staggered(requests, engines["tp2"])
    static = _staggered(requests, engines["static"])
    for a, b, c in zip(continuous_tp1, tp2, static):
        assert a["output_token_ids"] == b["output_token_ids"] == c["output_token_ids"], a["id"]
    # Static batching admits only into an empty group: no admission while another request of the group runs.
    for x in static:
        assert not any(
            y is not x
            and y["scheduled_time"] < x["scheduled_time"] < y["end_time"]
            and y["scheduled_time"] != x["scheduled_time"]
            for y in static
        ), x["id"]


def test_group_coordinators_behind_the_router_serve_every_way_in(engines, continuous_tp1, raw_requests):
    coordinator = engines["routed"]
    requests = _mixed(raw_requests)
    routed = _staggered(requests, coordinator)
    assert [r["output_token_ids"] for r in routed] == [r["output_token_ids"] for r in continuous_tp1]
    assert {r["dp_rank"] for r in routed} == {0, 1}
    ray_groups = ray.get(coordinator.delivery_sources.remote(), timeout=30)
    assert [_actor_repr(g).rsplit(", ", 1)[1] for g in ray_groups] == ["dp_ranks=[0])", "dp_ranks=[1])"]

    async def multiplexed() -> list[dict]:  # read from the group Coordinators, as the HTTP server does
        deliveries = Deliveries(coordinator)
        try:
            return await asyncio.gather(*(read_all(deliveries.open(r, ack=True)) for r in requests[:4]))
        finally:
            await deliveries.close()

    for items, record in zip(asyncio.run(multiplexed()), continuous_tp1):
        assert items[0]["accepted"] and items[-1]["output_token_ids"] == record["output_token_ids"]
        assert [t for item in items[1:-1] for t in item["token_ids"]] == record["output_token_ids"]
    relayed = [ray.get(ref) for ref in coordinator.stream.options(num_returns="streaming").remote(requests[1])]
    assert relayed[-1]["output_token_ids"] == continuous_tp1[1]["output_token_ids"]
    gen = coordinator.stream.options(num_returns="streaming").remote(
        {"id": "routed-abort", "prompt": "Go on forever.", "max_new_tokens": 400, "ignore_eos": True}, ack=True
    )
    assert ray.get(next(gen), timeout=60)["accepted"]
    assert ray.get(coordinator.abort.remote("routed-abort"), timeout=30) is True
    assert [ray.get(ref) for ref in gen][-1]["finish_reason"] == "abort"
    assert wait_for(
        lambda: ray.get(coordinator.status.remote()) == {"live_groups": 2, "dp_size": 2, "waiting": 0, "running": 0},
        timeout_s=30,
    )
    done, sent = ray.get(coordinator.progress.remote(), timeout=30)
    assert done == sent == len(requests) + 4 + 2
    assert [i["rank"] for i in ray.get(coordinator.topology.remote(), timeout=30)] == [0, 1]


def _collect(gen, log: list) -> None:
    for ref in gen:
        item = ray.get(ref)
        log.append((time.monotonic(), item))


def test_short_request_finishes_before_the_long_one_it_joined(engines):
    """The short request joins once the long one streams, and the long one is aborted only after the short one
    ended: the abort finding it still running shows the short one was served beside it, whatever the timings."""
    coordinator = engines["tp1"]
    long_log: list = []
    short_log: list = []
    long_gen = coordinator.stream.options(num_returns="streaming").remote(
        {"id": "long", "prompt": "Tell me a very long story.", "max_new_tokens": 8000, "ignore_eos": True}
    )
    reader = threading.Thread(target=_collect, args=(long_gen, long_log))
    reader.start()
    assert wait_for(lambda: len(long_log) >= 2, timeout_s=60, interval_s=0.01)
    short_gen = coordinator.stream.options(num_returns="streaming").remote(
        {"id": "short", "prompt": "Hi.", "max_new_tokens": 5, "ignore_eos": True}
    )
    _collect(short_gen, short_log)
    assert ray.get(coordinator.abort.remote("long"), timeout=30) is True
    reader.join(timeout=120)
    long_final, short_final = long_log[-1][1], short_log[-1][1]
    assert long_final["final"] and short_final["final"]
    assert long_final["error"] is None and short_final["error"] is None
    assert long_final["finish_reason"] == "abort" and short_final["finish_reason"] == "length"
    assert 0 < len(long_final["output_token_ids"]) < 8000 and len(short_final["output_token_ids"]) == 5
    assert sum(len(item["token_ids"]) for _, item in short_log if not item.get("final")) == 5
    streamed = [t for _, item in long_log if not item.get("final") for t in item["token_ids"]]
    assert streamed == long_final["output_token_ids"][: len(streamed)]


def test_abort_and_a_consumer_that_goes_away_free_the_slot(engines):
    coordinator = engines["tp1"]
    log: list = []
    gen = coordinator.stream.options(num_returns="streaming").remote(
        {"id": "to-abort", "prompt": "Go on forever.", "max_new_tokens": 400, "ignore_eos": True}
    )
    reader = threading.Thread(target=_collect, args=(gen, log))
    reader.start()
    assert wait_for(lambda: len(log) >= 1, timeout_s=60, interval_s=0.01)
    assert ray.get(coordinator.abort.remote("to-abort"), timeout=30) is True
    reader.join(timeout=60)
    final = log[-1][1]
    assert final["final"] and final["finish_reason"] == "abort" and final["error"] is None
    assert 0 < len(final["output_token_ids"]) < 400
    assert wait_for(lambda: ray.get(coordinator.status.remote())["running"] == 0, timeout_s=30)

    gone = coordinator.stream.options(num_returns="streaming").remote(
        {"id": "walks-away", "prompt": "Go on forever.", "max_new_tokens": 400, "ignore_eos": True}, ack=True
    )
    # With ack, the first item says the request is queued; then the consumer cancels its stream.
    assert ray.get(next(gone), timeout=60) == {"id": "walks-away", "token_ids": [], "text": "", "accepted": True}
    ray.cancel(gone)
    assert wait_for(
        lambda: ray.get(coordinator.status.remote()) == {"live_groups": 1, "dp_size": 1, "waiting": 0, "running": 0},
        timeout_s=30,
    )


def test_stop_string_ends_the_request_and_is_not_returned(engines):
    coordinator = engines["tp1"]
    request = {"id": "stop", "prompt": "Describe the weather today.", "max_new_tokens": 16, "ignore_eos": True}
    full = ray.get(coordinator.generate.remote([request]), timeout=120)[0]["output_text"]
    clean = [i for i in range(4, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
    assert clean, f"no stop string candidate in {full!r}"
    stop_at = full.find(full[clean[0] : clean[0] + 2])
    record = ray.get(coordinator.generate.remote([{**request, "stop": [full[clean[0] : clean[0] + 2]]}]), timeout=120)[
        0
    ]
    assert record["finish_reason"] == "stop" and record["error"] is None
    assert record["output_text"] == full[:stop_at]


@ray.remote(num_cpus=0)
def _raise(error: BaseException) -> None:
    raise error


def test_typed_errors_keep_type_param_and_status_through_ray(engines):
    from actors.errors import NoLiveGroupError, RequestError
    from cluster.serve import _engine_error
    from model.processor import InvalidRequestError

    coordinator = engines["tp1"]
    cases = [
        ({"id": "e1", "prompt": "hi", "stop": ["a"] * 5}, RequestError, "stop"),
        ({"id": "e2", "prompt": "hi", "temperature": -1}, RequestError, "temperature"),
        (
            {"id": "e3", "prompt": "hi", "mm_processor_kwargs": {"dpi": 3}},
            InvalidRequestError,
            "mm_processor_kwargs.dpi",
        ),
    ]
    for request, kind, param in cases:
        stream = coordinator.stream.options(num_returns="streaming").remote(request)
        with pytest.raises(ValueError) as info:  # Ray's RayTaskError is also an instance of the cause's class
            ray.get(next(stream), timeout=60)
        cause = info.value.cause
        assert type(cause) is kind and (cause.param, cause.status) == (param, 400), cause
        assert (_engine_error(info.value).status, _engine_error(info.value).param) == (400, param)
    with pytest.raises(NoLiveGroupError) as info:
        ray.get(_raise.remote(NoLiveGroupError("no live DP group to serve it (dp group 0 died)")), timeout=60)
    cause = info.value.cause
    assert (str(cause), cause.status, cause.param) == ("no live DP group to serve it (dp group 0 died)", 503, None)
    assert _engine_error(info.value).status == 503


def test_requests_go_to_the_least_loaded_group(local_ray, tiny_checkpoint):
    """Without prefix caching, routing is by load alone. (With it, a group within `route_slack` of the least
    loaded that holds a prompt's prefix wins, and whether it holds one yet depends on when its prefill ran.)"""
    coordinator = _engine(
        tiny_checkpoint,
        "online-dp2",
        "world_size=2",
        "parallel_config.tp_size=1",
        "data_config.batch_size=4",
        "prefix_caching=false",
    )
    try:
        requests = [{"id": f"b{i}", "prompt": "Hello.", "max_new_tokens": 40, "ignore_eos": True} for i in range(4)]
        records = ray.get(coordinator.generate.remote(requests), timeout=120)
        assert sorted(r["dp_rank"] for r in records) == [0, 0, 1, 1]
    finally:
        stop(coordinator)


DRIVER = """
import json, pathlib, sys, time, ray
ray.init(address=sys.argv[1], namespace="online-tp1", log_to_driver=False)
c = ray.get_actor("coordinator")  # looked up before the start signal
folder, me, other = pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
request = {"id": me, "prompt": "Tell me a story.", "max_new_tokens": 8000, "ignore_eos": True}
print("ready", flush=True)
while not (folder / "go").exists():
    time.sleep(0.01)
stream = c.stream.options(num_returns="streaming").remote(request)
ray.get(next(stream), timeout=120)  # a first token: this request runs
(folder / me).touch()
deadline = time.monotonic() + 120
while not (folder / other).exists() and time.monotonic() < deadline:  # until the other one runs too
    time.sleep(0.01)
ray.get(c.abort.remote(me), timeout=30)
for ref in stream:
    item = ray.get(ref, timeout=60)
print(json.dumps(item), flush=True)
"""


def test_two_drivers_are_served_at_once(engines, tmp_path):
    """Each driver's request streams tokens, and is aborted only once the other driver's request has streamed
    its first token: both ending aborted (not by length) shows both ran at the same time, whatever the load."""
    address = ray.get_runtime_context().gcs_address
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, address, str(tmp_path), me, other],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for me, other in (("A", "B"), ("B", "A"))
    ]
    try:
        with ThreadPoolExecutor(2) as pool:
            assert all(pool.map(lambda p: p.stdout.readline().strip() == "ready", procs))
            (tmp_path / "go").touch()
            outputs = list(pool.map(lambda p: p.communicate(timeout=300)[0], procs))
    finally:
        for p in procs:
            p.kill()
    records = {name: json.loads(out.strip().splitlines()[-1]) for name, out in zip("AB", outputs)}
    for record in records.values():
        assert record["final"] and record["error"] is None and record["finish_reason"] == "abort", record
        assert 0 < len(record["output_token_ids"]) < 8000
    assert (tmp_path / "A").exists() and (tmp_path / "B").exists()


def _actor_repr(handle) -> str:
    """The actor's repr, evaluated in its own process (what Ray records for the dashboard)."""
    return ray.get(handle.__ray_call__.remote(lambda self: repr(self)), timeout=30)


def test_actor_reprs_name_rank_tp_dp_and_device(engines):
    assert _actor_repr(engines["tp2"]) == (
        "Coordinator(dp_size=1, tp_size=2, world_size=2, device=cpu, policy=continuous)"
    )
    for rank in (0, 1):
        worker = ray.get_actor(f"shard-worker-{rank}", namespace="online-tp2")
        assert _actor_repr(worker) == f"ShardWorker(rank={rank}, tp={rank}/2, dp=0, device=cpu)"
