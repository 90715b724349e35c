"""Stop strings matched on streamed text: the match is cut off and never emitted.

Text that could be the beginning of a stop string is held back until it is either completed
(the request stops, the held text is dropped) or ruled out (the held text is emitted).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopStringMatcher"]


class StopStringMatcher:
    """Feed text deltas; get back the part that is safe to emit and whether a stop matched."""

    __slots__ = ("_held", "_max_len", "_stops", "stopped_on")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._max_len = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped_on: str | None = None

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return ``(text to emit, stopped)``; after a stop, the rest of the stream is dropped."""
        if self.stopped_on is not None:
            return "", True
        text = self._held + delta
        if not self._stops or not text:
            self._held = ""
            return text, False
        cut = -1
        for stop in self._stops:
            at = text.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut, self.stopped_on = at, stop
        if cut != -1:
            self._held = ""
            return text[:cut], True
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held text, emitted when the request ends for another reason."""
        held, self._held = self._held, ""
        return held if self.stopped_on is None else ""

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self._max_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
