"""Requests with n > 1 choices without a model: the block pool's `share`, the scheduler's fork of the choices from
one prefill, the group loop with async scheduling, and the Coordinator's streams and records (fake workers).

The fake group (cluster/tools/fake_workers.py) gives a sampled request tokens that depend on its prompt and its
seed, so each choice is checked against the toy model run alone with the seed seed + index.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path

import pytest

from actors.coordinator import Coordinator
from actors.kv_blocks import BlockPool
from actors.scheduler import DECODING, FORKING, WAITING, GroupScheduler, Sequence
from cluster.tools.fake_workers import sampled_seed, toy_token
from model.sampling import SamplingParams
from tests.test_group_loop import EOS, Owner, coordinator, make_seq
from tests.test_lookahead import check_block_owners, new_loop


def with_choices(name: str, prompt_len: int, max_new_tokens: int, n: int, seed: int = 7) -> list[Sequence]:
    """An n > 1 request as the Coordinator queues it: choice 0 carrying the others, choice i sampled with seed + i."""
    seqs = []
    for i in range(n):
        seq = make_seq(name, prompt_len, max_new_tokens)
        seq.request_id = f"{name}/{i}"
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed + i)
        seq.payload = dataclasses.replace(seq.payload, params=params)
        seqs.append(seq)
    seqs[0].forks = seqs[1:]
    return seqs


def alone(seq: Sequence, eos: set[int]) -> tuple[list[int], str]:
    """The toy model's tokens and finish reason for `seq` served alone with its own seed."""
    seed, out = sampled_seed(seq.prompt_ids, seq.payload.params), []
    while len(out) < seq.max_new_tokens:
        out.append(toy_token(seed, len(out)))
        if out[-1] in eos:
            return out, "stop"
    return out, "length"


# ----------------------------------------------------------------------------- the block pool
def test_share_takes_the_full_blocks_and_a_fresh_block_for_the_partial_one() -> None:
    pool = BlockPool(num_blocks=12, block_size=4, caching=False)
    assert pool.allocate("p", 10, [], reserve=2) == 0
    fresh = [pool.share(f"c{i}", "p", 10) for i in (1, 2)]
    parent = pool.table("p")
    for i, block in zip((1, 2), fresh):
        assert pool.table(f"c{i}") == parent[:2] + [block]
    assert len({parent[2], *fresh}) == 3
    assert pool.stats()["used"] == 5  # 3 of the parent's, one copy per choice
    pool.check()  # reference counts: 3 holders for each full block
    for owner in ("p", "c1", "c2"):
        pool.free(owner)
    pool.check()
    assert pool.stats()["used"] == 0
    assert pool.allocate("q", 8, []) == 0 and pool.share("d", "q", 8) is None  # no partial block: nothing to copy
    assert pool.table("d") == pool.table("q")


def test_allocate_leaves_the_reserve_free() -> None:
    pool = BlockPool(num_blocks=5, block_size=4, caching=False)  # 4 blocks
    assert pool.allocate("p", 10, [], reserve=2) is None  # 3 + 2 do not fit
    assert pool.allocate("p", 10, [], reserve=1) == 0


# ----------------------------------------------------------------------------- the scheduler
def test_the_last_prompt_chunk_forks_the_choices_with_a_copy_of_the_partial_block() -> None:
    sched = GroupScheduler(4, 20, 4, "continuous", token_budget=4, decode_steps_per_call=1)
    p, c1, c2 = with_choices("x", 10, 3, 3)
    sched.add(p)
    assert sched.load == 3 and c1.state == FORKING
    plan = sched.schedule()  # the first chunk: the choices run with their parent, holding its blocks
    assert [s.request_id for s in plan.admit] == ["x/0"] and plan.chunks == [(p, 0, 4)] and not plan.forks
    assert sched.running == [p, c1, c2] and c1.state == FORKING
    sched.prefilled(p, 4)
    sched.prefilled(p, 8) if sched.schedule().chunks == [(p, 4, 8)] else pytest.fail("second chunk")
    plan = sched.schedule()  # the last chunk forks
    assert plan.chunks == [(p, 8, 10)]
    parent = sched.pool.table("x/0")
    assert [(a.request_id, b.request_id) for a, b, _ in plan.forks] == [("x/0", "x/1"), ("x/0", "x/2")]
    for _, child, copy in plan.forks:
        table = plan.block_tables[child.request_id]
        assert table[:2] == parent[:2] and copy == (parent[2], table[2]) and table[2] != parent[2]
        assert child.state == DECODING and child.in_flight == 1 and child.num_computed == 10
    sched.prefilled(p, 10)
    for seq in (p, c1, c2):
        sched.append(seq, [500])
    plan = sched.schedule()
    assert plan.decode == [p, c1, c2] and plan.chunks == []
    assert sched.stats()["prefill_tokens"] == 10  # the prompt once
    for seq in (p, c1, c2):
        sched.finish(seq, "length")
    sched.pool.check()
    assert sched.pool.stats()["used"] == 0 and sched.idle is False  # releases still to send
    assert sorted(sched.schedule().releases) == ["x/0", "x/1", "x/2"] and sched.idle


