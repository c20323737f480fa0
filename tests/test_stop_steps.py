"""Stop strings through the Coordinator do not depend on how many tokens a call delivers (no Ray, no model).

The same requests with stop strings, served with one decode step per call and with sixteen, end with the
same text, finish reason and completion tokens: the stop string that completes first wins, and no token
after the one that completed it is kept (actors/stop_strings.py, RequestState.add_tokens).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from actors.config import EngineConfig, WorkerConfig
from actors.coordinator import Coordinator
from cluster.tools.fake_workers import FakeWorkerGroup
from tests.test_group_loop import NoPlacement


def serve(model_path: Path, steps: int, requests: list[dict]) -> list[dict]:
    """Records of `requests` served by a Coordinator over a fake group at `steps` decode steps per call."""

    async def main() -> list[dict]:
        worker = WorkerConfig(str(model_path), "cpu", "float32", "eager", "tp", 4, 256)
        cfg = EngineConfig(
            worker, tp_size=1, dp_size=1, worker_options={}, namespace="test", input_max_len=200,
            max_images_per_prompt=1, decode_steps_per_call=steps,
        )  # fmt: skip
        coord = Coordinator(cfg, NoPlacement(), [0], group_factory=FakeWorkerGroup)
        await coord.setup()
        try:
            return await coord.generate(requests)
        finally:
            await coord.shutdown()

    return asyncio.run(main())


def test_stop_strings_give_the_same_text_and_tokens_at_1_and_16_steps_per_call(tiny_checkpoint: Path) -> None:
    base = [{"id": f"s{i}", "prompt": f"stop test {i}", "max_new_tokens": 100, "ignore_eos": True} for i in range(6)]
    plain = serve(tiny_checkpoint, 1, base)
    rng = random.Random(7)
    requests = []
    for request, record in zip(base, plain):
        text = record["output_text"]
        assert len(text) > 12, text
        at = rng.randrange(5, len(text) - 6)
        first = text[at : at + rng.choice((1, 2, 3))]
        later = text[at - 3 : at + 4]  # overlaps `first` and starts before it: must not win by its start
        requests.append({**request, "stop": [later, first, "\u2603never"]})
    one, sixteen = serve(tiny_checkpoint, 1, requests), serve(tiny_checkpoint, 16, requests)
    stopped = 0
    for a, b in zip(one, sixteen):
        assert a["error"] is None and b["error"] is None
        assert (a["output_text"], a["finish_reason"]) == (b["output_text"], b["finish_reason"]), a["id"]
        assert a["output_token_ids"] == b["output_token_ids"], a["id"]  # usage.completion_tokens is their count
        stopped += a["finish_reason"] == "stop"
    assert stopped == len(requests)
