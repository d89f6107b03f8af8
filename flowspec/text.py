"""Text and token ids at the edges, one rule each: a conversation into the chat template's ids, and committed
ids back out as text deltas (whole characters only, cut before the first stop string). Used by the library
(flowspec.api), the HTTP server and the bench's references alike; it needs only a tokenizer's methods."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["TextStream", "chat_ids"]


def chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a conversation (`role`/`content` dicts) in the tokenizer's chat template, ready for the
    assistant's answer; without a template, the contents one per line."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=True)
        return [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]
    return [int(i) for i in tokenizer.encode("\n".join(m["content"] for m in messages))]


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
