"""A one-line progress report on stderr: documents/s, tokens/s and an ETA when the total is known."""
from __future__ import annotations

import sys
import time


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Redraws in place on a terminal; in a log file prints a line every `log_every` seconds."""

    def __init__(self, total: tuple[int, str] | None, enabled: bool = True, log_every: float = 30.0) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.interval = 0.5 if self.tty else log_every
        self.start = self.last = time.perf_counter()
        self.docs = self.chars = self.tokens = 0

    def update(self, docs: int, chars: int, tokens: int) -> None:
        self.docs += docs
        self.chars += chars
        self.tokens += tokens
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self._draw(now, end="\r" if self.tty else "\n", final=False)

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter(), end="\n", final=True)

    def _draw(self, now: float, end: str, final: bool) -> None:
        elapsed = max(now - self.start, 1e-9)
        line = (f"{self.docs:,} docs ({_si(self.docs / elapsed)}/s) | {_si(self.tokens)} tokens "
                f"({_si(self.tokens / elapsed)}/s) | {_clock(elapsed)}")
        if self.total and not final:
            amount, unit = self.total
            # Characters stand in for bytes: exact for ASCII, close for most text.
            done = (self.chars if unit == "bytes" else self.docs) / max(amount, 1)
            if 0 < done < 1:
                line += f" | {100 * done:.0f}% ETA {_clock(elapsed * (1 - done) / done)}"
        print(line.ljust(100), end=end, file=sys.stderr, flush=True)
