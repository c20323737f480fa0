"""One Coordinator per DP group behind a router (actors/router.py), without Ray.

Each group Coordinator runs in this process over a fake DP group, and `LocalHandle` stands in for
every Ray handle (the router's to its groups, the caller's to the router), so routing, forwarding,
the callers' reading of every group's deliveries and the liveness bookkeeping are tested here;
tests/test_online.py runs the same through Ray on the tiny checkpoint.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import ray

from actors.config import EngineConfig, WorkerConfig
from actors.coordinator import Coordinator
from actors.deliveries import Deliveries
from actors.errors import NoLiveGroupError, RequestError
from actors.prefix_view import CHUNK_CHARS, PrefixView, chunk_keys, request_text
from actors.router import GroupPlacement, Router
from cluster.tools.fake_workers import FakeWorkerGroup, LocalHandle
from tests.test_deliveries import read_all, until
from tests.test_group_loop import NoPlacement, expected, requests


class LocalRouter(Router):
    """The router with its group Coordinators in this process."""

    def _spawn(self, dp_rank: int, placement: GroupPlacement, group_factory: Any) -> LocalHandle:
        return LocalHandle(Coordinator(self.cfg, placement, [0], group_factory, [dp_rank]))

    def coordinators(self) -> list[Coordinator]:
        return [g._target for g in self.groups]


def router(model_path: Path, dp_size: int, max_batch_size: int = 4) -> LocalRouter:
    worker = WorkerConfig(str(model_path), "cpu", "float32", "eager", "tp", max_batch_size, 256)
    cfg = EngineConfig(
        worker, tp_size=1, dp_size=dp_size, worker_options={}, namespace="test", input_max_len=200,
        max_images_per_prompt=1, max_group_restarts=0,
    )  # fmt: skip
    return LocalRouter(cfg, NoPlacement(), list(range(dp_size)), group_factory=FakeWorkerGroup)


def test_requests_are_served_by_every_group_and_read_from_each(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        r = router(tiny_checkpoint, dp_size=2)
        topology = await r.setup()
        assert [i["dp_rank"] for i in topology] == [0, 1]
        assert [repr(c).endswith("dp_ranks=[0])") for c in r.coordinators()] == [True, False]
        ref = r.coordinators()[0]
        deliveries = Deliveries(LocalHandle(r))
        reqs = requests(8, 6)
        results = await asyncio.gather(*(read_all(deliveries.open(q, ack=True)) for q in reqs))
        for request, items in zip(reqs, results):
            final = items[-1]
            assert items[0] == {"id": request["id"], "token_ids": [], "text": "", "accepted": True}
            assert final["error"] is None and final["output_token_ids"] == expected(ref, request)
            assert [t for d in items[1:-1] for t in d["token_ids"]] == final["output_token_ids"]
            assert "".join(d["text"] for d in items[1:-1]) == final["output_text"]
        assert {items[-1]["dp_rank"] for items in results} == {0, 1}  # the load was spread
        # generate and the relayed stream give the same tokens.
        records = await r.generate(reqs[:3] + [{"id": "bad", "prompt": "x", "max_new_tokens": 0}])
        assert [x["output_token_ids"] for x in records[:3]] == [x[-1]["output_token_ids"] for x in results[:3]]
        assert "max_new_tokens" in records[3]["error"]
        streamed = [item async for item in r.stream(reqs[4], ack=True)]
        assert streamed[0]["accepted"] and streamed[-1]["output_token_ids"] == results[4][-1]["output_token_ids"]
        assert await r.progress() == (13, 13)
        assert (await r.status())["live_groups"] == 2
        assert [s["dp_rank"] for s in await r.kv_cache_stats()] == [0, 1]
        assert len((await r.stats())["workers"]) == 2
        await deliveries.close()
        await until(lambda: not any(c.outboxes or c.requests for c in r.coordinators()))  # both connections closed
        await r.shutdown()
        assert not ray.is_initialized()  # in-process groups: nothing here may start Ray (later modules start their own)

    asyncio.run(main())


class OneSource:
    """A caller's view of the router that does not know its `delivery_sources`: it reads `deliveries`."""

    def __init__(self, r: Router) -> None:
        self.submit, self.deliveries, self.delivery_address = r.submit, r.deliveries, r.delivery_address

    def delivery_sources(self) -> list:
        return []


