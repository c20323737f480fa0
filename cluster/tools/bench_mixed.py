"""Mixed-round benchmark: a prompt chunk and decode rows in one packed forward, against the two apart.

`python -m cluster.tools.bench_mixed [--checkpoint small|tiny] [--chunk 512] [--rows 32] [--context 128]
[--stride 24] [--repeats 7] [--threads N]`

In process (the Ray-free model path a worker runs), on the checkpoint's random weights, decode in graph
mode (`ModelRunner.capture_graphs` for the rows' bucket). `--rows` requests decode with staggered contexts
(`--context` + i x `--stride` tokens, so no two read the same number of keys); one more request's first
`--chunk` prompt tokens form the chunk. Timed, interleaved, each repeat:

- mixed: `RunningBatch.forward` with the chunk and one token of every decoding row (one packed forward);
- chunk: the same chunk alone through `RunningBatch.forward`;
- decode: one graph-mode decode step of the rows (`RunningBatch.decode`).

Reported: the median of each, mixed / (chunk + decode) of the medians (a mixed round should cost little
more than its parts), and the median over repeats of each repeat's own ratio (its three rounds ran back to
back, so load that comes and goes on a shared machine moves that ratio less). The chunk's request is
released and admitted again before each chunk, so every chunk starts from an empty cache; the decode rows
grow by one token per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from cluster.tools.bench import CACHE_DIR, CHECKPOINTS, log
from cluster.tools.tiny_checkpoint import build_tiny_checkpoint
from model.batch import RunningBatch
from model.kv_cache import NULL_BLOCK, blocks_for
from model.processor import PreparedRequest
from model.runner import ModelRunner
from model.sampling import SamplingParams


def run(args: argparse.Namespace) -> dict:
    directory, spec = CHECKPOINTS[args.checkpoint]
    path = build_tiny_checkpoint(CACHE_DIR / directory, spec)
    contexts = [args.context + i * args.stride for i in range(args.rows)]
    max_seq_len = max(max(contexts), 2 * args.chunk) + 4 * args.repeats + 16
    per_seq = blocks_for(max_seq_len, 16)
    runner = ModelRunner(
        path,
        max_batch_size=args.rows,
        max_seq_len=max_seq_len,
        num_kv_blocks=(args.rows + 1) * per_seq + 1,
        kv_block_size=16,
    )
    log(f"{args.checkpoint}: capturing decode for {args.rows} rows")
    start = time.perf_counter()
    runner.capture_graphs([next(b for b in runner.buckets if b >= args.rows)])
    log(f"captured in {time.perf_counter() - start:.1f} s")
    batch = RunningBatch(runner)
    size = runner.block_size
    free = iter(range(NULL_BLOCK + 1, runner.cache.num_blocks))
    gen = torch.Generator().manual_seed(0)

    def admit(request_id: str, length: int, num_cached: int) -> None:
        ids = torch.randint(0, 256, (length,), generator=gen).tolist()  # byte tokens: no image pads
        request = PreparedRequest(request_id, ids, None, None)
        batch.admit(request, SamplingParams(max_new_tokens=max_seq_len - length), [], None, num_cached)

    # Decode rows: prompts whose keys are in the cache but their last token (random cache contents: the
    # cost of attention does not depend on them), that token computed once so that each row decodes.
    rows = [f"row{i}" for i in range(args.rows)]
    for request_id, context in zip(rows, contexts):
        admit(request_id, context, context - 1)
        batch.set_tables({request_id: (0, [next(free) for _ in range(per_seq)])})
    batch.forward([(r, c - 1, c) for r, c in zip(rows, contexts)], [])
    chunk_blocks = [next(free) for _ in range(blocks_for(2 * args.chunk, size))]

    def fresh_chunk() -> list[tuple[str, int, int]]:
        if "chunk" in batch.seqs:
            batch.release("chunk")
        admit("chunk", 2 * args.chunk, 0)  # the chunk is the first half of its prompt: nothing is sampled
        batch.set_tables({"chunk": (0, chunk_blocks)})
        return [("chunk", 0, args.chunk)]

    rounds: dict[str, Callable[[], object]] = {
        "mixed": lambda: batch.forward(fresh_chunk(), rows),
        "chunk": lambda: batch.forward(fresh_chunk(), []),
        "decode": lambda: batch.decode(rows, 1),
    }
    for fn in rounds.values():  # warm-up: one of each
        fn()
    times: dict[str, list[float]] = {name: [] for name in rounds}
    for repeat in range(args.repeats):
        for name, fn in rounds.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        log(f"repeat {repeat + 1}: " + ", ".join(f"{n} {t[-1] * 1e3:.0f} ms" for n, t in times.items()))
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = [m / (c + d) for m, c, d in zip(times["mixed"], times["chunk"], times["decode"])]
    return {
        "bench": "mixed",
        "checkpoint": args.checkpoint,
        "chunk": args.chunk,
        "rows": args.rows,
        "contexts": [contexts[0], contexts[-1]],
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        **{f"{name}_ms": round(m * 1e3, 2) for name, m in median.items()},
        **{f"{name}_all_ms": [round(t * 1e3, 1) for t in ts] for name, ts in times.items()},
        "mixed_over_parts": round(median["mixed"] / (median["chunk"] + median["decode"]), 3),
        "median_repeat_ratio": round(statistics.median(ratios), 3),
        "per_repeat_ratio": [round(r, 3) for r in ratios],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.bench_mixed", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="small", choices=sorted(CHECKPOINTS))
    parser.add_argument("--chunk", type=int, default=512, help="prompt tokens in the chunk")
    parser.add_argument("--rows", type=int, default=32, help="decoding requests")
    parser.add_argument("--context", type=int, default=128, help="the shortest decode row's context")
    parser.add_argument("--stride", type=int, default=24, help="context added per further row")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if min(args.chunk, args.rows, args.context, args.repeats) < 1 or args.stride < 0:
        parser.error("--chunk, --rows, --context and --repeats must be positive, --stride not negative")
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run(args)
    print(
        f"mixed {summary['mixed_ms']:.1f} ms, chunk {summary['chunk_ms']:.1f} ms, "
        f"decode {summary['decode_ms']:.1f} ms: mixed / (chunk + decode) = {summary['mixed_over_parts']} "
        f"(median per repeat {summary['median_repeat_ratio']})"
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
