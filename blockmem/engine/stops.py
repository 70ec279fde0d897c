"""Stop strings over streamed text: emit what cannot be part of a stop string, hold the rest."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""  # text held back because it could start a stop string
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add streamed text; return the part that is safe to show now."""
        if self.stopped or not text:
            return ""
        if not self.stops:
            return text
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)[0]], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        """The held-back text at the end of generation (it never completed a stop string)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
