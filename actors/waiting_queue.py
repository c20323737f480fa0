"""A group's waiting requests: first in, first out, with removal by request id in O(1).

An abort or a stop of a waiting request removes it from the middle of the queue; with a deque that
scans the queue, so aborting n waiting requests cost O(n^2). An insertion-ordered dict keyed by
request id keeps the order and makes every operation O(1): append and take from the front, put back
at the front (a preempted request), remove anywhere.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Identified(Protocol):
    request_id: str


T = TypeVar("T", bound=Identified)


class WaitingQueue(Generic[T]):
    """Requests in the order they are to be admitted; each request id at most once."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, T] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

    def __contains__(self, item: T) -> bool:
        return self._items.get(item.request_id) is item

    def head(self) -> T:
        """The first request (IndexError when empty)."""
        for item in self._items.values():
            return item
        raise IndexError("head of an empty waiting queue")

    def append(self, item: T) -> None:
        """Queue at the back; ValueError when its id is already queued."""
        self._check_new(item)
        self._items[item.request_id] = item

    def appendleft(self, item: T) -> None:
        """Queue at the front (a preempted request goes first); ValueError when its id is already queued."""
        self._check_new(item)
        self._items[item.request_id] = item
        self._items.move_to_end(item.request_id, last=False)

    def popleft(self) -> T:
        """Take the first request (IndexError when empty)."""
        if not self._items:
            raise IndexError("popleft from an empty waiting queue")
        return self._items.popitem(last=False)[1]

    def remove(self, item: T) -> None:
        """Take this request out wherever it is; ValueError when it is not queued."""
        if item not in self:
            raise ValueError(f"request {item.request_id!r} is not waiting")
        del self._items[item.request_id]

    def clear(self) -> None:
        self._items.clear()

    def _check_new(self, item: T) -> None:
        if item.request_id in self._items:
            raise ValueError(f"request {item.request_id!r} is already waiting")