def test_the_routers_own_deliveries_merge_every_groups(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        r = router(tiny_checkpoint, dp_size=2)
        await r.setup()
        deliveries = Deliveries(LocalHandle(OneSource(r)))
        reqs = requests(6, 4)
        results = await asyncio.gather(*(read_all(deliveries.open(q)) for q in reqs))
        assert {items[-1]["dp_rank"] for items in results} == {0, 1}
        for request, items in zip(reqs, results):
            assert items[-1]["output_token_ids"] == expected(r.coordinators()[0], request)
            assert [t for d in items[:-1] for t in d["token_ids"]] == items[-1]["output_token_ids"]
        await deliveries.close()
        await until(lambda: not any(c.outboxes for c in r.coordinators()))  # closing ends every group's stream
        await r.shutdown()

    asyncio.run(main())


def test_refused_requests_raise_their_own_error_through_the_router(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        r = router(tiny_checkpoint, dp_size=2)
        await r.setup()
        deliveries = Deliveries(LocalHandle(r))
        bad = {"id": "bad", "prompt": "hello", "max_new_tokens": 0}
        with pytest.raises(RequestError, match="max_new_tokens") as raised:
            await deliveries.open(bad, ack=True).__anext__()
        assert raised.value.param == "max_new_tokens"
        with pytest.raises(RequestError, match="max_new_tokens"):
            await r.stream(bad).__anext__()
        assert all(r.alive)  # a request's own error says nothing about the group
        await deliveries.close()
        await r.shutdown()

    asyncio.run(main())


def test_a_stream_whose_consumer_goes_away_and_an_abort_free_the_group(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        r = router(tiny_checkpoint, dp_size=1)
        await r.setup()
        coord = r.coordinators()[0]
        group = coord.engines[0].group
        group.hold, group.entered = asyncio.Event(), asyncio.Event()
        gen = r.stream({"id": "gone", "prompt": "going away", "max_new_tokens": 50, "ignore_eos": True}, ack=True)
        assert (await gen.__anext__())["accepted"]
        await group.entered.wait()
        await gen.aclose()  # the consumer goes away: the group's stream is cancelled, which aborts it
        await until(lambda: not coord.requests)
        assert coord.engines[0].scheduler.load == 0
        aborted = asyncio.ensure_future(r.generate(requests(1, 50)))
        await until(lambda: bool(coord.requests))
        assert await r.abort("r0") is True
        group.hold.set()
        assert (await aborted)[0]["finish_reason"] == "abort"
        assert not coord.requests and coord.engines[0].scheduler.load == 0
        assert await r.abort("r0") is False
        await r.shutdown()

    asyncio.run(main())


def test_a_group_that_is_not_live_is_skipped_until_none_is(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        r = router(tiny_checkpoint, dp_size=2)
        await r.setup()
        first, second = (c.engines[0].group for c in r.coordinators())
        first.alive = False  # as after a worker died; the router has not heard yet
        deliveries = Deliveries(LocalHandle(r))
        items = await read_all(deliveries.open(requests(1, 3)[0]))
        assert items[-1]["dp_rank"] == 1 and r.alive == [False, True]
        second.alive = False
        with pytest.raises(NoLiveGroupError):
            await deliveries.open(requests(1, 3)[0]).__anext__()
        assert "no live DP group" in (await r.generate(requests(1, 3)))[0]["error"]
        await deliveries.close()
        await r.shutdown()

    asyncio.run(main())


def test_routing_follows_load_then_the_prefix_a_group_was_sent(tiny_checkpoint: Path) -> None:
    r = router(tiny_checkpoint, dp_size=2, max_batch_size=4)  # route_slack 1
    story = "Once upon a time " * 20
    assert r._pick({"id": "a", "prompt": story}) == 0  # a tie: the lower rank
    assert r._pick({"id": "b", "prompt": "something else " * 20}) == 1  # less loaded
    assert r._pick({"id": "c", "prompt": story + " and then"}) == 0  # loads close: the group with its prefix
    assert r._pick({"id": "d", "prompt": story + " again"}) == 0  # 2 vs 1 in flight: still close
    r.loads[0] = 10  # reported busy: the prefix no longer outweighs the load
    assert r._pick({"id": "e", "prompt": story}) == 1
    r.received = list(r.routed)  # every routed request reported: loads are what the groups said
    r.loads = [0, 0]
    image_a = {"id": "f", "prompt": story, "images": [b"pixels of a"]}
    image_b = {"id": "g", "prompt": story, "images": [b"pixels of b"]}
    assert r._pick(image_a) == 0 and r.views[0].hit(chunk_keys(request_text(image_b))) == 0  # other image: no hit


def test_request_text_and_prefix_view() -> None:
    chat = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
                                                      {"type": "text", "text": "hi " * 40}]}]}  # fmt: skip
    longer = {"messages": chat["messages"] + [{"role": "assistant", "content": "hello " * 20}]}
    keys, more = chunk_keys(request_text(chat)), chunk_keys(request_text(longer))
    assert keys and more[: len(keys)] == keys  # a conversation extends its own prefix
    other = {"messages": [{**chat["messages"][0], "content": [{"type": "image_url", "image_url": {"url": "b.png"}},
                                                              {"type": "text", "text": "hi " * 40}]}]}  # fmt: skip
    assert not set(chunk_keys(request_text(other))) & set(keys)
    resized = {**chat, "mm_processor_kwargs": {"max_pixels": 4096}}
    assert not set(chunk_keys(request_text(resized))) & set(keys)
    assert len(chunk_keys("x" * (3 * CHUNK_CHARS - 1))) == 2 and request_text("not a dict") == ""
    view = PrefixView(3)
    view.add([1, 2])
    view.add([3, 4])  # 1 is evicted
    assert view.hit([1, 2]) == 0 and view.hit([2, 3, 9]) == 2
    with pytest.raises(ValueError, match="capacity"):
        PrefixView(0)
