"""Speculative decoding benchmark: TPOT at batch 1 with n-gram and draft proposals against plain decoding.

`python -m cluster.tools.bench_spec [--checkpoint small|tiny] [--exe-mode graph|eager] [--k 4]
[--draft-layers 4] [--tail-scale 1.0] [--tokens 64] [--context-tokens 96] [--repeats 2] [--workload loop|echo]
[--json OUT]`

In process (the Ray-free model path, as every worker runs it), one request at a time, on the checkpoint's
random weights. The workload makes the answer repeat text of the prompt, as extraction or rewriting does.
A random model does not copy its prompt, but its greedy output falls into a loop; so the prompt opens with
the stretch of text the answer will repeat, that loop, then holds a passage, the model's greedy
continuation of it, the passage again, and the model's greedy answer to all that up to a few tokens into
its loop: the answer goes on with the loop, which the prompt's opening holds. (With the 0.5B shape's
random weights the loop is one token repeated. The opening stretch makes the earliest occurrence of the
answer's last tokens, which vLLM's rule proposes from, one followed by the loop; shorter runs of the same
token earlier in the prompt would otherwise be taken first. `--workload echo` is the same prompt without
the opening, whose loop the prompt also holds, but only after shorter runs.)
The draft is the checkpoint's first `--draft-layers` decoder layers with its
embeddings, head and vision tower (`cluster.tools.draft_checkpoint`): what a smaller model of the same
family would be, with an acceptance set by how much the cut layers change the output. A cut of random
layers proposes what the whole model rarely takes; `--tail-scale S` < 1 builds a target for which the cut is
a good draft, as a trained family draft is for its target: the output projections (o_proj, down_proj) of
the target's layers past the draft's are scaled by S in process after loading, so those layers add S times
their contribution to the residual stream and the first layers decide most tokens. The target still runs
every layer at full cost, so TPOT is what a target of that size pays.

Reported per method: TPOT (median over repeats of (last token time - first) / (tokens - 1)), its ratio to
plain decoding measured in the same run, the acceptance rate and the mean acceptance length (tokens per
verification round: 1 + accepted / rounds); and whether the greedy tokens equal plain decoding's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from cluster.tools.bench import CACHE_DIR, CHECKPOINTS, TEXT_PROMPT, log
from cluster.tools.draft_checkpoint import cut_draft
from cluster.tools.tiny_checkpoint import MARKER_FILE, build_tiny_checkpoint
from model.batch import GenerationResult
from model.cpu_linear import attach_packed, packed_copy
from model.draft import load_drafter
from model.processor import PreparedRequest, PromptBuilder
from model.runner import ModelRunner, batch_buckets
from model.sampling import SamplingParams
from model.speculative import SpeculativeConfig, verify_buckets

OPENING_TOKENS = 16  # the loop's stretch the prompt opens with
LOOP_ENTRY_TOKENS = 8  # how far into its loop the answer in the prompt goes


def scale_tail(runner: ModelRunner, first: int, scale: float) -> None:
    """Scale the output projections of the runner's decoder layers from `first` on by `scale` (their packed
    copies made again: model/cpu_linear.py reads a copy, not the weight)."""
    with torch.no_grad():
        for layer in runner.model.model.layers[first:]:
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.weight.mul_(scale)
                if packed_copy(proj.weight) is not None:
                    attach_packed(proj.weight)


def tpot(result: GenerationResult) -> float:
    times = result.token_times_s
    return (times[-1] - times[0]) / (len(times) - 1)


def periodic_tail(tokens: list[int]) -> tuple[int, int]:
    """(start, period) of the longest stretch at the end of `tokens` that repeats with a period, at least
    two periods long: a greedy loop (start == len(tokens) when there is none)."""
    best = (len(tokens), 1)
    for period in range(1, len(tokens) // 2 + 1):
        start = len(tokens) - period
        while start > 0 and tokens[start - 1] == tokens[start - 1 + period]:
            start -= 1
        if len(tokens) - start >= 2 * period and start < best[0]:
            best = (start, period)
    return best


def echo_request(runner: ModelRunner, builder: PromptBuilder, tokens: int, opening: bool = True) -> PreparedRequest:
    """A prompt whose answer repeats a stretch of the prompt (see the module docstring): the model's loop
    (with `opening`), a passage, the model's greedy continuation of it, the passage again, then what the
    model answers to that, up to a few tokens into its loop."""
    greedy = [SamplingParams(max_new_tokens=tokens, ignore_eos=True)]
    passage = builder.build({"id": "passage", "prompt": TEXT_PROMPT})
    [cont] = runner.generate([passage], greedy, [])
    again = passage.input_ids + cont.output_token_ids + passage.input_ids
    [answer] = runner.generate([PreparedRequest("again", again, None, None)], greedy, [])
    out = answer.output_token_ids
    start, period = periodic_tail(out)
    if start >= len(out) or not opening:  # no loop (or no opening asked): half of the answer, as it is
        return PreparedRequest("echo", again + out[: tokens // 2], None, None)
    loop = out[start:]
    stretch = (loop * (OPENING_TOKENS // len(loop) + 1))[:OPENING_TOKENS]
    into = min(start + max(LOOP_ENTRY_TOKENS, period), len(out))
    return PreparedRequest("echo", stretch + again + out[:into], None, None)


def measure(runner, request, tokens, repeats, config=None, drafter=None) -> dict:
    params = [SamplingParams(max_new_tokens=tokens, ignore_eos=True)]
    runs = [runner.generate([request], params, [], config, drafter)[0] for _ in range(repeats)]
    rounds = runs[-1].spec_rounds
    proposed = sum(p for p, _ in rounds)
    accepted = sum(a for _, a in rounds)
    return {
        "tpot_ms": statistics.median(tpot(r) for r in runs) * 1e3,
        "tokens": runs[-1].output_token_ids,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else None,
        "mean_acceptance_length": 1 + accepted / len(rounds) if rounds else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", choices=sorted(CHECKPOINTS), default="small")
    parser.add_argument("--exe-mode", choices=("graph", "eager"), default="graph")
    parser.add_argument("--k", type=int, default=4, help="proposals per round")
    parser.add_argument("--draft-layers", type=int, default=4, help="decoder layers the draft keeps")
    parser.add_argument(
        "--tail-scale",
        type=float,
        default=1.0,
        help="scale the target's output projections past the draft's layers by this (1: as built)",
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--context-tokens", type=int, default=96, help="length of each generated part of the prompt")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--workload",
        choices=("loop", "echo"),
        default="loop",
        help="loop: the prompt opens with the stretch the answer repeats; echo: the same without the opening",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if not 1 <= args.k <= 15 or args.tokens < 2 or min(args.draft_layers, args.context_tokens, args.repeats) < 1:
        parser.error(
            "--k must be in 1..15, --tokens at least 2 (a TPOT), --draft-layers, --context-tokens and "
            "--repeats at least 1"
        )
    if not 0 < args.tail_scale <= 1:
        parser.error(f"--tail-scale {args.tail_scale} must be in (0, 1]")
    name, spec = CHECKPOINTS[args.checkpoint]
    path = build_tiny_checkpoint(CACHE_DIR / name, spec)
    draft_path = CACHE_DIR / f"{name}-draft-{args.draft_layers}"
    draft_config = draft_path / "config.json"
    if not draft_config.is_file() or draft_config.stat().st_mtime < (path / MARKER_FILE).stat().st_mtime:
        cut_draft(path, draft_path, args.draft_layers, force=True)  # none yet, or cut from an older build
    max_seq_len = 1024
    runner = ModelRunner(path, max_batch_size=1, max_seq_len=max_seq_len)
    runner.add_decode_buckets(verify_buckets(batch_buckets(1), args.k))
    if args.tail_scale != 1:
        scale_tail(runner, args.draft_layers, args.tail_scale)
    drafter = load_drafter(runner, draft_path)
    if args.exe_mode == "graph":
        log("compiling the decode steps (target: 1 and k + 1 rows; draft: 1 and 2 rows)")
        runner.capture_graphs()
        drafter.runner.capture_graphs()
    builder = PromptBuilder.from_pretrained(path)
    request = echo_request(runner, builder, args.context_tokens, args.workload == "loop")
    log(f"prompt of {len(request.input_ids)} tokens, {args.tokens} new tokens, k={args.k}")
    ngram = SpeculativeConfig("ngram", args.k)
    draft = SpeculativeConfig("draft", args.k, model=str(draft_path))
    measure(runner, request, 8, 1)  # warm-up of every path
    measure(runner, request, 8, 1, ngram)
    measure(runner, request, 8, 1, draft, drafter)
    rows = {}
    for label, config, d in (("plain", None, None), ("ngram", ngram, None), ("draft", draft, drafter)):
        rows[label] = measure(runner, request, args.tokens, args.repeats, config, d)
        log(f"{label}: TPOT {rows[label]['tpot_ms']:.2f} ms")
    plain = rows["plain"]
    print(f"{'method':<8}{'TPOT ms':>10}{'vs plain':>10}{'accepted':>10}{'mean len':>10}{'same':>6}")
    for label, row in rows.items():
        row["vs_plain"] = row["tpot_ms"] / plain["tpot_ms"]
        row["same_tokens"] = row["tokens"] == plain["tokens"]
        rate = "" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.2f}"
        length = "" if row["mean_acceptance_length"] is None else f"{row['mean_acceptance_length']:.2f}"
        same = "yes" if row["same_tokens"] else "no"
        print(f"{label:<8}{row['tpot_ms']:>10.2f}{row['vs_plain']:>10.2f}{rate:>10}{length:>10}{same:>6}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {k: {f: v for f, v in row.items() if f != "tokens"} for k, row in rows.items()}
        meta = {
            "checkpoint": args.checkpoint,
            "exe_mode": args.exe_mode,
            "k": args.k,
            "draft_layers": args.draft_layers,
            "tail_scale": args.tail_scale,
            "workload": args.workload,
        }
        args.json.write_text(json.dumps({**meta, "methods": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
