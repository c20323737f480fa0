"""Vision encode under a budget per round, through the group loop over the fake worker group (no Ray, no model).

A video request's temporal slices are encoded over several rounds while a text request decodes: every round
still steps the decoding request, the video request starts on the workers once its last slice is encoded,
and an abort or a failed encode in the middle of it leaves the workers holding none of its embeddings and
fails that request alone. Tokens are checked against the fake's toy model run on each request alone.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from actors.group_loop import GroupLoop
from actors.scheduler import GroupScheduler, Plan, Sequence
from cluster.tools.fake_workers import FakeWorkerGroup
from tests.test_group_loop import EOS, Owner, check_against_reference, make_seq

SLICES, SLICE_TOKENS = 4, 2  # the video: 4 temporal slices of 2 x 4 patches, 2 merged tokens each


def with_video(seq: Sequence, start: int) -> Sequence:
    """`seq` with a video whose tokens are prompt[start:start + 8], in SLICES slices (the fake reads no pixels)."""
    end = start + SLICES * SLICE_TOKENS
    seq.images, seq.image_slices = [(start, end, seq.request_id.encode())], [SLICES]
    prepared = seq.payload.prepared
    prepared.image_grid_thw = torch.tensor([[SLICES, 2, 4]])
    prepared.pixel_values = torch.zeros(SLICES * 8, 8)
    return seq


def new_loop(group: FakeWorkerGroup, lookahead: bool = False) -> tuple[GroupLoop, list[Plan]]:
    """A loop whose scheduler encodes one slice a round; the plans it made, as it makes them."""
    sched = GroupScheduler(4, 64, 4, "continuous", 64, 4, encoder_budget=SLICE_TOKENS)
    loop = GroupLoop(group, sched, sorted(EOS), lookahead=lookahead)
    plans: list[Plan] = []
    schedule = sched.schedule

    def recorded() -> Plan:
        plans.append(schedule())
        return plans[-1]

    sched.schedule = recorded
    return loop, plans


def encoded(plans: list[Plan], request_id: str) -> list[int]:
    """The rounds (indices into `plans`) that encoded items of `request_id`."""
    return [i for i, plan in enumerate(plans) if any(s.request_id == request_id for s, _, _ in plan.encode)]


@pytest.mark.parametrize("lookahead", [False, True])
def test_decoding_goes_on_in_every_round_of_a_video_encode_and_an_abort_frees_its_embeddings(lookahead: bool) -> None:
    group = FakeWorkerGroup(0)
    loop, plans = new_loop(group, lookahead)
    text = make_seq("a", 6, 30)
    video, dropped = with_video(make_seq("v", 14, 6), 3), with_video(make_seq("w", 14, 6), 3)

    async def main() -> Owner:
        await group.start()
        owner = Owner(loop)
        loop.scheduler.add(text)
        await owner.round()  # "a" prefilled; it decodes from now on
        loop.scheduler.add(video)
        loop.scheduler.add(dropped)
        while "w" not in group.embeds:  # "v" encodes first, a slice a round, then "w"
            await owner.round()
        assert 0 < group.embeds["w"] < SLICES * 8  # part of its patches
        loop.scheduler.abort("w")
        await owner.round()
        assert "w" not in group.embeds  # dropped with its release
        await owner.run()
        return owner

    owner = asyncio.run(main())
    check_against_reference(owner, [text, video])
    rounds = encoded(plans, "v")
    assert len(rounds) == SLICES and rounds == list(range(rounds[0], rounds[0] + SLICES))
    started = [i for i, plan in enumerate(plans) if video in plan.admit]
    assert started == [rounds[-1]]  # started with its last slice, not before
    assert all(text in plans[i].decode for i in rounds + encoded(plans, "w"))  # "a" stepped in each of them
    assert not group.embeds and group.seqs == {} and loop.scheduler.pool.stats()["used"] == 0


def test_a_failed_encode_in_the_middle_of_a_video_fails_that_request_alone() -> None:
    group = FakeWorkerGroup(0)
    loop, plans = new_loop(group)
    text, good = make_seq("a", 6, 30), with_video(make_seq("good", 14, 6), 3)
    bad = with_video(make_seq("bad", 14, 6), 3)

    async def main() -> Owner:
        await group.start()
        owner = Owner(loop)
        loop.scheduler.add(text)
        await owner.round()
        loop.scheduler.add(bad)
        loop.scheduler.add(good)
        await owner.round()  # the first slice of "bad"
        assert group.embeds == {"bad": 8}
        group.encode_errors["bad"] = "frame 3 of 'bad' cannot be decoded"
        await owner.run()
        return owner

    owner = asyncio.run(main())
    assert set(owner.errors) == {"bad"} and "cannot be decoded" in owner.errors["bad"]
    check_against_reference(owner, [text, good])
    rounds = encoded(plans, "bad")
    assert len(rounds) == 2 and text in plans[rounds[1]].decode  # the next slice failed; "a" stepped in that round
    assert not any(bad in plan.admit for plan in plans)
    assert not group.embeds and group.seqs == {} and loop.scheduler.pool.stats()["used"] == 0
