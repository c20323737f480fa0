"""Decode cost of structured outputs and logprobs, against plain requests in the same run.

    python -m cluster.tools.bench_constrained MODEL_PATH [--device cpu] [--graph] [--tokens 32] [--repeats 8]

In one process (model.runner.ModelRunner, no Ray), for the same prompt: TPOT at batch 1 of a plain
request and of a `json_schema` one; at batch 8 of 8 plain rows and of the 4 plain rows of a batch whose
other 4 are constrained; at batch 1 with `top_logprobs=5` and without. Every request generates exactly
`--tokens` tokens (ignore_eos: a constrained row whose JSON is complete goes on with its mask allowing
only EOS). Each figure is the median TPOT over `--repeats` runs (seconds per
token after the first, from the workers' token times); each ratio is the median over repeats of a figure's
TPOT over its baseline's in a run next to it, the pair's order alternating (a shared machine's drift
between two runs is smaller than across a whole round of configurations). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics

from actors.grammars import GrammarCompiler
from model.processor import PromptBuilder
from model.runner import ModelRunner
from model.sampling import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 400},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 20},
    },
    "required": ["title", "tags"],
    "additionalProperties": False,
}


def tpot(times: list[float]) -> float:
    return (times[-1] - times[0]) / (len(times) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--graph", action="store_true", help="capture decode graphs (torch.compile on cpu)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()

    builder = PromptBuilder.from_pretrained(args.model_path)
    request = {"response_format": {"type": "json_schema", "json_schema": {"name": "doc", "schema": SCHEMA}}}
    grammar = asyncio.run(GrammarCompiler(builder.tokenizer).grammar(request))
    runner = ModelRunner(args.model_path, device=args.device, max_batch_size=8, max_seq_len=512)
    if args.graph:
        runner.capture_graphs([1, 8])
    prompt = builder.build({"id": "p", "prompt": "Describe a picture as JSON."})
    base = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    constrained = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True, grammar=grammar)
    logprobs = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True, logprobs=True, top_logprobs=5)
    configs = {
        "b1_plain": ([base], [0]),
        "b1_json_schema": ([constrained], [0]),
        "b8_plain": ([base] * 8, [0, 1, 2, 3]),
        "b8_half_constrained_plain_rows": ([base] * 4 + [constrained] * 4, [0, 1, 2, 3]),
        "b1_top_logprobs_5": ([logprobs], [0]),
    }
    for params, _ in configs.values():  # warm-up of every path
        runner.generate([prompt] * len(params), params, builder.eos_token_ids)
    pairs = {  # each figure against its baseline, run next to it
        "ratio_b1_json_schema": ("b1_plain", "b1_json_schema"),
        "ratio_b8_half_constrained": ("b8_plain", "b8_half_constrained_plain_rows"),
        "ratio_b1_top_logprobs_5": ("b1_plain", "b1_top_logprobs_5"),
    }
    seen: dict[str, list[float]] = {name: [] for name in configs}
    ratios: dict[str, list[float]] = {name: [] for name in pairs}
    for repeat in range(args.repeats):
        for figure, pair in pairs.items():
            got = {}
            for name in pair if repeat % 2 == 0 else pair[::-1]:  # ABBA: neither side always runs first
                params, rows = configs[name]
                results = runner.generate([prompt] * len(params), params, builder.eos_token_ids)
                got[name] = statistics.mean(tpot(results[r].token_times_s) for r in rows)
                seen[name].append(got[name])
            ratios[figure].append(got[pair[1]] / got[pair[0]])
    out: dict[str, float] = {name: statistics.median(values) for name, values in seen.items()}
    out.update({figure: statistics.median(values) for figure, values in ratios.items()})
    print(json.dumps({"device": args.device, "graph": args.graph, "tokens": args.tokens, **out}))


if __name__ == "__main__":
    main()
