"""Block tables sent as what changed (actors/table_updates.py) and applied on a rank (RunningBatch.set_tables)."""

from __future__ import annotations

import pytest

from actors.scheduler import Plan, Sequence
from actors.table_updates import TableUpdates
from model.batch import RunningBatch, SeqState
from model.sampling import SamplingParams


def plan(tables: dict[str, list[int]], admit: tuple[str, ...] = (), releases=(), preempted=()) -> Plan:
    return Plan(
        releases=list(releases),
        preempted=list(preempted),
        admit=[Sequence(r, [1], 1) for r in admit],
        block_tables={r: list(t) for r, t in tables.items()},
    )


def test_whole_tables_at_admission_then_only_new_blocks() -> None:
    sender = TableUpdates()
    assert sender.updates(plan({"a": [3, 4]}, admit=("a",))) == {"a": (0, [3, 4])}
    assert sender.updates(plan({"a": [3, 4]})) == {}  # unchanged: nothing sent
    assert sender.updates(plan({"a": [3, 4, 9], "b": [5]}, admit=("b",))) == {"a": (2, [9]), "b": (0, [5])}
    assert sender.updates(plan({"b": [5]}, preempted=("a",))) == {}
    assert sender.updates(plan({"a": [7]}, admit=("a",))) == {"a": (0, [7])}  # resumed: a whole new table
    assert sender.updates(plan({}, releases=("b",))) == {}
    assert sender.updates(plan({"b": [6]}, admit=("b",))) == {"b": (0, [6])}  # a new request with that id
    assert sender.updates(plan({"c": [8]}, admit=("c",)), skip={"c"}) == {}  # left out of the call
    sender.forget()  # new workers
    assert sender.updates(plan({"a": [7, 2]})) == {"a": (0, [7, 2])}
    with pytest.raises(AssertionError, match="'a': its block table shrank from 2 to 1"):
        sender.updates(plan({"a": [7]}))


def test_a_rank_applies_updates_and_refuses_a_gap() -> None:
    batch = RunningBatch(runner=None)  # set_tables needs no model
    batch.seqs["a"] = SeqState("a", [1], 1, None, 0, [], SamplingParams(), None, frozenset())
    batch.set_tables({"a": (0, [3, 4])})
    epoch = batch.seqs["a"].table_epoch
    batch.set_tables({"a": (2, [9])})
    assert batch.seqs["a"].table == [3, 4, 9] and batch.seqs["a"].table_epoch == epoch  # appended: same epoch
    batch.set_tables({"a": (0, [7])})
    assert batch.seqs["a"].table == [7] and batch.seqs["a"].table_epoch != epoch  # replaced: a new epoch
    with pytest.raises(ValueError, match="request 'a': block table update from entry 3, but 1 are held"):
        batch.set_tables({"a": (3, [1])})
