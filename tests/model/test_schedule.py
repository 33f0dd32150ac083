"""The divergence check: NaN and a sustained rise stop the run with advice; noise does not."""

from __future__ import annotations

import math
import random

import pytest

from seqserve.model.schedule import DivergenceCheck, TrainingDiverged


def test_non_finite_loss_stops_at_once() -> None:
    check = DivergenceCheck()
    check.update(1, 3.0)
    with pytest.raises(TrainingDiverged, match=r"step 2.*--lr-scale"):
        check.update(2, math.nan)


def test_noisy_falling_loss_with_spikes_is_not_divergence() -> None:
    check, rng = DivergenceCheck(), random.Random(0)
    for step in range(1, 2000):
        loss = 5 * math.exp(-step / 300) + 1 + rng.random() * 0.3 + (6 if step % 97 == 0 else 0)
        check.update(step, loss)


def test_a_sustained_rise_to_twice_the_lowest_stops() -> None:
    check = DivergenceCheck()
    for step in range(1, 200):
        check.update(step, 1.0)
    with pytest.raises(TrainingDiverged, match="2x its lowest"):
        for step in range(200, 400):
            check.update(step, 3.0)


def test_state_round_trips() -> None:
    a = DivergenceCheck()
    for step in range(1, 80):
        a.update(step, 1.0)
    b = DivergenceCheck()
    b.load_state_dict(a.state_dict())
    assert list(b.recent) == list(a.recent) and b.lowest == a.lowest
