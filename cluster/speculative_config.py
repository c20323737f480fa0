"""The `speculative` section of a run config: vLLM's keys, off by default, checked at the edge.

```yaml
speculative:
  method: ngram            # or draft; null (the default) turns speculation off
  num_speculative_tokens: 4   # k: proposals per round (num_tokens is a short alias)
  prompt_lookup_min: 1     # ngram: the shortest suffix matched
  prompt_lookup_max: 4     # ngram: the longest
  model: /path/to/draft    # draft: a Qwen2.5-VL checkpoint with the target's tokenizer
  draft_tensor_parallel_size: 1   # draft: 1 (a replica on every rank) or the target's tp_size (sharded)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.draft import DraftMismatch, check_draft
from model.speculative import METHODS, SpeculativeConfig


@dataclass
class SpeculativeSection:
    """Speculative decoding (docs/architecture.md, "Speculative decoding").

    method: "ngram" (proposals from the request's own tokens: prompt lookup) or "draft" (a smaller
        Qwen2.5-VL checkpoint that sees the same images); null: off.
    num_speculative_tokens: proposals per round (1..15); required with a method. num_tokens: the same key,
        shorter; set one of them.
    prompt_lookup_min / prompt_lookup_max: with ngram, the lengths of the suffix looked up in the request's
        tokens (the longest that occurs wins, then its earliest occurrence).
    model: with draft, the draft checkpoint; its tokenizer must be the target's (checked when the config
        loads; the embedding tables may differ in rows).
    draft_tensor_parallel_size: with draft, 1 (a whole draft on every rank) or the target's tp_size (the
        draft sharded over the same ranks); null: the target's.
    min_acceptance / backoff_rounds: a request whose recent acceptance falls below min_acceptance stops
        proposing for backoff_rounds rounds.
    """

    method: str | None = None
    num_speculative_tokens: int | None = None
    num_tokens: int | None = None
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None
    draft_tensor_parallel_size: int | None = None
    min_acceptance: float = 0.1
    backoff_rounds: int = 8


def speculative_config(section: SpeculativeSection, model_path: str, tp_size: int) -> SpeculativeConfig | None:
    """The model-level config of a validated section (None: speculation off). ValueError naming the key."""
    if section.method is None:
        for key in ("num_speculative_tokens", "num_tokens", "model", "draft_tensor_parallel_size"):
            if getattr(section, key) is not None:
                raise ValueError(f"speculative.{key}={getattr(section, key)!r} is set but speculative.method is null")
        return None
    if section.method not in METHODS:
        raise ValueError(f"speculative.method={section.method!r} must be one of {', '.join(METHODS)} or null")
    k, alias = section.num_speculative_tokens, section.num_tokens
    if k is not None and alias is not None and k != alias:
        raise ValueError(
            f"speculative.num_speculative_tokens={k} and speculative.num_tokens={alias} disagree (set one)"
        )
    k = k if k is not None else alias
    if k is None:
        raise ValueError("speculative.num_speculative_tokens is required with speculative.method")
    draft_tp = section.draft_tensor_parallel_size
    model = None
    if section.method == "draft":
        if not section.model:
            raise ValueError("speculative.method='draft' needs speculative.model, the draft checkpoint")
        model = str(Path(section.model).expanduser().resolve())
        if draft_tp is None:
            draft_tp = tp_size
        if draft_tp not in (1, tp_size):
            raise ValueError(
                f"speculative.draft_tensor_parallel_size={draft_tp} must be 1 or the target's tp_size={tp_size}"
            )
        try:
            check_draft(model_path, model)
        except DraftMismatch as e:
            raise ValueError(f"speculative.model={section.model!r}: {e}") from e
    elif section.model is not None or draft_tp is not None:
        key = "model" if section.model is not None else "draft_tensor_parallel_size"
        raise ValueError(f"speculative.{key} is for method 'draft', but speculative.method is 'ngram'")
    return SpeculativeConfig(
        method=section.method,
        num_speculative_tokens=k,
        prompt_lookup_min=section.prompt_lookup_min,
        prompt_lookup_max=section.prompt_lookup_max,
        model=model,
        draft_tensor_parallel_size=draft_tp or 1,
        min_acceptance=section.min_acceptance,
        backoff_rounds=section.backoff_rounds,
    )
