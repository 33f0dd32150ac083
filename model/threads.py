"""CPU threads for training, picked by timing the steps themselves.

On a quiet 2-core machine two threads trained the demo model about 1.5x as fast as one; with
anything else running, two threads waited at every parallel region for the one that had lost
its core, and a step took up to 4x as long as with one thread. No fixed count suits both, and
a shared machine changes from one to the other within a run. So the trainer times a few steps
at each candidate count, keeps the fastest per target token, and checks again after a while:
after 15 s of training, then after twice as long each time the same count wins again (at most
2 minutes), and after 15 s again when the winner changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from seqserve.runtime.cores import available_cores

FIRST_HOLD_S = 15.0
MAX_HOLD_S = 120.0


def thread_candidates(cores: int | None = None) -> list[int]:
    """Thread counts worth timing: all cores, and all but one (1 and 2 on a 2-core machine); the
    cores are those this process may use (affinity and cgroup quota: a container's CPU limit)."""
    cores = cores or available_cores()
    return sorted({max(1, cores - 1), cores})


class ThreadTuner:
    """Times `trial_steps` steps at each candidate thread count (after one step to settle in),
    then trains at the fastest until the next trial. Call `step_done(tokens)` after every step;
    it sets torch's thread count for the next one, and `restart_clock()` after a pause."""

    def __init__(self, candidates: list[int], *, trial_steps: int = 2, first_hold_s: float = FIRST_HOLD_S,
                 max_hold_s: float = MAX_HOLD_S, clock: Callable[[], float] = time.perf_counter,
                 set_threads: Callable[[int], None] = torch.set_num_threads) -> None:
        self.candidates, self.trial_steps = list(candidates), trial_steps
        self.first_hold_s, self.max_hold_s = first_hold_s, max_hold_s
        self.clock, self.set_threads = clock, set_threads
        self.hold_s = first_hold_s
        self.chosen: int | None = None
        self.rates: dict[int, float] = {}  # seconds per target token at each count, in the last trial
        self.trials = 0  # trials finished so far
        self._queue: list[int] = []
        self._seconds = self._tokens = 0.0
        self._steps = 0
        self._hold_until = 0.0
        self._last = clock()
        self._start_trial()

    def restart_clock(self) -> None:
        """Start timing the next step from now (after validation, or anything else between steps)."""
        self._last = self.clock()

    @property
    def threads(self) -> int:
        """The thread count the next step runs with."""
        return self._queue[0] if self._queue else self.chosen  # type: ignore[return-value]

    def _start_trial(self) -> None:
        self._queue = list(self.candidates)
        self._begin(self._queue[0])

    def _begin(self, threads: int) -> None:
        self._steps, self._seconds, self._tokens = 0, 0.0, 0.0
        self.set_threads(threads)

    def step_done(self, tokens: int) -> None:
        """Record a finished step of `tokens` target tokens and set the threads for the next one."""
        now = self.clock()
        seconds, self._last = now - self._last, now
        if not self._queue:  # training at the chosen count
            if now >= self._hold_until and len(self.candidates) > 1:
                self._start_trial()
            return
        self._steps += 1
        if self._steps > 1:  # the first step at a new count settles the thread pool in; not timed
            self._seconds += seconds
            self._tokens += tokens
        if self._steps <= self.trial_steps:
            return
        self.rates[self._queue.pop(0)] = self._seconds / max(self._tokens, 1.0)
        if self._queue:
            self._begin(self._queue[0])
            return
        best = min(self.rates, key=self.rates.__getitem__)
        self.hold_s = min(2 * self.hold_s, self.max_hold_s) if best == self.chosen else self.first_hold_s
        self.chosen, self.trials = best, self.trials + 1
        self._hold_until = now + self.hold_s
        self.set_threads(best)
