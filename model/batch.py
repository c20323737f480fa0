"""The running requests of one rank: per-request state over a paged KV cache, packed rounds, multi-step decode.

The caller (the Coordinator through a ShardWorker, or `generate` in process) decides everything: which
requests start (with how many prompt tokens already in cached blocks), their block tables, which token
ranges each round computes, how many decode steps run, which requests are preempted or released.
Every rank of a TP group applies the same decisions, so their collectives match and their sampled
tokens agree (same logits, same seeded generators).

A round with prompt pieces is one packed forward: the pieces, and one token of every decoding request
listed with them. A round without pieces is a pure-decode call of a few steps through the decode graph
of the smallest batch bucket that holds the decoding requests. A request that meets EOS or its
`max_new_tokens` stops taking part; it holds its blocks until the caller releases it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from model.grammar import GrammarMatchers, mask_logits, matchers_for
from model.graph import pick_bucket
from model.kv_cache import NULL_BLOCK, blocks_for, slot_tables
from model.logprobs import Entry, LogprobRows
from model.penalties import Penalties, penalized
from model.processor import PreparedRequest
from model.sampling import SamplingParams, make_generator, sample
from model.speculative import RowSpeculation, SpeculativeConfig, accept, ngram_propose, verify_layout
from model.text import PackedBatch

if TYPE_CHECKING:
    from model.draft import Drafter
    from model.runner import ModelRunner

_GREEDY = SamplingParams()

Chunk = tuple[str, int, int]  # (request id, start, end): tokens[start:end] computed this round
TableUpdate = tuple[int, list[int]]  # (start, blocks): a block table's entries from `start` on become `blocks`


def image_spans(input_ids: list[int], image_token_id: int, video_token_id: int = -1) -> list[tuple[int, int]]:
    """[start, end) of each run of image-pad (or video-pad) tokens (one run per image or video), in prompt order."""
    spans: list[tuple[int, int]] = []
    for i, token in enumerate(input_ids):
        if token != image_token_id and token != video_token_id:
            continue
        if spans and spans[-1][1] == i and input_ids[i - 1] == token:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


@dataclass
class SeqState:
    """One request on this rank: its tokens, sampling state and blocks."""

    request_id: str
    tokens: list[int]  # prompt, then the generated tokens
    prompt_len: int
    positions: torch.Tensor  # (3, prompt_len) M-RoPE positions of the prompt
    delta: int  # position of token i >= prompt_len is i + delta
    spans: list[tuple[int, int]]  # image-pad runs of the prompt
    params: SamplingParams
    generator: torch.Generator | None
    eos: frozenset[int]
    embeds: dict[int, torch.Tensor] = field(default_factory=dict)  # image index -> embeddings not yet in the cache
    num_computed: int = 0  # tokens whose keys and values are in the blocks
    table: list[int] = field(default_factory=list)
    table_epoch: int = 0  # changes whenever the table is replaced, not only appended to: keys the device copy
    finish_reason: str | None = None
    matcher: Any = None  # the grammar's matcher (model/grammar.py) when params.grammar is set
    draft_embeds: dict[int, torch.Tensor] = field(default_factory=dict)  # as `embeds`, the draft's (model/draft.py)
    draft_computed: int = 0  # tokens whose draft KV is in the blocks
    speculation: RowSpeculation = field(default_factory=RowSpeculation)
    forks: list[str] = field(default_factory=list)  # choices whose first tokens come from this prompt's last logits

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def decoding(self) -> bool:
        """Generating, with every token but the last sampled one in the cache."""
        return self.finish_reason is None and len(self.tokens) > self.prompt_len and self.num_computed > 0

    def kv_end(self, steps: int) -> int:
        """One past the last position `steps` decode steps from here write: num_computed + steps, capped at
        prompt_len + max_new_tokens (the blocks GroupScheduler gives). A row that ends inside the call stops
        advancing: each later step writes again at its final num_computed (its last token's position), at
        most prompt_len + max_new_tokens - 1 (ended by length)."""
        return min(self.num_computed + steps, self.prompt_len + self.params.max_new_tokens)

    def position_ids(self, start: int, end: int) -> torch.Tensor:
        """(3, end - start) M-RoPE positions of tokens[start:end]."""
        head = self.positions[:, start : min(end, self.prompt_len)]
        if end <= self.prompt_len:
            return head
        tail = torch.arange(max(start, self.prompt_len), end) + self.delta
        return torch.cat([head, tail.expand(3, -1)], dim=1)

    def image_rows(self, start: int, end: int, draft: bool = False) -> list[torch.Tensor]:
        """Embeddings of the image-pad tokens among tokens[start:end], in order (the draft's with `draft`)."""
        embeds = self.draft_embeds if draft else self.embeds
        out = []
        for i, (s, e) in enumerate(self.spans):
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                if i not in embeds:
                    raise ValueError(
                        f"request {self.request_id!r}: tokens {lo}..{hi} belong to image {i}, whose "
                        f"{'draft ' if draft else ''}embeddings were not given (its encode was skipped as cached, "
                        "but the cache does not hold them)"
                    )
                out.append(embeds[i][lo - s : hi - s])
        return out


@dataclass
class GenerationResult:
    """One request's outcome in process; times are seconds from the start of the `generate` call."""

    request_id: str
    output_token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    token_times_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS), "length", or None on error
    error: str | None = None
    logprobs: list[Entry] = field(default_factory=list)  # per token, when its params ask (model/logprobs.py)
    spec_rounds: list[tuple[int, int]] = field(default_factory=list)  # (proposed, accepted) per speculative round


@dataclass
class StepOutput:
    """New tokens of one request from one call, with their Unix times; finish_reason once it ended."""

    request_id: str
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[Entry] | None = None  # one entry per token (model/logprobs.py) when the request asks
    spec_rounds: list[tuple[int, int]] | None = None  # (proposed, accepted) per speculative round with proposals


class RunningBatch:
    """The requests of one rank over a `ModelRunner`'s paged KV cache."""

    def __init__(
        self, runner: ModelRunner, speculative: SpeculativeConfig | None = None, drafter: Drafter | None = None
    ) -> None:
        """speculative: how pure-decode calls that ask for it speculate (`decode(spec_tokens=...)`); drafter:
        the draft model of the "draft" method (model/draft.py)."""
        if speculative is not None and (speculative.method == "draft") != (drafter is not None):
            raise ValueError(f"speculative.method={speculative.method!r} needs a drafter exactly when it is 'draft'")
        self.runner = runner
        self.speculative = speculative
        self.drafter = drafter
        self.seqs: dict[str, SeqState] = {}
        # The last pure-decode call's block tables on the device: its rows' (id, epoch), each row's length, tensor.
        self._tables: tuple[list[tuple[str, int]], list[int], torch.Tensor] | None = None
        self._epochs = itertools.count(1)

    # ----------------------------------------------------------------------------- lifecycle
    def admit(
        self,
        request: PreparedRequest,
        params: SamplingParams,
        eos_token_ids: list[int],
        image_embeds: torch.Tensor | None,
        num_cached: int = 0,
        draft_embeds: torch.Tensor | None = None,
    ) -> None:
        """Start a request whose first `num_cached` tokens are already in its blocks (a cached prefix).

        `image_embeds` holds the embeddings of every image that ends after `num_cached`, in order (images
        wholly inside the cached prefix are not encoded again). A request this rank preempted earlier
        resumes: it keeps its generated tokens and its sampler. ValueError when it cannot run here.
        """
        runner = self.runner
        known = self.seqs.get(request.request_id)
        if known is not None and known.num_computed:
            raise ValueError(f"request {request.request_id!r} is already running")
        problem = runner.check_fits(request, params)
        if problem is not None:
            raise ValueError(problem)
        if known is None:
            spans = image_spans(request.input_ids, runner.config.image_token_id, runner.config.video_token_id)
            positions, delta = runner.prompt_positions(request)
            known = SeqState(
                request.request_id,
                list(request.input_ids),
                len(request.input_ids),
                positions,
                delta,
                spans,
                params,
                make_generator(params, runner.device),
                frozenset(eos_token_ids),
            )
            if params.grammar is not None:
                known.matcher = self._grammars().matcher(params.grammar)
        if not 0 <= num_cached < len(known.tokens):
            raise ValueError(
                f"request {request.request_id!r}: num_cached={num_cached} outside [0, {len(known.tokens)})"
            )
        needed = [i for i, (_, end) in enumerate(known.spans) if end > num_cached]
        have = 0 if image_embeds is None else image_embeds.shape[0]
        want = sum(known.spans[i][1] - known.spans[i][0] for i in needed)
        if have != want:
            raise ValueError(
                f"request {request.request_id!r}: its images after the {num_cached} cached tokens have {want} "
                f"image-pad tokens but {have} embeddings were given"
            )
        sizes = [known.spans[i][1] - known.spans[i][0] for i in needed]
        if image_embeds is not None:
            known.embeds = dict(zip(needed, image_embeds.split(sizes)))
        if self.drafter is not None and want:
            if draft_embeds is None or draft_embeds.shape[0] != want:
                raise ValueError(f"request {request.request_id!r}: the draft's image embeddings were not given")
            known.draft_embeds = dict(zip(needed, draft_embeds.split(sizes)))
        known.num_computed = known.draft_computed = num_cached
        self.seqs[request.request_id] = known

    def set_tables(self, tables: dict[str, TableUpdate]) -> None:
        """Update the listed requests' block tables (the caller's block pool decides them): entries from `start`
        on become `blocks`. A running request's table only grows, so the caller sends the new blocks alone
        (start = the length the workers hold); start 0 sends a whole table (admission, resumption)."""
        for request_id, (start, blocks) in tables.items():
            seq = self._seq(request_id)
            if start > len(seq.table):
                raise ValueError(
                    f"request {request_id!r}: block table update from entry {start}, but {len(seq.table)} are held"
                )
            if start < len(seq.table) or not seq.table:
                seq.table_epoch = next(self._epochs)
            seq.table[start:] = blocks

    def fork(self, parent_id: str, child_id: str, params: SamplingParams) -> None:
        """Start `child_id` as a further choice of `parent_id`'s prompt (an n > 1 request), sampled with `params`
        (its own seed): its first token is sampled with the parent's first, from the same last-position
        logits, in the forward that computes the parent's last prompt chunk. Its blocks come through
        `set_tables` (the prompt's full blocks shared, a copy of the partial last one: `copy_blocks` after
        that forward). ValueError when the parent has sampled already or the child runs."""
        parent = self._seq(parent_id)
        if child_id in self.seqs:
            raise ValueError(f"request {child_id!r} is already running")
        if len(parent.tokens) != parent.prompt_len:
            raise ValueError(f"request {parent_id!r}: a choice forks from a prompt not yet sampled")
        child = SeqState(
            child_id,
            list(parent.tokens),
            parent.prompt_len,
            parent.positions,
            parent.delta,
            parent.spans,
            params,
            make_generator(params, self.runner.device),
            parent.eos,
            num_computed=parent.prompt_len,
            draft_computed=parent.prompt_len if self.drafter is not None else 0,  # the draft's KV: as the target's
        )
        if params.grammar is not None:
            child.matcher = self._grammars().matcher(params.grammar)
        parent.forks.append(child_id)
        self.seqs[child_id] = child

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (source, destination) KV block (the partial prompt block of a forked choice)."""
        self.runner.cache.copy_blocks(pairs)
        if self.drafter is not None:  # the draft's pool has the target's block layout
            self.drafter.runner.cache.copy_blocks(pairs)

    def preempt(self, request_id: str) -> None:
        """Drop a request's KV (its blocks go back to the pool); its tokens and sampler stay for its resumption."""
        seq = self.seqs.get(request_id)
        if seq is not None:
            seq.num_computed, seq.table, seq.embeds = 0, [], {}
            seq.draft_computed, seq.draft_embeds = 0, {}
            seq.table_epoch = next(self._epochs)

    def release(self, request_id: str) -> None:
        """Forget a request (finished, stopped or aborted)."""
        self.seqs.pop(request_id, None)

    @property
    def active(self) -> bool:
        return any(s.finish_reason is None for s in self.seqs.values())

    # ----------------------------------------------------------------------------- rounds
    def step(
        self, chunks: list[Chunk], decode: list[str], steps: int = 1, spec_tokens: int = 0
    ) -> dict[str, StepOutput]:
        """One round: the chunks and one token of each `decode` request in one packed forward, or, with no
        chunks, `steps` pure-decode steps of the `decode` requests (speculative rounds of up to `spec_tokens`
        proposals each, when speculation is configured). Returns new tokens per request."""
        if chunks:
            return self.forward(chunks, decode, spec_tokens)
        return self.decode(decode, steps, spec_tokens)

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], decode: list[str], spec_tokens: int = 0) -> dict[str, StepOutput]:
        """Prompt pieces and decode tokens packed into one forward; samples where a piece reaches the end of its
        sequence's known tokens (a prompt's last chunk, a resumed request, every decode token). With
        `spec_tokens` and speculation configured, a decode row's piece also holds its proposals, verified at
        every position of the piece (`accept`), as a pure-decode call's rounds verify them."""
        runner = self.runner
        rows = [self._seq(r) for r in decode if self._seq(r).decoding]
        proposals: dict[str, list[int]] = {}
        k = min(spec_tokens, self.speculative.num_speculative_tokens) if self.speculative and spec_tokens else 0
        if k and rows:
            made, _ = self._proposals(rows, k, lambda idx: runner.table_tensor([rows[i].table for i in idx]))
            proposals = {s.request_id: p for s, p in zip(rows, made) if p}
        pieces = list(chunks) + [
            (s.request_id, s.num_computed, s.num_computed + 1 + len(proposals.get(s.request_id, ()))) for s in rows
        ]
        ids: list[int] = []
        positions, embeds, layout, sample_rows = [], [], [], []
        verified: dict[str, int] = {}  # a row with proposals -> its first query among the sampled rows
        for request_id, start, end in pieces:
            seq = self._seq(request_id)
            proposed = proposals.get(request_id, [])
            if start != seq.num_computed or not start < end <= len(seq.tokens) + len(proposed):
                raise ValueError(
                    f"request {request_id!r}: piece {start}..{end} does not continue its {seq.num_computed} "
                    f"computed of {len(seq.tokens)} tokens"
                )
            if blocks_for(end, runner.block_size) > len(seq.table):
                raise ValueError(f"request {request_id!r}: {len(seq.table)} blocks do not hold {end} tokens")
            ids.extend(seq.tokens[start:end] + proposed)
            positions.append(seq.position_ids(start, end))
            embeds.extend(seq.image_rows(start, end))
            layout.append((start, end - start, seq.table))
            if proposed:
                verified[request_id] = len(sample_rows)
                sample_rows.extend((request_id, len(ids) - 1 - j) for j in range(len(proposed), -1, -1))
            elif end == len(seq.tokens):
                sample_rows.append((request_id, len(ids) - 1))
                sample_rows.extend((child, len(ids) - 1) for child in seq.forks)  # the same logits
                seq.forks = []
        device = runner.device
        packed = PackedBatch.build(layout, runner.block_size, device)
        logits = runner.model.prefill(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.cat(positions, dim=1).to(device),
            torch.cat(embeds).to(device) if embeds else None,
            packed,
            torch.tensor([row for _, row in sample_rows], dtype=torch.long, device=device),
        )
        plain = [(r, start, end) for r, start, end in pieces if r not in verified]
        for request_id, _, end in plain:  # a verified row counts its KV as it keeps tokens (`_keep`)
            seq = self._seq(request_id)
            seq.num_computed = end
            for i, (_, image_end) in enumerate(seq.spans):  # embeddings now in the cache
                if image_end <= end:
                    seq.embeds.pop(i, None)
        if self.drafter is not None:  # the draft's KV follows the target's (model/draft.py)
            self.drafter.mirror([(self._seq(r), start, end) for r, start, end in plain])
        out: dict[str, StepOutput] = {}
        now = time.time()
        at = [i for i, (r, _) in enumerate(sample_rows) if r not in verified]
        seqs = [self._seq(sample_rows[i][0]) for i in at]
        chosen, entries = self._sample(logits[torch.tensor(at, dtype=torch.long, device=device)], seqs)
        for i, (seq, token) in enumerate(zip(seqs, chosen)):
            out[seq.request_id] = StepOutput(seq.request_id)
            self._append(seq, out[seq.request_id], token, now, entries.get(i))
        for request_id, first in verified.items():
            seq, proposed = self._seq(request_id), proposals[request_id]
            out[request_id] = StepOutput(request_id)
            self._keep(seq, out[request_id], logits[first : first + len(proposed) + 1], proposed, k, now)
        return out

    @torch.inference_mode()
    def decode(self, decode: list[str], steps: int, spec_tokens: int = 0) -> dict[str, StepOutput]:
        """Up to `steps` decode steps of the listed requests; a request stops at EOS or max_new_tokens. Fewer
        steps only when a request's blocks do not hold the positions `steps` steps write (`SeqState.kv_end`).
        With `spec_tokens` and speculation configured, each step is a speculative round (`speculate`)."""
        live = [self._seq(r) for r in decode if self._seq(r).decoding]
        if not live or steps < 1:
            return {}
        if spec_tokens and self.speculative is not None:
            return self.speculate(live, steps, min(spec_tokens, self.speculative.num_speculative_tokens))
        runner = self.runner
        rows = pick_bucket(runner.buckets, len(live))
        pad = rows - len(live)
        device = runner.device
        # Only a row whose blocks do not hold what the call writes cuts it; the others run every step.
        size = runner.block_size
        short = [len(s.table) * size - s.num_computed for s in live if s.kv_end(steps) > len(s.table) * size]
        if short:
            steps = min(steps, *short)
            if steps < 1:
                raise ValueError("a decoding request has no block for its next token")
        # Step inputs stay on the device for the whole call and are updated in place: the next tokens are the
        # sampled ones; lengths and positions advance by one for rows still decoding.
        # One copy to the device: (4, rows) of tokens, lengths, positions and what a step adds to those two.
        host = [
            [s.tokens[-1] for s in live],
            [s.num_computed for s in live],
            [s.num_computed + s.delta for s in live],
            [1] * len(live),
        ]
        tokens, lens, positions, advance = torch.tensor([r + [0] * pad for r in host], dtype=torch.long, device=device)
        tables = self._table_tensor(live, rows)
        params = [s.params for s in live] + [_GREEDY] * pad
        gens = [s.generator for s in live] + [None] * pad
        asking = LogprobRows(params, device)
        penalties = self._penalties(live)
        out = {s.request_id: StepOutput(s.request_id) for s in live}
        for step in range(steps):
            # lens + 1 on the host (a row that ended keeps its last length): the bound of what attention reads,
            # and each row's length for the paged kernel
            kv_lens = [s.num_computed + 1 for s in live]
            logits = runner.decode(
                tokens,
                positions,
                lens,
                max_len=max(kv_lens),
                block_tables=tables,
                kv_lens=kv_lens + [1] * pad if runner.paged_decode else None,
            )
            scores = self._constrain(logits, live)
            if penalties:
                scores = penalties.apply(scores)
            chosen = sample(scores, params, gens)
            computed = asking.compute(logits, chosen) if asking else None
            if penalties:
                penalties.advance(chosen, [s.finish_reason is None for s in live])
            if step + 1 < steps:  # the next step's inputs (a call's last step has none)
                tokens.copy_(chosen)
                lens.add_(advance)
                positions.add_(advance)
            chosen_ids = chosen.tolist()  # the one host sync per step: EOS checks and token times
            now = time.time()
            entries = asking.entries(computed) if computed else {}  # ready once the sync above returned
            for i, seq in enumerate(live):
                if seq.finish_reason is None:
                    seq.num_computed += 1
                    self._append(seq, out[seq.request_id], chosen_ids[i], now, entries.get(i))
                    if seq.finish_reason is not None:
                        advance[i] = 0
            if all(s.finish_reason is not None for s in live):
                break
        return out

    def speculate(self, live: list[SeqState], steps: int, k: int) -> dict[str, StepOutput]:
        """Up to `steps` speculative rounds of the live rows, each proposing up to k tokens per row."""
        out = {s.request_id: StepOutput(s.request_id) for s in live}
        for _ in range(steps):
            live = [s for s in live if s.finish_reason is None]
            if not live:
                break
            self._speculative_round(live, k, out)
        return out

    def _speculative_round(self, live: list[SeqState], k: int, out: dict[str, StepOutput]) -> None:
        """Propose, verify in one decode step over 1 + (the most proposals of any row) query rows per row (k + 1
        at most; 1 when no row proposes, a plain step), keep what `accept` keeps.

        A row proposes only when its sampling is plain (no grammar, penalty or logprobs: those rows take one
        token from their first query, through the ordinary path), it has room for a proposal (max_new_tokens,
        its blocks) and its recent acceptance is not resting it (`RowSpeculation`). Rejected proposals' KV
        lies past the row's num_computed: never read, overwritten by later tokens.
        """
        runner, config = self.runner, self.speculative
        assert config is not None
        n = len(live)
        tables = self._table_tensor(live, pick_bucket(runner.buckets, n))
        for s in live:
            if len(s.table) * runner.block_size <= s.num_computed:
                raise ValueError(f"request {s.request_id!r} has no block for its next token")
        proposals, special = self._proposals(live, k, lambda rows: tables[torch.tensor(rows, device=tables.device)])
        width = 1 + max(len(p) for p in proposals)  # query rows per sequence: 1 where no row proposes
        tokens, lens, positions, real = verify_layout(
            [s.tokens[-1] for s in live], proposals, [s.num_computed for s in live], [s.delta for s in live], width
        )
        rows = pick_bucket(runner.buckets, len(tokens))
        pad = rows - len(tokens)
        device = runner.device
        owner = torch.arange(n, device=device).repeat_interleave(width)  # query row -> its sequence's table row
        step_tables = torch.cat([tables[owner], tables.new_full((pad, tables.shape[1]), NULL_BLOCK)])
        step_tables[torch.tensor([not r for r in real] + [True] * pad, device=device)] = NULL_BLOCK
        kv = [x + 1 for x in lens] + [1] * pad
        logits = runner.decode(
            torch.tensor(tokens + [0] * pad, device=device),
            torch.tensor(positions + [0] * pad, device=device),
            torch.tensor(lens + [0] * pad, dtype=torch.long, device=device),
            max_len=max(kv),
            block_tables=step_tables,
            kv_lens=kv if runner.paged_decode else None,
        )
        now = time.time()
        chosen_special = self._sample_rows(logits, live, [i for i in range(n) if special[i]], width)
        for i, seq in enumerate(live):
            if special[i]:
                token, entry = chosen_special[i]
                seq.num_computed += 1
                self._append(seq, out[seq.request_id], token, now, entry)
            else:
                first = i * width
                self._keep(
                    seq, out[seq.request_id], logits[first : first + len(proposals[i]) + 1], proposals[i], k, now
                )

    def _proposals(
        self, live: list[SeqState], k: int, tables: Callable[[list[int]], torch.Tensor]
    ) -> tuple[list[list[int]], list[bool]]:
        """Each live row's proposals for one round (up to k; [] where it proposes nothing) and whether its
        sampling is special (a grammar, penalties or logprobs: it never proposes). A row proposes when it has
        room (max_new_tokens, its blocks) and its recent acceptance is not resting it (`RowSpeculation`).
        tables(rows): the block tables (len(rows), M) of those live rows, for the draft."""
        runner, config = self.runner, self.speculative
        assert config is not None
        size = runner.block_size
        room = []
        for s in live:
            left = s.params.max_new_tokens - len(s.output) - 1  # the round emits proposals + 1
            room.append(max(0, min(k, left, len(s.table) * size - s.num_computed - 1)))
        special = [not self._plain(s) for s in live]
        asking = [i for i, s in enumerate(live) if not special[i] and room[i] and s.speculation.wants()]
        proposals: list[list[int]] = [[] for _ in live]
        if config.method == "ngram":
            for i in asking:
                proposals[i] = ngram_propose(
                    live[i].tokens, room[i], config.prompt_lookup_min, config.prompt_lookup_max
                )
            return proposals, special
        drafter = self.drafter
        assert drafter is not None
        asking = [i for i in asking if len(live[i].tokens) + k <= runner.max_seq_len]
        if asking:
            for i, tokens in zip(asking, drafter.propose([live[i] for i in asking], k, tables(asking))):
                proposals[i] = tokens[: room[i]]
        return proposals, special

    def _keep(
        self, seq: SeqState, out: StepOutput, logits: torch.Tensor, proposed: list[int], k: int, now: float
    ) -> None:
        """Take one row's verification: logits (len(proposed) + 1, V) at its query rows -> the tokens `accept`
        emits, each appended (up to EOS or max_new_tokens) with its KV counted; the round's (proposed,
        accepted) in `out`, the row's acceptance and the draft's KV brought in line."""
        before = len(seq.tokens)
        new, accepted = accept(logits, proposed, seq.params, seq.generator)
        kept = 0
        for token in new:
            seq.num_computed += 1
            self._append(seq, out, token, now)
            kept += 1
            if seq.finish_reason is not None:
                break
        if proposed:
            accepted = min(accepted, kept)
            out.spec_rounds = (out.spec_rounds or []) + [(len(proposed), accepted)]
            seq.speculation.observe(len(proposed), accepted, self.speculative)
            if self.drafter is not None:
                self.drafter.accepted(seq, before, accepted, k)

    def _sample_rows(
        self, logits: torch.Tensor, live: list[SeqState], rows: list[int], stride: int
    ) -> dict[int, tuple[int, Entry | None]]:
        """Live row i's next token from query row i * stride, through the ordinary path (grammar mask,
        penalties, sampling, logprobs), for the listed rows."""
        if not rows:
            return {}
        picked = logits[torch.tensor([i * stride for i in rows], device=logits.device)]
        chosen, entries = self._sample(picked, [live[i] for i in rows])
        return {i: (token, entries.get(j)) for j, (i, token) in enumerate(zip(rows, chosen))}

    def _sample(self, logits: torch.Tensor, seqs: list[SeqState]) -> tuple[list[int], dict[int, Entry]]:
        """One token for each row of logits (B, V) (seqs[i] for row i): grammar mask, penalties, sampling, and the
        logprobs entries of the rows that ask (by row)."""
        asking = LogprobRows([s.params for s in seqs], logits.device)
        scores = self._constrain(logits, seqs)
        penalties = self._penalties(seqs)
        if penalties:
            scores = penalties.apply(scores)
        chosen = sample(scores, [s.params for s in seqs], [s.generator for s in seqs])
        computed = asking.compute(logits, chosen) if asking else None
        return chosen.tolist(), asking.entries(computed) if computed else {}

    @staticmethod
    def _plain(seq: SeqState) -> bool:
        """Whether a row's sampling is plain enough to speculate: no grammar, penalty or logprobs."""
        p = seq.params
        return seq.matcher is None and not penalized(p) and not p.logprobs

    # ----------------------------------------------------------------------------- helpers
    def _table_tensor(self, live: list[SeqState], rows: int) -> torch.Tensor:
        """(rows, max_blocks_per_seq) block tables of `live` (padded rows: the null block), kept on the device
        between calls: when the rows are those of the last call, only the blocks appended since are copied."""
        keys = [(s.request_id, s.table_epoch) for s in live]
        if self._tables is not None and self._tables[0] == keys and self._tables[2].shape[0] == rows:
            _, lengths, tensor = self._tables
            for i, seq in enumerate(live):
                if len(seq.table) > lengths[i]:  # a table only grows within one epoch
                    new = seq.table[lengths[i] :]
                    tensor[i, lengths[i] : len(seq.table)] = torch.tensor(new, dtype=torch.long, device=tensor.device)
                    lengths[i] = len(seq.table)
            return tensor
        tensor = self.runner.table_tensor([s.table for s in live] + [[]] * (rows - len(live)))
        self._tables = (keys, [len(s.table) for s in live], tensor)
        return tensor

    def _grammars(self) -> GrammarMatchers:
        runner = self.runner
        return matchers_for(str(runner.model_path), runner.config.text.vocab_size, tuple(runner.config.eos_token_ids))

    def _constrain(self, logits: torch.Tensor, seqs: list[SeqState]) -> torch.Tensor:
        """logits (B, V) with each constrained row (seqs[i] for row i, still generating) masked to what its
        grammar allows next; the logits themselves when no row is constrained (logprobs read those)."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None and s.finish_reason is None]
        if not rows:
            return logits
        allowed = self._grammars().allowed([seqs[i].matcher for i in rows], logits.device)
        return mask_logits(logits, torch.tensor(rows, device=logits.device), allowed)

    def _penalties(self, seqs: list[SeqState]) -> Penalties | None:
        """The penalty state of a call's rows (seqs[i] is row i), or None when no row sets a penalty."""
        if not any(penalized(s.params) for s in seqs):
            return None
        return Penalties(
            [s.params for s in seqs],
            [s.tokens[: s.prompt_len] for s in seqs],
            [s.output for s in seqs],
            [s.eos for s in seqs],
            self.runner.config.text.vocab_size,
            self.runner.device,
        )

    def _seq(self, request_id: str) -> SeqState:
        seq = self.seqs.get(request_id)
        if seq is None:
            raise ValueError(f"request {request_id!r} is not running on this rank")
        return seq

    def _append(self, seq: SeqState, out: StepOutput, token: int, now: float, entry: Entry | None = None) -> None:
        seq.tokens.append(token)
        out.tokens.append(token)
        out.times.append(now)
        if seq.matcher is not None:
            seq.matcher.consume_token(token)  # one it allowed: EOS ends the request below
        if entry is not None:
            if out.logprobs is None:
                out.logprobs = []
            out.logprobs.append(entry)
        if token in seq.eos and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
        elif len(seq.output) >= seq.params.max_new_tokens:
            seq.finish_reason = "length"
        out.finish_reason = seq.finish_reason


