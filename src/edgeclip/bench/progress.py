"""A progress bar on stderr (stdout may carry --json): redrawn in place on a terminal, one line per
step otherwise (logs, CI). No dependency."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: float, enabled: bool = True, stream=None, width: int = 28):
        self.total, self.done, self.enabled = max(total, 1e-9), 0.0, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width, self.label, self.start = width, "", time.perf_counter()
        self._step_base, self._weight = 0.0, 0.0

    def step(self, label: str, weight: float = 1.0) -> None:
        """Start a step worth `weight` of the total (the previous one counts as done); `update(fraction)`
        moves within it."""
        self.done = self._step_base = min(self.total, self._step_base + self._weight)
        self._weight = weight
        self.label = label
        if self.enabled and not self.tty:
            print(f"[{100 * self.done / self.total:3.0f}%] {label}", file=self.stream, flush=True)
        self._draw()

    def update(self, fraction: float) -> None:
        self.done = min(self.total, self._step_base + self._weight * min(1.0, max(0.0, fraction)))
        self._draw()

    def finish_step(self) -> None:
        self.update(1.0)

    def log(self, message: str) -> None:
        if self.enabled:
            if self.tty:
                self.stream.write("\r\033[K")
            print(f"  {message}", file=self.stream, flush=True)
            self._draw()

    def _draw(self) -> None:
        if not (self.enabled and self.tty):
            return
        filled = int(self.width * self.done / self.total)
        elapsed = time.perf_counter() - self.start
        bar = "█" * filled + "·" * (self.width - filled)
        self.stream.write(f"\r\033[K{bar} {100 * self.done / self.total:3.0f}%  {elapsed:5.0f} s  {self.label[:60]}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.done = self.total
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
