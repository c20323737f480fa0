"""Logprobs and a grammar's mask at tp 2 (two gloo ranks in separate processes), eager and graph mode:
both ranks sample the same tokens and report the same values, which are transformers' log-softmax."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.grammars import GrammarCompiler
from model.parallel import ParallelContext, free_port
from model.processor import PreparedRequest, PromptBuilder
from model.runner import ModelRunner
from model.sampling import SamplingParams
from tests.reference import HFReference
from tests.test_logprobs import assert_logprobs_match

NAMES = ["text", "one_image"]
TOP = 5


def _rank(rank: int, port: int, path: str, requests: list[PreparedRequest], params: list, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        runner = ModelRunner(path, ctx=ParallelContext(rank=rank, size=2, group=dist.group.WORLD), max_batch_size=2)
        eager = runner.generate(requests, params, eos_token_ids=[])
        runner.capture_graphs([2])
        graph = runner.generate(requests, params, eos_token_ids=[])
        results = [[(r.output_token_ids, r.logprobs) for r in run] for run in (eager, graph)]
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # written: no interpreter teardown (tests/test_graph.py's _tp_rank says why)


@pytest.mark.slow  # two processes compiling decode graphs: minutes on a loaded 2-core machine
def test_logprobs_and_grammar_at_tp2(
    tiny_checkpoint: Path,
    prepared: Callable[[Path], dict[str, PreparedRequest]],
    hf_reference: HFReference,
    tmp_path: Path,
) -> None:
    requests = [prepared(tiny_checkpoint)[n] for n in NAMES]
    compiler = GrammarCompiler(PromptBuilder.from_pretrained(tiny_checkpoint).tokenizer)
    grammar = asyncio.run(compiler.grammar({"response_format": {"type": "json_object"}}))
    base = SamplingParams(max_new_tokens=7, logprobs=True, top_logprobs=TOP)
    params = [base, dataclasses.replace(base, grammar=grammar)]
    mp.start_processes(
        _rank, args=(free_port(), str(tiny_checkpoint), requests, params, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[1] == ranks[0]  # every rank samples the same tokens, its matcher in step
    eager, graph = ranks[0]
    assert [tokens for tokens, _ in graph] == [tokens for tokens, _ in eager]
    for run in (eager, graph):
        for request, (tokens, entries) in zip(requests, run):
            assert_logprobs_match(hf_reference, tiny_checkpoint, request, tokens, entries, TOP)
    text = PromptBuilder.from_pretrained(tiny_checkpoint).decode(eager[1][0])
    assert text.startswith("{")
