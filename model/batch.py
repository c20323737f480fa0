"""The running batch of one rank: requests in KV slots, packed chunked prefill, multi-step decode.

The caller (the Coordinator, through a ShardWorker; or `ModelRunner.generate` in process) decides
what runs: which request enters which slot, which prompt pieces are prefilled, how many decode
steps run, which slots are released. Every rank of a TP group applies the same decisions, so their
collectives match and their sampled tokens agree (same logits, same seeded generators).

Decode runs over slots 0..B-1, B the smallest batch bucket above the highest decoding slot. Rows
of slots that are not decoding are padding: they write one KV entry at their slot's fill length,
a position the slot's next prompt chunk (or next request) overwrites before reading it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from model.graph import pick_bucket
from model.processor import PreparedRequest
from model.runner import ModelRunner
from model.sampling import SamplingParams, make_generator, sample

_GREEDY = SamplingParams()


@dataclass
class SlotState:
    """One request in a KV slot."""

    request_id: str
    input_ids: list[int]
    positions: torch.Tensor  # (3, L) M-RoPE positions of the prompt
    delta: int  # decode position = cache length + delta
    image_embeds: torch.Tensor | None  # (image tokens of the prompt, hidden)
    params: SamplingParams
    generator: torch.Generator | None
    eos: frozenset[int]
    filled: int = 0  # prompt tokens in the cache
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def decoding(self) -> bool:
        return bool(self.output) and self.finish_reason is None

    @property
    def cache_len(self) -> int:
        """Entries in the KV cache; while decoding, the last sampled token is not among them yet."""
        return self.filled + max(len(self.output) - 1, 0)


@dataclass
class StepOutput:
    """New tokens of one slot from one call, with their Unix times; finish_reason once it ended."""

    request_id: str
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish_reason: str | None = None


class RunningBatch:
    """Per-slot request state over a `ModelRunner`'s KV cache."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.slots: list[SlotState | None] = [None] * runner.max_batch_size

    # ----------------------------------------------------------------------------- slots
    def admit(
        self,
        slot: int,
        request: PreparedRequest,
        params: SamplingParams,
        eos_token_ids: list[int],
        image_embeds: torch.Tensor | None,
    ) -> None:
        """Put a request into a free slot; ValueError when it cannot run here."""
        problem = self.runner.check_fits(request, params)
        if problem is not None:
            raise ValueError(problem)
        if not 0 <= slot < len(self.slots):
            raise ValueError(f"slot {slot} out of range 0..{len(self.slots) - 1}")
        if self.slots[slot] is not None:
            raise ValueError(f"slot {slot} is held by request {self.slots[slot].request_id!r}")
        image_tokens = sum(t == self.runner.config.image_token_id for t in request.input_ids)
        have = 0 if image_embeds is None else image_embeds.shape[0]
        if have != image_tokens:
            raise ValueError(
                f"request {request.request_id!r}: prompt has {image_tokens} image-pad tokens but "
                f"its images give {have} embeddings"
            )
        positions, delta = self.runner.prompt_positions(request)
        self.slots[slot] = SlotState(
            request.request_id,
            list(request.input_ids),
            positions,
            delta,
            image_embeds,
            params,
            make_generator(params, self.runner.device),
            frozenset(eos_token_ids),
        )

    def release(self, slot: int) -> None:
        self.slots[slot] = None

    @property
    def active(self) -> bool:
        return any(s is not None for s in self.slots)

    # ----------------------------------------------------------------------------- prefill
    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[int, int]]) -> dict[int, StepOutput]:
        """Prefill prompt pieces, packed into one forward: (slot, end) continues each slot's prompt to `end`.

        Returns the first token of every slot whose prompt is now complete.
        """
        runner, image_id = self.runner, self.runner.config.image_token_id
        ids, positions, embeds, segments, ends = [], [], [], [], []
        for slot, end in chunks:
            state = self._slot(slot)
            start = state.filled
            if not start < end <= len(state.input_ids):
                raise ValueError(f"slot {slot}: chunk end {end} outside ({start}, {len(state.input_ids)}]")
            piece = state.input_ids[start:end]
            ids.extend(piece)
            positions.append(state.positions[:, start:end])
            if state.image_embeds is not None:
                before = sum(t == image_id for t in state.input_ids[:start])
                inside = sum(t == image_id for t in piece)
                if inside:
                    embeds.append(state.image_embeds[before : before + inside])
            segments.append((slot, start, end - start))
            ends.append(len(ids) - 1)
        device = runner.device
        done = [i for i, (slot, end) in enumerate(chunks) if end == len(self._slot(slot).input_ids)]
        logits = runner.model.prefill(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.cat(positions, dim=1).to(device),
            torch.cat(embeds).to(device) if embeds else None,
            segments,
            torch.tensor([ends[i] for i in done], dtype=torch.long, device=device),
        )
        for slot, end in chunks:
            self._slot(slot).filled = end
        out: dict[int, StepOutput] = {}
        for row, i in enumerate(done):
            slot = chunks[i][0]
            state = self._slot(slot)
            token = int(sample(logits[row : row + 1], [state.params], [state.generator])[0])
            state.image_embeds = None  # in the cache now
            out[slot] = StepOutput(state.request_id)
            self._append(state, out[slot], token, time.time())
        return out

    # ----------------------------------------------------------------------------- decode
    @torch.inference_mode()
    def decode(self, steps: int) -> dict[int, StepOutput]:
        """Up to `steps` decode steps for every decoding slot; a slot stops at EOS or max_new_tokens."""
        live = [i for i, s in enumerate(self.slots) if s is not None and s.decoding]
        if not live or steps < 1:
            return {}
        runner = self.runner
        rows = pick_bucket(runner.buckets, max(live) + 1)
        states = [self.slots[i] if i < len(self.slots) else None for i in range(rows)]
        decoding = [s is not None and s.decoding for s in states]
        lens_host = [0 if s is None else s.cache_len for s in states]
        device = runner.device
        # Step inputs stay on the device for the whole call and are updated in place: the next tokens
        # are the sampled ones; lengths and positions advance by one for rows still decoding.
        tokens = torch.tensor([s.output[-1] if d else 0 for s, d in zip(states, decoding)], device=device)
        lens = torch.tensor(lens_host, dtype=torch.long, device=device)
        positions = lens + torch.tensor([s.delta if d else 0 for s, d in zip(states, decoding)], device=device)
        advance = torch.tensor([int(d) for d in decoding], dtype=torch.long, device=device)
        params = [s.params if d else _GREEDY for s, d in zip(states, decoding)]
        gens = [s.generator if d else None for s, d in zip(states, decoding)]
        out = {i: StepOutput(self.slots[i].request_id) for i in live}
        longest = max(lens_host[i] for i in live)
        for step in range(steps):
            chosen = sample(runner.decode(tokens, positions, lens, max_len=longest + step + 1), params, gens)
            tokens.copy_(chosen)
            lens.add_(advance)
            positions.add_(advance)
            chosen_ids = chosen.tolist()  # the one host sync per step: EOS checks and token times
            now = time.time()
            for i in live:
                state = states[i]
                if state.decoding:
                    self._append(state, out[i], chosen_ids[i], now)
                    if not state.decoding:
                        advance[i] = 0
            if not any(states[i].decoding for i in live):
                break
        return out

    # ----------------------------------------------------------------------------- helpers
    def _slot(self, slot: int) -> SlotState:
        state = self.slots[slot]
        if state is None:
            raise ValueError(f"slot {slot} holds no request")
        return state

    def _append(self, state: SlotState, out: StepOutput, token: int, now: float) -> None:
        state.output.append(token)
        out.tokens.append(token)
        out.times.append(now)
        if token in state.eos and not state.params.ignore_eos:
            state.finish_reason = "stop"
        elif len(state.output) >= state.params.max_new_tokens:
            state.finish_reason = "length"
        if state.finish_reason is not None:
            out.finish_reason = state.finish_reason
            self.slots[self.slots.index(state)] = None  # the slot is free at once
