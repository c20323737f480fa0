"""A draft model for speculative decoding: a smaller Qwen2.5-VL with the target's tokenizer, on the same rank.

The draft is a `ModelRunner` of its own (its vision tower, embeddings and decoder) whose paged KV cache has
as many blocks as the target's, of the same size, and is indexed by the target's block tables: block b of a
request holds the target's keys and values in the target's pool and the draft's in the draft's. Allocation,
prefix caching, preemption and release therefore need nothing of their own; the draft's KV follows the
target's because the draft computes every piece the target computes (`mirror`, with its own image
embeddings) and catches up on the tokens the target decoded without it (`catch_up`).

Proposals are greedy: k draft decode steps from each row's last token. The first step feeds each row's
last two tokens (2B query rows), because the token after k accepted proposals was never fed to the draft;
a row whose draft KV already holds the second-to-last token writes that query to the null block instead.
Each row's `SeqState.draft_computed` counts the tokens whose draft KV is in its blocks.

The draft's KV of a block reached through the prefix cache is the draft's only when the draft computed
it: a request that ended with the draft behind the target leaves its last block's draft entries stale.
That costs acceptance, never correctness: the target verifies every proposal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.kv_cache import NULL_BLOCK
from model.parallel import SINGLE, ParallelContext
from model.text import PackedBatch

if TYPE_CHECKING:
    from model.batch import SeqState
    from model.runner import ModelRunner


class DraftMismatch(ValueError):
    """The draft checkpoint cannot propose for the target."""


def _vocabulary(path: Path) -> dict[str, int]:
    """token -> id of a checkpoint's tokenizer.json (its model vocabulary and its added tokens)."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise DraftMismatch(f"checkpoint {str(path)!r} has no tokenizer.json")
    raw = json.loads(file.read_text())
    vocab = dict(raw.get("model", {}).get("vocab", {}))
    vocab.update({t["content"]: t["id"] for t in raw.get("added_tokens", [])})
    return vocab


def check_draft(target_path: str | Path, draft_path: str | Path) -> None:
    """DraftMismatch naming what differs when the draft's tokenizer or vision layout is not the target's.

    The embedding tables may have different numbers of rows (Qwen2.5-VL-3B has 151,936, the 72B 152,064):
    only the tokenizers' tokens and ids must agree, and the special tokens the prompt layout uses.
    """
    from model.config import ModelConfig

    target, draft = Path(target_path), Path(draft_path)
    if not (draft / "config.json").is_file():
        raise DraftMismatch(f"speculative.model={str(draft)!r} is not a checkpoint directory (no config.json)")
    mine, theirs = _vocabulary(target), _vocabulary(draft)
    if mine != theirs:
        missing = sorted(set(mine) - set(theirs))[:5]
        extra = sorted(set(theirs) - set(mine))[:5]
        moved = sorted(t for t in set(mine) & set(theirs) if mine[t] != theirs[t])[:5]
        details = []
        if missing:
            details.append(f"tokens only in the target: {missing}")
        if extra:
            details.append(f"tokens only in the draft: {extra}")
        if moved:
            details.append(f"tokens with other ids: {[(t, mine[t], theirs[t]) for t in moved]}")
        raise DraftMismatch(
            f"the draft {str(draft)!r} does not share the target's tokenizer ({len(mine)} vs {len(theirs)} "
            f"tokens): {'; '.join(details)}"
        )
    a, b = ModelConfig.from_pretrained(target), ModelConfig.from_pretrained(draft)
    for name in ("image_token_id", "video_token_id", "vision_start_token_id"):
        if getattr(a, name) != getattr(b, name):
            raise DraftMismatch(f"the draft's {name} is {getattr(b, name)}, the target's {getattr(a, name)}")
    for name in ("spatial_merge_size", "tokens_per_second", "patch_size", "temporal_patch_size"):
        if getattr(a.vision, name) != getattr(b.vision, name):
            raise DraftMismatch(
                f"the draft's vision_config.{name} is {getattr(b.vision, name)}, the target's "
                f"{getattr(a.vision, name)} (the draft must see the same image tokens and positions)"
            )


def load_drafter(
    target: ModelRunner, draft_path: str | Path, ctx: ParallelContext = SINGLE, progress: bool = False
) -> Drafter:
    """The draft checkpoint on the target's device, its KV pool laid out as the target's (same block count
    and size), with decode buckets for its two-token first step. `ctx`: SINGLE (a replica on this rank) or
    the target's TP context (sharded over the same ranks). DraftMismatch when it cannot draft for the target."""
    from model.runner import ModelRunner, batch_buckets

    check_draft(target.model_path, draft_path)
    runner = ModelRunner(
        draft_path,
        ctx=ctx,
        device=target.device,
        dtype=target.dtype,
        max_batch_size=target.max_batch_size,
        max_seq_len=target.max_seq_len,
        progress=progress,
        fused_ops=target.fused_ops,
        num_kv_blocks=target.cache.num_blocks,
        kv_block_size=target.block_size,
    )
    runner.add_decode_buckets([2 * b for b in batch_buckets(target.max_batch_size)])
    return Drafter(runner, target.config.text.vocab_size)


