"""How stages report progress without knowing about terminals (the CLI plugs a rich one in)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Plain progress: log lines on stderr, at most one progress line every few seconds."""

    def __init__(self, quiet: bool = False, every_s: float = 5.0):
        self.quiet = quiet
        self.every_s = every_s
        self._desc, self._total, self._done, self._last = "", 0, 0, 0.0

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def start(self, desc: str, total: int) -> None:
        self._desc, self._total, self._done, self._last = desc, total, 0, time.monotonic()

    def advance(self, n: int = 1) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._last >= self.every_s or self._done >= self._total:
            self._last = now
            self.log(f"{self._desc}: {self._done}/{self._total}")

    def stop(self) -> None:
        pass
