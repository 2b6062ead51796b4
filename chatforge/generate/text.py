"""Turning a stream of token bytes into text deltas that are safe to show.

Two things can make the text produced so far unsafe to send yet:
- an unfinished UTF-8 character (byte-level BPE tokens can split one); the incremental decoder
  holds those bytes back until the character completes;
- a possible beginning of a stop string ("\\nUs" when "\\nUser:" is a stop string); the tail that
  could still grow into a stop string is held back until it either completes (then it and
  everything after it are dropped) or cannot any more (then it is released).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


def held_back_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class IncrementalText:
    """Accumulates token bytes; `push` returns the newly safe text and whether a stop string hit."""

    def __init__(self, stops: Sequence[str] = (), strip_leading_whitespace: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.lstrip = strip_leading_whitespace  # drop whitespace before the first visible character
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # decoded text so far (stop string and after removed once found)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, data: bytes, check_stops: bool = True) -> str:
        """Add a token's bytes; return the text that can be shown now ('' if all is held back)."""
        if self.stopped:
            return ""
        # A new stop string must end in the new text; text already sent is never taken back.
        start = max(self.sent, len(self.text) - max((len(s) for s in self.stops), default=0))
        piece = self.decoder.decode(data)
        self.text += piece.lstrip() if self.lstrip and not self.text else piece
        if check_stops and self.stops:
            cut = self._first_stop(start)
            if cut is not None:
                self.text, self.stopped = self.text[:cut], True
                return self._release(len(self.text))
        hold = held_back_length(self.text, self.stops) if check_stops else 0
        return self._release(len(self.text) - hold)

    def finish(self) -> str:
        """The end of generation: flush incomplete bytes (as U+FFFD) and any held-back text."""
        if not self.stopped:
            piece = self.decoder.decode(b"", final=True)
            self.text += piece.lstrip() if self.lstrip and not self.text else piece
        return self._release(len(self.text))

    def _first_stop(self, start: int) -> int | None:
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta
