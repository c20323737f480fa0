"""transformers' Qwen2.5-VL as the reference: greedy tokens, teacher-forced logits, the near-tie rule.

Greedy sequences are compared with the near-tie rule of cluster.tools.greedy_check; every acceptance is
reported with a warning, so a run says when the rule was used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from cluster.tools.greedy_check import compare_greedy
from model.processor import PreparedRequest
from model.runner import ModelRunner

LOGITS_ATOL = 1e-4


class NearTieWarning(UserWarning):
    """A greedy sequence diverged from the reference at a near tie and was accepted."""


def extend(request: PreparedRequest, continuation: Sequence[int]) -> PreparedRequest:
    """The request with `continuation` appended to its prompt (for teacher forcing)."""
    return replace(request, input_ids=list(request.input_ids) + list(continuation))


def hf_inputs(request: PreparedRequest, image_token_id: int) -> dict[str, torch.Tensor]:
    """Keyword arguments for transformers' forward / generate, batch of one."""
    ids = torch.tensor([request.input_ids])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if request.pixel_values is not None:
        inputs.update(
            pixel_values=request.pixel_values,
            image_grid_thw=request.image_grid_thw,
            mm_token_type_ids=(ids == image_token_id).int(),
        )
    return inputs


class HFReference:
    """transformers models per checkpoint, with greedy generations and logits memoized."""

    def __init__(self) -> None:
        self._models: dict[Path, Qwen2_5_VLForConditionalGeneration] = {}
        self._tokens: dict[tuple, list[int]] = {}
        self._logits: dict[tuple, torch.Tensor] = {}

    def model(self, path: str | Path) -> Qwen2_5_VLForConditionalGeneration:
        path = Path(path)
        if path not in self._models:
            self._models[path] = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        return self._models[path]

    def image_token_id(self, path: str | Path) -> int:
        return int(self.model(path).config.image_token_id)

    def generate(
        self, path: str | Path, request: PreparedRequest, max_new_tokens: int, eos_token_ids: Sequence[int]
    ) -> list[int]:
        """Greedy output tokens of `generate`; stops after (and includes) any of `eos_token_ids`."""
        key = (Path(path), request.request_id, tuple(request.input_ids), max_new_tokens, tuple(eos_token_ids))
        if key not in self._tokens:
            model = self.model(path)
            inputs = hf_inputs(request, self.image_token_id(path))
            # eos_token_id=None overrides the checkpoint's generation_config: no EOS at all.
            eos = list(eos_token_ids) or None
            with torch.inference_mode():
                out = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0
                )
            self._tokens[key] = out[0, len(request.input_ids) :].tolist()
        return list(self._tokens[key])

    def logits(self, path: str | Path, request: PreparedRequest, continuation: Sequence[int] = ()) -> torch.Tensor:
        """Teacher-forced logits (prompt + continuation length, vocab) of one forward pass."""
        full = extend(request, continuation)
        key = (Path(path), request.request_id, tuple(full.input_ids))
        if key not in self._logits:
            with torch.inference_mode():
                out = self.model(path)(**hf_inputs(full, self.image_token_id(path)))
            self._logits[key] = out.logits[0].float()
        return self._logits[key]


def our_logits(runner: ModelRunner, request: PreparedRequest, continuation: Sequence[int] = ()) -> torch.Tensor:
    """Teacher-forced prefill logits (prompt + continuation length, vocab) from a ModelRunner (KV slot 0)."""
    embeds = runner.encode_images([request])[0]
    logits, _ = runner.prefill(extend(request, continuation), embeds, 0, all_logits=True)
    return logits.float()


def step_rows(full_logits: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Teacher-forced logits over prompt + continuation -> one row per continuation token (its step)."""
    return full_logits[prompt_len - 1 : -1]


def assert_greedy_match(
    ours: Sequence[int], ref: Sequence[int], step_logits: Callable[[int], tuple[torch.Tensor, torch.Tensor]], what: str
) -> None:
    """Assert the near-tie rule holds; warn (NearTieWarning) and print when it had to be applied."""
    result = compare_greedy(ours, ref, step_logits)
    assert result.accepted, f"{what}: {result.detail}"
    if result.near_tie_step is not None:
        message = f"{what}: near-tie rule applied, comparison stopped: {result.detail}"
        print(message)
        warnings.warn(message, NearTieWarning, stacklevel=2)


def paired_steps(ours: torch.Tensor, ref: torch.Tensor) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """step_logits for compare_greedy from per-step logits of both sides (teacher-forced on the reference)."""
    return lambda step: (ours[step], ref[step])
