"""A fake DP worker group: answers `encode` and `step` like ShardWorker over RunningBatch, with no model.

Each request's next token is `toy_token(prompt_seed(prompt), index)`: its prompt is hashed once, at
admission (mixed with the request's seed when its temperature is above 0, so that sampled requests
with other seeds differ), and each token is a cheap mix of that seed and the output index (the fake must cost little
next to the Coordinator it drives), drawn from a range of ordinary tokenizer ids. EOS (unless
`ignore_eos`) and `max_new_tokens` end a request as `model.batch.RunningBatch` does, and a
pure-decode call of `steps` steps advances every decoding request up to `steps` tokens. A forked choice
(an n > 1 request) starts from its parent's prompt, with its own seed, and takes its first token
with the parent's first; the partial-block copies are logged in `copies`. A call can
take a set time per step (`step_time_s`, the Coordinator benchmark) and be held on events (tests).
The group has the interface the Coordinator's group loop uses: `dp_rank`, `alive`, `infos`,
`stats`, `rendezvous`, `start`, `kill` and `call(method, *args)` returning every rank's answer,
raising `GroupFailure` when the group is dead.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from actors import clock
from actors.groups import CallError, GroupFailure

TOKEN_RANGE = (300, 1000)  # ordinary BPE ids of the tiny checkpoint's tokenizer (no special token)


def prompt_seed(prompt_ids: list[int]) -> int:
    """A 32-bit hash of a prompt (what the fake model's tokens depend on)."""
    return int.from_bytes(hashlib.sha256(repr(list(prompt_ids)).encode()).digest()[:4], "little")


def sampled_seed(prompt_ids: list[int], params: Any) -> int:
    """The fake model's seed of a request: its prompt's hash, mixed with its seed when it samples."""
    return prompt_seed(prompt_ids) ^ (params.seed if params.temperature > 0 else 0)


def toy_token(seed: int, index: int, token_range: tuple[int, int] = TOKEN_RANGE) -> int:
    """The fake model's output token number `index` (0-based) for the prompt of `prompt_seed` `seed`."""
    mixed = ((seed ^ (index * 0x9E3779B1)) * 0x85EBCA6B) & 0xFFFFFFFF
    low, high = token_range
    return low + (mixed >> 8) % (high - low)


@dataclass
class FakeSeq:
    """One request on the fake workers (mirrors model.batch.SeqState where the loop can see it)."""

    prompt: list[int]
    seed: int
    max_new_tokens: int
    eos: frozenset[int]
    ignore_eos: bool
    tokens: list[int]
    num_computed: int
    finish_reason: str | None = None
    table: list[int] = field(default_factory=list)  # its block table, updated as RunningBatch.set_tables does
    forks: list[str] = field(default_factory=list)  # choices that take their first token with this one's first

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def decoding(self) -> bool:
        return self.finish_reason is None and self.num_computed == len(self.tokens) - 1


@dataclass
class FakeWorkerGroup:
    """A DP group of `tp_size` fake ranks that all give rank 0's answer (construct as WorkerGroup is)."""

    dp_rank: int
    cfg: Any = None
    strategies: list[Any] = field(default_factory=list)
    step_time_s: float = 0.0
    token_range: tuple[int, int] = TOKEN_RANGE
    reject: dict[str, str] = field(default_factory=dict)  # request key -> admission error message
    encode_errors: dict[str, str] = field(default_factory=dict)  # request key -> error of an encode call holding it
    hold: asyncio.Event | None = None  # when set, a `step` call waits for it after `entered` is set
    entered: asyncio.Event | None = None
    alive: bool = False
    infos: list[dict] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)
    rendezvous: tuple[str, int] | None = None
    seqs: dict[str, FakeSeq] = field(default_factory=dict)
    # Request id -> patches of its vision items encoded so far, waiting for its admission (dropped when it is
    # released or preempted first).
    embeds: dict[str, int] = field(default_factory=dict)
    # (kind, steps, start, end): kind "encode", "prefill" (a call with chunks) or "decode"; times of clock.perf()
    calls: list[tuple[str, int, float, float]] = field(default_factory=list)
    starts: int = 0
    copies: list[tuple[int, int]] = field(default_factory=list)  # (block, its copy) of every fork, in call order
    busy_s: float = 0.0  # thread CPU time spent in `step` answers (the fake's own work, not the caller's)
    dead_rank: int | None = None
    generation: int = 0  # workers killed so far: a call held across a kill finds its workers gone
    in_order: asyncio.Lock = field(default_factory=asyncio.Lock)  # step calls run one at a time, as started

    @property
    def tp_size(self) -> int:
        return max(1, len(self.strategies))

    async def start(self) -> None:
        """A fresh, empty group (as after a rebuild)."""
        self.starts += 1
        self.seqs, self.embeds, self.dead_rank, self.alive = {}, {}, None, True
        ranks = [self.dp_rank * self.tp_size + t for t in range(self.tp_size)]
        self.infos = [
            {"rank": r, "tp_rank": t, "dp_rank": self.dp_rank, "node_id": "fake", "node_ip": "127.0.0.1",
             "device": "cpu", "device_ids": [], "device_index": 0, "pid": 0}
            for t, r in enumerate(ranks)
        ]  # fmt: skip
        self.stats = [
            {"rank": r, "load_s": 0.0, "warmup_s": 0.0, "graph_capture_s": 0.0, "rss_bytes": 0, "device_bytes": 0}
            for r in ranks
        ]

    async def kill(self) -> None:
        self.alive = False
        self.seqs = {}
        self.generation += 1

    def die(self, rank: int = 0) -> None:
        """Make the next call (or the one held now) fail as if `rank` of this group died."""
        self.dead_rank = rank

    async def call(self, method: str, *args: Any) -> list[dict]:
        """Every rank's answer (all equal); GroupFailure when a rank is dead, CallError for an unknown method."""
        start = clock.perf()
        self._check_alive()
        kind, steps = method, 0
        if method == "encode":
            ids = [request.request_id for request in args[0]]
            bad = [self.encode_errors[i] for i in ids if i in self.encode_errors]
            if bad:
                raise CallError(f"shard-worker-{self.dp_rank * self.tp_size} of dp group {self.dp_rank}: {bad[0]}")
            self.add_embeds(args[0])
            answer: dict = {"seconds": 0.0, "cache": {}}
        elif method == "step":
            async with self.in_order:  # a rank runs its calls one after the other, in the order they came
                start = clock.perf()
                if self.entered is not None:
                    self.entered.set()
                generation = self.generation
                if self.hold is not None:
                    await self.hold.wait()
                if generation != self.generation:
                    raise GroupFailure(f"shard-worker-{self.dp_rank * self.tp_size} of dp group {self.dp_rank} died")
                self._check_alive()
                cpu = time.thread_time()
                answer = self._step(*args)
                self.busy_s += time.thread_time() - cpu
                kind, steps = ("prefill", 1) if args[4] else ("decode", args[6])
                if self.step_time_s and steps:
                    await asyncio.sleep(self.step_time_s * steps)
                answer["seconds"] = clock.perf() - start
        else:
            raise CallError(f"fake dp group {self.dp_rank} has no method {method!r}")
        self.calls.append((kind, steps, start, clock.perf()))
        return [answer] * self.tp_size

    def add_embeds(self, requests: list[Any]) -> None:
        """An encode call's items (each request holding the pixels of those alone) wait for their admission."""
        for request in requests:
            self.embeds[request.request_id] = self.embeds.get(request.request_id, 0) + _patches(request)

    def _check_alive(self) -> None:
        """GroupFailure when a rank is dead; the group stays `alive` until its owner fails it, as a WorkerGroup does."""
        if self.dead_rank is not None or not self.alive:
            rank = self.dp_rank * self.tp_size + (self.dead_rank or 0)
            raise GroupFailure(f"shard-worker-{rank} (rank {rank}) of dp group {self.dp_rank} died (RayActorError)")

    def _step(
        self,
        releases: list[str],
        preempted: list[str],
        admissions: list[tuple],
        tables: dict[str, tuple[int, list[int]]],
        chunks: list[tuple[str, int, int]],
        decode: list[str],
        steps: int,
        profile: bool = False,
        forks: list[tuple] | None = None,
        spec_tokens: int = 0,  # speculation is not simulated: a fake step makes one token a row
    ) -> dict:
        for rid in [*releases, *preempted]:
            self.embeds.pop(rid, None)  # as WorkerPhases.step
        for rid in releases:
            self.seqs.pop(rid, None)
        for rid in preempted:
            if rid in self.seqs:
                self.seqs[rid].num_computed, self.seqs[rid].table = 0, []
        errors: dict[str, str] = {}
        for request, params, eos, num_cached in admissions:
            rid = request.request_id
            encoded = self.embeds.pop(rid, 0)
            if rid in self.reject:
                errors[rid] = self.reject[rid]
                self.seqs.pop(rid, None)
                continue
            # Without a cached prefix every image must have been encoded whole (as RunningBatch.admit checks).
            patches = _patches(request)
            if num_cached == 0 and encoded != patches:
                errors[rid] = f"request {rid!r}: {encoded} of its {patches} image patches were encoded"
                self.seqs.pop(rid, None)
                continue
            known = self.seqs.get(rid)
            if known is not None and known.num_computed:  # as RunningBatch.admit
                errors[rid] = f"request {rid!r} is already running"
                self.seqs.pop(rid, None)
                continue
            if known is None:
                prompt = list(request.input_ids)
                known = FakeSeq(
                    prompt,
                    sampled_seed(prompt, params),
                    params.max_new_tokens,
                    frozenset(eos),
                    params.ignore_eos,
                    list(prompt),
                    0,
                )
                self.seqs[rid] = known
            known.num_computed = num_cached
        copies = []
        for parent_id, rid, params, copy in forks or ():
            parent = self.seqs.get(parent_id)
            if parent is not None and parent_id not in errors:  # as ShardWorker.step
                prompt = list(parent.prompt)
                self.seqs[rid] = FakeSeq(
                    prompt,
                    sampled_seed(prompt, params),
                    params.max_new_tokens,
                    parent.eos,
                    params.ignore_eos,
                    list(prompt),
                    len(prompt),
                )
                parent.forks.append(rid)
                copies.extend([copy] if copy is not None else [])
        for rid, (start, blocks) in tables.items():
            if rid in self.seqs and rid not in errors:
                table = self.seqs[rid].table
                if start > len(table):
                    raise ValueError(f"request {rid!r}: block table update from entry {start}, {len(table)} held")
                table[start:] = blocks
        missing = [r for r, _, _ in chunks if r not in errors and not self.seqs[r].table] + [
            r for r in decode if r in self.seqs and not self.seqs[r].table
        ]
        if missing:
            raise ValueError(f"fake dp group {self.dp_rank}: no block table for {missing}")
        out: dict[str, dict] = {}
        now = time.time()
        if chunks:
            for rid, start, end in chunks:
                if rid in errors:
                    continue
                seq = self.seqs[rid]
                if start != seq.num_computed or not start < end <= len(seq.tokens):
                    raise ValueError(f"request {rid!r}: chunk {start}..{end} after {seq.num_computed} computed")
                seq.num_computed = end
                if end == len(seq.tokens):
                    self._sample(rid, seq, out, now)
                    for child in seq.forks:
                        self._sample(child, self.seqs[child], out, now)
                    seq.forks = []
            for rid in decode:
                seq = self.seqs.get(rid)  # None: its admission failed in an earlier call
                if seq is not None and seq.decoding:
                    seq.num_computed += 1
                    self._sample(rid, seq, out, now)
        else:
            live = [(rid, self.seqs[rid]) for rid in decode if rid in self.seqs and self.seqs[rid].decoding]
            for _ in range(steps):
                for rid, seq in live:
                    if seq.finish_reason is None:
                        seq.num_computed += 1
                        self._sample(rid, seq, out, now)
        self.copies.extend(copies)
        return {"outputs": out, "errors": errors, "seconds": 0.0}

    def _sample(self, rid: str, seq: FakeSeq, out: dict[str, dict], now: float) -> None:
        token = toy_token(seq.seed, len(seq.tokens) - len(seq.prompt), self.token_range)
        seq.tokens.append(token)
        if token in seq.eos and not seq.ignore_eos:
            seq.finish_reason = "stop"
        elif len(seq.output) >= seq.max_new_tokens:
            seq.finish_reason = "length"
        item = out.setdefault(rid, {"request_id": rid, "tokens": [], "times": [], "finish_reason": None})
        item["tokens"].append(token)
        item["times"].append(now)
        item["finish_reason"] = seq.finish_reason


