"""A worker's round calls over its running batch, Ray-free: `encode` (a plan's vision items) and `step`.

ShardWorker (actors/shard_worker.py) holds one on each rank and adds the device, Ray and the profiler;
in-process drivers (tests/test_rounds.py, cluster/tools/bench_encode.py) call one directly.
"""

from __future__ import annotations

import time

from actors.pending_embeds import PendingEmbeds
from model.batch import RunningBatch, StepOutput, TableUpdate
from model.processor import PreparedRequest
from model.sampling import SamplingParams

# (request without pixels, params, EOS ids, prompt tokens already in its cached prefix blocks)
Admission = tuple[PreparedRequest, SamplingParams, list[int], int]
Fork = tuple[str, str, SamplingParams, tuple[int, int] | None]  # (parent id, choice id, its params, (block, copy))


class WorkerPhases:
    """The running batch, and the embeddings encoded for requests not yet started (the draft's too)."""

    def __init__(self, batch: RunningBatch) -> None:
        self.batch = batch
        self.embeds = PendingEmbeds()
        self.draft_embeds = PendingEmbeds()  # the same images through the draft's tower (model/draft.py)

    def encode(self, requests: list[PreparedRequest]) -> dict:
        """Vision encode of the requests' next items (images, or slices of a video: each request holds the pixels
        of those alone); the embeddings wait here, added to the request's earlier ones, for its admission.
        Nothing is kept when the call raises. Returns {"seconds", "cache": the vision cache's totals}."""
        start = time.perf_counter()
        runner, drafter = self.batch.runner, self.batch.drafter
        embeds = runner.encode_images(requests)
        drafts = drafter.runner.encode_images(requests) if drafter is not None else [None] * len(requests)
        for request, emb, draft in zip(requests, embeds, drafts):
            if emb is not None:
                self.embeds.add(request.request_id, emb)
            if draft is not None:
                self.draft_embeds.add(request.request_id, draft)
        return {"seconds": time.perf_counter() - start, "cache": runner.vision_cache_stats()}

    def step(
        self,
        releases: list[str],
        preempted: list[str],
        admissions: list[Admission],
        tables: dict[str, TableUpdate],
        chunks: list[tuple[str, int, int]],
        decode: list[str],
        steps: int,
        forks: list[Fork] | None = None,
        spec_tokens: int = 0,
    ) -> dict:
        """One round: forget `releases` and drop the KV of `preempted` (and any embeddings either holds), start
        `admissions` with their embeddings, start the choices of `forks` (parent id, choice id, its params,
        (block, copy) or None) from their parents' prompts, take the block tables, then the chunks (request
        id, start, end) and one token of each `decode` request in one packed forward, or, without chunks,
        `steps` pure-decode steps of the `decode` requests (speculative rounds of up to `spec_tokens` proposals
        each, when speculation is configured); last, copy each forked choice's partial prompt block. A choice
        samples its first token with its parent's first, from the same logits (the parent's last chunk is in
        this call).

        Returns {"outputs": {request id: new tokens}, "errors": {request id: message}, "seconds"}; a request
        that cannot be started is reported and left out of the round, the others go on. A decode request
        this rank does not hold (its admission failed in a call planned before this one) is left out.
        """
        batch = self.batch
        start = time.perf_counter()
        for request_id in [*releases, *preempted]:
            self.embeds.drop(request_id)  # a request aborted or preempted in the middle of its encode
            self.draft_embeds.drop(request_id)
        for request_id in releases:
            batch.release(request_id)
        for request_id in preempted:
            batch.preempt(request_id)
        errors: dict[str, str] = {}
        for request, params, eos, num_cached in admissions:
            embeds = self.embeds.take(request.request_id)
            draft = self.draft_embeds.take(request.request_id)
            try:
                batch.admit(request, params, eos, embeds, num_cached, draft)
            except ValueError as e:
                errors[request.request_id] = str(e)
                batch.release(request.request_id)
        copies = []
        for parent_id, child_id, params, copy in forks or ():
            if parent_id in batch.seqs and parent_id not in errors:
                batch.fork(parent_id, child_id, params)
                copies.extend([copy] if copy is not None else [])
        batch.set_tables({r: t for r, t in tables.items() if r not in errors and r in batch.seqs})
        chunks = [c for c in chunks if c[0] not in errors]
        decode = [r for r in decode if r not in errors and r in batch.seqs]
        outputs = batch.step(chunks, decode, steps, spec_tokens) if chunks or decode else {}
        batch.copy_blocks(copies)
        return {"outputs": _plain(outputs), "errors": errors, "seconds": time.perf_counter() - start}


def _plain(outputs: dict[str, StepOutput]) -> dict[str, dict]:
    """Each output as a dict of its fields (shallow: the call's outputs are not used again here)."""
    return {request_id: dict(vars(out)) for request_id, out in outputs.items()}
