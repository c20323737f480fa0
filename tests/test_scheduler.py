"""The per-group scheduler as a pure state machine, driven by fake workers (no Ray, no model).

The fake workers play the group's part with a toy model whose KV cache is the block pool: each
position of a block holds the (token, image) it was computed from, and the next token is a hash of
the history read back through the request's block table. A wrong table, a bad prefix-cache hit, a
block written while another request holds it, or a lost or repeated token after a preemption all
change the tokens, which are checked against the same toy model run on the true history.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.kv_blocks import NULL_BLOCK
from actors.scheduler import (
    DECODING,
    FINISHED,
    PREFILLING,
    WAITING,
    GroupScheduler,
    Plan,
    SeqState,
    Sequence,
)
from actors.vision_items import first_to_encode

VOCAB = 1000
IMAGE_PAD = 7
EOS_EVERY = 29  # a request with eos=True ends at its first token divisible by this


def _item_bytes(token: int, image: bytes) -> bytes:
    return token.to_bytes(4, "little") + image


def toy_next(items: list[tuple[int, bytes]]) -> int:
    """The toy model: the next token is a hash of the (token, image) history."""
    digest = hashlib.sha256(b"".join(_item_bytes(t, i) for t, i in items)).digest()
    return 1 + int.from_bytes(digest[:4], "little") % (VOCAB - 1)


def image_at(seq: Sequence, pos: int) -> bytes:
    return next((h for s, e, h in seq.images if s <= pos < e), b"")


def reference(seq: Sequence, eos: bool) -> tuple[list[int], str]:
    """The tokens and finish reason of `seq` generated alone, without any scheduler."""
    items = [(t, image_at(seq, p)) for p, t in enumerate(seq.prompt_ids)]
    out: list[int] = []
    while len(out) < seq.max_new_tokens:
        tok = toy_next(items)
        out.append(tok)
        if eos and tok % EOS_EVERY == 0:
            return out, "eos"
        items.append((tok, b""))
    return out, "length"


@dataclass
class FakeWorkers:
    """The group's workers: they follow each plan exactly and report back as the Coordinator does."""

    sched: GroupScheduler
    eos: set[str] = field(default_factory=set)  # request ids that may end at EOS
    kv: dict[int, list] = field(default_factory=dict)  # block -> [(token, image) | None] * block_size
    known: set[str] = field(default_factory=set)  # requests with sampling state or embeddings on the workers
    encoded: dict[str, int] = field(default_factory=dict)  # request -> vision items encoded ahead of its start
    ended: dict[str, tuple[list[int], str]] = field(default_factory=dict)
    plans: list[Plan] = field(default_factory=list)

    def round(self) -> Plan:
        sched = self.sched
        plan = sched.schedule()
        self.plans.append(plan)
        told = set(plan.releases) | set(plan.preempted)
        for seq, first, end in plan.encode:  # before the step: its items in order, after its cached prefix
            rid = seq.request_id
            assert rid not in told, f"{rid!r} encoded in the plan that drops it"
            assert first == self.encoded.get(rid, first_to_encode(seq.vision_items, seq.num_cached)) < end
            self.encoded[rid] = end
            self.known.add(rid)
        for rid in plan.releases:
            assert rid in self.known, f"release of {rid!r}, unknown to the workers"
            self.known.remove(rid)
            self.encoded.pop(rid, None)
        for rid in plan.preempted:
            assert rid in self.known, f"preemption of {rid!r}, unknown to the workers"
            self.encoded.pop(rid, None)
        for seq in plan.admit:  # started with every item after its cached prefix encoded
            items = seq.vision_items
            assert self.encoded.pop(seq.request_id, first_to_encode(items, seq.num_cached)) == len(items)
            self.known.add(seq.request_id)
            table = plan.block_tables[seq.request_id]
            for pos in range(seq.num_cached):  # a prefix-cache hit holds exactly this request's history
                assert self._read(table, pos) == (seq.tokens[pos], image_at(seq, pos)), f"bad hit at {pos}"
        sampled: dict[str, list[int]] = {}
        for seq, start, end in plan.chunks:
            assert start == seq.num_computed and seq.state == PREFILLING and seq.request_id in self.known
            table = plan.block_tables[seq.request_id]
            for pos in range(start, end):
                self._write(seq, table, pos, (seq.tokens[pos], image_at(seq, pos)))
            sched.prefilled(seq, end)
            if end == len(seq.tokens):
                sampled[seq.request_id] = [toy_next(self._history(table, end))]
        for seq in plan.decode:
            assert seq.state == DECODING and seq.num_computed == len(seq.tokens) - 1
            table, toks = plan.block_tables[seq.request_id], []
            for _ in range(plan.decode_steps):
                pos = len(seq.tokens) + len(toks) - 1
                last = toks[-1] if toks else seq.tokens[-1]
                self._write(seq, table, pos, (last, b""))
                toks.append(toy_next(self._history(table, pos + 1)))
                if self._ends(seq, len(seq.output_ids) + len(toks), toks[-1]):
                    break
            sampled[seq.request_id] = toks
        for rid, toks in sampled.items():
            seq = sched.by_id[rid]
            sched.append(seq, toks)
            reason = self._ends(seq, len(seq.output_ids), toks[-1])
            if reason:
                sched.finish(seq, reason)
                self.ended[rid] = (list(seq.output_ids), reason)
        return plan

    def _ends(self, seq: Sequence, n_out: int, last: int) -> str | None:
        if seq.request_id in self.eos and last % EOS_EVERY == 0:
            return "eos"
        return "length" if n_out >= seq.max_new_tokens else None

    def _write(self, seq: Sequence, table: list[int], pos: int, item: tuple[int, bytes]) -> None:
        pool = self.sched.pool
        assert pos // pool.block_size < len(table), f"{seq.request_id}: no block for position {pos}"
        block = table[pos // pool.block_size]
        assert block != NULL_BLOCK
        assert block not in pool._key_of, f"{seq.request_id}: writes cached block {block}"
        assert pool._ref[block] == 1, f"{seq.request_id}: writes block {block}, shared by {pool._ref[block]}"
        self.kv.setdefault(block, [None] * pool.block_size)[pos % pool.block_size] = item

    def _read(self, table: list[int], pos: int):
        bs = self.sched.pool.block_size
        return self.kv.get(table[pos // bs], [None] * bs)[pos % bs]

    def _history(self, table: list[int], end: int) -> list[tuple[int, bytes]]:
        return [self._read(table, p) for p in range(end)]

    def run(self, max_rounds: int = 10_000) -> None:
        for _ in range(max_rounds):
            if self.sched.idle:
                return
            self.round()
            check_invariants(self.sched)
        raise AssertionError("the scheduler did not drain")

    def fail_group(self) -> list[Sequence]:
        """The group failed: its workers (and their caches) are rebuilt empty."""
        self.known.clear()
        self.encoded.clear()
        self.kv.clear()
        return self.sched.take_all()


def check_invariants(sched: GroupScheduler) -> None:
    """The pool is consistent, and the scheduler's view of who holds what agrees with it."""
    sched.pool.check()
    running = {s.request_id for s in sched.running}
    waiting = {s.request_id for s in sched.waiting}
    assert not running & waiting and set(sched.by_id) == running | waiting
    assert len(sched.running) <= sched.max_running
    assert set(sched.pool._tables) == running
    for seq in sched.waiting:
        assert seq.state == WAITING and sched.by_id[seq.request_id] is seq
    for seq in sched.running:
        assert seq.state in (PREFILLING, DECODING)
        assert sched.pool.held(seq.request_id) * sched.block_size >= seq.num_computed
        if seq.state == PREFILLING:  # admitted with blocks for all its tokens
            assert sched.pool.held(seq.request_id) * sched.block_size >= len(seq.tokens)
    stats = sched.stats()
    assert stats["used"] + stats["free"] == sched.pool.capacity


def _sched(max_running=4, num_blocks=64, block_size=4, **kw) -> GroupScheduler:
    return GroupScheduler(max_running, num_blocks, block_size, **kw)


def _seq(rid: str, n: int, max_new: int = 4, base: int = 100, **kw) -> Sequence:
    return Sequence(rid, [base + i for i in range(n)], max_new, **kw)


def _chunks(plan: Plan) -> list[tuple[str, int, int]]:
    return [(s.request_id, a, b) for s, a, b in plan.chunks]


def _ids(seqs) -> list[str]:
    return [s.request_id for s in seqs]


# ----------------------------------------------------------------------------- budget and chunks
def test_decode_tokens_first_then_chunks_in_admission_order_within_the_budget():
    sched = _sched(max_running=4, token_budget=20)
    w = FakeWorkers(sched)
    sched.add(_seq("d", 3, max_new=50))
    w.round()  # d prefilled whole and decoding
    for rid, n in zip("abc", (5, 6, 30)):
        sched.add(_seq(rid, n, base=200 + 50 * ord(rid)))
    plan = w.round()
    assert _ids(plan.decode) == ["d"] and plan.decode_steps == 1
    assert _chunks(plan) == [("a", 0, 5), ("b", 0, 6), ("c", 0, 8)]  # 1 decode token + 19 prompt tokens
    assert set(plan.block_tables) == {"a", "b", "c", "d"}
    assert sched.by_id["c"].state == PREFILLING and sched.by_id["c"].num_computed == 8
    check_invariants(sched)


def test_long_prompt_is_chunked_and_the_decoding_requests_ride_in_every_round():
    sched = _sched(max_running=2, token_budget=16, num_blocks=32)
    w = FakeWorkers(sched)
    sched.add(_seq("short", 8, max_new=30))
    w.round()
    sched.add(_seq("long", 40, max_new=2, base=500))
    plans = [w.round() for _ in range(3)]
    assert [_chunks(p) for p in plans] == [[("long", 0, 15)], [("long", 15, 30)], [("long", 30, 40)]]
    assert all(_ids(p.decode) == ["short"] and p.decode_steps == 1 for p in plans)
    nxt = w.round()
    assert not nxt.chunks and _ids(nxt.decode) == ["short", "long"] and nxt.decode_steps == 4  # pure decode
    w.run()
    assert w.ended == {rid: reference(sched_seq, False) for rid, sched_seq in _all(w, ["short", "long"])}


# ----------------------------------------------------------------------------- budget sized to the step time
def _prompt_tokens(plan: Plan) -> int:
    return sum(b - a for _, a, b in plan.chunks)


def _decoding_with_a_long_prompt(stall: float | None, budget: int = 64) -> tuple[GroupScheduler, FakeWorkers]:
    """`d` decoding, then `long` (60 tokens) waiting to be admitted next round."""
    sched = _sched(max_running=2, token_budget=budget, num_blocks=64, max_decode_stall=stall)
    w = FakeWorkers(sched)
    sched.add(_seq("d", 4, max_new=60))
    assert _prompt_tokens(w.round()) == 4  # no decode rows yet: no cap even with estimates
    sched.add(_seq("long", 60, max_new=2, base=500))
    return sched, w


def test_a_round_with_decode_rows_carries_the_prompt_tokens_its_stall_allows():
    sched, w = _decoding_with_a_long_prompt(stall=0.5)
    sched.set_step_costs(decode_step_s=0.2, prompt_token_s=0.01)  # 0.5 x 0.2 s of prompt tokens = 10 tokens
    assert sched.prefill_cap == 10
    plans = [w.round() for _ in range(6)]
    assert [_chunks(p) for p in plans] == [[("long", 10 * i, 10 * i + 10)] for i in range(6)]
    assert all(_ids(p.decode) == ["d"] and p.decode_steps == 1 for p in plans)
    w.run()
    assert w.ended == {rid: reference(seq, False) for rid, seq in _all(w, ["d", "long"])}


def test_without_decode_rows_or_estimates_or_a_stall_a_round_keeps_the_whole_budget():
    sched = _sched(token_budget=64, max_decode_stall=0.5)
    sched.set_step_costs(0.2, 0.01)
    sched.add(_seq("alone", 60))
    assert _chunks(FakeWorkers(sched).round()) == [("alone", 0, 60)]  # nothing decodes: nothing to stall
    for stall, costs in ((0.5, (None, 0.01)), (0.5, (0.2, None)), (None, (0.2, 0.01))):
        sched, w = _decoding_with_a_long_prompt(stall)
        sched.set_step_costs(*costs)
        assert sched.prefill_cap == float("inf")
        assert _chunks(w.round()) == [("long", 0, 60)]  # 64 - 1 decode token


def test_the_budget_stays_the_upper_bound_of_the_cap():
    sched, w = _decoding_with_a_long_prompt(stall=10.0, budget=16)
    sched.set_step_costs(0.2, 0.01)  # cap 200 tokens
    assert _chunks(w.round()) == [("long", 0, 15)]


def test_the_cap_never_starves_a_prefill():
    sched, w = _decoding_with_a_long_prompt(stall=0.0)
    sched.set_step_costs(0.2, 5.0)  # a prompt token costs 25 decode steps: still a block (4 tokens) per round
    plans = [w.round() for _ in range(3)]
    assert [_chunks(p) for p in plans] == [[("long", 0, 4)], [("long", 4, 8)], [("long", 8, 12)]]
    w.run()
    assert w.ended == {rid: reference(seq, False) for rid, seq in _all(w, ["d", "long"])}


def test_new_estimates_change_the_cap_from_the_next_round():
    sched, w = _decoding_with_a_long_prompt(stall=1.0)
    sched.set_step_costs(0.1, 0.01)
    assert _chunks(w.round()) == [("long", 0, 10)]
    sched.set_step_costs(0.2, 0.01)  # a slower decode step allows more prompt tokens per round
    assert _chunks(w.round()) == [("long", 10, 30)]
    sched.set_step_costs(0.2, 0.04)  # dearer prompt tokens, fewer
    assert _chunks(w.round()) == [("long", 30, 35)]


def test_the_static_policy_ignores_the_cap():
    sched = _sched(max_running=2, policy="static", max_decode_stall=0.0)
    sched.set_step_costs(0.2, 0.01)
    sched.add(_seq("a", 30))
    sched.add(_seq("b", 40, base=400))
    assert _chunks(FakeWorkers(sched).round()) == [("a", 0, 30), ("b", 0, 40)]


@pytest.mark.parametrize(
    ("costs", "name"),
    [((0.0, 0.01), "decode_step_s=0.0"), ((0.2, -1.0), "prompt_token_s=-1.0"), ((float("nan"), 0.1), "decode_step_s")],
)
def test_bad_step_costs_are_refused_naming_the_estimate(costs, name):
    sched = _sched()
    with pytest.raises(ValueError, match=name):
        sched.set_step_costs(*costs)
    assert sched.prefill_cap == float("inf")


def _all(w: FakeWorkers, rids):
    seqs = {s.request_id: s for p in w.plans for s in p.admit}
    return [(rid, seqs[rid]) for rid in rids]


def test_pure_decode_rounds_take_the_steps_capped_by_what_any_request_still_needs():
    sched = _sched(max_running=2, decode_steps_per_call=4)
    w = FakeWorkers(sched)
    sched.add(_seq("a", 4, max_new=3))
    sched.add(_seq("b", 4, max_new=7, base=300))
    w.round()  # both prefilled: one token each
    steps = []
    while not sched.idle:
        steps.append(w.round().decode_steps)
    assert steps[0] == 4  # b still needs 6; a ends inside the call
    assert steps == [4, 2, 0]  # then b needs 2; the last round only releases
    assert {rid: len(out) for rid, (out, _) in w.ended.items()} == {"a": 3, "b": 7}


def test_pure_decode_steps_shrink_to_the_free_blocks_before_anything_is_preempted():
    sched = _sched(max_running=1, num_blocks=4, block_size=4, decode_steps_per_call=8)  # 3 blocks
    w = FakeWorkers(sched)
    sched.add(_seq("a", 3, max_new=9))  # 12 tokens at most: all 3 blocks
    w.round()  # 3 prompt tokens + 1 sampled
    sched.add(_seq("b", 2, max_new=2, base=900))  # waits: one slot
    plan = w.round()
    assert plan.decode_steps == 8 and not plan.preempted
    w.run()
    assert sched.stats()["preemptions"] == 0
    sched2 = _sched(max_running=2, num_blocks=5, block_size=4, decode_steps_per_call=8)  # 4 blocks
    w2 = FakeWorkers(sched2)
    sched2.add(_seq("a", 3, max_new=9))
    sched2.add(_seq("b", 5, max_new=2, base=900))  # holds 2 blocks while it decodes
    w2.round()
    plan = w2.round()
    assert plan.decode_steps == 5 and not plan.preempted  # 8 steps would need 2 more blocks for a: 1 is free
    w2.run()
    assert sched2.stats()["preemptions"] == 0
    assert w2.ended["a"] == reference(_all(w2, ["a"])[0][1], False)


# ----------------------------------------------------------------------------- vision encode budget
def _video(rid: str, before: int, slices: int, per_slice: int, after: int, max_new: int = 4) -> Sequence:
    """`before` text tokens, a vision input of `slices` temporal slices of `per_slice` tokens each (one slice: an
    image), `after` text tokens."""
    n = slices * per_slice
    prompt = [100 + i for i in range(before)] + [IMAGE_PAD] * n + [300 + i for i in range(after)]
    return Sequence(rid, prompt, max_new, images=[(before, before + n, rid.encode())], image_slices=[slices])


def _encodes(plan: Plan) -> list[tuple[str, int, int]]:
    return [(s.request_id, a, b) for s, a, b in plan.encode]


@pytest.mark.parametrize("encoder_budget", [8, 4])  # 4: below one slice, which goes through alone
def test_the_encoder_budget_spreads_a_video_over_rounds_while_decode_rows_step(encoder_budget):
    sched = _sched(token_budget=64, encoder_budget=encoder_budget)
    w = FakeWorkers(sched)
    sched.add(_seq("d", 3, max_new=40))
    w.round()
    video = _video("v", 2, slices=4, per_slice=6, after=3)  # 24 video tokens, 6 a slice
    sched.add(video)
    plans = [w.round() for _ in range(4)]
    assert [_encodes(p) for p in plans] == [[("v", 0, 1)], [("v", 1, 2)], [("v", 2, 3)], [("v", 3, 4)]]
    assert all(_ids(p.decode) == ["d"] for p in plans)  # d decodes in every round of the encode
    assert [_ids(p.admit) for p in plans] == [[], [], [], ["v"]]  # started with its last slice, whole prompt
    assert [_chunks(p) for p in plans] == [[], [], [], [("v", 0, 29)]]
    w.run()
    assert w.ended["v"] == reference(video, False)


def test_a_request_waits_for_the_encoder_budget_and_the_queue_behind_it_waits_too():
    sched = _sched(token_budget=64, encoder_budget=10)
    w = FakeWorkers(sched)
    for seq in (_video("a", 1, 1, 8, 1), _video("b", 1, 1, 8, 1), _seq("t", 4)):
        sched.add(seq)
    plan = w.round()
    assert _encodes(plan) == [("a", 0, 1)] and _ids(plan.admit) == ["a"]
    assert _ids(sched.waiting) == ["b", "t"] and "b" not in sched.pool._tables  # no blocks held while it waits
    plan = w.round()
    assert _encodes(plan) == [("b", 0, 1)] and _ids(plan.admit) == ["b", "t"]


def test_images_inside_the_cached_prefix_need_no_encode_and_do_not_wait_for_the_budget():
    sched = _sched(token_budget=64, encoder_budget=6)
    w = FakeWorkers(sched)
    first = _video("a", 2, 1, 8, 6)  # 16 prompt tokens: the image's blocks are cached once it ran
    sched.add(first)
    w.run()
    again = _video("b", 2, 1, 8, 6)
    again.images = first.images  # the same image
    sched.add(_video("c", 1, 3, 6, 1))  # a video ahead of it takes the round's budget
    sched.add(again)
    plan = w.round()
    assert _encodes(plan) == [("c", 0, 1)] and _ids(plan.admit) == ["b"] and again.num_cached == 12


def test_a_request_preempted_in_its_encode_encodes_again_from_its_first_item():
    """A 29-token video request is admitted (8 blocks of 4) beside a decoding one and encodes a slice a round;
    the decoding request runs out of blocks and preempts it mid-encode. Admitted again later, it encodes every
    slice again (the workers dropped what they held) and gets the tokens it gets alone."""
    sched = _sched(num_blocks=11, token_budget=64, encoder_budget=6)
    w = FakeWorkers(sched)
    sched.add(_seq("d", 3, max_new=20))
    w.round()
    video = _video("v", 2, slices=4, per_slice=6, after=3)
    sched.add(video)
    w.run()
    preempted = next(i for i, p in enumerate(w.plans) if "v" in p.preempted)
    assert video not in [s for s, _, _ in w.plans[preempted].encode] + w.plans[preempted].admit  # not again at once
    before = [e for p in w.plans[:preempted] for e in _encodes(p)]
    after = [e for p in w.plans[preempted:] for e in _encodes(p)]
    assert before and len(before) < 4 and not any(_ids(p.admit) == ["v"] for p in w.plans[:preempted])
    assert after == [("v", 0, 1), ("v", 1, 2), ("v", 2, 3), ("v", 3, 4)]
    assert w.ended["v"] == reference(video, False)


def test_an_abort_in_the_middle_of_an_encode_releases_what_the_workers_hold():
    sched = _sched(token_budget=64, encoder_budget=6)
    w = FakeWorkers(sched)
    sched.add(_video("v", 2, slices=4, per_slice=6, after=3))
    w.round()
    w.round()
    assert w.encoded == {"v": 2}
    sched.abort("v")
    plan = w.round()
    assert plan.releases == ["v"] and not plan.encode and not w.encoded and not w.known
    assert sched.pool.stats()["used"] == 0


def test_a_request_is_not_admitted_in_the_plan_that_releases_its_id():
    """The workers drop a released request's embeddings in the plan's step, after the plan's encode: a new request
    under the id of one that just ended waits a round."""
    sched = _sched(token_budget=64, encoder_budget=64)
    w = FakeWorkers(sched)
    sched.add(_video("x", 2, 1, 8, 3, max_new=50))
    w.round()
    sched.abort("x")
    again = _video("x", 2, 1, 8, 3)
    again.images = [(2, 10, b"another image")]
    sched.add(again)
    plan = w.round()
    assert plan.releases == ["x"] and not plan.encode and not plan.admit
    plan = w.round()
    assert _encodes(plan) == [("x", 0, 1)] and _ids(plan.admit) == ["x"]


def test_slices_that_do_not_split_a_vision_input_are_refused_naming_the_request():
    seq = _video("v", 2, slices=4, per_slice=6, after=3)
    seq.image_slices = [5]
    with pytest.raises(ValueError, match=r"request 'v': vision input 0: 24 tokens do not split into 5"):
        _sched().add(seq)


# ----------------------------------------------------------------------------- admission by blocks
def test_fcfs_admission_by_blocks_the_head_waits_and_nothing_skips_ahead():
    sched = _sched(max_running=4, num_blocks=9, block_size=4)  # 8 blocks
    w = FakeWorkers(sched)
    sched.add(_seq("a", 16, max_new=8))  # 4 blocks
    sched.add(_seq("big", 17, max_new=4, base=300))  # 5 blocks: does not fit beside a
    sched.add(_seq("small", 2, max_new=2, base=600))  # would fit, but waits behind big
    plan = w.round()
    assert _ids(plan.admit) == ["a"] and _ids(sched.waiting) == ["big", "small"]
    while "a" not in w.ended:
        assert "big" not in _ids(w.round().admit)
        assert _ids(sched.waiting)[0] == "big"
    w.run()
    assert [rid for p in w.plans for rid in _ids(p.admit)] == ["a", "big", "small"]


def test_max_running_bounds_admission():
    sched = _sched(max_running=2)
    for i in range(3):
        sched.add(_seq(f"r{i}", 3, base=10 * i))
    plan = sched.schedule()
    assert _ids(plan.admit) == ["r0", "r1"] and sched.load == 3


def test_admitted_together_share_nothing_then_a_later_request_hits_the_prefix_cache():
    sched = _sched(max_running=4, block_size=4)
    w = FakeWorkers(sched)
    sched.add(_seq("a", 10))
    sched.add(_seq("b", 10))  # same prompt, same round: a's blocks are not computed yet
    w.round()
    assert sched.by_id["b"].num_cached == 0
    assert sched.prefix_hit(_seq("probe", 10)) == 8
    sched.add(_seq("c", 10))
    plan = w.round()
    c = sched.by_id["c"]
    assert c.num_cached == c.cached_tokens == 8 and ("c", 8, 10) in _chunks(plan)
    assert plan.block_tables["c"][:2] == plan.block_tables["a"][:2]
    w.run()
    assert w.ended["c"] == w.ended["a"] == w.ended["b"]
    stats = sched.stats()
    assert stats["hit_tokens"] == 8 and stats["query_tokens"] == 30


def test_a_prompt_of_whole_blocks_still_computes_its_last_block():
    sched = _sched(block_size=4)
    w = FakeWorkers(sched)
    sched.add(_seq("a", 8))
    w.run()
    sched.add(_seq("b", 8))
    plan = w.round()
    assert _chunks(plan) == [("b", 4, 8)]  # 8 cached tokens, but one block is recomputed to sample from


def test_same_text_with_another_image_never_hits():
    sched = _sched(block_size=4)
    w = FakeWorkers(sched)
    prompt = [1, 2, 3] + [IMAGE_PAD] * 6 + [4, 5, 6, 8, 9]
    img_a, img_b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    sched.add(Sequence("a", prompt, 4, images=[(3, 9, img_a)]))
    w.run()
    assert sched.prefix_hit(Sequence("p", prompt, 4, images=[(3, 9, img_b)])) == 0  # block 0 holds image tokens
    sched.add(Sequence("b", prompt, 4, images=[(3, 9, img_b)]))
    sched.add(Sequence("c", list(prompt), 4, images=[(3, 9, img_a)]))
    w.run()
    assert sched.by_id.get("b") is None and w.plans[-1].releases  # both ended
    b_hit = next(s for p in w.plans for s in p.admit if s.request_id == "b").cached_tokens
    c_hit = next(s for p in w.plans for s in p.admit if s.request_id == "c").cached_tokens
    assert (b_hit, c_hit) == (0, 12)
    assert w.ended["c"] == w.ended["a"] and w.ended["b"] != w.ended["a"]


def test_prefix_caching_off_recomputes_everything_with_the_same_tokens():
    outs = {}
    for caching in (True, False):
        sched = _sched(block_size=4, prefix_caching=caching)
        w = FakeWorkers(sched)
        for rid in "ab":
            sched.add(_seq(rid, 13, max_new=6))
            w.run()
        outs[caching] = w.ended
        assert sched.stats()["hit_tokens"] == (12 if caching else 0)
    assert outs[True] == outs[False]


# ----------------------------------------------------------------------------- preemption
def _preempting_pair(num_blocks: int = 7) -> tuple[GroupScheduler, FakeWorkers, Plan]:
    """'old' and 'new' (4 blocks each at most) decode side by side in 6 blocks; 'later' waits for a slot.
    Returns at the round that preempted."""
    sched = _sched(max_running=2, num_blocks=num_blocks, block_size=4, decode_steps_per_call=1)
    w = FakeWorkers(sched)
    sched.add(_seq("old", 4, max_new=12))
    sched.add(_seq("new", 4, max_new=12, base=300))
    sched.add(_seq("later", 2, max_new=2, base=700))
    for _ in range(20):
        plan = w.round()
        check_invariants(sched)
        if plan.preempted:
            return sched, w, plan
    raise AssertionError("no preemption")


def test_the_newest_request_is_preempted_keeps_its_tokens_and_goes_to_the_front():
    sched, w, plan = _preempting_pair()
    assert plan.preempted == ["new"] and _ids(plan.decode) == ["old"] and not plan.admit
    new = sched.by_id["new"]
    assert new.state == WAITING and new.preemptions == 1 and new.num_computed == 0
    assert len(new.output_ids) == 9 and _ids(sched.waiting) == ["new", "later"]  # at the front
    assert sched.stats()["preemptions"] == 1
    w.run()
    assert [rid for p in w.plans for rid in _ids(p.admit)] == ["old", "new", "new", "later"]
    for rid in ("old", "new", "later"):
        assert w.ended[rid] == reference(_all(w, [rid])[0][1], False), rid


def test_a_preempted_request_aborted_while_waiting_is_released():
    sched, w, _ = _preempting_pair()
    sched.abort("new")
    plan = w.round()
    assert plan.releases == ["new"] and "new" not in w.known
    w.run()
    check_invariants(sched)


def test_a_resumed_request_recomputes_prompt_and_outputs_with_cache_hits():
    sched = _sched(max_running=2, num_blocks=9, block_size=4, decode_steps_per_call=1)  # 8 blocks
    w = FakeWorkers(sched)
    sched.add(_seq("a", 8, max_new=12))  # 5 blocks at most
    sched.add(_seq("b", 6, max_new=10, base=300))  # 4 blocks at most
    preempted_at = None
    while preempted_at is None:
        plan = w.round()
        if plan.preempted:
            preempted_at = len(sched.by_id["b"].tokens)
    b = sched.by_id["b"]
    assert plan.preempted == ["b"] and b.num_computed == 0
    while "b" not in _ids(plan.admit):
        plan = w.round()
    full = (preempted_at - 1) // 4 * 4  # its computed full blocks stayed cached
    assert b.num_cached == full and b.cached_tokens == 0  # the record keeps the first admission's hit
    assert ("b", full, preempted_at) in _chunks(plan)  # recompute prompt + outputs, one prompt
    w.run()
    assert w.ended["b"] == reference(b, False)
    assert w.ended["a"] == reference(_all(w, ["a"])[0][1], False)


def test_a_run_forced_to_preempt_gives_the_same_tokens_as_one_that_is_not():
    def run(num_blocks: int) -> tuple[dict, int]:
        sched = _sched(max_running=6, num_blocks=num_blocks, block_size=2, token_budget=24, decode_steps_per_call=3)
        w = FakeWorkers(sched, eos={"r3", "r7"})
        rng = random.Random(5)
        for i in range(12):
            sched.add(_seq(f"r{i}", rng.randint(3, 20), max_new=rng.randint(1, 20), base=rng.choice([0, 0, 40])))
            w.round()
            check_invariants(sched)
        w.run()
        return w.ended, sched.stats()["preemptions"]

    roomy, none = run(200)
    tight, some = run(22)
    assert none == 0 and some > 0
    assert tight == roomy


# ----------------------------------------------------------------------------- endings
def test_every_ending_frees_blocks_at_once_and_is_released_once():
    sched = _sched(max_running=4, num_blocks=40)
    w = FakeWorkers(sched)
    sched.add(_seq("len", 3, max_new=1))
    sched.add(_seq("run", 5, max_new=30, base=200))
    sched.add(_seq("stop", 5, max_new=30, base=300))
    sched.add(_seq("pre", 5, max_new=30, base=400))
    sched.add(_seq("wait", 5, max_new=30, base=500))  # never admitted (max_running)
    plan = w.round()
    assert "len" in w.ended and "len" not in sched.by_id and sched.pool.held("len") == 0
    used = sched.stats()["used"]
    sched.abort("run")  # a client gone
    assert sched.pool.held("run") == 0 and sched.stats()["used"] < used
    sched.abort("stop", reason="stop")
    waiting = sched.abort("wait")
    assert waiting is not None and waiting.state == FINISHED and waiting.finish_reason == "abort"
    assert sched.abort("nope") is None
    plan = sched.schedule()
    assert sorted(plan.releases) == ["len", "run", "stop"]  # 'wait' never reached the workers
    assert sched.schedule().releases == []
    sched.abort("pre")
    assert sched.schedule().releases == ["pre"] and sched.idle
    check_invariants(sched)
    assert sched.stats()["used"] == 0


def test_finish_of_an_ended_request_is_a_no_op_and_reports_after_ending_are_refused():
    sched = _sched()
    seq = _seq("a", 3)
    sched.add(seq)
    sched.schedule()
    sched.abort("a")
    sched.finish(seq, "length")
    assert seq.finish_reason == "abort"
    with pytest.raises(ValueError, match="'a' is not decoding here"):
        sched.append(seq, [1])
    with pytest.raises(ValueError, match="'a' is not prefilling here"):
        sched.prefilled(seq, 3)


def test_reports_that_do_not_match_the_plan_are_refused():
    sched = _sched(block_size=4, token_budget=4)
    seq = _seq("a", 10, max_new=2)
    sched.add(seq)
    sched.schedule()  # chunk (0, 4)
    with pytest.raises(ValueError, match="chunk end 11"):
        sched.prefilled(seq, 11)
    with pytest.raises(ValueError, match="append: request 'a' is not decoding"):
        sched.append(seq, [1])  # before its final chunk ran
    sched.prefilled(seq, 4)
    sched.schedule()
    sched.prefilled(seq, 8)
    sched.schedule()
    sched.prefilled(seq, 10)
    with pytest.raises(ValueError, match="prefilled: request 'a' is not prefilling"):
        sched.prefilled(seq, 10)
    with pytest.raises(ValueError, match="exceed max_new_tokens=2"):
        sched.append(seq, [1, 2, 3])


def test_take_all_returns_waiting_then_running_and_empties_the_group():
    sched = _sched(max_running=1)
    w = FakeWorkers(sched)
    for rid in "ab":
        sched.add(_seq(rid, 9, base=0))
    w.round()
    sched.abort("a")  # its release is pending
    sched.add(_seq("c", 3))
    w.round()
    taken = w.fail_group()
    assert [(s.request_id, s.state) for s in taken] == [("c", WAITING), ("b", DECODING)]
    assert sched.idle and sched.load == 0 and sched.schedule() == Plan()
    stats = sched.stats()
    assert stats["used"] == stats["cached"] == 0 and stats["free"] == sched.pool.capacity
    sched.add(taken[1])  # moved to another group: starts over there, keeping its tokens
    b = taken[1]
    assert b.state == WAITING and b.num_computed == 0 and len(b.output_ids) == 1
    plan = w.round()
    assert _chunks(plan) == [("b", 0, 10)] and not plan.releases  # rebuilt workers start empty
    w.run()
    assert w.ended["b"] == reference(b, False)


def test_load_counts_waiting_and_running_and_duplicate_ids_fail():
    sched = _sched(max_running=1)
    sched.add(_seq("a", 3))
    sched.add(_seq("b", 3))
    sched.schedule()
    assert sched.load == 2 and _ids(sched.running) == ["a"]
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(_seq("a", 3))


# ----------------------------------------------------------------------------- static policy
def test_static_policy_admits_only_into_an_empty_group_and_does_not_chunk():
    sched = _sched(max_running=2, num_blocks=400, policy="static", token_budget=16)
    w = FakeWorkers(sched)
    for rid, n in (("a", 1), ("b", 6), ("c", 1)):
        sched.add(_seq(rid, 300, max_new=n, base=ord(rid)))
    plan = w.round()
    assert _chunks(plan) == [("a", 0, 300), ("b", 0, 300)]
    while "b" not in w.ended:
        assert "c" not in _ids(w.round().admit), "c admitted while b ran"
    w.run()
    assert list(w.ended) == ["a", "b", "c"]


def test_static_policy_prefills_its_batch_together_after_every_encode():
    """The static policy encodes its batch over rounds (the encoder budget) but starts no member's prompt until
    the last item is encoded: then every prompt goes in one round, and no member decodes in a round that carries
    another member's prompt (its decode would wait for it, as it did when the text-only member started at once)."""
    sched = _sched(max_running=2, token_budget=64, encoder_budget=6, policy="static")
    w = FakeWorkers(sched)
    text = _seq("t", 3, max_new=8)
    video = _video("v", 2, slices=4, per_slice=6, after=3)  # 29 prompt tokens, 4 slices of 6
    sched.add(text)
    sched.add(video)
    plans = [w.round() for _ in range(4)]
    assert [_encodes(p) for p in plans] == [[("v", 0, 1)], [("v", 1, 2)], [("v", 2, 3)], [("v", 3, 4)]]
    assert [_chunks(p) for p in plans] == [[], [], [], [("t", 0, 3), ("v", 0, 29)]]
    w.run()
    assert not any(p.chunks and p.decode for p in w.plans)
    assert w.ended["t"] == reference(text, False) and w.ended["v"] == reference(video, False)


# ----------------------------------------------------------------------------- settings and limits
def test_a_request_that_could_never_fit_fails_at_add_naming_the_limit():
    sched = _sched(num_blocks=11, block_size=16)  # 10 blocks = 160 tokens
    with pytest.raises(ValueError) as err:
        sched.add(_seq("huge", 150, max_new=20))
    msg = str(err.value)
    assert "KV pool" in msg and "170 tokens" in msg and "11 blocks" in msg and "10 blocks" in msg
    assert "of 16 tokens" in msg and "160 tokens" in msg
    sched.add(_seq("fits", 150, max_new=10))  # 160 tokens exactly


def test_prefix_hit_reports_whole_cached_blocks_of_the_prompt():
    sched = _sched(block_size=4)
    w = FakeWorkers(sched)
    sched.add(_seq("a", 11, max_new=6))
    w.run()
    assert sched.prefix_hit(_seq("p", 11)) == 8
    a_tokens = w.plans[0].admit[0].tokens
    assert sched.prefix_hit(Sequence("q", a_tokens[:16] + [1], 4)) == 16  # a's outputs were cached too
    assert sched.prefix_hit(_seq("r", 5, base=900)) == 0
    assert _sched(prefix_caching=False).prefix_hit(_seq("p", 11)) == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"policy": "fifo"}, "policy"),
        ({"token_budget": 0}, "token_budget"),
        ({"decode_steps_per_call": 0}, "decode_steps_per_call"),
        ({"max_running": 0}, "max_running"),
        ({"num_blocks": 1}, "num_blocks"),
        ({"block_size": 0}, "block_size"),
        ({"max_running": 8, "token_budget": 4}, "token_budget=4"),
        ({"max_decode_stall": -0.5}, "max_decode_stall=-0.5"),
        ({"encoder_budget": 0}, "encoder_budget=0"),
    ],
)
def test_bad_settings_are_rejected_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _sched(**kwargs)


