"""Turning a request dict into what a DP group runs: model inputs, a scheduler `Sequence`, a `RequestState`.

Preparation (chat template, image loading and resizing, tokenization) runs on a thread, so the
Coordinator's event loop keeps serving rounds meanwhile. A caller may give up while its request is
being prepared: `abort` by id then marks it here, and the request ends as soon as its preparation
does, never queued. The counts here are what a router sees as load before a request reaches a group.

A request with `n` > 1 becomes one sequence and one RequestState per choice (actors/choices.py):
choice 0's sequence carries the others as its `forks`, and the caller gets their `Choices`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

from actors import clock
from actors.choices import Choices, choice_key
from actors.config import EngineConfig
from actors.errors import RequestError
from actors.grammars import GrammarCompiler
from actors.request_fields import check_request_fields
from actors.requests import RequestState, sampling_params, stop_strings
from actors.scheduler import Sequence
from actors.tools_format import tool_request
from model.batch import image_spans
from model.logprobs import TokenBytes
from model.processor import PreparedRequest, PromptBuilder
from model.sampling import SamplingParams
from model.vision_cache import image_key


class Preparation:
    """Prepares requests for the groups and remembers which ones an abort named while they were prepared."""

    def __init__(self, cfg: EngineConfig, builder: PromptBuilder) -> None:
        self.cfg = cfg
        self.builder = builder
        self.token_bytes = TokenBytes(builder.tokenizer)  # the text and bytes of logprobs' tokens
        self.grammars = GrammarCompiler(builder.tokenizer, cfg.grammar_cache_size, cfg.grammar_compile_timeout_s)
        self.keys = itertools.count()
        self.in_flight = 0  # requests being prepared now
        self.preparing: dict[str, int] = {}  # ids of requests being prepared -> how many with that id
        self.aborted: set[str] = set()  # of those, the ids an `abort` named meanwhile
        self.offload = asyncio.to_thread  # runs `build` off the loop (a simulation runs it inline, no thread)

    def abort(self, request_id: str) -> bool:
        """Mark every request with this id that is being prepared; whether there was one."""
        if request_id in self.preparing:
            self.aborted.add(request_id)
            return True
        return False

    async def prepare(
        self, request: Any, emit: Callable[[dict], None] | None = None
    ) -> tuple[Sequence, RequestState | Choices, bool]:
        """The request's sequence (its payload the state; with n > 1 choice 0's, the others its forks), its
        state (or its Choices; stream items go to `emit`, default its own queue) and whether an abort named
        it while it was prepared.

        Raises RequestError (or InvalidRequestError) naming the field when it cannot run as given.
        """
        arrival = clock.wall()
        check_request_fields(request)
        n = request.get("n") or 1
        if n > self.cfg.worker.max_batch_size:
            raise RequestError(
                f"'n'={n} choices exceed data_config.batch_size={self.cfg.worker.max_batch_size}, the most "
                "sequences a DP group runs at once",
                "n",
            )
        request, tools = tool_request(request, self.builder.template_tools, self.builder.tool_call_tokens)
        params = sampling_params(request, self.cfg.sampling)
        vocabulary = len(self.builder.tokenizer)
        outside = [token for token, _ in params.logit_bias if token >= vocabulary]
        if outside:
            raise RequestError(
                f"'logit_bias': token id {outside[0]} is outside the vocabulary (ids 0..{vocabulary - 1})", "logit_bias"
            )
        grammar = await self.grammars.grammar(request)
        if grammar is not None:
            params = dataclasses.replace(params, grammar=grammar)
        stop = stop_strings(request)
        rid = request.get("id")
        rid = rid if isinstance(rid, str) else None
        if rid is not None:
            self.preparing[rid] = self.preparing.get(rid, 0) + 1
        self.in_flight += 1
        try:
            prepared, images = await self.offload(self.build, request)
        finally:
            self.in_flight -= 1
            aborted = self._prepared(rid)
        self._check_lengths(request, prepared, params.max_new_tokens)
        key = f"{prepared.request_id}#{next(self.keys)}"
        if n == 1:
            seq, state = self._sequence(key, prepared, params, stop, images, arrival, emit, tools)
            return seq, state, aborted
        choices = Choices(key, prepared.request_id, asyncio.get_running_loop().create_future(), emit)
        seqs = []
        for i in range(n):
            choice = dataclasses.replace(params, seed=params.seed + i)
            seq, state = self._sequence(
                choice_key(key, i), prepared, choice, stop, images, arrival, choices.sink(i), tools
            )
            state.parent = choices
            choices.states.append(state)
            seqs.append(seq)
        seqs[0].forks = seqs[1:]
        return seqs[0], choices, aborted

    def _sequence(
        self,
        key: str,
        prepared: PreparedRequest,
        params: SamplingParams,
        stop: list[str],
        images: list[tuple[int, int, bytes]],
        arrival: float,
        emit: Callable[[dict], None] | None,
        tools: dict[str, dict] | None,
    ) -> tuple[Sequence, RequestState]:
        """One sequence for the scheduler and its state (its payload)."""
        grids = prepared.image_grid_thw if prepared.image_grid_thw is not None else []
        slices = [int(grid[0]) for grid in grids]  # a video is encoded slice by slice
        seq = Sequence(key, list(prepared.input_ids), params.max_new_tokens, images, image_slices=slices)
        state = RequestState.create(
            key, prepared.request_id, prepared, params, stop, self.builder.decode, arrival, emit, self.token_bytes
        )
        state.tools = tools
        seq.payload = state
        return seq, state

    def build(self, request: dict) -> tuple[PreparedRequest, list[tuple[int, int, bytes]]]:
        """Model inputs, and each image's token span with the hash of its processed pixels (prefix-cache keys)."""
        prepared = self.builder.build(request)
        images: list[tuple[int, int, bytes]] = []
        if prepared.image_grid_thw is not None:
            spans = image_spans(prepared.input_ids, self.builder.image_token_id, self.builder.video_token_id)
            offset = 0
            for (start, end), grid in zip(spans, prepared.image_grid_thw):
                n = int(grid.prod())
                images.append((start, end, image_key(prepared.pixel_values[offset : offset + n], grid)))
                offset += n
        return prepared, images

    def _prepared(self, rid: str | None) -> bool:
        """A request named `rid` is prepared (or failed to be); whether an abort named it meanwhile."""
        if rid is None:
            return False
        aborted = rid in self.aborted
        left = self.preparing.pop(rid) - 1
        if left:
            self.preparing[rid] = left
        else:
            self.aborted.discard(rid)
        return aborted

    def _check_lengths(self, request: dict, prepared: PreparedRequest, max_new_tokens: int) -> None:
        """RequestError naming the limit when the prompt or prompt + output cannot fit this engine."""
        cfg = self.cfg
        if len(prepared.input_ids) > cfg.input_max_len:
            raise RequestError(
                f"request {prepared.request_id!r}: prompt has {len(prepared.input_ids)} tokens, more "
                f"than data_config.input_max_len={cfg.input_max_len}",
                "messages" if request.get("messages") is not None else "prompt",
            )
        need = len(prepared.input_ids) + max_new_tokens
        if need > cfg.worker.max_seq_len:
            raise RequestError(
                f"request {prepared.request_id!r}: prompt of {len(prepared.input_ids)} tokens + "
                f"max_new_tokens={max_new_tokens} needs {need} KV positions, more than "
                f"max_seq_len={cfg.worker.max_seq_len}",
                "max_new_tokens",
            )
