"""The per-DP-group scheduler: a pure state machine over requests and KV blocks (no Ray, no torch).

A request moves waiting -> prefilling -> decoding -> finished (or is aborted anywhere); a running
request may be preempted back to waiting when blocks run out. Each `schedule()` returns one `Plan`
for the group's workers, applied in this order:

- `releases`: requests that ended (EOS, length, stop, abort): the workers forget them;
- `preempted`: requests whose KV (and embeddings encoded ahead of their start) the workers drop,
  keeping their sampling state;
- `encode`: vision items of admitted requests, encoded before the step (see below);
- `admit`: requests the workers start now, fresh or resumed after a preemption;
- one forward under one token budget (vLLM v1 style): every decoding request one token, then
  prompt chunks of prefilling requests in admission order with the rest of `token_budget` (a long
  prompt is split over rounds). A round with no chunk is a pure-decode call of up to
  `decode_steps_per_call` steps (the captured graph).

The budget is sized to the device's step time: once the caller has fed estimates of a pure-decode
step's seconds and of the seconds each prompt token adds to a round (`set_step_costs`), a round that
carries decode rows takes at most as many prompt tokens as cost `max_decode_stall` x a decode step,
and at least a block's worth (`prefill_cap`). A round with prompt chunks runs the eager packed
forward, whose fixed cost any chunk, however small, pays: the stall bounds only what the tokens add,
so a decoding request waits at most that fixed cost plus stall x a step for each token. A round with
no decode rows keeps the whole budget.

Vision encode has a budget of its own per round, `encoder_budget` image-pad tokens (merged patches, as
vLLM's encoder budget counts them; None: no bound). A request's vision inputs are items
(actors/vision_items.py: an image whole, a video one temporal slice at a time); those of inputs wholly
inside its cached prefix need none. Each round encodes items of the admitted requests in admission
order, as many as the budget holds (one at least, however large, so that encoding always moves on);
a request's chunks wait until all its items are encoded, and the workers start it (`admit`) with its
first chunk, in the round of its last items or later. Decoding requests get their step in every round
meanwhile. A request that needs encode is admitted only when the round's budget left takes its first
item (the static policy admits its batch whatever the budget, encodes it over rounds, and starts every
member's prompt in one round once the last item is encoded).

Memory is the admission bound: a waiting request is admitted, first come first served, only when
the pool gives it blocks for all of its tokens (the prefix cache may supply a block-aligned
prefix, which its first chunk then skips). Running requests grow one block at a time; when one
needs a block and none is free, the newest running request is preempted: its blocks are freed
(full computed blocks stay cached), it goes to the front of the queue and is recomputed later,
prompt and generated tokens alike, as one prompt. No request is preempted to admit another.

The caller reports what ran: `prefilled` after a chunk, `append` with sampled tokens, `finish`
when the workers ended a request (EOS, length) and `abort` for anything else. Every ending frees
the request's blocks at once and names it in the next plan's `releases` (the workers then also drop
whatever they hold of it, embeddings of items encoded so far included). A request named in a plan's
releases or preemptions is not admitted again in that plan: the workers drop its embeddings in that
plan's step, after its encode.

The next round may be planned while a pure-decode call still runs (the group loop's lookahead): the
workers keep each request's last sampled token, so a decode step needs only how many tokens a row
will have, not their values. Each plan counts its decode steps into the rows' `in_flight`, and
`append` counts them back as they come (a row that ended inside a call is finished, so what it did
not make no longer matters); blocks, steps and the `max_new_tokens` cap count tokens in flight as
made. Freeing blocks at once stays safe because the workers run calls in the order they were
planned: a call still writing a freed block runs before any call that gives it to another request.
A request preempted with tokens in flight gets them through `append` while it waits, and is not
admitted again before they are back (its prompt on resumption includes them).

With speculative decoding (`spec_tokens` = k > 0) each step of a pure-decode call is a verification
round that writes up to k + 1 positions a row and makes between 1 and k + 1 tokens: blocks and `in_flight`
count the most it can make (`Plan.made`), and the group loop gives back what a call did not make when
it returns. Blocks past what a row keeps hold rejected proposals' KV, which is never read.

A request with n > 1 choices is one sequence per choice, choice 0 carrying the others in `forks`:
only choice 0 prefills. It is admitted when the running room holds all n, and its further choices
enter `running` with it (state FORKING), each holding its prompt's full blocks (shared) and a block
of its own for the partial last one (`BlockPool.share`). The plan with its last prompt chunk forks
them (`Plan.forks`): the workers start each as a copy of its prompt, sample its first token from
the same last-position logits with its own sampler, and copy the partial block after the forward;
from then on each choice decodes, is preempted (and recomputed alone) and ends as any request. A
FORKING choice picked for preemption takes its parent with it, and with the parent all its choices
(they wait for its prompt again, holding nothing); a parent that ends takes its FORKING choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from actors.kv_blocks import BlockPool, block_hashes
from actors.vision_items import VisionItem, first_to_encode, vision_items
from actors.waiting_queue import WaitingQueue


class SeqState(str, Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"
    FORKING = "forking"  # a further choice of an n > 1 request, waiting for its first choice's prompt


WAITING, PREFILLING, DECODING, FINISHED = SeqState.WAITING, SeqState.PREFILLING, SeqState.DECODING, SeqState.FINISHED
FORKING = SeqState.FORKING


@dataclass
class Sequence:
    """One request as the scheduler sees it; `payload` is the caller's (never read here).

    `tokens` is prompt_ids + output_ids; `output_ids` only grows (through `GroupScheduler.append`)
    and survives preemption. `images` are (start, end, content hash) per image, the token span of
    its image tokens in the prompt (the hash of its processed pixels and grid); `image_slices` the
    temporal slices of each (its grid_t: 1 for an image; empty: one each). `forks` are the further
    choices of an n > 1 request (same prompt and images), until its prompt's last chunk forks them.
    """

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    images: list[tuple[int, int, bytes]] = field(default_factory=list)
    payload: Any = None
    image_slices: list[int] = field(default_factory=list)
    state: SeqState = SeqState.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens of `tokens` whose KV is in the blocks
    num_cached: int = 0  # of those, how many the last admission took from the prefix cache
    cached_tokens: int = 0  # the first admission's num_cached (what the record reports)
    preemptions: int = 0
    in_flight: int = 0  # tokens that calls already planned will sample, not yet appended
    encoded: int = 0  # of `vision_items`, those encoded (or inside the cached prefix) since its admission
    finish_reason: str | None = None
    forks: list[Sequence] = field(default_factory=list, repr=False, compare=False)
    fork_parent: Sequence | None = field(default=None, repr=False, compare=False)  # while FORKING
    _tokens: list[int] = field(default_factory=list, init=False, repr=False, compare=False)
    _keys: list[bytes] = field(default_factory=list, init=False, repr=False, compare=False)
    _keys_block_size: int = field(default=0, init=False, repr=False, compare=False)
    # The workers hold something of it (its sampling state, or embeddings of its items): its end must reach them.
    _on_workers: bool = field(default=False, init=False, repr=False, compare=False)
    _started: bool = field(default=False, init=False, repr=False, compare=False)  # its first chunk was planned
    _items: list[VisionItem] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def tokens(self) -> list[int]:
        """prompt_ids + output_ids, extended in place (amortised O(1)); do not modify it."""
        prompt, out = self.prompt_ids, self.output_ids
        if not len(prompt) <= len(self._tokens) <= len(prompt) + len(out):
            self._tokens = list(prompt)
        if len(self._tokens) < len(prompt) + len(out):
            self._tokens.extend(out[len(self._tokens) - len(prompt) :])
        return self._tokens

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def vision_items(self) -> list[VisionItem]:
        """Its vision inputs as units of encode, in prompt order (actors/vision_items.py)."""
        if self._items is None:
            self._items = vision_items([(start, end) for start, end, _ in self.images], self.image_slices)
        return self._items

    @property
    def encoding(self) -> bool:
        """Admitted with items still to encode: its chunks wait for them."""
        return self.encoded < len(self.vision_items)


@dataclass
class Plan:
    """One round for a group's workers (see the module docstring for the order)."""

    releases: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    encode: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, first, end) of seq.vision_items
    admit: list[Sequence] = field(default_factory=list)
    chunks: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, start, end) of seq.tokens
    decode: list[Sequence] = field(default_factory=list)
    decode_steps: int = 0  # 1 in a round with chunks, the pure-decode steps otherwise, 0 if nothing decodes
    spec_tokens: int = 0  # proposals per speculative round of a pure-decode call (0: each step makes one token)
    made: dict[str, int] = field(default_factory=dict)  # request id -> the most tokens the call may make for it
    block_tables: dict[str, list[int]] = field(default_factory=dict)  # every request in chunks, decode or forks
    # (parent, choice, (block to copy, its copy) or None): choices forked from the parent's last prompt chunk
    forks: list[tuple[Sequence, Sequence, tuple[int, int] | None]] = field(default_factory=list)


