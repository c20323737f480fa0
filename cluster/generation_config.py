"""The checkpoint's generation_config.json as the run's sampling defaults (`generation_config: auto`).

As vLLM's `--generation-config auto`: the sampling keys a checkpoint's generation_config.json sets
(temperature, top_p, top_k, repetition_penalty; Qwen2.5-VL's set some of them) become the run's
defaults. The precedence for each setting is: the request's own field, then a data_config key the user
set in the config file or on the command line, then the checkpoint's generation_config, then the
built-in default. `do_sample` is not read (vLLM does not either): a checkpoint that wants greedy
decoding says so with its temperature. `generation_config: none` ignores the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

# generation_config.json key -> data_config key
SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
}
GENERATION_CONFIG_MODES = ("auto", "none")


def explicit_keys(path: str | Path | None, overrides: list[str] | None) -> set[str]:
    """The dotted keys (data_config.temperature, ...) a config file and command-line overrides set."""
    keys: set[str] = set()
    if path is not None and Path(path).is_file():
        loaded = OmegaConf.load(path)
        if isinstance(loaded, DictConfig):
            data = loaded.get("data_config")
            if isinstance(data, DictConfig):
                keys.update(f"data_config.{k}" for k in data)
    for item in overrides or []:
        keys.add(item.partition("=")[0].strip())
    return keys


def checkpoint_defaults(model_path: str | Path) -> dict[str, Any]:
    """The sampling keys of a checkpoint's generation_config.json (data_config names), {} without one."""
    file = Path(model_path) / "generation_config.json"
    if not file.is_file():
        return {}
    generation = json.loads(file.read_text())
    return {key: generation[key] for key in SAMPLING_KEYS if generation.get(key) is not None}


def apply_generation_config(cfg: Any, explicit: set[str]) -> dict[str, Any]:
    """With cfg.generation_config 'auto', set each data_config sampling key the user did not set from the
    checkpoint's generation_config.json; returns what was applied."""
    if cfg.generation_config != "auto":
        return {}
    applied = {
        key: value for key, value in checkpoint_defaults(cfg.model_path).items() if f"data_config.{key}" not in explicit
    }
    for key, value in applied.items():
        setattr(cfg.data_config, key, type(getattr(cfg.data_config, key))(value))
    if applied:
        logger.info("sampling defaults from %s/generation_config.json: %s", cfg.model_path, applied)
    return applied
