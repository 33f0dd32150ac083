"""The learning-rate schedule and the divergence check: defaults that suit a small corpus without flags.

The paper (section 5.3) warms up linearly for 4,000 steps to d_model^-0.5 * 4000^-0.5 and then
decays with the inverse square root of the step. Its peak depends on the warm-up length, so the
same formula with a short warm-up (a small corpus) peaks far higher than the paper ever trained
at: 4.4e-3 for d_model 128 with 400 steps, which made small corpora spike and stall. Here the peak
is the paper's for the model's width (as if the warm-up were its 4,000 steps), and the warm-up is
scaled to the run: 5% of the planned steps, between 50 and 4,000. With 4,000 warm-up steps this
is exactly the paper's schedule.
"""

from __future__ import annotations

import math
from collections import deque

from seqserve.runtime.errors import SeqserveError

PAPER_WARMUP = 4000


def noam_lr(step: int, d_model: int, warmup: int, scale: float = 1.0) -> float:
    """The paper's schedule: linear warm-up, then decay with the inverse square root of the step."""
    step = max(step, 1)
    return scale * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def peak_lr(d_model: int, scale: float = 1.0) -> float:
    """The paper's peak learning rate for this width: d_model^-0.5 * 4000^-0.5, times `scale`."""
    return scale * d_model ** -0.5 * PAPER_WARMUP ** -0.5


def auto_warmup(planned_steps: int) -> int:
    """Warm-up steps for a run of `planned_steps`: 5% of it, at least 50, at most the paper's 4,000."""
    return int(min(PAPER_WARMUP, max(50, round(0.05 * planned_steps))))


MIN_STEPS = 2000  # default run length in updates: a small corpus gets more epochs, not fewer steps


def auto_epochs(steps_per_epoch: int) -> int:
    """Epochs for a run of at least MIN_STEPS updates: 10 for a large corpus, more (up to 200) for a small one."""
    return int(min(200, max(10, -(-MIN_STEPS // max(1, steps_per_epoch)))))


def scheduled_lr(step: int, d_model: int, warmup: int, scale: float = 1.0) -> float:
    """Learning rate at `step` (from 1): linear warm-up to `peak_lr`, then peak * sqrt(warmup / step)."""
    step = max(step, 1)
    return peak_lr(d_model, scale) * min(step / warmup, math.sqrt(warmup / step))


class TrainingDiverged(SeqserveError):
    """The training loss became non-finite or rose far above its best: the run cannot recover."""


class DivergenceCheck:
    """Stops a run whose loss is NaN/inf, or whose smoothed loss rises to `factor` times its lowest.

    Smoothing over `window` steps ignores the single spikes that clipping absorbs; a sustained
    doubling of the loss after it had fallen means the run has left the basin it was learning in.
    """

    def __init__(self, *, window: int = 50, factor: float = 2.0) -> None:
        self.window, self.factor = window, factor
        self.recent: deque[float] = deque(maxlen=window)
        self.lowest = math.inf

    def update(self, step: int, loss: float) -> None:
        """Record one step's loss; raises TrainingDiverged with advice when the run has diverged."""
        advice = "lower the learning rate with --lr-scale 0.5 (or less), or lengthen the warm-up with --warmup"
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training diverged at step {step}: the loss is {loss}; {advice}")
        self.recent.append(loss)
        if len(self.recent) < self.window:
            return
        smoothed = sum(self.recent) / len(self.recent)
        self.lowest = min(self.lowest, smoothed)
        if smoothed > self.factor * self.lowest:
            raise TrainingDiverged(f"training diverged at step {step}: the loss averaged {smoothed:.3f} over the "
                                   f"last {self.window} steps, more than {self.factor:g}x its lowest "
                                   f"({self.lowest:.3f}); {advice}")

    def state_dict(self) -> dict:
        """What a resumed run needs to keep checking where this one left off."""
        return {"recent": list(self.recent), "lowest": self.lowest}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s output."""
        self.recent.extend(state["recent"])
        self.lowest = state["lowest"]
