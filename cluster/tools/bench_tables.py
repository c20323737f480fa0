"""Host time a decode call spends on block tables: whole tables every call against what changed.

`python -m cluster.tools.bench_tables [--rows 64] [--context 32768] [--block-size 16] [--calls 400]`

No model: `rows` requests of `context` tokens each decode one token per call, and a row gains a
block every `block-size` steps (the rows staggered, as a running batch's are). Per call, timed
alike for both ways: the step call's arguments pickled and unpickled (what a Ray call does with
them), the tables applied to the rank's `RunningBatch` (`set_tables`), and the (rows,
max_blocks_per_seq) device tensor the decode step reads (`RunningBatch._table_tensor`). Before:
whole tables every call, the tensor rebuilt; after: only the blocks appended since the last call
(actors/table_updates.py), the tensor kept and patched. Prints the median host milliseconds per call
of each and the arguments' pickled size.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time
from types import SimpleNamespace

import torch

from actors.scheduler import Plan
from actors.table_updates import TableUpdates
from model.batch import RunningBatch, SeqState
from model.kv_cache import blocks_for
from model.runner import ModelRunner
from model.sampling import SamplingParams


def run(rows: int, context: int, block_size: int, calls: int, deltas: bool) -> tuple[float, int]:
    """Median seconds per call and the median pickled size of the call's tables."""
    width = blocks_for(context + calls, block_size)
    runner = SimpleNamespace(max_blocks_per_seq=width, device=torch.device("cpu"))
    runner.table_tensor = ModelRunner.table_tensor.__get__(runner)
    batch, sender = RunningBatch(runner), TableUpdates()
    lengths = [context - (i * block_size) // rows for i in range(rows)]  # staggered: one grows every few calls
    ids = [f"r{i}" for i in range(rows)]
    for rid in ids:
        batch.seqs[rid] = SeqState(rid, [0], 1, None, 0, [], SamplingParams(), None, frozenset())
    next_block = 1
    tables = {}
    for rid, n in zip(ids, lengths):
        tables[rid] = list(range(next_block, next_block + blocks_for(n, block_size)))
        next_block += len(tables[rid])
    times, sizes = [], []
    for call in range(calls):
        for i, rid in enumerate(ids):
            if blocks_for(lengths[i] + call + 1, block_size) > len(tables[rid]):
                tables[rid].append(next_block)
                next_block += 1
        plan = Plan(admit=[], block_tables=tables)
        start = time.perf_counter()
        payload = sender.updates(plan) if deltas else {r: (0, t) for r, t in tables.items()}
        wire = pickle.dumps(([], [], [], payload, [], ids, 1), protocol=5)
        batch.set_tables(pickle.loads(wire)[3])
        batch._table_tensor([batch.seqs[r] for r in ids], rows)
        times.append(time.perf_counter() - start)
        sizes.append(len(wire))
    return statistics.median(times[1:]), int(statistics.median(sizes[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.bench_tables", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args(argv)
    whole = run(args.rows, args.context, args.block_size, args.calls, deltas=False)
    changed = run(args.rows, args.context, args.block_size, args.calls, deltas=True)
    print(f"{args.rows} rows x {args.context} tokens, blocks of {args.block_size}, median of {args.calls} calls:")
    print(f"  whole tables, tensor rebuilt: {whole[0] * 1e3:.3f} ms per call, {whole[1]} bytes of arguments")
    print(f"  what changed, tensor kept:    {changed[0] * 1e3:.3f} ms per call, {changed[1]} bytes of arguments")
    print(f"  ratio: {whole[0] / changed[0]:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
