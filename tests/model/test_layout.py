"""The CPU layout (processes x threads) picked by timing: the faster wins, and a change in the
machine's load is noticed."""

from __future__ import annotations

import pytest

from seqserve.model.layout import Layout, LayoutTuner, layout_candidates
from seqserve.runtime import cores


ONE, TWO, PROCS = Layout(1, 1), Layout(1, 2), Layout(2, 1)


class FakeMachine:
    """A clock and a layout setting: a step of 1,000 tokens takes `cost[layout]` seconds."""

    def __init__(self, cost: dict[Layout, float]) -> None:
        self.cost, self.now, self.layout, self.history = cost, 0.0, None, []

    def clock(self) -> float:
        return self.now

    def apply(self, layout: Layout) -> None:
        self.layout = layout

    def step(self, tuner: LayoutTuner, *, first_in_new_layout: float = 0.0) -> None:
        settling = first_in_new_layout if self.history and self.history[-1] != self.layout else 0.0
        self.history.append(self.layout)
        self.now += self.cost[self.layout] + settling
        tuner.step_done(1000)


def test_candidates_are_one_process_on_all_cores_or_all_but_one_and_one_process_per_core(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert layout_candidates(1) == [ONE]
    assert layout_candidates(1, max_processes=4) == [ONE]
    assert layout_candidates(2) == [ONE, TWO]
    # a process per core: one process threading over all of them is not tried
    assert layout_candidates(2, max_processes=2) == [ONE, PROCS]
    assert layout_candidates(8) == [Layout(1, 7), Layout(1, 8)]
    assert layout_candidates(8, max_processes=2) == [Layout(1, 7), Layout(1, 8), Layout(2, 4)]
    assert layout_candidates(8, max_processes=16) == [Layout(1, 7), Layout(8, 1)]
    assert str(PROCS) == "2x1"
    # The cores this process may use: a container limited to 2.5 CPUs on a 16-core host tries 2
    # and 3 threads, not 15 and 16 that would wait on each other.
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(cores, "cgroup_quota", lambda: 2.5)
    assert layout_candidates() == [Layout(1, 2), Layout(1, 3)]
    assert layout_candidates(max_processes=8) == [Layout(1, 2), Layout(3, 1)]


def test_the_fastest_layout_wins_after_a_trial_of_each() -> None:
    machine = FakeMachine({ONE: 0.10, TWO: 0.07, PROCS: 0.06})  # a quiet machine: two processes are fastest
    tuner = LayoutTuner([ONE, TWO, PROCS], machine.apply, clock=machine.clock)
    for _ in range(30):
        machine.step(tuner, first_in_new_layout=1.0)  # the settling step would mislead if it were timed
    # The layout using the most cores first, where both processes warm up (4 untimed steps); then
    # one settling step in each of the others, and 3 timed steps in each.
    assert machine.history[:15] == [PROCS] * 7 + [TWO] * 4 + [ONE] * 4
    assert set(machine.history[15:]) == {PROCS} and tuner.chosen == PROCS and tuner.trials == 1
    assert tuner.rates[ONE] > tuner.rates[TWO] > tuner.rates[PROCS]


def test_short_steps_are_timed_for_a_minimum_time() -> None:
    machine = FakeMachine({ONE: 0.02, TWO: 0.011})  # a small corpus: steps of a few hundred tokens
    tuner = LayoutTuner([ONE, TWO], machine.apply, clock=machine.clock)
    while tuner.trials < 1:
        machine.step(tuner)
    # untimed steps (4 for the first process to train, then 1), then steps until 0.15 s are
    # timed: 14 of 11 ms, 8 of 20 ms
    assert machine.history == [TWO] * (4 + 14) + [ONE] * (1 + 8)
    assert tuner.chosen == TWO
    machine = FakeMachine({ONE: 0.001, TWO: 0.0005})  # but never more than 20 timed steps
    tuner = LayoutTuner([ONE, TWO], machine.apply, clock=machine.clock)
    while tuner.trials < 1:
        machine.step(tuner)
    assert machine.history == [TWO] * (4 + 20) + [ONE] * (1 + 20)


def test_a_loaded_machine_switches_back_to_one_core_at_the_next_check() -> None:
    machine = FakeMachine({ONE: 0.10, TWO: 0.07, PROCS: 0.06})
    tuner = LayoutTuner([ONE, TWO, PROCS], machine.apply, first_hold_s=5.0, max_hold_s=20.0, clock=machine.clock)
    while machine.now < 30:
        machine.step(tuner)
    assert tuner.chosen == PROCS and tuner.trials >= 2
    assert tuner.hold_s > 5.0  # the same winner again: checked less often
    # Someone else's work starts: two threads now wait for each other, two processes for the slower.
    machine.cost = {ONE: 0.12, TWO: 0.40, PROCS: 0.25}
    switched_at = machine.now
    while tuner.chosen == PROCS:
        machine.step(tuner)
    assert machine.now - switched_at < 20.0 + 4 * (0.12 + 0.40 + 0.25)  # within one hold and one trial
    assert machine.layout == ONE and tuner.hold_s == 5.0  # a new winner: checked soon again
    steps = len(machine.history)
    while machine.now < switched_at + 60:
        machine.step(tuner)
    assert machine.history[steps:].count(ONE) > 0.7 * (len(machine.history) - steps)  # trials cost little


def test_restart_clock_keeps_a_pause_out_of_the_timing() -> None:
    machine = FakeMachine({ONE: 0.10, TWO: 0.06})
    tuner = LayoutTuner([ONE, TWO], machine.apply, clock=machine.clock)
    machine.step(tuner)
    machine.step(tuner)
    machine.now += 30.0  # validation between epochs
    tuner.restart_clock()
    for _ in range(10):
        machine.step(tuner)
    assert tuner.chosen == TWO and tuner.rates[ONE] < 0.001


def test_a_layout_barely_faster_does_not_displace_the_one_in_use() -> None:
    machine = FakeMachine({ONE: 0.10, TWO: 0.07, PROCS: 0.06})
    tuner = LayoutTuner([ONE, TWO, PROCS], machine.apply, first_hold_s=5.0, max_hold_s=80.0, clock=machine.clock)
    while tuner.trials < 1:
        machine.step(tuner)
    assert tuner.chosen == PROCS
    machine.cost = {ONE: 0.10, TWO: 0.059, PROCS: 0.06}  # within the noise of a step: keep what runs
    while tuner.trials < 3:
        machine.step(tuner)
    assert tuner.chosen == PROCS and tuner.hold_s == 20.0  # kept twice: held twice as long each time
    machine.cost = {ONE: 0.10, TWO: 0.05, PROCS: 0.06}  # clearly faster now
    while tuner.trials < 4:
        machine.step(tuner)
    assert tuner.chosen == TWO and tuner.hold_s == 5.0
