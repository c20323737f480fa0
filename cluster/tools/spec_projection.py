"""Speculative decoding on the target, projected with the planner's cost model: TPOT of draft-and-verify rounds.

`python -m cluster.tools.spec_projection [--hardware a3] [--tp 8] [--context 1200] [--reference-k 3]
[--round-ms 0] [--json OUT]` prints, per target weights (bf16, w8a8), draft (Qwen2.5-VL-3B, -7B), draft
TP (1: a replica on every rank; 4 or 8: sharded over the target's ranks) and published acceptance length
(2.3, 3.2), the best number of proposals k in 1..7, the round's parts, TPOT and the memory floors.

A round for B rows with k proposals (the engine's design for verification):
- the draft runs k sequential decode steps at batch B, the first over 2B rows (the last two tokens of
  each row: the bonus or corrected token of the previous round has no draft KV yet);
- the target verifies with its ordinary decode step over B x (k + 1) rows of one new token each (each
  proposal position is its own row reading its sequence's KV through the same block table), so its cost
  is `cost_model.decode_step` over those rows;
- plus a fixed cost per round (`round_fixed_s`; the hardware profiles carry none beyond each forward's
  own call and per-layer costs, so it is 0 unless given).
Tokens per round with per-token acceptance alpha: (1 - alpha^(k+1)) / (1 - alpha). A published mean
acceptance length L (tokens per round, bonus included) fixes alpha at the k it was measured with
(`reference_k`); other k follow from that alpha. TPOT = round time / tokens per round.
The floors: every target weight read once per token at the full HBM bandwidth.
docs/simulator.md has the table and the conclusion.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.tools import cost_model
from cluster.tools.hardware import Hardware, hardware
from cluster.tools.model_shapes import ModelShape, model_shape

TARGET = "qwen2.5-vl-72b"
DRAFTS = ("qwen2.5-vl-3b", "qwen2.5-vl-7b")
DRAFT_TPS = (1, 4, 8)
# Published mean acceptance lengths (tokens per round, bonus included): a separate Qwen2.5-VL-3B draft on a
# 32B target, 2.29 (an unmerged vLLM pull request); EAGLE-3 on Qwen2.5-VL-7B in SGLang, 3.2.
ACCEPTANCE_LENGTHS = (2.3, 3.2)
K_MAX = 7
GOAL_MS = 5.6  # the W8A8 floor of the 72B at TP 8 on a3, rounded: the goal is a TPOT below it


def tokens_per_round(alpha: float, k: int) -> float:
    """Expected tokens a round yields with k proposals each accepted with probability alpha: sum of alpha^i, i <= k."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: a per-token acceptance probability must be in [0, 1]")
    if k < 0:
        raise ValueError(f"k={k}: the number of proposals must be >= 0")
    if alpha == 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def alpha_for(length: float, k: int) -> float:
    """The per-token acceptance at which k proposals yield `length` tokens per round (bisection; exact to 1e-12)."""
    if k < 1 or not 1.0 <= length < k + 1:
        raise ValueError(f"acceptance length {length} at k={k}: needs k >= 1 and 1 <= length < k + 1")
    low, high = 0.0, 1.0
    while high - low > 1e-12:
        middle = (low + high) / 2
        if tokens_per_round(middle, k) < length:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def check_tp(shape: ModelShape, tp: int) -> None:
    """A TP degree that shards this shape: it divides the attention heads and the MLP's intermediate size."""
    if tp < 1 or shape.heads % tp or shape.intermediate % tp:
        raise ValueError(
            f"tp={tp} does not shard {shape.name} ({shape.heads} heads, intermediate {shape.intermediate})"
        )


def verify_step(
    target: ModelShape, hw: Hardware, tp: int, weights: str, contexts: list[int], k: int
) -> cost_model.StepCost:
    """The target's decode step over B x (k + 1) rows: row j of a sequence at `context` (its length after a plain
    decode step) holds proposal position j and reads context + j tokens of KV."""
    return cost_model.decode_step(target, hw, tp, weights, [c + j for c in contexts for j in range(k + 1)], graph=True)


def draft_steps(
    draft: ModelShape, hw: Hardware, tp: int, weights: str, contexts: list[int], k: int
) -> list[cost_model.StepCost]:
    """The draft's k decode steps: the first over the last two tokens of each row, then one row each."""
    first = [c + d for c in contexts for d in (-1, 0)]
    steps = [cost_model.decode_step(draft, hw, tp, weights, first, graph=True)]
    for i in range(1, k):
        steps.append(cost_model.decode_step(draft, hw, tp, weights, [c + i for c in contexts], graph=True))
    return steps