class Drafter:
    """Proposes tokens with a draft `ModelRunner` whose KV pool mirrors the target's block layout."""

    def __init__(self, runner: ModelRunner, target_vocab: int) -> None:
        self.runner = runner
        self.vocab = min(target_vocab, runner.config.text.vocab_size)  # proposals are ids both models have

    # ----------------------------------------------------------------------------- keeping in step
    @torch.inference_mode()
    def mirror(self, pieces: list[tuple[SeqState, int, int]]) -> None:
        """Compute the draft's KV of each (seq, start, end) the target computed, from where the draft's KV of
        that sequence ends (at most `start`) to `end`."""
        runner = self.runner
        ids: list[int] = []
        positions, embeds, layout, touched = [], [], [], []
        for seq, _, end in pieces:
            start = min(seq.draft_computed, end)
            if start >= end:
                continue
            ids.extend(seq.tokens[start:end])
            positions.append(seq.position_ids(start, end))
            embeds.extend(seq.image_rows(start, end, draft=True))
            layout.append((start, end - start, seq.table))
            touched.append((seq, end))
        if not layout:
            return
        device = runner.device
        packed = PackedBatch.build(layout, runner.block_size, device)
        runner.model.prefill(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.cat(positions, dim=1).to(device),
            torch.cat(embeds).to(device) if embeds else None,
            packed,
            torch.zeros(0, dtype=torch.long, device=device),  # no logits: only the KV is wanted
        )
        for seq, end in touched:
            seq.draft_computed = end
            for i, (_, image_end) in enumerate(seq.spans):
                if image_end <= end:
                    seq.draft_embeds.pop(i, None)

    def catch_up(self, seqs: list[SeqState]) -> None:
        """Bring each row's draft KV to its second-to-last token (what the target decoded without the draft)."""
        behind = [(s, s.draft_computed, len(s.tokens) - 2) for s in seqs if s.draft_computed < len(s.tokens) - 2]
        if behind:
            self.mirror(behind)

    # ----------------------------------------------------------------------------- proposals
    @torch.inference_mode()
    def propose(self, seqs: list[SeqState], k: int, tables: torch.Tensor) -> list[list[int]]:
        """k greedy draft tokens after each row's last token. tables: the rows' (>= len(seqs), M) block tables."""
        from model.graph import pick_bucket

        self.catch_up(seqs)
        runner = self.runner
        device = runner.device
        n = len(seqs)
        rows = pick_bucket(runner.buckets, 2 * n)
        null = torch.full_like(tables[:1], NULL_BLOCK)
        # Step 1: each row's second-to-last and last tokens, query rows 2b and 2b + 1.
        tokens, lens, positions, table_rows = [], [], [], []
        for b, seq in enumerate(seqs):
            last = len(seq.tokens) - 1
            fed = seq.draft_computed < last  # the second-to-last token's draft KV is missing
            tokens += [seq.tokens[last - 1] if fed else 0, seq.tokens[last]]
            lens += [last - 1 if fed else 0, last]
            positions += [last - 1 + seq.delta if fed else 0, last + seq.delta]
            table_rows += [tables[b : b + 1] if fed else null, tables[b : b + 1]]
        pad = rows - 2 * n
        step_tables = torch.cat(table_rows + [null] * pad)
        logits = runner.decode(
            torch.tensor(tokens + [0] * pad, device=device),
            torch.tensor(positions + [0] * pad, device=device),
            torch.tensor(lens + [0] * pad, device=device),
            max_len=max(lens) + 1,
            block_tables=step_tables,
            kv_lens=[x + 1 for x in lens] + [1] * pad if runner.paged_decode else None,
        )
        chosen = logits[1 : 2 * n : 2, : self.vocab].argmax(dim=-1)  # (n,) from each row's last token
        for seq in seqs:
            seq.draft_computed = len(seq.tokens)
        out = [[t] for t in chosen.tolist()]
        if k == 1:
            return out
        # Steps 2..k: one query row per sequence, fed the previous proposal.
        rows = pick_bucket(runner.buckets, n)
        pad = rows - n
        step_tables = torch.cat([tables[:n]] + [null] * pad)
        base = [len(s.tokens) for s in seqs]
        current = torch.cat([chosen, torch.zeros(pad, dtype=torch.long, device=device)])
        for step in range(1, k):
            lens = [b + step - 1 for b in base]
            logits = runner.decode(
                current,
                torch.tensor([x + s.delta for x, s in zip(lens, seqs)] + [0] * pad, device=device),
                torch.tensor(lens + [0] * pad, device=device),
                max_len=max(lens) + 1,
                block_tables=step_tables,
                kv_lens=[x + 1 for x in lens] + [1] * pad if runner.paged_decode else None,
            )
            current = logits[:, : self.vocab].argmax(dim=-1)
            for b, token in enumerate(current[:n].tolist()):
                out[b].append(token)
        return out

    def accepted(self, seq: SeqState, before: int, accepted: int, k: int) -> None:
        """After verification: `before` tokens were held when proposing; of the k proposals `accepted` were
        kept. The draft fed the last token and proposals 1..k-1, so its KV is right up to the accepted ones."""
        seq.draft_computed = min(before + min(accepted, k - 1), len(seq.tokens) - 1)