def generate(
    runner: ModelRunner,
    requests: list[PreparedRequest],
    params: list[SamplingParams],
    eos_token_ids: list[int],
    speculative: SpeculativeConfig | None = None,
    drafter: Drafter | None = None,
) -> list[GenerationResult]:
    """Run requests to completion in process, max_batch_size at a time, each in a fixed slot of blocks.

    Each batch: its images encoded together, its prompts prefilled in one packed forward, then decode
    until every request meets EOS or its max_new_tokens (speculative rounds with `speculative`; the runner
    needs the verification buckets, `model.speculative.verify_buckets`). Results in request order.
    """
    if len(params) != len(requests):
        raise ValueError(f"got {len(requests)} requests but {len(params)} sampling params")
    start_unix = time.time()
    results = [GenerationResult(r.request_id, prompt_tokens=len(r.input_ids)) for r in requests]
    runnable = []
    for i, (req, p) in enumerate(zip(requests, params)):
        results[i].error = runner.check_fits(req, p)
        if results[i].error is None:
            runnable.append(i)
    tables = slot_tables(runner.max_batch_size, runner.max_seq_len, runner.block_size)
    for first in range(0, len(runnable), runner.max_batch_size):
        batch = RunningBatch(runner, speculative, drafter)
        chunk = runnable[first : first + runner.max_batch_size]
        embeds = runner.encode_images([requests[i] for i in chunk])
        drafts = drafter.runner.encode_images([requests[i] for i in chunk]) if drafter else [None] * len(chunk)
        ids = [f"#{i}" for i in chunk]  # request ids given by users may repeat
        for slot, (i, key, emb, draft) in enumerate(zip(chunk, ids, embeds, drafts)):
            batch.admit(replace(requests[i], request_id=key), params[i], eos_token_ids, emb, 0, draft)
            batch.set_tables({key: (0, tables[slot])})
        outputs = [batch.forward([(key, 0, len(requests[i].input_ids)) for key, i in zip(ids, chunk)], [])]
        steps = max(params[i].max_new_tokens for i in chunk)
        while batch.active:  # one call runs every step: the step inputs stay on the device
            live = [r for r in ids if batch.seqs[r].finish_reason is None]
            outputs.append(batch.decode(live, steps, speculative.num_speculative_tokens if speculative else 0))
        by_id = {key: results[i] for key, i in zip(ids, chunk)}
        for out in outputs:
            for request_id, step in out.items():
                result = by_id[request_id]
                result.output_token_ids.extend(step.tokens)
                result.token_times_s.extend(u - start_unix for u in step.times)
                result.finish_reason = step.finish_reason or result.finish_reason
                result.logprobs.extend(step.logprobs or [])
                result.spec_rounds.extend(step.spec_rounds or [])
    return results