@dataclass(frozen=True)
class Setup:
    """What a round runs on: the target at `tp` ranks in `weights`, the draft at `draft_tp` in `draft_weights`,
    rows at `contexts` (each row's length after a plain decode step), and a fixed cost per round."""

    target: ModelShape
    draft: ModelShape
    hw: Hardware
    tp: int
    draft_tp: int
    weights: str
    draft_weights: str
    contexts: tuple[int, ...]
    round_fixed_s: float = 0.0

    def __post_init__(self) -> None:
        check_tp(self.target, self.tp)
        check_tp(self.draft, self.draft_tp)
        if self.draft_tp != 1 and self.tp % self.draft_tp:
            raise ValueError(f"draft tp={self.draft_tp}: must be 1 or divide the target's tp={self.tp}")
        if not self.contexts:
            raise ValueError("contexts=(): a round needs at least one row")
        if self.round_fixed_s < 0:
            raise ValueError(f"round_fixed_s={self.round_fixed_s}: must be >= 0")


@dataclass(frozen=True)
class SpecRound:
    """One configuration's round at k proposals: its parts in seconds and the tokens it yields."""

    weights: str
    draft: str
    draft_tp: int
    acceptance_length: float
    k: int
    alpha: float
    tokens: float
    draft_s: float
    verify_s: float
    fixed_s: float

    @property
    def round_s(self) -> float:
        return self.draft_s + self.verify_s + self.fixed_s

    @property
    def tpot_s(self) -> float:
        return self.round_s / self.tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "round_s": self.round_s, "tpot_s": self.tpot_s}


def spec_round(setup: Setup, k: int, alpha: float, acceptance_length: float) -> SpecRound:
    """The round of B = len(contexts) rows with k proposals at per-token acceptance alpha."""
    contexts = list(setup.contexts)
    steps = draft_steps(setup.draft, setup.hw, setup.draft_tp, setup.draft_weights, contexts, k)
    verify = verify_step(setup.target, setup.hw, setup.tp, setup.weights, contexts, k)
    return SpecRound(
        setup.weights,
        setup.draft.name,
        setup.draft_tp,
        acceptance_length,
        k,
        alpha,
        tokens_per_round(alpha, k),
        sum(step.seconds for step in steps),
        verify.seconds,
        setup.round_fixed_s,
    )


@dataclass(frozen=True)
class Projection:
    """The best k of one configuration, its round at the reference k (tokens = L) and every k tried."""

    best: SpecRound
    at_reference: SpecRound
    rounds: list[SpecRound]


def project(setup: Setup, acceptance_length: float, reference_k: int = 3, k_max: int = K_MAX) -> Projection:
    """Rounds at k = 1..k_max, alpha solved from `acceptance_length` at `reference_k`; the best has the lowest TPOT."""
    if not 1 <= reference_k <= k_max:
        raise ValueError(f"reference_k={reference_k}: must be in 1..k_max={k_max}")
    alpha = alpha_for(acceptance_length, reference_k)
    rounds = [spec_round(setup, k, alpha, acceptance_length) for k in range(1, k_max + 1)]
    return Projection(min(rounds, key=lambda r: r.tpot_s), rounds[reference_k - 1], rounds)


def plain_tpot_s(target: ModelShape, hw: Hardware, tp: int, weights: str, contexts: list[int]) -> float:
    """TPOT without speculation: one captured decode step per token."""
    return cost_model.decode_step(target, hw, tp, weights, contexts, graph=True).seconds


def floor_s(target: ModelShape, hw: Hardware, tp: int, weights: str) -> float:
    """The memory floor of a token at batch 1: the rank's weights read once at the full HBM bandwidth."""
    return cost_model.weight_bytes(target, weights, tp) / hw.bandwidth


def draft_weights_for(choice: str, weights: str) -> str:
    """The draft's weights: `target` (the target's), or bf16 / w8a8 as named."""
    if choice == "target":
        return weights
    cost_model.check_weights(choice)
    return choice


