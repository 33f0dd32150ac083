"""Threads picked by timing: the faster count wins, and a change in the machine's load is noticed."""

from __future__ import annotations

import pytest

from seqserve.model.threads import ThreadTuner, thread_candidates
from seqserve.runtime import cores


class FakeMachine:
    """A clock and a thread setting: a step of 1,000 tokens takes `cost[threads]` seconds."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.cost, self.now, self.threads, self.history = cost, 0.0, 0, []

    def clock(self) -> float:
        return self.now

    def set_threads(self, n: int) -> None:
        self.threads = n

    def step(self, tuner: ThreadTuner, *, first_at_new_count: float = 0.0) -> None:
        settling = first_at_new_count if self.history and self.history[-1] != self.threads else 0.0
        self.history.append(self.threads)
        self.now += self.cost[self.threads] + settling
        tuner.step_done(1000)


def test_candidates_are_all_cores_and_all_but_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert thread_candidates(1) == [1]
    assert thread_candidates(2) == [1, 2]
    assert thread_candidates(8) == [7, 8]
    # The cores this process may use: a container limited to 2.5 CPUs on a 16-core host tries 2
    # and 3 threads, not 15 and 16 that would wait on each other.
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(cores, "cgroup_quota", lambda: 2.5)
    assert thread_candidates() == [2, 3]


def test_the_faster_count_wins_after_a_trial_of_each() -> None:
    machine = FakeMachine({1: 0.10, 2: 0.06})  # a quiet machine: two threads are faster
    tuner = ThreadTuner([1, 2], clock=machine.clock, set_threads=machine.set_threads)
    for _ in range(20):
        machine.step(tuner, first_at_new_count=1.0)  # the settling step would mislead if it were timed
    assert machine.history[:6] == [1, 1, 1, 2, 2, 2]  # one settling and two timed steps each
    assert set(machine.history[6:]) == {2} and tuner.chosen == 2 and tuner.trials == 1
    assert tuner.rates[1] > tuner.rates[2]


def test_a_loaded_machine_switches_back_to_one_thread_at_the_next_check() -> None:
    machine = FakeMachine({1: 0.10, 2: 0.06})
    tuner = ThreadTuner([1, 2], first_hold_s=5.0, max_hold_s=20.0, clock=machine.clock, set_threads=machine.set_threads)
    while machine.now < 30:
        machine.step(tuner)
    assert tuner.chosen == 2 and tuner.trials >= 2
    assert tuner.hold_s > 5.0  # the same winner again: checked less often
    machine.cost = {1: 0.12, 2: 0.40}  # someone else's work starts: two threads now wait for each other
    switched_at = machine.now
    while tuner.chosen == 2:
        machine.step(tuner)
    assert machine.now - switched_at < 20.0 + 6 * 0.4  # within one hold and one trial
    assert machine.threads == 1 and tuner.hold_s == 5.0  # a new winner: checked soon again
    steps = len(machine.history)
    while machine.now < switched_at + 60:
        machine.step(tuner)
    assert machine.history[steps:].count(2) < 0.2 * (len(machine.history) - steps)  # trials cost little


def test_restart_clock_keeps_a_pause_out_of_the_timing() -> None:
    machine = FakeMachine({1: 0.10, 2: 0.06})
    tuner = ThreadTuner([1, 2], clock=machine.clock, set_threads=machine.set_threads)
    machine.step(tuner)
    machine.step(tuner)
    machine.now += 30.0  # validation between epochs
    tuner.restart_clock()
    for _ in range(10):
        machine.step(tuner)
    assert tuner.chosen == 2 and tuner.rates[1] < 0.001
