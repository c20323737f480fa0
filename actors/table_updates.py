"""What a group's workers need of each plan's block tables: only what changed since the last call.

A running request's table only grows (the pool appends a block as it needs one), so after its
admission the workers need only the blocks appended since; an unchanged table is not sent at all.
At 32k tokens of context and 64 rows, whole tables would be 131k integers per call, every step
(docs/benchmarks.md, "Block tables"). The workers apply `(start, blocks)` as
`table[start:] = blocks` (`model.batch.RunningBatch.set_tables`); they run the calls in plan
order, so the lengths recorded here are theirs once the calls before have run.
"""

from __future__ import annotations

from actors.scheduler import Plan


class TableUpdates:
    """The block-table entries a group's workers hold, per request, as the plans sent them."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}  # request id -> entries of its table the workers hold

    def forget(self) -> None:
        """The workers were replaced (a rebuild): they hold no table."""
        self.sent.clear()

    def updates(self, plan: Plan, skip: set[str] = frozenset()) -> dict[str, tuple[int, list[int]]]:
        """(start, blocks) per request of the plan whose table is new or grew (a whole table, start 0, for a
        request admitted now); requests in `skip` (left out of the call) are not sent."""
        sent = self.sent
        for request_id in plan.releases + plan.preempted:
            sent.pop(request_id, None)
        for seq in plan.admit:
            sent.pop(seq.request_id, None)
        out = {}
        for request_id, table in plan.block_tables.items():
            if request_id in skip:
                continue
            start = sent.get(request_id, 0)
            if start > len(table):
                raise AssertionError(f"request {request_id!r}: its block table shrank from {start} to {len(table)}")
            if len(table) > start or request_id not in sent:
                out[request_id] = (start, table[start:])
                sent[request_id] = len(table)
        return out