def projections(args: argparse.Namespace) -> dict:
    """Every configuration of the table, with the floors and the plain decode TPOT of each target weights."""
    target, hw = model_shape(args.target), hardware(args.hardware)
    contexts = [args.context] * args.batch
    out: dict = {
        "target": target.name,
        "hardware": hw.name,
        "tp": args.tp,
        "batch": args.batch,
        "context": args.context,
        "reference_k": args.reference_k,
        "round_fixed_s": args.round_ms / 1e3,
        "goal_s": args.goal_ms / 1e3,
        "targets": {},
        "rows": [],
        "skipped": [],
    }
    for weights in args.weights:
        out["targets"][weights] = {
            "weight_bytes_per_rank": cost_model.weight_bytes(target, weights, args.tp),
            "floor_s": floor_s(target, hw, args.tp, weights),
            "plain_tpot_s": plain_tpot_s(target, hw, args.tp, weights, contexts),
        }
        for name in args.drafts:
            draft = model_shape(name)
            for draft_tp in args.draft_tp:
                for length in args.acceptance:
                    try:
                        setup = Setup(
                            target,
                            draft,
                            hw,
                            args.tp,
                            draft_tp,
                            weights,
                            draft_weights_for(args.draft_weights, weights),
                            tuple(contexts),
                            args.round_ms / 1e3,
                        )
                        p = project(setup, length, args.reference_k, args.k_max)
                    except ValueError as e:
                        out["skipped"].append(f"{weights} {name} draft tp {draft_tp} L {length}: {e}")
                        continue
                    out["rows"].append(
                        {
                            "best": p.best.to_dict(),
                            "at_reference_k": p.at_reference.to_dict(),
                            "by_k": [r.to_dict() for r in p.rounds],
                        }
                    )
    return out


def format_table(result: dict) -> str:
    """The printed table: one line per configuration at its best k."""
    goal = result["goal_s"]
    lines = [
        f"{result['target']} on {result['hardware']} at TP {result['tp']}, batch {result['batch']}, context "
        f"{result['context']}; alpha from L at k={result['reference_k']}; goal TPOT < {goal * 1e3:.1f} ms"
    ]
    for weights, t in result["targets"].items():
        lines.append(
            f"  {weights}: {t['weight_bytes_per_rank'] / 1e9:.2f} GB per rank, floor {t['floor_s'] * 1e3:.2f} ms, "
            f"plain decode TPOT {t['plain_tpot_s'] * 1e3:.2f} ms"
        )
    header = (
        f"{'weights':<7} {'draft':<14} {'dtp':>3} {'L':>4} {'k':>2} {'alpha':>5} {'tok/rnd':>7} {'draft ms':>8} "
        f"{'verify ms':>9} {'round ms':>8} {'TPOT ms':>7} {'at k_ref':>8} {'vs plain':>8} {'goal':>4}"
    )
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        b, ref = row["best"], row["at_reference_k"]
        plain = result["targets"][b["weights"]]["plain_tpot_s"]
        lines.append(
            f"{b['weights']:<7} {b['draft']:<14} {b['draft_tp']:>3} {b['acceptance_length']:>4.1f} {b['k']:>2} "
            f"{b['alpha']:>5.3f} {b['tokens']:>7.2f} {b['draft_s'] * 1e3:>8.2f} {b['verify_s'] * 1e3:>9.2f} "
            f"{b['round_s'] * 1e3:>8.2f} {b['tpot_s'] * 1e3:>7.2f} {ref['tpot_s'] * 1e3:>8.2f} "
            f"{plain / b['tpot_s']:>7.2f}x {'yes' if b['tpot_s'] < goal else 'no':>4}"
        )
    lines += [f"skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster.tools.spec_projection", description=__doc__.split("\n")[0])
    parser.add_argument("--target", default=TARGET, help="the target's model shape (a preset or checkpoint)")
    parser.add_argument("--hardware", default="a3", help="a3, 910b, a100-80g, h100, h200, cpu-here or a .json")
    parser.add_argument("--tp", type=int, default=8, help="the target's TP degree")
    parser.add_argument("--weights", nargs="+", default=["bf16", "w8a8"], choices=("bf16", "w8a8"))
    parser.add_argument("--drafts", nargs="+", default=list(DRAFTS), help="draft model shapes")
    parser.add_argument("--draft-tp", type=int, nargs="+", default=list(DRAFT_TPS))
    parser.add_argument(
        "--draft-weights", default="target", choices=("target", "bf16", "w8a8"), help="target: as the target's"
    )
    parser.add_argument("--acceptance", type=float, nargs="+", default=list(ACCEPTANCE_LENGTHS))
    parser.add_argument("--reference-k", type=int, default=3, help="the k at which the acceptance lengths hold")
    parser.add_argument("--k-max", type=int, default=K_MAX)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1200, help="each row's tokens (prompt + output so far)")
    parser.add_argument("--round-ms", type=float, default=0.0, help="a fixed cost per round")
    parser.add_argument("--goal-ms", type=float, default=GOAL_MS)
    parser.add_argument("--json", type=Path, help="write every configuration and k here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1 or args.context < 2:
        parser.error(f"--batch={args.batch} must be >= 1 and --context={args.context} >= 2")
    try:
        check_tp(model_shape(args.target), args.tp)
        result = projections(args)
    except ValueError as e:
        parser.error(str(e))
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
