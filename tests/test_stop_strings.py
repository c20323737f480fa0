"""The stop matcher against a reference written from the rule: scanning the whole text character by
character, the first stop string to be complete cuts it (of those ending at one character, the longest);
the matcher must agree however the text was split into deliveries."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.stop_strings import StopMatcher


def first_stop(text: str, stops: list[str]) -> tuple[str, int | None]:
    """(the text cut before the first stop string to be complete, where that stop string ends) by a scan of
    the whole text; (text, None) without one."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(map(len, ending))], end
    return text, None


def _feed(stops: list[str], pieces: list[str]) -> tuple[str, StopMatcher, int]:
    """The matcher fed `pieces` until it stops: what it released (its held tail too if no stop string came),
    the matcher, and the length of the pieces before the one it stopped in."""
    matcher, released, before = StopMatcher(stops), "", 0
    for piece in pieces:
        released += matcher.feed(piece)
        assert len(matcher.held) < max(map(len, stops))
        if matcher.stopped:
            return released, matcher, before
        before += len(piece)
    return released + matcher.release(), matcher, before


def _check(stops: list[str], pieces: list[str]) -> None:
    """The matcher fed `pieces` cuts their text as the rule does, and says where the stop string ends."""
    released, matcher, before = _feed(stops, pieces)
    cut, end = first_stop("".join(pieces), stops)
    assert (released, matcher.stopped) == (cut, end is not None), (pieces, stops)
    if end is not None:
        assert before + matcher.end == end, (pieces, stops)


def test_the_stop_string_completed_first_wins_not_the_one_starting_first() -> None:
    # "c" is complete at the third character, "abcd" at the fourth: "c" cuts, delivered at once or not.
    assert StopMatcher(["abcd", "c"]).feed("abcd") == "ab" == StopMatcher(["abcd", "c"]).feed("abc")
    _check(["abcd", "c"], ["abcd"])
    # Two ending at one character: the longest cuts.
    assert StopMatcher(["bc", "abc"]).feed("xabcd") == "x"
    _check(["bc", "abc"], ["xa", "bcd"])


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abxy", max_size=30),
    stops=st.lists(st.text(alphabet="abx", min_size=1, max_size=5), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 30), max_size=12),
)
def test_matcher_agrees_with_the_rule_however_the_text_is_delivered(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    _check(stops, [text[a:b] for a, b in zip(bounds, bounds[1:])])