def test_a_request_waits_for_room_for_all_its_choices() -> None:
    sched = GroupScheduler(3, 40, 4, "continuous", token_budget=64, decode_steps_per_call=1)
    a = make_seq("a", 5, 4)
    sched.add(a)
    p, *_ = with_choices("x", 6, 3, 3)
    sched.add(p)
    plan = sched.schedule()
    assert plan.admit == [a] and p.state == WAITING  # 1 + 3 sequences > max_running 3
    with pytest.raises(ValueError, match="n=4 choices exceed max_running=3"):
        sched.add(with_choices("y", 6, 3, 4)[0])


def test_a_forking_choice_picked_for_preemption_takes_its_parent_and_then_forks_again() -> None:
    """A decoding request needs a block when the newest running sequence is a choice still waiting for its
    parent's prompt: the parent goes back to the queue with all its choices (holding nothing), and forks them
    when it is admitted again."""
    sched = GroupScheduler(4, 8, 4, "continuous", token_budget=4, decode_steps_per_call=1)  # 7 blocks
    a = make_seq("a", 4, 20)
    sched.add(a)
    sched.schedule()
    sched.prefilled(a, 4)
    sched.append(a, [500])
    p, c1, c2 = with_choices("x", 10, 3, 3)
    sched.add(p)
    plan = sched.schedule()  # a grows to 2 blocks, x takes 3 + 2 copies: 7 of 8
    assert plan.admit == [p] and sched.running == [a, p, c1, c2]
    sched.prefilled(p, plan.chunks[-1][2])
    for _ in range(4):  # a decodes until its third block is missing
        sched.append(a, [500])
    assert sched.pool.held("a") == 2
    plan = sched.schedule()
    assert plan.preempted == ["x/0"] and sched.running == [a]
    assert p.state == WAITING and c1.state == c2.state == FORKING and sched.load == 4
    assert sched.pool.held("x/1") == 0
    sched.pool.check()
    for seq in (a,):
        sched.finish(seq, "length")
    plan = sched.schedule()
    assert plan.admit == [p] and sched.running == [p, c1, c2]  # forks again when its prompt is done


def test_a_forked_choice_preempted_is_recomputed_alone_and_an_abort_before_the_fork_ends_every_choice() -> None:
    owner_seqs = with_choices("x", 10, 12, 3)
    loop = new_loop(num_blocks=12, max_running=4, budget=16)
    other = make_seq("o", 7, 12)

    async def main() -> Owner:
        await loop.group.start()
        owner = Owner(loop)
        loop.scheduler.add(owner_seqs[0])
        loop.scheduler.add(other)
        await owner.run(2000)
        return owner

    owner = asyncio.run(main())
    assert not owner.errors and owner_seqs[2].preemptions == 1  # a forked choice, recomputed alone
    for seq in owner_seqs:
        want, reason = alone(seq, EOS)
        assert owner.tokens[seq.request_id] == want and owner.reasons[seq.request_id] == reason, seq.request_id
    assert loop.scheduler.pool.stats()["used"] == 0 and loop.group.seqs == {}
    check_block_owners(loop.group.writes)

    sched = GroupScheduler(4, 20, 4, "continuous", token_budget=4, decode_steps_per_call=1)
    p, c1, c2 = with_choices("y", 10, 3, 3)
    sched.add(p)
    sched.schedule()
    sched.abort("y/0")
    assert c1.state == c2.state == "finished" and sched.running == [] and not sched.by_id
    sched.pool.check()
    assert sched.pool.stats()["used"] == 0 and sched.schedule().releases == ["y/0"]


def test_choices_under_async_scheduling_get_their_own_tokens_and_every_block_write_is_in_plan_order() -> None:
    """Requests with 1 to 4 choices, chunked prompts, a small pool (preemption of parents and choices), EOS and
    length, one-step calls planned ahead: every choice's tokens as served alone with its seed; blocks written in
    plan order (the partial-block copies included); everything freed."""
    rng = random.Random(3)
    for seed in range(3):
        loop = new_loop(num_blocks=18, max_running=6, budget=12)
        seqs, queued = [], []
        for i in range(6):
            n = rng.randint(1, 4)
            group = with_choices(f"r{seed}-{i}", rng.randint(3, 15), rng.randint(2, 14), n, seed=rng.randint(0, 99))
            seqs.extend(group)
            queued.append(group[0])

        async def main(loop=loop, queued=queued) -> Owner:
            await loop.group.start()
            owner = Owner(loop)
            for seq in queued:
                loop.scheduler.add(seq)
            await owner.run(3000)
            return owner

        owner = asyncio.run(main())
        assert not owner.errors
        for seq in seqs:
            want, reason = alone(seq, EOS)
            assert owner.tokens[seq.request_id] == want, seq.request_id
            assert owner.reasons[seq.request_id] == reason, seq.request_id
        assert loop.scheduler.pool.stats()["used"] == 0 and loop.group.seqs == {}
        assert loop.group.copies, "no partial block was copied"
        check_block_owners(loop.group.writes)


