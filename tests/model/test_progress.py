"""Progress on stderr: whole plain lines when it is not a terminal (log files, CI)."""

from __future__ import annotations

import io

from seqserve.model.progress import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_without_carriage_returns_when_not_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(5, "epoch 1/2", stream=out, interval_s=0.0)
    for i in range(5):
        progress.update(1, loss=f"{1 / (i + 1):.3f}")
    progress.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[-1] == "epoch 1/2: step 5/5 loss=0.200" and len(lines) == 6


def test_a_bar_on_a_terminal() -> None:
    out = _Tty()
    progress = Progress(3, "epoch 1/1", stream=out)
    progress.update(3, loss="0.5")
    progress.close()
    assert "\r" in out.getvalue()
