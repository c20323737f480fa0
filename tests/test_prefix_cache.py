"""The paged KV cache with automatic prefix caching, through the real Coordinator on the tiny checkpoint.

Four engines share one local Ray cluster, all with small KV blocks so that short prompts span several
blocks and prefix hits are partial:

- "off": tp 1, `prefix_caching=false`, blocks of 4 tokens, a pool of 4 whole sequences;
- "tp2_dp" and "tp2_tp": tp 2 with caching, `parallel_config.vision_mode` dp and tp, blocks of 4 and 8;
- "small": tp 1 with caching and a pool of SMALL_BLOCKS blocks of 4, so that requests are preempted and
  cached blocks evicted.

The same requests (text, images, a 3-turn chat with an image in turn 1, one prompt with two different
images) run one after another on each; their greedy tokens must be identical and be transformers'
greedy choices (tests/reference.py: a near tie only below its margin, and few), and `cached_tokens`
must show where the cache hit. The small pool shows preemption (same tokens as the large pool of
"off", greedy and seeded), the bookkeeping after hundreds of random requests with aborts, stop
strings and failures (no block leaks, every request gets a record), and a request that could never
fit failing at submit.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from PIL import Image

from actors.errors import RequestError
from cluster import start, stop
from model.batch import image_spans
from model.processor import PromptBuilder
from tests.ray_helpers import tiny_config, wait_for
from tests.reference import Generated, assert_greedy_matches_reference

RAY_NUM_CPUS = 6  # 6 workers: 1 + 2 + 2 + 1
BLOCK = {"off": 4, "tp2_dp": 4, "tp2_tp": 8, "small": 4}
CACHING = ("tp2_dp", "tp2_tp")  # engines with caching whose pool holds every parity request's blocks at once
SMALL_BLOCKS = 40  # 39 usable blocks of 4 tokens: 156 tokens, two requests of ~100 tokens cannot run together
NEW_TOKENS = 8  # per parity request
CHAT_TOKENS = 6  # per chat turn
CHAT_FOLLOW_UPS = ("What colour is the sky in it?", "And how many trees are there?")


def _config(checkpoint: Path, name: str, *overrides: str):
    return tiny_config(
        checkpoint,
        "data_config.batch_size=4",
        "data_config.input_max_len=256",
        "data_config.max_new_tokens=256",
        "scheduler.prefill_chunk_tokens=16",
        f"kv_cache.block_size={BLOCK[name]}",
        f"ray.namespace=prefix-{name.replace('_', '-')}",
        *overrides,
    )


ENGINE_OVERRIDES: dict[str, tuple[str, ...]] = {
    "off": ("world_size=1", "parallel_config.tp_size=1", "prefix_caching=false"),
    "tp2_dp": ("world_size=2", "parallel_config.tp_size=2", "parallel_config.vision_mode=dp"),
    "tp2_tp": ("world_size=2", "parallel_config.tp_size=2", "parallel_config.vision_mode=tp"),
    # One decode step per call: the leak test's long request is still running when it is aborted (with auto
    # steps per call, a call may run all of its tokens at once).
    "small": (
        "world_size=1",
        "parallel_config.tp_size=1",
        f"kv_cache.num_blocks={SMALL_BLOCKS}",
        "scheduler.decode_steps_per_call=1",
    ),
}


@pytest.fixture(scope="module")
def engines(local_ray, tiny_checkpoint: Path) -> Iterator[dict[str, Any]]:
    """Every engine of the module, started at once (their loads overlap), stopped at the end."""
    started: dict[str, Any] = {}
    lock = threading.Lock()

    def launch(name: str) -> None:
        handle = start(_config(tiny_checkpoint, name, *ENGINE_OVERRIDES[name]))
        with lock:
            started[name] = handle

    try:
        with ThreadPoolExecutor(len(ENGINE_OVERRIDES)) as pool:
            for future in [pool.submit(launch, name) for name in ENGINE_OVERRIDES]:
                future.result()
        yield started
    finally:
        for coordinator in started.values():
            stop(coordinator)


@pytest.fixture(scope="module")
def twin_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two different images of the same size: the same prompt around either has the same token ids."""
    root = tmp_path_factory.mktemp("twins")
    paths = []
    for seed in (11, 12):
        pixels = np.random.default_rng(seed).integers(0, 256, (100, 150, 3), dtype=np.uint8)
        paths.append(str(root / f"twin-{seed}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths[0], paths[1]


def _one(coordinator: Any, raw: dict) -> dict:
    """The record of one request, served alone (so the prefix cache's state is the same on every engine)."""
    record = ray.get(coordinator.generate.remote([raw]), timeout=180)[0]
    assert record["error"] is None, (raw["id"], record["error"])
    return record


@dataclass
class ParityRun:
    records: dict[str, dict]  # request name -> record
    raws: dict[str, dict]  # request name -> the request as sent (chat turns carry the engine's own answers)


def _parity_run(coordinator: Any, raw_requests: dict[str, dict], chat_image: str, twins: tuple[str, str]) -> ParityRun:
    """Text and image requests, a 3-turn chat and one prompt with two different images, in this order."""
    raws: dict[str, dict] = {}
    for name in ("text", "text_long", "one_image", "two_images"):
        raws[name] = {**raw_requests[name], "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    raws["text_again"] = {**raws["text"], "id": "text_again"}
    records = {name: _one(coordinator, raw) for name, raw in raws.items()}

    messages: list[dict] = [
        {
            "role": "user",
            "content": [{"type": "image", "image": chat_image}, {"type": "text", "text": "Describe the image."}],
        }
    ]
    for turn in (1, 2, 3):
        name = f"chat_{turn}"
        raws[name] = {"id": name, "messages": list(messages), "max_new_tokens": CHAT_TOKENS, "ignore_eos": True}
        records[name] = _one(coordinator, raws[name])
        if turn < 3:
            messages += [
                {"role": "assistant", "content": records[name]["output_text"]},
                {"role": "user", "content": CHAT_FOLLOW_UPS[turn - 1]},
            ]

    prompt = "Describe this picture in a few words."
    for name, image in (("twin_a", twins[0]), ("twin_b", twins[1]), ("twin_a_again", twins[0])):
        raws[name] = {"id": name, "prompt": prompt, "images": [image], "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
        records[name] = _one(coordinator, raws[name])
    return ParityRun(records, raws)


@pytest.fixture(scope="module")
def parity(engines, raw_requests, sample_images, twin_images) -> dict[str, ParityRun]:
    """The parity requests on every engine, the engines at once (each fresh: nothing cached before)."""
    with ThreadPoolExecutor(len(engines)) as pool:
        runs = {
            name: pool.submit(_parity_run, engine, raw_requests, str(sample_images["tall"]), twin_images)
            for name, engine in engines.items()
        }
        return {name: run.result() for name, run in runs.items()}


@pytest.fixture(scope="module")
def builder(tiny_checkpoint: Path) -> PromptBuilder:
    return PromptBuilder.from_pretrained(tiny_checkpoint)


def _first_image_span(builder: PromptBuilder, raw: dict) -> tuple[int, int]:
    return image_spans(builder.build(raw).input_ids, builder.image_token_id)[0]


def test_greedy_tokens_are_identical_with_caching_on_and_off_and_match_transformers(
    parity, builder, tiny_checkpoint, hf_reference
):
    """Caching on (tp 2 in both vision modes, and tp 1 on a pool that evicts) against off, and off against
    transformers: every request, every chat turn built from the engine's own answers."""
    off = parity["off"]
    for name in ("tp2_dp", "tp2_tp", "small"):
        run = parity[name]
        assert run.raws == off.raws, name  # the same answers, so the same chat turns
        for request, record in run.records.items():
            assert record["output_token_ids"] == off.records[request]["output_token_ids"], (name, request)
    outputs = [
        Generated(name, builder.build(off.raws[name]), record["output_token_ids"], off.raws[name]["max_new_tokens"])
        for name, record in off.records.items()  # every request ignores EOS
    ]
    assert_greedy_matches_reference(hf_reference, tiny_checkpoint, outputs)


def test_cached_tokens_show_where_the_prefix_cache_hit(parity, builder):
    off = parity["off"].records
    assert all(r["cached_tokens"] == 0 for r in off.values()), {n: r["cached_tokens"] for n, r in off.items()}
    for name in CACHING:
        records, raws, block = parity[name].records, parity[name].raws, BLOCK[name]
        cached = {n: r["cached_tokens"] for n, r in records.items()}
        assert all(c % block == 0 for c in cached.values()), (name, cached)
        # The shared system prompt hits (partially: the prompts part after it); the same prompt again hits
        # every full block but the one holding its last token, which is always computed.
        assert 0 < cached["text_long"] < records["text_long"]["prompt_tokens"], (name, cached)
        assert cached["text_again"] == (records["text"]["prompt_tokens"] - 1) // block * block, (name, cached)
        # Turns 2 and 3 reuse the conversation so far, turn 1's image included (not encoded again).
        image_end = _first_image_span(builder, raws["chat_1"])[1]
        assert image_end <= cached["chat_2"] < cached["chat_3"], (name, cached)
        assert cached["chat_3"] >= records["chat_1"]["prompt_tokens"] // block * block, (name, cached)
        # The same prompt with another image stops before the first block that holds image tokens...
        image_start, image_end = _first_image_span(builder, raws["twin_b"])
        assert cached["twin_b"] == image_start // block * block, (name, cached)
        # ...while the first image, asked about again, hits past its image tokens.
        assert cached["twin_a_again"] >= image_end, (name, cached)
        assert records["twin_a_again"]["output_token_ids"] == records["twin_a"]["output_token_ids"], name
    # The small pool evicts, so its hits are whatever survived; they are still whole blocks.
    assert all(r["cached_tokens"] % BLOCK["small"] == 0 for r in parity["small"].records.values())


def _story_requests(**fields: Any) -> list[dict]:
    """Four requests of about 100 tokens each (one with an image): only one fits SMALL_BLOCKS at a time."""
    requests = [
        {"id": f"story-{i}", "prompt": f"Tell me story number {i} about the sea.", "max_new_tokens": 40}
        for i in range(3)
    ]
    requests.append({"id": "story-image", "prompt": "Tell me about this.", "max_new_tokens": 30})
    return [{**r, "ignore_eos": True, **fields} for r in requests]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_p": 0.9}], ids=["greedy", "seeded"])
def test_a_run_forced_to_preempt_gives_the_same_tokens(engines, sample_images, sampling):
    requests = _story_requests(**sampling)
    requests[-1]["images"] = [str(sample_images["wide"])]
    if sampling:
        for i, request in enumerate(requests):
            request["seed"] = 100 + i
    forced = ray.get(engines["small"].generate.remote(requests), timeout=300)
    roomy = ray.get(engines["off"].generate.remote(requests), timeout=300)
    for request, a, b in zip(requests, forced, roomy):
        assert a["error"] is None and b["error"] is None, (a["error"], b["error"])
        assert a["output_token_ids"] == b["output_token_ids"], a["id"]
        assert len(a["output_token_ids"]) == request["max_new_tokens"], a["id"]
    assert sum(r["preemptions"] or 0 for r in forced) > 0, [r["preemptions"] for r in forced]
    assert all(not r["preemptions"] for r in roomy), [r["preemptions"] for r in roomy]


def _random_requests(rng: random.Random, images: list[str], n: int) -> tuple[list[dict], dict[str, str]]:
    """`n` short requests of mixed kinds -> (requests, kind by id). Kinds: text, image, stop (a stop
    string), long (to be aborted) and invalid (each of several ways to fail at submit)."""
    words = "the sea a ship blue red tree house river light story night cold wind sun over under".split()
    invalid = [
        {"temperature": -1},
        {"max_new_tokens": 200},  # prompt + 200 tokens need more blocks than the pool has
        {"images": ["/nonexistent/picture.png"]},
        {"prompt": "word " * 300},  # more than data_config.input_max_len
        {"stop": ["a", "b", "c", "d", "e"]},
    ]
    requests, kinds = [], {}
    for i in range(n):
        kind = rng.choices(["text", "image", "stop", "long", "invalid"], [50, 15, 15, 10, 10])[0]
        request = {
            "id": f"r{i}",
            "prompt": " ".join(rng.choices(words, k=rng.randint(1, 30))),
            "max_new_tokens": rng.randint(1, 6),
            "ignore_eos": rng.random() < 0.5,
        }
        if kind == "image":
            request["images"] = [rng.choice(images)]
        elif kind == "stop":
            request["stop"] = [rng.choice("aeiou ")]
        elif kind == "long":
            request.update(max_new_tokens=40, ignore_eos=True)
        elif kind == "invalid":
            request.update(invalid[i % len(invalid)])
        requests.append(request)
        kinds[request["id"]] = kind
    return requests, kinds


def _worker_state(namespace: str) -> tuple[int, int]:
    """(requests held, image embeddings held) by the one worker of a tp-1 engine."""
    worker = ray.get_actor("shard-worker-0", namespace=namespace)
    return ray.get(worker.__ray_call__.remote(lambda self: (len(self.batch.seqs), len(self.phases.embeds))), timeout=30)


def test_no_block_leaks_after_hundreds_of_random_requests(engines, sample_images):
    coordinator = engines["small"]
    rng = random.Random(0)
    images = [str(sample_images[name]) for name in ("wide", "small")]
    requests, kinds = _random_requests(rng, images, 300)
    (before,) = ray.get(coordinator.kv_cache_stats.remote(), timeout=30)
    calls = [requests[i : i + 30] for i in range(0, len(requests), 30)]
    # A long request is aborted while it runs: at its first token, with 79 one-step calls still to go. The
    # long ones of the mix are aborted once every request is submitted (half) and once a call has ended
    # (the rest), wherever they are by then: waiting, running, preempted or done.
    blocker = {"id": "aborted-running", "prompt": "Go on and on.", "max_new_tokens": 80, "ignore_eos": True}
    running = coordinator.stream.options(num_returns="streaming").remote(blocker)
    assert ray.get(next(running), timeout=120)["token_ids"]
    assert ray.get(coordinator.abort.remote("aborted-running"), timeout=30) is True
    streamed = [ray.get(ref, timeout=60) for ref in running]
    _, submitted_before = ray.get(coordinator.progress.remote(), timeout=30)
    refs = [coordinator.generate.remote(call) for call in calls]
    total = submitted_before + len(requests)
    assert wait_for(lambda: ray.get(coordinator.progress.remote())[1] >= total, timeout_s=300)
    long_ids = [i for i, kind in kinds.items() if kind == "long"]
    ray.get([coordinator.abort.remote(i) for i in long_ids[::2]], timeout=60)
    ray.wait(refs, num_returns=1, timeout=300)
    ray.get([coordinator.abort.remote(i) for i in long_ids[1::2]], timeout=60)
    records = [r for call in ray.get(refs, timeout=600) for r in call]

    final = streamed[-1]
    assert final["final"] and final["finish_reason"] == "abort" and 0 < len(final["output_token_ids"]) < 80
    assert [r["id"] for r in records] == [r["id"] for r in requests]  # every request got its own record
    reasons: dict[str, set] = {}
    for record, request in zip(records, requests):
        kind = kinds[record["id"]]
        reasons.setdefault(kind, set()).add(record["finish_reason"])
        if kind == "invalid":
            assert record["error"], record["id"]
            continue
        assert record["error"] is None, (record["id"], record["error"])
        if record["finish_reason"] == "length":
            assert len(record["output_token_ids"]) == request["max_new_tokens"], record["id"]
    assert reasons["long"] <= {"abort", "length"} and "stop" in reasons["stop"], reasons

    # Quiet again: nothing waits or runs, the workers forgot every request, and every block is free.
    assert wait_for(lambda: ray.get(coordinator.status.remote())["running"] == 0, timeout_s=60)
    assert wait_for(lambda: _worker_state("prefix-small") == (0, 0), timeout_s=30), _worker_state("prefix-small")
    (stats,) = ray.get(coordinator.kv_cache_stats.remote(), timeout=30)
    # `free` counts free blocks and cached blocks nobody uses (both can be handed out), `cached` every
    # block registered in the prefix cache, `used` the rest; block 0 (the null block) is never counted.
    assert stats["used"] == 0 and stats["free"] == SMALL_BLOCKS - 1, stats
    assert 0 < stats["cached"] <= stats["free"], stats
    assert stats["running"] == stats["waiting"] == 0, stats
    assert stats["evictions"] > 0 and 0 < stats["hit_tokens"] < stats["query_tokens"], stats
    ray.get(coordinator.__ray_call__.remote(lambda self: [e.scheduler.pool.check() for e in self.engines]))
    # Every preemption the pool counted during the run is in a record.
    preempted = sum(r["preemptions"] or 0 for r in [*records, final])
    assert 0 < preempted == stats["preemptions"] - before["preemptions"], (preempted, before, stats)

    # The cache still gives the right tokens after all that.
    story = _story_requests()[0]
    assert _one(coordinator, story)["output_token_ids"] == _one(engines["off"], story)["output_token_ids"]


def test_a_request_that_could_never_fit_fails_at_submit(engines):
    coordinator = engines["small"]
    request = {"id": "too-big", "prompt": "Hello.", "max_new_tokens": 200}
    (record,) = ray.get(coordinator.generate.remote([request]), timeout=60)
    assert record["finish_reason"] is None and not record["output_token_ids"]
    usable = SMALL_BLOCKS - 1
    limit = f"more than the KV pool holds ({usable} blocks, {usable * BLOCK['small']} tokens); kv_cache.num_blocks"
    assert limit in record["error"] and "max_new_tokens=200" in record["error"], record["error"]
    stream = coordinator.stream.options(num_returns="streaming").remote(request)
    with pytest.raises(RequestError) as info:
        ray.get(next(stream), timeout=60)
    assert info.value.cause.param == "max_new_tokens" and limit in str(info.value.cause)
    assert ray.get(coordinator.status.remote(), timeout=30)["waiting"] == 0


def test_warmup_fits_a_pool_smaller_than_one_sequence(tiny_checkpoint):
    """Warm-up writes one block, so a pool of 2 blocks (the null block and one) starts with max_seq_len 256."""
    from model.runner import ModelRunner

    runner = ModelRunner(tiny_checkpoint, max_seq_len=256, num_kv_blocks=2, kv_block_size=4)
    runner.warmup()
    assert runner.cache.num_blocks == 2
