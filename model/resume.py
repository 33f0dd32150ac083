"""The training state of a run, written beside its checkpoint so that `--resume RUN_DIR` continues an
interrupted run exactly: weights, optimizer and schedule, where in which epoch it was, the history
so far and the divergence check's memory. Data order and dropout are functions of (seed, epoch,
step), so nothing random needs to be carried beyond that."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from seqserve.model.checkpoint import atomic_save, load_versioned

STATE_FILE = "training_state.pt"
STATE_VERSION = 1


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write the state atomically: a run killed while saving resumes from the previous one."""
    atomic_save({"version": STATE_VERSION, **state}, path)


def load_training_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The state saved in RUN_DIR; a missing or foreign file is a CheckpointError naming it."""
    path = Path(run_dir) / STATE_FILE
    return load_versioned(path, "training state", STATE_VERSION,
                          missing=f"no training state to resume from (is {run_dir} a training run's --out?)")
