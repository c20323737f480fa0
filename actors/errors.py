"""Errors the engine raises for a request, typed where they arise so that a server maps them by type.

Each carries `param` (the request field at fault, e.g. ``stop`` or ``max_new_tokens``, or None)
and `status` (the HTTP status a server answers with). `model.processor.InvalidRequestError` carries
the same two attributes, so a server reads both from either without importing `model`.

Through Ray, an exception raised in an actor arrives wrapped (`RayTaskError`, whose `cause` is the
original; `unwrap` takes it out); both attributes survive the trip, as instance attributes pickle
with the exception.
"""

from __future__ import annotations

NO_LIVE_GROUP = "no live DP group to serve it"


class RequestError(ValueError):
    """A request the engine cannot serve as given; the message names the request and the bad value."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


class NoLiveGroupError(RequestError):
    """No DP group is alive to serve the request (HTTP 503): the request may succeed later."""

    def __init__(self, message: str = NO_LIVE_GROUP) -> None:
        super().__init__(message, None, 503)


def unwrap(error: BaseException) -> BaseException:
    """The exception an actor raised, out of Ray's wrapper (`RayTaskError`, whose `cause` is the original)
    and out of task errors nested in it; `error` itself when it carries no exception as its `cause`."""
    seen = {id(error)}
    while isinstance(cause := getattr(error, "cause", None), BaseException) and id(cause) not in seen:
        seen.add(id(cause))
        error = cause
    return error