# ----------------------------------------------------------------------------- the Coordinator
def _coordinator(tiny_checkpoint: Path) -> Coordinator:
    return coordinator(tiny_checkpoint, dp_size=1, max_batch_size=4, restarts=0)


def test_n_choices_stream_with_their_index_and_equal_single_requests_with_the_derived_seeds(
    tiny_checkpoint: Path,
) -> None:
    async def main() -> None:
        coord = _coordinator(tiny_checkpoint)
        await coord.setup()
        request = {"id": "q", "prompt": "three ways", "max_new_tokens": 6, "temperature": 1.0, "seed": 5}
        before = coord.kv_cache_stats()[0]["prefill_tokens"]
        items = [item async for item in coord.stream({**request, "n": 3})]
        prefilled = coord.kv_cache_stats()[0]["prefill_tokens"] - before
        final = items[-1]
        assert final["final"] and final["error"] is None and len(final["choices"]) == 3
        assert prefilled == final["prompt_tokens"]  # one prefill for the three choices
        singles = await coord.generate([{**request, "id": f"s{i}", "seed": 5 + i} for i in range(3)])
        for i, (choice, single) in enumerate(zip(final["choices"], singles)):
            assert choice["index"] == i and choice["token_ids"] == single["output_token_ids"]
            assert choice["text"] == single["output_text"] and choice["finish_reason"] == single["finish_reason"]
            deltas = [item for item in items[:-1] if item.get("index") == i]
            assert [t for item in deltas for t in item["token_ids"]] == choice["token_ids"]
            assert "".join(item["text"] for item in deltas) == choice["text"]
        assert len({tuple(c["token_ids"]) for c in final["choices"]}) == 3
        assert final["output_token_ids"] == final["choices"][0]["token_ids"]
        plain = (await coord.generate([request]))[0]
        assert "choices" not in plain  # n = 1: the record as before
        assert coord.progress() == (5, 5)
        await coord.shutdown()

    asyncio.run(main())


def test_each_choice_ends_at_its_own_stop_string(tiny_checkpoint: Path) -> None:
    """A stop string taken from the middle of choice 1's text ends choice 1 there; a choice whose text does not
    hold it runs to its length."""

    async def main() -> None:
        coord = _coordinator(tiny_checkpoint)
        await coord.setup()
        request = {"id": "q", "prompt": "stop here", "max_new_tokens": 12, "temperature": 1.0, "seed": 9, "n": 3}
        full = (await coord.generate([request]))[0]["choices"]
        text = full[1]["text"]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        cut = (await coord.generate([{**request, "stop": stop}]))[0]["choices"]
        for before, after in zip(full, cut):
            if stop in before["text"]:
                assert after["text"] == before["text"][: before["text"].index(stop)]
                assert after["finish_reason"] == "stop"
            else:
                assert after == before
        assert cut[1]["finish_reason"] == "stop" and len(cut[1]["token_ids"]) < len(full[1]["token_ids"])
        await coord.shutdown()

    asyncio.run(main())


def test_abort_ends_every_choice_and_n_above_the_batch_is_refused_naming_n(tiny_checkpoint: Path) -> None:
    async def main() -> None:
        coord = _coordinator(tiny_checkpoint)
        await coord.setup()
        group = coord.engines[0].group
        group.hold, group.entered = asyncio.Event(), asyncio.Event()
        request = {"id": "q", "prompt": "go on", "max_new_tokens": 50, "ignore_eos": True, "n": 3}
        done = asyncio.create_task(coord.generate([request]))
        await group.entered.wait()
        assert coord.abort("q")
        group.hold.set()
        record = (await done)[0]
        assert record["finish_reason"] == "abort" and [c["finish_reason"] for c in record["choices"]] == ["abort"] * 3
        assert coord.requests == {} and coord.keys_by_id == {}
        group.hold = group.entered = None
        refused = (await coord.generate([{**request, "n": 5}]))[0]
        assert "'n'=5" in refused["error"] and "batch_size=4" in refused["error"]
        stats = coord.kv_cache_stats()[0]
        assert stats["used"] == 0 and stats["running"] == stats["waiting"] == 0
        await coord.shutdown()

    asyncio.run(main())
