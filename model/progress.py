"""Training progress on stderr: a tqdm bar on a terminal, plain timestamped lines otherwise, so that
a log file or CI output gets whole lines and no carriage returns."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Progress over one epoch's steps: `update(n, **figures)` after each step, `close()` at the end."""

    def __init__(self, total: int, desc: str, *, stream: TextIO | None = None, interval_s: float = 30.0,
                 enabled: bool = True) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.interval_s, self.enabled = total, desc, interval_s, enabled
        self.done, self.figures = 0, ""
        self.bar = None
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if enabled and self.is_tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", file=self.stream, dynamic_ncols=True,
                            mininterval=1.0)
        self.last_line = time.monotonic()

    def update(self, n: int = 1, **figures: str) -> None:
        """Count `n` steps; `figures` (loss, tok/s, ...) show on the bar or on the next plain line."""
        self.done += n
        if figures:
            self.figures = " ".join(f"{k}={v}" for k, v in figures.items())
        if self.bar is not None:
            self.bar.update(n)
            if figures:
                self.bar.set_postfix_str(self.figures, refresh=False)
        elif self.enabled and time.monotonic() - self.last_line >= self.interval_s:
            self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        print(f"{self.desc}: step {self.done}/{self.total} {self.figures}".rstrip(), file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar, or write the epoch's last plain line."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line()