class GroupScheduler:
    """Waiting queue, running requests and the KV block pool of one DP group."""

    def __init__(
        self,
        max_running: int,
        num_blocks: int,
        block_size: int,
        policy: str = "continuous",
        token_budget: int = 2048,
        decode_steps_per_call: int = 4,
        prefix_caching: bool = True,
        max_decode_stall: float | None = None,
        encoder_budget: int | None = None,
    ) -> None:
        if policy not in ("continuous", "static"):
            raise ValueError(f"policy={policy!r} must be 'continuous' or 'static'")
        for name, value, low in (
            ("max_running", max_running, 1),
            ("num_blocks", num_blocks, 2),
            ("block_size", block_size, 1),
            ("token_budget", token_budget, 1),
            ("decode_steps_per_call", decode_steps_per_call, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if token_budget < max_running:
            raise ValueError(
                f"token_budget={token_budget} must be >= max_running={max_running} (one decode token per request)"
            )
        if max_decode_stall is not None and not (isinstance(max_decode_stall, (int, float)) and max_decode_stall >= 0):
            raise ValueError(f"max_decode_stall={max_decode_stall!r} must be None or a number >= 0")
        if encoder_budget is not None and not (isinstance(encoder_budget, int) and encoder_budget >= 1):
            raise ValueError(f"encoder_budget={encoder_budget!r} must be None or an integer >= 1")
        self.max_running = max_running
        self.policy = policy
        self.token_budget = token_budget
        self.decode_steps_per_call = decode_steps_per_call
        self.spec_tokens = 0  # proposals per speculative round of the next pure-decode call (the group loop sets it)
        self.max_decode_stall = max_decode_stall
        self.encoder_budget = encoder_budget  # image-pad tokens of vision encode per round (None: no bound)
        self.decode_step_s: float | None = None  # estimates fed by set_step_costs (None: not measured yet)
        self.prompt_token_s: float | None = None
        self.pool = BlockPool(num_blocks, block_size, prefix_caching)
        self.block_size = block_size
        self.waiting: WaitingQueue[Sequence] = WaitingQueue()  # removal by id in O(1) (aborts)
        self.running: list[Sequence] = []  # admission order
        self.by_id: dict[str, Sequence] = {}
        self.preemptions = 0
        self.prefill_tokens = 0  # tokens computed in prompt chunks, recomputations included
        self.pending_forks = 0  # choices waiting with their parent in `waiting` (FORKING, holding nothing)
        self._releases: list[str] = []

    # ----------------------------------------------------------------------------- queries
    @property
    def load(self) -> int:
        """Waiting plus running sequences (one per choice): what 'least loaded' compares."""
        return len(self.waiting) + len(self.running) + self.pending_forks

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and not self._releases

    def stats(self) -> dict[str, int]:
        """The pool's stats, cumulative preemptions and prompt tokens computed, the running and waiting counts."""
        return {
            **self.pool.stats(),
            "preemptions": self.preemptions,
            "prefill_tokens": self.prefill_tokens,
            "running": len(self.running),
            "waiting": len(self.waiting),
        }

    @property
    def prefill_cap(self) -> float:
        """Prompt tokens a round with decode rows may carry (inf: no cap, or no estimates yet).

        max(block_size, stall x decode step / prompt token's cost): the per-token cost alone is what the
        cap divides by, as a round's fixed cost is paid whatever its chunk. The floor of a block: a
        prompt holds all its blocks from admission, so filling at least one per round keeps it to at
        most as many rounds as it holds blocks, whatever a bad estimate says (tens of tokens or more on
        a device: cpu and cuda 16, npu 128).
        """
        if self.max_decode_stall is None or self.decode_step_s is None or self.prompt_token_s is None:
            return float("inf")
        tokens = self.max_decode_stall * self.decode_step_s / self.prompt_token_s
        return max(self.block_size, int(tokens + 1e-6))  # a whole number short by float rounding counts whole

    def prefix_hit(self, seq: Sequence) -> int:
        """Tokens of `seq`'s prompt this group's prefix cache holds now (changes nothing)."""
        if not self.pool.caching:
            return 0
        keys = self._keys(seq)[: seq.prompt_len // self.block_size]
        return self.pool.cached_prefix(keys) * self.block_size

    # ----------------------------------------------------------------------------- events
    def never_fits(self, prompt_len: int, max_new_tokens: int, n: int = 1) -> str | None:
        """Why a request of this size (with `n` choices) could never fit the whole KV pool (it would wait
        forever), or None."""
        total = prompt_len + max_new_tokens
        need = -(-total // self.block_size)
        admit = -(-prompt_len // self.block_size) + (n - 1 if prompt_len % self.block_size else 0)
        if need <= self.pool.capacity and admit > self.pool.capacity:
            return (
                f"a prompt of {prompt_len} tokens with n={n} choices needs {admit} blocks of {self.block_size} "
                f"tokens at admission, more than the KV pool holds ({self.pool.capacity} blocks)"
            )
        if need <= self.pool.capacity:
            return None
        return (
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = {total} tokens need {need} blocks "
            f"of {self.block_size} tokens, more than the KV pool holds ({self.pool.capacity} blocks, "
            f"{self.pool.capacity * self.block_size} tokens)"
        )

    def set_step_costs(self, decode_step_s: float | None, prompt_token_s: float | None) -> None:
        """New estimates: seconds of a pure-decode step, seconds each prompt token adds to a round beyond the
        fixed cost of a round with prompt chunks (None: not measured yet). They set `prefill_cap` from the
        next round on."""
        for name, value in (("decode_step_s", decode_step_s), ("prompt_token_s", prompt_token_s)):
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"{name}={value!r} must be None or a finite number of seconds > 0")
        self.decode_step_s, self.prompt_token_s = decode_step_s, prompt_token_s

    def add(self, seq: Sequence) -> None:
        """Queue a request (fresh, or moved here from a failed group keeping its output_ids), with its `forks`.

        ValueError for a duplicate id, more choices than `max_running` or a request that could never fit the
        whole KV pool.
        """
        for one in [seq, *seq.forks]:
            if one.request_id in self.by_id:
                raise ValueError(f"request id {one.request_id!r} is already scheduled")
        ids = {seq.request_id, *(s.request_id for s in seq.forks)}
        if seq.forks and (seq.output_ids or len(ids) <= len(seq.forks)):
            raise ValueError(f"request {seq.request_id!r}: choices need distinct ids and a prompt not yet sampled")
        if 1 + len(seq.forks) > self.max_running:
            raise ValueError(
                f"request {seq.request_id!r}: n={1 + len(seq.forks)} choices exceed max_running={self.max_running}"
            )
        if seq.prompt_len < 1 or seq.max_new_tokens < 1:
            raise ValueError(
                f"request {seq.request_id!r}: prompt of {seq.prompt_len} tokens and max_new_tokens="
                f"{seq.max_new_tokens} must both be >= 1"
            )
        never = self.never_fits(seq.prompt_len, seq.max_new_tokens, 1 + len(seq.forks))
        if never is not None:
            raise ValueError(f"request {seq.request_id!r} can never fit: {never}")
        try:
            seq._items = vision_items([(start, end) for start, end, _ in seq.images], seq.image_slices)
        except ValueError as e:
            raise ValueError(f"request {seq.request_id!r}: {e}") from None
        seq.state, seq.finish_reason, seq.num_computed, seq.num_cached, seq.in_flight = WAITING, None, 0, 0, 0
        seq._on_workers = seq._started = False
        self.waiting.append(seq)
        self.by_id[seq.request_id] = seq
        for child in seq.forks:
            child.state, child.finish_reason, child.fork_parent = FORKING, None, seq
            child.num_computed, child.num_cached, child.in_flight, child._on_workers = 0, 0, 0, False
            self.by_id[child.request_id] = child
        self.pending_forks += len(seq.forks)

    def prefilled(self, seq: Sequence, end: int) -> None:
        """A chunk of `seq.tokens` ending at `end` ran; a chunk ending at len(tokens) makes it decode."""
        self._check_state(seq, "prefilled", PREFILLING)
        if not seq.num_computed < end <= len(seq.tokens):
            raise ValueError(
                f"request {seq.request_id!r}: chunk end {end} outside ({seq.num_computed}, {len(seq.tokens)}]"
            )
        self.prefill_tokens += end - seq.num_computed
        seq.num_computed = end
        if end == len(seq.tokens):
            seq.state = DECODING
        self._register(seq)

    def append(self, seq: Sequence, tokens: list[int]) -> None:
        """New sampled tokens: the one after a final chunk (reported by `prefilled` first), or a decode
        call's; the last one has no KV yet. A request preempted while the call ran keeps them for its
        resumption."""
        waiting = seq.state == WAITING and self.by_id.get(seq.request_id) is seq and seq.preemptions > 0
        if not waiting:
            self._check_state(seq, "append", DECODING)
        if len(seq.output_ids) + len(tokens) > seq.max_new_tokens:
            raise ValueError(
                f"request {seq.request_id!r}: {len(seq.output_ids)} + {len(tokens)} tokens exceed "
                f"max_new_tokens={seq.max_new_tokens}"
            )
        computed = len(seq.tokens) + len(tokens) - 1
        if not waiting and computed > self.pool.held(seq.request_id) * self.block_size:
            raise ValueError(
                f"request {seq.request_id!r}: {computed} tokens computed but blocks were planned "
                f"for {self.pool.held(seq.request_id) * self.block_size}"
            )
        seq.output_ids.extend(tokens)
        seq.in_flight = max(0, seq.in_flight - len(tokens))
        if waiting:  # no KV until it is admitted again
            return
        seq.num_computed = computed
        self._register(seq)

    def returned(self, plan: Plan, made: dict[str, int]) -> None:
        """A pure-decode call of `plan` returned having made `made[request id]` tokens for each of its rows:
        what a row's count in flight held beyond that (a speculative round keeps fewer than its k + 1, a row
        ends early) is no longer in flight. Call it before `append` takes the tokens."""
        for seq in plan.decode:
            if self.by_id.get(seq.request_id) is seq:
                short = plan.made.get(seq.request_id, 0) - made.get(seq.request_id, 0)
                seq.in_flight = max(0, seq.in_flight - max(0, short))

    def finish(self, seq: Sequence, reason: str) -> None:
        """The workers ended `seq` (EOS or length): its blocks are freed now (no-op if it already ended)."""
        if self.by_id.get(seq.request_id) is seq:
            self._end(seq, reason)

    def abort(self, request_id: str, reason: str = "abort") -> Sequence | None:
        """End a request wherever it is (stop string, client gone, error); None if it is not here."""
        seq = self.by_id.get(request_id)
        if seq is not None:
            self._end(seq, reason)
        return seq

    def take_all(self) -> list[Sequence]:
        """The group failed: every request out (waiting first, then running, states left as they
        were), the pool emptied and reset, pending releases dropped (rebuilt workers start empty)."""
        out = list(self.waiting) + self.running
        self.waiting.clear()
        self.running.clear()
        self.by_id.clear()
        self._releases.clear()
        self.pool.reset()
        self.pending_forks = 0
        for seq in out:
            seq._on_workers, seq.in_flight = False, 0
        return out

    # ----------------------------------------------------------------------------- planning
    def schedule(self) -> Plan:
        """The next round (see the module docstring)."""
        plan = Plan(releases=self._releases)
        self._releases = []
        static = self.policy == "static"
        # Decoding requests first: each needs a block for the one token it computes in any round. One whose
        # calls in flight already make its last token ends there.
        for seq in [s for s in self.running if s.state == DECODING and self._to_make(s) > 0]:
            while seq.state == DECODING and not self.pool.grow(seq.request_id, self._kv_end(seq, 1)):
                self._preempt(self.running[-1], plan)
        plan.decode = [s for s in self.running if s.state == DECODING and self._to_make(s) > 0]
        # A speculating decode row takes its k proposals from the budget too, should the round carry chunks.
        budget = float("inf") if static else self.token_budget - len(plan.decode) * (1 + self.spec_tokens)
        if plan.decode and not static:
            budget = min(budget, self.prefill_cap)
        encoder = _EncoderBudget(self.encoder_budget)
        for seq in self.running:
            if seq.state == PREFILLING:
                self._encode(seq, encoder, plan)
                if budget > 0 and not seq.encoding and not static:
                    budget -= self._chunk(seq, budget, plan)
        if not static or not self.running:
            self._admit(budget, encoder, plan)
        # Static batching prefills its batch together, once every member is encoded: a member started earlier
        # would decode in the rounds that carry the others' prompts.
        prefilling = [s for s in self.running if s.state == PREFILLING]
        if static and not any(s.encoding for s in prefilling):
            for seq in prefilling:
                self._chunk(seq, budget, plan)
        if plan.decode and plan.chunks:  # one step; its rows verify their proposals in the packed forward
            plan.decode_steps = 1
            plan.spec_tokens = (
                self.spec_tokens if self.spec_tokens and self._take_blocks(plan.decode, 1 + self.spec_tokens) else 0
            )
        elif plan.decode:
            plan.spec_tokens = self.spec_tokens
            steps = self._pure_decode_steps(plan.decode, 1 + plan.spec_tokens) if plan.spec_tokens else None
            if not steps:  # no blocks for k + 1 positions a row: plain steps (one always fits)
                plan.spec_tokens = 0
                steps = self._pure_decode_steps(plan.decode, 1)
            plan.decode_steps = steps
        for seq in plan.decode:
            made = min(plan.decode_steps * (1 + plan.spec_tokens), self._to_make(seq))
            seq.in_flight += made
            plan.made[seq.request_id] = made
        for seq in [s for s, _, _ in plan.chunks] + plan.decode:
            plan.block_tables[seq.request_id] = self.pool.table(seq.request_id)
        return plan

    def _admit(self, budget: float, encoder: _EncoderBudget, plan: Plan) -> None:
        """First come first served while running room, budget, blocks and the encoder budget allow (the head
        waits for blocks, and, but under the static policy, for the encoder budget to start its encode)."""
        told = {*plan.releases, *plan.preempted}  # the workers drop these in this plan's step
        while self.waiting and len(self.running) < self.max_running and budget > 0:
            seq = self.waiting.head()
            if seq.in_flight:  # preempted while its tokens were in flight: its prompt is not known yet
                return
            if len(self.running) + 1 + len(seq.forks) > self.max_running:  # room for all its choices
                return
            if seq.request_id in told:
                return
            items = seq.vision_items
            first = first_to_encode(items, self._cached_prefix(seq)) if items else 0
            if first < len(items) and self.policy != "static" and not encoder.fits(items[first].tokens):
                return
            keys = self._keys(seq) if self.pool.caching else []
            cached = self.pool.allocate(seq.request_id, len(seq.tokens), keys, self._copies(seq))
            if cached is None:
                return
            self.waiting.popleft()
            if seq.preemptions == 0:
                seq.cached_tokens = cached
            seq.num_cached = seq.num_computed = cached
            seq.state, seq._started = PREFILLING, False
            seq.encoded = first_to_encode(items, cached)
            self.running.append(seq)
            self._share(seq)
            self._encode(seq, encoder, plan)
            if not seq.encoding and self.policy != "static":  # static chunks its batch in `schedule`
                budget -= self._chunk(seq, budget, plan)

    def _encode(self, seq: Sequence, encoder: _EncoderBudget, plan: Plan) -> None:
        """Plan the next items of `seq` the encoder budget holds (none once an item did not fit this round)."""
        items, end = seq.vision_items, seq.encoded
        while end < len(items) and encoder.take(items[end].tokens):
            end += 1
        if end > seq.encoded:
            plan.encode.append((seq, seq.encoded, end))
            seq.encoded, seq._on_workers = end, True

    def _cached_prefix(self, seq: Sequence) -> int:
        """The prompt tokens `BlockPool.allocate` would take from the prefix cache for `seq` now."""
        if not self.pool.caching:
            return 0
        limit = (len(seq.tokens) - 1) // self.block_size
        return self.pool.cached_prefix(self._keys(seq)[:limit]) * self.block_size

    def _chunk(self, seq: Sequence, budget: float, plan: Plan) -> int:
        if not seq._started:  # the workers start it with its first chunk
            plan.admit.append(seq)
            seq._started = seq._on_workers = True
        end = int(min(len(seq.tokens), seq.num_computed + budget))
        plan.chunks.append((seq, seq.num_computed, end))
        if end == len(seq.tokens) and seq.forks:
            self._fork(seq, plan)
        return end - seq.num_computed

    # ----------------------------------------------------------------------------- choices (n > 1)
    def _copies(self, seq: Sequence) -> int:
        """Blocks `seq`'s choices take of their own at its admission: one each for a partial last prompt block."""
        return len(seq.forks) if seq.prompt_len % self.block_size else 0

    def _share(self, parent: Sequence) -> None:
        """`parent` was admitted: its choices run with it, FORKING, holding its prompt's blocks (`BlockPool.share`)."""
        for child in parent.forks:
            self.pool.share(child.request_id, parent.request_id, parent.prompt_len)
            self.running.append(child)
        self.pending_forks -= len(parent.forks)

    def _fork(self, parent: Sequence, plan: Plan) -> None:
        """`parent`'s last prompt chunk is planned: its choices sample their first tokens from the same logits in
        that call (in flight), then decode on their own; each copies the partial last block after the forward."""
        full = parent.prompt_len // self.block_size
        partial = parent.prompt_len % self.block_size
        source = self.pool.table(parent.request_id)[full] if partial else None
        for child in parent.forks:
            table = self.pool.table(child.request_id)
            child.state, child.num_computed, child.in_flight = DECODING, parent.prompt_len, 1
            child._on_workers, child.fork_parent = True, None
            plan.forks.append((parent, child, (source, table[full]) if partial else None))
            plan.block_tables[child.request_id] = table
        parent.forks = []

    def _pure_decode_steps(self, decode: list[Sequence], per_step: int) -> int:
        """The most steps (<= decode_steps_per_call, <= what any request still needs) whose blocks fit when each
        step writes `per_step` positions a row (k + 1 for a speculative round); the blocks are taken. 0 when
        none fits; with per_step 1 one step always fits (its blocks were taken first)."""
        most = max(-(-max(self._to_make(s) for s in decode) // per_step), 1)
        for steps in range(min(self.decode_steps_per_call, most), 0, -1):
            if self._take_blocks(decode, steps * per_step):
                return steps
        if per_step == 1:
            raise AssertionError("a decode step without its blocks")
        return 0

    def _take_blocks(self, decode: list[Sequence], positions: int) -> bool:
        """Give every row blocks for `positions` more positions (capped at what it can hold) if the free blocks
        cover them all; False, taking nothing, if they do not."""
        extra = [self._blocks_short(s, positions) for s in decode]
        if sum(extra) > self.pool.num_free():
            return False
        for s, n in zip(decode, extra):
            if n and not self.pool.grow(s.request_id, self._kv_end(s, positions)):
                raise AssertionError(f"request {s.request_id!r}: counted blocks were not there")
        return True

    def _kv_end(self, seq: Sequence, steps: int) -> int:
        """Positions `steps` more decode steps write after those in flight, capped by the most the request
        can ever hold (a row that ends inside a multi-step call writes its later positions to the null block)."""
        return min(seq.num_computed + seq.in_flight + steps, seq.prompt_len + seq.max_new_tokens)

    @staticmethod
    def _to_make(seq: Sequence) -> int:
        """Tokens the request may still sample beyond those made and in flight."""
        return seq.max_new_tokens - len(seq.output_ids) - seq.in_flight

    def _blocks_short(self, seq: Sequence, steps: int) -> int:
        need = -(-self._kv_end(seq, steps) // self.block_size)
        return max(0, need - self.pool.held(seq.request_id))

    # ----------------------------------------------------------------------------- helpers
    def _preempt(self, seq: Sequence, plan: Plan) -> None:
        """Free `seq`'s blocks (computed full blocks stay cached) and queue it first, to be recomputed. A choice
        waiting for its parent's prompt takes the parent, whose choices all wait with it again."""
        if seq.state == FORKING and seq.fork_parent is not None:
            seq = seq.fork_parent
        for child in seq.forks:
            self.pool.free(child.request_id)
            self.running.remove(child)
        self.pending_forks += len(seq.forks)
        self.pool.free(seq.request_id)
        self.running.remove(seq)
        seq.state, seq.num_computed, seq.encoded, seq._started = WAITING, 0, 0, False
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
        if seq._on_workers:  # else it was admitted here only: nothing was encoded or started yet
            plan.preempted.append(seq.request_id)

    def _end(self, seq: Sequence, reason: str) -> None:
        """The one release path: blocks freed now, the id into the next plan's releases. Choices waiting for
        `seq`'s prompt end with it."""
        for child in list(seq.forks):
            self._end(child, reason)
        del self.by_id[seq.request_id]
        if seq.state == FORKING:
            parent = seq.fork_parent
            assert parent is not None, f"request {seq.request_id!r} is forking without a parent"
            parent.forks.remove(seq)
            if parent.state == WAITING:
                self.pending_forks -= 1
            else:
                self.running.remove(seq)
                self.pool.free(seq.request_id)
            seq.fork_parent = None
        elif seq.state == WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.pool.free(seq.request_id)
        if seq._on_workers:
            self._releases.append(seq.request_id)
            seq._on_workers = False
        seq.state, seq.finish_reason, seq.in_flight = FINISHED, reason, 0

    def _keys(self, seq: Sequence) -> list[bytes]:
        """The prefix-cache keys of the full blocks of seq.tokens, extended as it grows."""
        if seq._keys_block_size != self.block_size:
            seq._keys, seq._keys_block_size = [], self.block_size
        tokens, bs = seq.tokens, self.block_size
        if len(tokens) // bs > len(seq._keys):
            start = len(seq._keys) * bs
            parent = seq._keys[-1] if seq._keys else None
            seq._keys.extend(block_hashes(tokens, bs, seq.images, start, parent))
        return seq._keys

    def _register(self, seq: Sequence) -> None:
        """Offer the newly full computed blocks of `seq` to the prefix cache."""
        if self.pool.caching:
            full = seq.num_computed // self.block_size
            self.pool.cache(seq.request_id, self._keys(seq)[:full])

    def _check_state(self, seq: Sequence, event: str, state: SeqState) -> None:
        if self.by_id.get(seq.request_id) is not seq or seq.state != state:
            raise ValueError(
                f"{event}: request {seq.request_id!r} is not {state.value} here (state {SeqState(seq.state).value})"
            )


class _EncoderBudget:
    """What is left of one round's vision-encode budget, in image-pad tokens (None: no bound).

    The first item of a round is taken whatever its size, so that encoding always moves on; once an item
    does not fit, none is taken after it (items go in admission order)."""

    def __init__(self, tokens: int | None) -> None:
        self.left = float("inf") if tokens is None else tokens
        self.taken = 0
        self.closed = False

    def fits(self, tokens: int) -> bool:
        """Whether an item of `tokens` would be taken now."""
        return not self.closed and (self.taken == 0 or tokens <= self.left)

    def take(self, tokens: int) -> bool:
        """Take an item of `tokens` if it fits; else close the round's budget."""
        if not self.fits(tokens):
            self.closed = True
            return False
        self.left -= tokens
        self.taken += 1
        return True
