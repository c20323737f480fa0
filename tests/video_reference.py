"""References for video tests: transformers' inputs for a prepared request, its greedy tokens and logits, and the
authors' positions rule."""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from model.processor import PreparedRequest


def hf_video_inputs(
    request: PreparedRequest, image_token_id: int, video_token_id: int, prompt_len: int | None = None
) -> dict[str, torch.Tensor]:
    """transformers' keyword arguments (batch of one) for a request with images and videos.

    prompt_len: where the prompt ends when input_ids continue with generated tokens (which may
    include a pad token's id: only the prompt's pad tokens are vision tokens).

    The request holds every vision input in prompt order; transformers takes images and videos
    apart (pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw / second_per_grid_ts)
    and tells them apart by mm_token_type_ids (text 0, image 1, video 2).
    """
    ids = torch.tensor([request.input_ids])
    inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if request.image_grid_thw is None:
        return inputs
    seconds = request.second_per_grid_ts or [None] * len(request.image_grid_thw)
    pieces = request.pixel_values.split(request.image_grid_thw.prod(-1).tolist())
    images = [i for i, s in enumerate(seconds) if s is None]
    videos = [i for i, s in enumerate(seconds) if s is not None]
    if images:
        inputs["pixel_values"] = torch.cat([pieces[i] for i in images])
        inputs["image_grid_thw"] = request.image_grid_thw[images]
    if videos:
        inputs["pixel_values_videos"] = torch.cat([pieces[i] for i in videos])
        inputs["video_grid_thw"] = request.image_grid_thw[videos]
        inputs["second_per_grid_ts"] = torch.tensor([seconds[i] for i in videos])
    types = (ids == image_token_id).int() + 2 * (ids == video_token_id).int()
    types[:, ids.shape[1] if prompt_len is None else prompt_len :] = 0
    inputs["mm_token_type_ids"] = types
    return inputs


def hf_greedy(
    hf: Qwen2_5_VLForConditionalGeneration, inputs: dict, max_new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens and its logits at each step (after exactly the tokens before it).

    Its own generate gives the step logits: a teacher-forced forward over prompt + output cannot, when
    the output contains a pad token's id (transformers counts every pad id as a vision token).
    """
    with torch.inference_mode():
        out = hf.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens, torch.cat(out.logits).float()


def authors_positions(
    input_ids: list[int],
    grids: list[tuple[int, int, int]],
    seconds: list[float | None],
    vision_token_ids: set[int],
    merge: int,
    tokens_per_second: float,
) -> torch.Tensor:
    """(3, L) positions written from the docstring of get_rope_index in the authors' Qwen2.5-VL code.

    Its words: text tokens have the same position on all three axes, starting at 0; a vision
    input's temporal id of patch i is i * second_per_grid_t * tokens_per_second (truncated), its
    height and width ids its row and column, all shifted by the text position before it; "the text
    position ids start from [the] max vision position id + 1".
    """
    positions: list[list[int]] = [[], [], []]
    nxt, item, i = 0, 0, 0
    while i < len(input_ids):
        if input_ids[i] not in vision_token_ids:
            for axis in positions:
                axis.append(nxt)
            nxt += 1
            i += 1
            continue
        t, h, w = grids[item]
        s = seconds[item]
        interval = float(torch.tensor(tokens_per_second) * torch.tensor(s, dtype=torch.float32)) if s else 1.0
        top = nxt
        for ti in range(t):
            time_id = int(torch.tensor(ti) * torch.tensor(interval, dtype=torch.float32)) if s else ti
            for hi in range(h // merge):
                for wi in range(w // merge):
                    for axis, value in zip(positions, (time_id, hi, wi)):
                        axis.append(nxt + value)
                        top = max(top, nxt + value)
        i += t * (h // merge) * (w // merge)
        nxt = top + 1
        item += 1
    return torch.tensor(positions)
