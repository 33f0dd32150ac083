"""How training uses a CPU's cores, picked by timing the steps themselves: how many processes
(the trainer and its workers, workers.py) and how many torch threads each.

On a quiet 2-core machine two threads trained the demo model 1.4-1.8x as fast as one, and two
processes of one thread each 1.5-2x; with anything else running, two threads waited at every
parallel region for the one that had lost its core, and a step took up to 4x as long as with one
thread. No fixed layout suits every machine and moment, and a shared machine changes from one to
another within a run. So the trainer times a few steps in each candidate layout, keeps the fastest
per target token, and checks again after a while: after 15 s of training, then after twice as
long each time the same layout wins again (at most 2 minutes), and after 15 s again when the
winner changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from seqserve.runtime.cores import available_cores

log = logging.getLogger(__name__)

FIRST_HOLD_S = 15.0
MAX_HOLD_S = 120.0
MARGIN = 0.05  # a challenger must be this much faster per token to replace the layout in use
# A layout's timed steps last at least this long (up to MAX_TRIAL_STEPS steps): three steps of a
# small corpus's 475-token batches took 75 ms in all, and such trials picked one thread over two
# for 5 epochs of 31 in a run that trained 30% slower in them.
MIN_TRIAL_S = 0.15
MAX_TRIAL_STEPS = 20


class Layout(NamedTuple):
    """Processes training shares of each batch, and torch threads in each."""

    processes: int
    threads: int

    def __str__(self) -> str:
        return f"{self.processes}x{self.threads}"


def layout_candidates(cores: int | None = None, *, max_processes: int = 1) -> list[Layout]:
    """Layouts worth timing: one process with all cores' threads and with all but one, and (when
    `max_processes` allows) one process per core, up to `max_processes`, sharing the cores'
    threads. Where that gives every core a process of its own, one process threading over all of
    them is left out: on 2 cores two processes of one thread trained the demo model 10% faster
    (median of 4 interleaved rounds, 3 of them won), lost 4x less with another program on a core,
    and the two were close enough that a few timed steps picked the slower one in 2 rounds of 16.
    The cores are those this process may use (affinity and cgroup quota: a container's CPU
    limit). On 2 cores: 1x1 and 2x1, or 1x1 and 1x2 with one process."""
    cores = cores or available_cores()
    layouts = {Layout(1, max(1, cores - 1)), Layout(1, cores)}
    processes = min(cores, max_processes)
    if processes > 1:
        layouts.add(Layout(processes, cores // processes))
    if processes == cores > 1:
        layouts.discard(Layout(1, cores))
    return sorted(layouts)


class LayoutTuner:
    """Times `trial_steps` steps in each candidate layout, more where they take less than
    MIN_TRIAL_S in all (after one step to settle in, or `warmup_steps` where processes train for
    the first time), then trains in the fastest until the
    next trial. Call `step_done(tokens)` after every step; it applies the layout of the next one
    (`apply(layout)`), and `restart_clock()` after a pause.

    A process's first steps are slow (its allocator and oneDNN's kernels for each new shape warm
    up): a worker's second and third steps took up to 1.5x its later ones, and a trial that timed
    them picked one process over two that trained faster. So trials run the layouts that use the
    most cores first, where every process warms up at once.

    Steps vary by 10-20% from one to the next on a busy host, so two layouts within `MARGIN` of
    each other would take turns winning, and each change restarts the short hold; the layout in
    use stays unless another beats it by more than `MARGIN`."""

    def __init__(self, candidates: list[Layout], apply: Callable[[Layout], None], *, trial_steps: int = 3,
                 warmup_steps: int = 4, first_hold_s: float = FIRST_HOLD_S, max_hold_s: float = MAX_HOLD_S,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.candidates = sorted(candidates, key=lambda c: (-c.processes * c.threads, -c.processes))
        self.trial_steps, self.warmup_steps = trial_steps, warmup_steps
        self._warm = 0  # processes that have trained steps (the trainer's and its first workers)
        self._settle = 1
        self.first_hold_s, self.max_hold_s = first_hold_s, max_hold_s
        self.clock, self.apply = clock, apply
        self.hold_s = first_hold_s
        self.chosen: Layout | None = None
        self.rates: dict[Layout, float] = {}  # seconds per target token in each layout, in the last trial
        self.trials = 0  # trials finished so far
        self._queue: list[Layout] = []
        self._seconds = self._tokens = 0.0
        self._steps = 0
        self._hold_until = 0.0
        self._last = clock()
        self._start_trial()

    def restart_clock(self) -> None:
        """Start timing the next step from now (after validation, or anything else between steps)."""
        self._last = self.clock()

    @property
    def layout(self) -> Layout:
        """The layout the next step runs in."""
        return self._queue[0] if self._queue else self.chosen  # type: ignore[return-value]

    def _start_trial(self) -> None:
        self._queue = list(self.candidates)
        self._begin(self._queue[0])

    def _begin(self, layout: Layout) -> None:
        self._steps, self._seconds, self._tokens = 0, 0.0, 0.0
        self._settle = self.warmup_steps if layout.processes > self._warm else 1
        self._warm = max(self._warm, layout.processes)
        self.apply(layout)

    def step_done(self, tokens: int) -> None:
        """Record a finished step of `tokens` target tokens and apply the layout of the next one."""
        now = self.clock()
        seconds, self._last = now - self._last, now
        if not self._queue:  # training in the chosen layout
            if now >= self._hold_until and len(self.candidates) > 1:
                self._start_trial()
            return
        self._steps += 1
        if self._steps > self._settle:  # the first step in a new layout settles its thread pool in
            self._seconds += seconds
            self._tokens += tokens
        timed = self._steps - self._settle
        if timed < self.trial_steps or (self._seconds < MIN_TRIAL_S and timed < MAX_TRIAL_STEPS):
            return
        self.rates[self._queue.pop(0)] = self._seconds / max(self._tokens, 1.0)
        if self._queue:
            self._begin(self._queue[0])
            return
        best = min(self.rates, key=self.rates.__getitem__)
        if self.chosen is not None and self.rates[self.chosen] <= (1 + MARGIN) * self.rates[best]:
            best = self.chosen
        log.debug("layouts timed (µs per target token): %s; training in %s",
                  ", ".join(f"{k} {1e6 * v:.1f}" for k, v in self.rates.items()), best)
        self.hold_s = min(2 * self.hold_s, self.max_hold_s) if best == self.chosen else self.first_hold_s
        self.chosen, self.trials = best, self.trials + 1
        self._hold_until = now + self.hold_s
        self.apply(best)
