"""Committed token ids in, text deltas out: whole characters only, cut before the first stop string."""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["TextStream"]


class TextStream:
    """Decodes the growing answer and hands out what is safe to show.

    A delta never ends in half a UTF-8 character, and never shows the start of what may become a stop string
    (up to the longest stop string less one character is held back until the next tokens settle it).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode, self.stop = decode, tuple(stop)
        self.tokens: list[int] = []
        self.text = ""  # the answer so far (cut at a stop string once one is found)
        self.shown = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found: the answer ends before it
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def feed(self, tokens: Sequence[int]) -> str:
        """Take newly committed tokens; return the text that may be shown now."""
        if self.stopped:
            return ""
        self.tokens.extend(tokens)
        text = self.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.text[:self.shown]):
            return ""  # half a character, or a decoding that rewrote shown text: wait for the next tokens
        self.text = text
        cut = self._first_stop()
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._take(len(self.text))
        return self._take(len(text) - self._hold)

    def finish(self) -> str:
        """The answer ended: the rest of its text."""
        return self._take(len(self.text))

    def _first_stop(self) -> int | None:
        start = max(0, self.shown - self._hold)  # a stop string may begin in the held-back tail
        found = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(found) if found else None

    def _take(self, upto: int) -> str:
        if upto <= self.shown:
            return ""
        delta, self.shown = self.text[self.shown:upto], upto
        return delta
