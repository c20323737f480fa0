"""Simulated DP worker groups: the fake groups of cluster/tools/fake_workers.py, each call lasting what the
cost model says it takes on the target hardware, waited for on the simulated clock (cluster/tools/sim_loop.py).

A `step` call runs the fake's bookkeeping (tokens, EOS, lengths, preemptions) and then sleeps:
a round with prompt chunks costs one eager packed forward (`cost_model.prefill_step`) over its chunks
and decode rows; a pure-decode call costs one step per step it ran (`cost_model.decode_step`, captured
graph when the run's exe_mode is graph), each row at its own length, rows that ended dropping out.
An `encode` call costs the vision tower over its images (`cost_model.vision_call_s`). The device runs a
group's calls one at a time in the order they came; after each comes the Coordinator's own time
(`cost_model.coordinator_s`) before the answer reaches the group loop, which sees it as the call's
overhead, as it sees Ray's and its own in a real run (with async scheduling the device starts the
next call meanwhile). Each token is stamped with the simulated
time its step ended.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from actors import clock
from cluster.tools import cost_model
from cluster.tools.fake_workers import FakeWorkerGroup
from cluster.tools.hardware import Hardware
from cluster.tools.model_shapes import ModelShape


@dataclass
class Target:
    """What the simulated groups model: the model shape, its weights, the device, the TP degree and modes."""

    shape: ModelShape
    hardware: Hardware
    weights: str
    tp: int
    graph: bool  # pure-decode calls run a captured graph (exe_mode graph)
    vision_mode: str  # "dp" or "tp" (parallel_config.vision_mode)


@dataclass
class SimWorkerGroup(FakeWorkerGroup):
    """A fake DP group whose calls take the target's modelled time on the simulated clock."""

    target: Target | None = None
    tp_degree: int = 1
    busy_device_s: float = 0.0  # modelled device seconds of every call so far

    @property
    def tp_size(self) -> int:
        return self.tp_degree

    async def call(self, method: str, *args: Any) -> list[dict]:
        self._check_alive()
        target = self.target
        assert target is not None, "SimWorkerGroup needs a target"
        if method not in ("encode", "step"):
            return await super().call(method, *args)
        async with self.in_order:  # the device runs the calls one after the other, in the order they came
            if method == "encode":
                requests = args[0]
                self.add_embeds(requests)
                patches = [int(g.prod()) for r in requests if r.image_grid_thw is not None for g in r.image_grid_thw]
                seconds = cost_model.vision_call_s(
                    target.shape, target.hardware, target.tp, target.vision_mode, patches, target.weights
                )
                answer: dict = {"seconds": seconds, "cache": {}}
                tokens = 0
            else:
                releases, preempted, admissions, tables, chunks, decode, steps = args[:7]
                forks = args[8] if len(args) > 8 else None
                answer = self._step(releases, preempted, admissions, tables, chunks, decode, steps, False, forks)
                outputs = answer["outputs"]
                start = clock.wall()
                if chunks:
                    seconds = self._round_s(chunks, decode, answer["errors"], outputs)
                    times = [start + seconds]
                else:
                    times = self._decode_times(decode, outputs, start)
                    seconds = times[-1] - start if times else 0.0
                for item in outputs.values():
                    item["times"] = times[: len(item["tokens"])] if not chunks else times * len(item["tokens"])
                tokens = sum(len(item["tokens"]) for item in outputs.values())
                answer["seconds"] = seconds
            self.busy_device_s += seconds
            await asyncio.sleep(seconds)
        # The Coordinator's time for the call's answer: after the device, which (with async scheduling) may
        # already run the next call meanwhile.
        await asyncio.sleep(cost_model.coordinator_s(1, tokens))
        return [answer] * self.tp_size

    def _round_s(self, chunks: list, decode: list[str], errors: dict, outputs: dict) -> float:
        """A packed round's seconds: its prompt chunks (tokens, context after) and its decode rows' lengths."""
        target = self.target
        rows = [(end - start, end) for rid, start, end in chunks if rid not in errors]
        lengths = [len(self.seqs[rid].tokens) - 1 for rid in decode if rid in outputs and rid in self.seqs]
        if not rows and not lengths:
            return 0.0
        cost = cost_model.prefill_step(target.shape, target.hardware, target.tp, target.weights, rows, lengths)
        return cost.seconds

    def _decode_times(self, decode: list[str], outputs: dict, start: float) -> list[float]:
        """The end time of each step of a pure-decode call: each row ran as many steps as it got tokens, its
        context one longer each step."""
        target = self.target
        runs = []  # (steps this row ran, its length before the call)
        for rid in decode:
            got = len(outputs.get(rid, {}).get("tokens", ()))
            if got and rid in self.seqs:
                runs.append((got, len(self.seqs[rid].tokens) - got))
        times, now = [], start
        for step in range(max((got for got, _ in runs), default=0)):
            contexts = [length + step for got, length in runs if got > step]  # KV after the step
            cost = cost_model.decode_step(
                target.shape, target.hardware, target.tp, target.weights, contexts, target.graph
            )
            now += cost.seconds
            times.append(now)
        return times
