"""Checkpoint tensor names in the layout our modules use, from either layout a checkpoint may be saved in."""

from __future__ import annotations

# Prefixes of the layout transformers 5 writes, mapped to the released layout our modules use.
_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def normalize_name(name: str) -> str:
    """A checkpoint tensor's name in the released layout (``model.language_model.x`` -> ``model.x``)."""
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name
