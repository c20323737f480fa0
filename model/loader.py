"""Shard-at-load from safetensors: each parameter's own loader reads only its slice of the file."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from model.names import normalize_name
from model.quant import QuantizationError, check_mode, prepare_model


class CheckpointError(ValueError):
    """Checkpoint files are missing, incomplete or do not match the model."""


_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: from its index when sharded, else every *.safetensors."""
    path = Path(model_path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"model_path {str(path)!r} holds no *.safetensors weights")
    return files


def load_weights(
    model: nn.Module,
    model_path: str | Path,
    progress: bool = False,
    desc: str = "loading weights",
    quantization: str = "auto",
) -> set[str]:
    """Load every parameter of `model` from the checkpoint; returns the names loaded.

    Fails on a checkpoint tensor the model has no place for, on a parameter the checkpoint does not
    provide, and on any part loaded twice. Packed projections are filled part by part using the
    model's `packed_modules` mapping. A checkpoint with a quant_model_description.json is loaded
    into int8 layers as it describes (model/quant.py) unless `quantization` is "none", which refuses it.
    """
    try:
        description = check_mode(quantization, model_path)
        plan = prepare_model(model, description) if description is not None else None
    except QuantizationError as e:
        raise CheckpointError(str(e)) from e
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules", {})
    tie = bool(getattr(getattr(model, "config", None), "text", None) and model.config.text.tie_word_embeddings)
    parts_done: dict[str, list[object]] = defaultdict(list)
    unexpected: list[str] = []
    files = checkpoint_files(model_path)
    with tqdm(total=None, desc=desc, unit="tensor", disable=not progress, mininterval=1.0) as bar:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    bar.update()
                    name = normalize_name(key)
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    targets = [(name, None)]
                    if tie and name == "model.embed_tokens.weight" and "lm_head.weight" in params:
                        targets.append(("lm_head.weight", None))
                    for target, shard_id in targets:
                        target, shard_id = _packed_target(target, packed, shard_id)
                        param = params.get(target)
                        if param is None:
                            if plan is None or target not in plan.ignored:
                                unexpected.append(key)
                            continue
                        if shard_id in parts_done[target]:
                            raise CheckpointError(f"checkpoint tensor {key!r} loads {target} a second time")
                        try:
                            param.weight_loader(param, f.get_slice(key), shard_id)
                        except ValueError as e:
                            raise CheckpointError(f"checkpoint tensor {key!r} in {file.name}: {e}") from e
                        parts_done[target].append(shard_id)
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} tensor(s) the model does not use: {', '.join(sorted(unexpected)[:10])}"
        )
    missing = [
        key
        for n in sorted(params)
        if not _complete(n, parts_done.get(n), packed) and (plan is None or n not in plan.optional)
        for key in _missing_keys(n, parts_done.get(n, []), packed)
    ]
    if missing:
        raise CheckpointError(
            f"checkpoint at {str(model_path)!r} lacks {len(missing)} weight(s): {', '.join(missing[:10])}"
        )
    if plan is not None:
        try:
            plan.finalize()
        except QuantizationError as e:
            raise CheckpointError(str(e)) from e
    return set(parts_done)


def _packed_target(name: str, packed: dict[str, tuple[str, object]], shard_id: object) -> tuple[str, object]:
    for ckpt_part, (fused, part) in packed.items():
        marker = f".{ckpt_part}."
        if marker in name:
            return name.replace(marker, f".{fused}."), part
    return name, shard_id


def _missing_keys(name: str, done: list[object], packed: dict[str, tuple[str, object]]) -> list[str]:
    """The checkpoint names (released layout) that would complete parameter `name`."""
    module, leaf = name.rsplit(".", 1)
    prefix, _, fused = module.rpartition(".")
    parts = [(ckpt_part, part) for ckpt_part, (f, part) in packed.items() if f == fused]
    if not parts:
        return [name]
    return [f"{prefix}.{ckpt_part}.{leaf}" for ckpt_part, part in parts if part not in done]


def _complete(name: str, done: list[object] | None, packed: dict[str, tuple[str, object]]) -> bool:
    if not done:
        return False
    if done == [None]:
        return True
    fused = name.split(".")[-2]
    expected = {part for f, part in packed.values() if f == fused}
    return set(done) == expected
