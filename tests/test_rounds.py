"""Real rounds in process: the tiny model through `GroupScheduler` and `RunningBatch` (no Ray).

Each round's plan goes to a worker's round calls (`WorkerPhases`, what ShardWorker runs) as the group loop
sends it (the plan's vision items encoded first and kept until their request starts, then releases,
preemptions, admissions with the embeddings of the images after their cached prefix, block tables, then the
chunks and decode rows, or a multi-step pure-decode call), and what ran goes back to the scheduler as the
group loop and the Coordinator report it. Greedy tokens in
float32 must equal each request generated alone (`model.batch.generate`):

- a multi-step pure-decode call runs all its steps for every row that has blocks for them, while a
  row that reaches its max_new_tokens inside the call stops there;
- small blocks, a small chunk budget and a pool that forces preemptions, with image prompts whose
  M-RoPE delta their decode positions and recomputed prompt tails must carry;
- a budget for vision encode that spreads a video over rounds, slice by slice, while a text request
  decodes (a video's slices encoded apart give the embeddings of the video encoded whole).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image

from actors.group_loop import items_request
from actors.scheduler import GroupScheduler, Plan, Sequence
from actors.table_updates import TableUpdates
from actors.vision_items import first_to_encode, vision_items
from actors.worker_phases import WorkerPhases
from cluster.tools.draft_checkpoint import cut_draft
from model.batch import RunningBatch, StepOutput, generate, image_spans
from model.draft import load_drafter
from model.kv_cache import blocks_for
from model.processor import PreparedRequest, PromptBuilder
from model.runner import ModelRunner
from model.sampling import SamplingParams
from model.speculative import SpeculativeConfig, verify_buckets
from model.vision_cache import image_key
from tests.video_files import make_frames

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@dataclass
class Payload:
    prepared: PreparedRequest
    params: SamplingParams


def make_sequence(runner: ModelRunner, prepared: PreparedRequest, max_new_tokens: int) -> Sequence:
    """The scheduler's view of a request, each image keyed by its pixels and split into its temporal slices (as
    request preparation does)."""
    images, offset = [], 0
    spans = image_spans(prepared.input_ids, runner.config.image_token_id, runner.config.video_token_id)
    grids = prepared.image_grid_thw if prepared.image_grid_thw is not None else []
    for (start, end), grid in zip(spans, grids):
        n = int(grid.prod())
        images.append((start, end, image_key(prepared.pixel_values[offset : offset + n], grid)))
        offset += n
    seq = Sequence(prepared.request_id, list(prepared.input_ids), max_new_tokens, images)
    seq.image_slices = [int(grid[0]) for grid in grids]
    seq.payload = Payload(prepared, SamplingParams(max_new_tokens=max_new_tokens))
    return seq


@dataclass
class Workers:
    """The group's workers in process: a worker's round calls (`WorkerPhases`, ShardWorker's) and the block tables
    they hold."""

    phases: WorkerPhases
    tables: TableUpdates = field(default_factory=TableUpdates)


def run_round(sched: GroupScheduler, workers: Workers) -> tuple[Plan, dict[str, StepOutput]]:
    """One planned round on the workers as the group loop sends it (the plan's vision items encoded first, block
    tables: what changed), its progress and tokens reported back to the scheduler."""
    plan = sched.schedule()
    phases = workers.phases
    parts = [
        items_request(dataclasses.replace(s.payload.prepared, request_id=s.request_id), s.vision_items[a:b])
        for s, a, b in plan.encode
    ]
    if parts:
        phases.encode(parts)
    admissions = [
        (
            dataclasses.replace(seq.payload.prepared, request_id=seq.request_id, pixel_values=None),
            seq.payload.params,
            [],
            seq.num_cached,
        )
        for seq in plan.admit
    ]
    chunks = [(seq.request_id, start, end) for seq, start, end in plan.chunks]
    decode = [seq.request_id for seq in plan.decode]
    forks = [(parent.request_id, child.request_id, child.payload.params, copy) for parent, child, copy in plan.forks]
    tables = workers.tables.updates(plan)
    answer = phases.step(
        plan.releases, plan.preempted, admissions, tables, chunks, decode, plan.decode_steps, forks, plan.spec_tokens
    )
    assert not answer["errors"], answer["errors"]
    out = {request_id: StepOutput(**o) for request_id, o in answer["outputs"].items()}
    for seq, _, end in plan.chunks:
        sched.prefilled(seq, end)
    sched.returned(plan, {r: len(o.tokens) for r, o in out.items()})
    for request_id, step in out.items():
        seq = sched.by_id[request_id]
        sched.append(seq, step.tokens)
        if step.finish_reason is not None:
            sched.finish(seq, step.finish_reason)
    sched.pool.check()
    return plan, out


def alone(runner: ModelRunner, request: PreparedRequest, max_new_tokens: int) -> list[int]:
    """Greedy tokens of the request generated on its own (no EOS: every request runs to its length)."""
    [result] = generate(runner, [request], [SamplingParams(max_new_tokens=max_new_tokens)], [])
    assert result.error is None and result.finish_reason == "length"
    return result.output_token_ids


@pytest.fixture(scope="module")
def runner_for(tiny_checkpoint: Path) -> Callable[[int, int], ModelRunner]:
    """runner_for(block size, max_seq_len) -> a float32 cpu runner of the tiny checkpoint, built once each."""
    built: dict[tuple[int, int], ModelRunner] = {}

    def get(block_size: int, max_seq_len: int) -> ModelRunner:
        if (block_size, max_seq_len) not in built:
            built[block_size, max_seq_len] = ModelRunner(
                tiny_checkpoint, max_batch_size=4, max_seq_len=max_seq_len, kv_block_size=block_size
            )
        return built[block_size, max_seq_len]

    return get


def test_a_row_ending_inside_a_call_does_not_shorten_it(runner_for: Callable[[int, int], ModelRunner]) -> None:
    """A (6 new tokens) ends two steps into an 8-step call whose 8 positions neither its blocks nor max_seq_len
    hold; its blocks reach its last position (prompt + 6), as the scheduler gives them, and B runs all 8 steps."""
    runner = runner_for(16, 128)
    a = PreparedRequest("a", [(7 * i + 3) % 500 + 10 for i in range(122)], None, None)  # 122 + 6 = 128 < 122 + 8
    b = PreparedRequest("b", [(11 * i + 5) % 500 + 10 for i in range(20)], None, None)
    expected = {"a": alone(runner, a, 6), "b": alone(runner, b, 9)}  # greedy: B's first 9 of its 100
    sched = GroupScheduler(4, 16, 16, token_budget=256, decode_steps_per_call=8)
    for prepared, max_new_tokens in ((a, 6), (b, 100)):
        sched.add(make_sequence(runner, prepared, max_new_tokens))
    workers = Workers(WorkerPhases(RunningBatch(runner)))
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    plan, out = run_round(sched, workers)  # both prompts, one token each
    assert [c[0].request_id for c in plan.chunks] == ["a", "b"] and plan.decode_steps == 0
    for request_id, step in out.items():
        tokens[request_id] += step.tokens
    cache = runner.cache.keys + runner.cache.values
    before = [layer.clone() for layer in cache]
    plan, out = run_round(sched, workers)
    assert not plan.chunks and plan.decode_steps == 8
    assert len(plan.block_tables["a"]) == blocks_for(122 + 6, 16) == 8
    others = sorted(set(range(1, runner.cache.num_blocks)) - set(plan.block_tables["a"] + plan.block_tables["b"]))
    assert all(torch.equal(old[others], new[others]) for old, new in zip(before, cache))  # A wrote in its blocks
    assert len(out["b"].tokens) == 8
    assert len(out["a"].tokens) == 5 and out["a"].finish_reason == "length"
    for request_id, step in out.items():
        tokens[request_id] += step.tokens
    assert tokens["a"] == expected["a"]
    assert tokens["b"] == expected["b"]


@pytest.mark.parametrize("speculation", [None, "ngram", "draft"])
def test_rounds_with_chunks_preemptions_and_images_give_each_request_its_tokens_alone(
    runner_for: Callable[[int, int], ModelRunner],
    prepared: Callable[[Path], dict[str, PreparedRequest]],
    sample_images: dict[str, Path],
    tiny_checkpoint: Path,
    tmp_path: Path,
    speculation: str | None,
) -> None:
    """Blocks of 4 tokens, 16 prompt tokens a round, 4 steps a pure-decode call and a pool of 46 blocks:
    prompts are chunked, decode rows ride in rounds with chunks, requests wait for blocks and are
    preempted, then recomputed from their cached blocks (prompt tails and generated tokens, at positions
    shifted by their M-RoPE delta), and a cached chat turn covers the first image of a prompt whose
    second image alone is encoded. With speculation (3 proposals a round; the draft: the checkpoint's first
    2 layers, its KV in a pool laid out as the target's), the same tokens."""
    runner = runner_for(4, 160)
    config, drafter = None, None
    if speculation is not None:
        runner.add_decode_buckets(verify_buckets(runner.buckets, 3))
        draft = cut_draft(tiny_checkpoint, tmp_path / "draft", layers=2) if speculation == "draft" else None
        config = SpeculativeConfig(speculation, 3, model=str(draft) if draft else None, min_acceptance=0.0)
        drafter = load_drafter(runner, draft) if draft else None
    built = prepared(tiny_checkpoint)
    builder = PromptBuilder.from_pretrained(tiny_checkpoint)

    def chat(request_id: str, second_image: str) -> PreparedRequest:
        """A turn with an image after a first turn with one: two of these share the first turn."""
        first = [{"type": "image", "image": str(sample_images["tall"])}, {"type": "text", "text": "What is it?"}]
        then = [{"type": "image", "image": str(sample_images[second_image])}, {"type": "text", "text": "And this?"}]
        messages = [
            {"role": "user", "content": first},
            {"role": "assistant", "content": "A tall picture of a gradient."},
            {"role": "user", "content": then},
        ]
        return builder.build({"id": request_id, "messages": messages})

    requests = [
        (built["one_image"], 24),
        (chat("chat", "small"), 6),
        (chat("chat_other", "wide"), 5),
        (built["small_image"], 24),
        (built["text_long"], 8),
        (built["two_images"], 8),
        (dataclasses.replace(built["one_image"], request_id="one_image_again"), 7),
    ]

    expected = {r.request_id: alone(runner, r, n) for r, n in requests}
    sched = GroupScheduler(4, 46, 4, token_budget=16, decode_steps_per_call=4)
    sched.spec_tokens = 3 if speculation else 0
    for request, max_new_tokens in requests:
        sched.add(make_sequence(runner, request, max_new_tokens))
    workers = Workers(WorkerPhases(RunningBatch(runner, config, drafter)))
    tokens: dict[str, list[int]] = {r.request_id: [] for r, _ in requests}
    plans, encoded = [], []  # encoded: (items, the first item after its cached prefix) per admission
    rounds: list[tuple[int, int]] = []  # (proposed, accepted) of each speculative round with proposals
    while not sched.idle:
        assert len(plans) < 200
        plan, out = run_round(sched, workers)
        plans.append(plan)
        for s in plan.admit:
            if s.images:
                encoded.append((len(s.vision_items), first_to_encode(s.vision_items, s.num_cached)))
        for request_id, step in out.items():
            tokens[request_id] += step.tokens
            rounds += step.spec_rounds or []
    assert tokens == expected

    # What the rounds went through (a change of scheduling that drops one of these weakens the test).
    assert any(0 < first < n for n, first in encoded)  # the second image alone
    assert any(first == n for n, first in encoded)  # every image inside the cached prefix
    assert sched.preemptions >= 1
    assert any(s.images and end > s.prompt_len + 1 for plan in plans for s, _, end in plan.chunks)  # recomputed
    assert any(not p.chunks and p.decode_steps > 1 and any(s.images for s in p.decode) for p in plans)
    if speculation:  # speculative pure-decode calls, and rounds whose decode rows verify beside chunks
        assert any(p.spec_tokens == 3 and not p.chunks for p in plans) and rounds
        assert any(p.spec_tokens == 3 and p.chunks and p.decode for p in plans)


@pytest.mark.parametrize("speculation", ["ngram", "draft"])
def test_speculative_rounds_with_preemption_and_the_prefix_cache(
    runner_for: Callable[[int, int], ModelRunner],
    prepared: Callable[[Path], dict[str, PreparedRequest]],
    tiny_checkpoint: Path,
    tmp_path: Path,
    speculation: str,
) -> None:
    """A request whose prompt is a passage, the model's own continuation of it and the passage again (so that
    proposals match and rows skip ahead several tokens a round) beside two others in a pool too small for
    all: speculative pure-decode calls, preemptions and recomputation from cached blocks, and each request's
    tokens those it makes alone."""
    runner = runner_for(4, 256)
    runner.add_decode_buckets(verify_buckets(runner.buckets, 3))
    draft = cut_draft(tiny_checkpoint, tmp_path / "draft", layers=2) if speculation == "draft" else None
    config = SpeculativeConfig(speculation, 3, model=str(draft) if draft else None)
    built = prepared(tiny_checkpoint)
    text = built["text_long"].input_ids
    requests = [
        (PreparedRequest("echo", text + alone(runner, built["text_long"], 12) + text, None, None), 16),
        (built["text"], 20),
        (built["one_image"], 20),
    ]
    expected = {r.request_id: alone(runner, r, n) for r, n in requests}
    sched = GroupScheduler(4, 64, 4, token_budget=64, decode_steps_per_call=2)
    sched.spec_tokens = 3
    for request, max_new_tokens in requests:
        sched.add(make_sequence(runner, request, max_new_tokens))
    workers = Workers(WorkerPhases(RunningBatch(runner, config, load_drafter(runner, draft) if draft else None)))
    tokens: dict[str, list[int]] = {r.request_id: [] for r, _ in requests}
    accepted = 0
    for _ in range(300):
        if sched.idle:
            break
        _, out = run_round(sched, workers)
        for request_id, step in out.items():
            tokens[request_id] += step.tokens
            accepted += sum(a for _, a in step.spec_rounds or ())
    assert tokens == expected
    assert sched.preemptions >= 1 and accepted > 0


@pytest.fixture(scope="module")
def video_request(
    tiny_checkpoint: Path, sample_images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> PreparedRequest:
    """An image, then a video of 8 frames of 168 x 224 pixels: 4 temporal slices of 12 x 16 patches, each frame
    cut into several attention windows; 48 video tokens a slice."""
    root = tmp_path_factory.mktemp("frames")
    frames = []
    for i, frame in enumerate(make_frames(8, 168, 224, seed=3)):
        frames.append(str(root / f"{i}.png"))
        Image.fromarray(frame).save(frames[-1])
    builder = PromptBuilder.from_pretrained(tiny_checkpoint, max_videos=1)
    content = [
        {"type": "image", "image": str(sample_images["wide"])},
        {"type": "video", "video": frames},
        {"type": "text", "text": "What changes between the picture and the clip?"},
    ]
    kwargs = {"video_min_pixels": 784, "video_max_pixels": 168 * 224}
    request = builder.build(
        {"id": "video", "messages": [{"role": "user", "content": content}], "mm_processor_kwargs": kwargs}
    )
    assert request.image_grid_thw[1].tolist() == [4, 12, 16]
    return request


def test_a_video_encoded_slice_by_slice_gives_the_embeddings_of_encoding_it_whole(
    runner_for: Callable[[int, int], ModelRunner], video_request: PreparedRequest
) -> None:
    """The tower's full attention is per temporal slice and its windows lie within a frame: encoding a request's
    items in any runs (each alone, pairs, a run from the image into the video) equals encoding it whole."""
    runner = runner_for(16, 320)
    spans = image_spans(video_request.input_ids, runner.config.image_token_id, runner.config.video_token_id)
    items = vision_items(spans, [int(grid[0]) for grid in video_request.image_grid_thw])
    assert [item.slice for item in items] == [0, 0, 1, 2, 3]
    [whole] = runner.encode_images([video_request])
    for runs in ([[0], [1], [2], [3], [4]], [[0, 1], [2, 3], [4]], [[0], [1, 2, 3, 4]]):
        parts = [items_request(video_request, [items[i] for i in run]) for run in runs]
        pieces = runner.encode_images(parts)
        assert torch.cat(pieces).shape == whole.shape
        assert (torch.cat(pieces) - whole).abs().max().item() <= 1e-5, runs


@pytest.mark.parametrize("speculation", [None, "draft"])
def test_an_encoder_budget_spreads_a_video_over_rounds_and_changes_no_token(
    runner_for: Callable[[int, int], ModelRunner],
    prepared: Callable[[Path], dict[str, PreparedRequest]],
    video_request: PreparedRequest,
    tiny_checkpoint: Path,
    tmp_path: Path,
    speculation: str | None,
) -> None:
    """A text request decodes while an image-and-video request arrives, under an encoder budget of one slice (48
    tokens) a round and with none: the video's slices go over four rounds, each with the text request's
    decode step, and every request gets the tokens it gets alone either way (with a draft model, whose tower
    encodes the same items, too)."""
    runner = runner_for(16, 320)
    config, drafter = None, None
    if speculation is not None:
        runner.add_decode_buckets(verify_buckets(runner.buckets, 3))
        draft = cut_draft(tiny_checkpoint, tmp_path / "draft", layers=2)
        config, drafter = (
            SpeculativeConfig(speculation, 3, model=str(draft), min_acceptance=0.0),
            load_drafter(runner, draft),
        )
    text = prepared(tiny_checkpoint)["text_long"]
    expected = {"text_long": alone(runner, text, 20), "video": alone(runner, video_request, 6)}
    for budget in (48, None):
        sched = GroupScheduler(4, 80, 16, token_budget=512, decode_steps_per_call=2, encoder_budget=budget)
        sched.spec_tokens = 3 if speculation else 0
        workers = Workers(WorkerPhases(RunningBatch(runner, config, drafter)))
        tokens: dict[str, list[int]] = {"text_long": [], "video": []}
        sched.add(make_sequence(runner, text, 20))
        plan, out = run_round(sched, workers)  # the text request prefilled: it decodes from now on
        plans, tokens["text_long"] = [plan], list(out["text_long"].tokens)
        sched.add(make_sequence(runner, video_request, 6))
        while not sched.idle:
            assert len(plans) < 100
            plan, out = run_round(sched, workers)
            plans.append(plan)
            for request_id, step in out.items():
                tokens[request_id] += step.tokens
        encoding = [p for p in plans if p.encode]
        if budget is None:
            assert len(encoding) == 1
        else:  # the image (its 20 tokens alone), then a slice a round; the text request decodes in each round
            assert [[(a, b) for _, a, b in p.encode] for p in encoding] == [
                [(0, 1)],
                [(1, 2)],
                [(2, 3)],
                [(3, 4)],
                [(4, 5)],
            ]
            assert all(p.decode and p.decode[0].request_id == "text_long" for p in encoding)
            assert [p for p in plans if p.admit and p.admit[0].request_id == "video"] == [encoding[-1]]
        assert tokens == expected
        assert workers.phases.batch.seqs == {} and not workers.phases.embeds and not workers.phases.draft_embeds


def test_an_abort_in_the_middle_of_an_encode_frees_the_workers_embeddings(
    runner_for: Callable[[int, int], ModelRunner], video_request: PreparedRequest
) -> None:
    """The image and the first slice of the video are encoded (two rounds under a budget of one slice), then the
    request is aborted: the next round's release drops what the worker held for it."""
    runner = runner_for(16, 320)
    sched = GroupScheduler(4, 80, 16, token_budget=512, encoder_budget=48)
    workers = Workers(WorkerPhases(RunningBatch(runner)))
    sched.add(make_sequence(runner, video_request, 6))
    for _ in range(2):
        run_round(sched, workers)
    assert len(workers.phases.embeds.parts["video"]) == 2 and "video" not in workers.phases.batch.seqs
    sched.abort("video")
    plan, _ = run_round(sched, workers)
    assert plan.releases == ["video"] and not workers.phases.embeds and sched.idle
