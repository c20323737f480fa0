"""A worker's vision embeddings of requests not yet started: encoded in parts over rounds, taken at admission.

The group's scheduler plans a request's vision items over one or more rounds (actors/vision_items.py), in
prompt order; each `encode` call adds the embeddings of the items it was given, and the request's admission
takes them all, in order: those of every vision input after its cached prefix. A release or preemption
drops what a request holds, so an abort in the middle of a long encode frees its embeddings.
"""

from __future__ import annotations

import torch


class PendingEmbeds:
    """Request id -> the embeddings encoded for it so far, in order."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.parts)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.parts

    def add(self, request_id: str, embeds: torch.Tensor) -> None:
        """The embeddings of the request's next items."""
        self.parts.setdefault(request_id, []).append(embeds)

    def take(self, request_id: str) -> torch.Tensor | None:
        """All the request's embeddings, in order, no longer held here (None: none were encoded)."""
        parts = self.parts.pop(request_id, None)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def drop(self, request_id: str) -> None:
        """Forget the request's embeddings (released or preempted)."""
        self.parts.pop(request_id, None)