class LocalHandle:
    """An in-process object called as a Ray actor handle (`handle.method.remote(...)`, and
    `.options(num_returns="streaming").remote(...)` for an async generator method), on this loop.

    Lets the Ray-facing clients of the Coordinator (actors/deliveries.py) run against a Coordinator
    in this process, without Ray: tests and `bench_coordinator --in-process`.
    """

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._target, name))


class _LocalMethod:
    def __init__(self, method: Any) -> None:
        self._method = method

    def options(self, **_: Any) -> _LocalMethod:
        return self

    def remote(self, *args: Any) -> Any:
        out = self._method(*args)
        if hasattr(out, "__anext__"):
            return _LocalRefs(out)
        if asyncio.iscoroutine(out):
            return asyncio.ensure_future(out)
        done = asyncio.get_running_loop().create_future()
        done.set_result(out)
        return done


class _LocalRefs:
    """An async generator's items as a Ray streaming generator gives them: each an awaitable."""

    def __init__(self, generator: Any) -> None:
        self._generator = generator

    def __aiter__(self) -> _LocalRefs:
        return self

    def cancel(self) -> None:
        """What `ray.cancel` does to a streaming generator: the generator is closed where it waits."""
        asyncio.ensure_future(self._generator.aclose())

    async def __anext__(self) -> asyncio.Future:
        item = await self._generator.__anext__()
        done = asyncio.get_running_loop().create_future()
        done.set_result(item)
        return done


def _patches(request: Any) -> int:
    """The vision patches a request's pixels hold (0 without images)."""
    grids = request.image_grid_thw
    return 0 if grids is None else sum(int(g.prod()) for g in grids)