def test_states_are_strings_and_tokens_follow_outputs():
    assert SeqState.DECODING == "decoding" and WAITING is SeqState.WAITING
    seq = _seq("a", 3)
    assert seq.tokens == [100, 101, 102] and seq.prompt_len == 3
    seq.output_ids.extend([7, 8])
    assert seq.tokens == [100, 101, 102, 7, 8]


# ----------------------------------------------------------------------------- randomized
PREFIXES = [[], [11, 12, 13, 14, 15, 16, 17, 18, 19], [11, 12, 13, 14, 20, 21]]
IMAGES = [hashlib.sha256(bytes([i])).digest() for i in range(3)]


def _random_request(rng: random.Random, rid: str) -> tuple[Sequence, bool]:
    """Prompts share prefixes and images often, so the cache hits and must tell them apart."""
    prompt = list(rng.choice(PREFIXES))
    images = []
    slices = []
    if rng.random() < 0.4:
        start = len(prompt)
        slices.append(rng.choice([1, 1, 2, 3]))  # an image, or a video of a few temporal slices
        prompt += [IMAGE_PAD] * slices[0] * rng.randint(1, 6 // slices[0])
        images.append((start, len(prompt), rng.choice(IMAGES)))
    prompt += [rng.randint(30, 40) for _ in range(rng.randint(0 if prompt else 1, 12))]
    return Sequence(rid, prompt, rng.randint(1, 16), images=images, image_slices=slices), rng.random() < 0.3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block_size=st.sampled_from([1, 2, 4, 8]),
    spare_blocks=st.integers(0, 24),
    max_running=st.integers(1, 6),
    extra_budget=st.integers(0, 24),
    steps=st.integers(1, 5),
    policy=st.sampled_from(["continuous", "continuous", "static"]),
    caching=st.booleans(),
    encoder_budget=st.sampled_from([None, 1, 2, 5]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_traffic_keeps_the_pool_consistent_and_leaks_nothing(
    block_size, spare_blocks, max_running, extra_budget, steps, policy, caching, encoder_budget, seed
):
    rng = random.Random(seed)
    biggest = 9 + 6 + 12 + 16  # the longest prompt + max_new_tokens _random_request makes
    num_blocks = -(-biggest // block_size) + 1 + spare_blocks
    sched = GroupScheduler(
        max_running,
        num_blocks,
        block_size,
        policy,
        max_running + extra_budget,
        steps,
        prefix_caching=caching,
        encoder_budget=encoder_budget,
    )
    w = FakeWorkers(sched)
    requests: dict[str, Sequence] = {}
    failed: set[str] = set()
    for i in range(200):
        seq, eos = _random_request(rng, f"r{i}")
        requests[seq.request_id] = seq
        if eos:
            w.eos.add(seq.request_id)
        sched.add(seq)
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            event = rng.random()
            live = list(sched.by_id)
            if event < 0.06 and live:  # a client gone or a stop string
                sched.abort(rng.choice(live), rng.choice(["abort", "stop"]))
            elif event < 0.075:  # the group failed: running requests fail, waiting ones come back
                for taken in w.fail_group():
                    if taken.state == WAITING:
                        sched.add(taken)
                    else:
                        failed.add(taken.request_id)
            else:
                w.round()
            check_invariants(sched)
    w.run()
    check_invariants(sched)
    stats = sched.stats()
    assert stats["used"] == 0 and stats["free"] == sched.pool.capacity  # every block free or cached
    assert not w.known and not w.encoded  # every request the workers knew was released, its embeddings dropped
    for rid, seq in requests.items():
        expected, reason = reference(seq, rid in w.eos)
        assert seq.state == FINISHED or rid in failed, rid
        if rid in w.ended:
            assert w.ended[rid] == (expected, reason), rid
        else:  # aborted, stopped or failed: what it got is a prefix of what it would have got
            assert seq.output_ids == expected[: len(seq.output_ids)], rid


def test_more_tokens_than_the_plan_gave_blocks_for_are_refused_and_change_nothing():
    sched = _sched(block_size=4, decode_steps_per_call=1)
    seq = _seq("a", 3, max_new=20)
    sched.add(seq)
    sched.schedule()
    sched.prefilled(seq, 3)
    sched.append(seq, [1])
    sched.schedule()  # one decode step: blocks for 4 positions
    with pytest.raises(ValueError, match="5 tokens computed but blocks were planned for 4"):
        sched.append(seq, [2, 3])
    assert seq.output_ids == [1] and seq.num_computed == 3
