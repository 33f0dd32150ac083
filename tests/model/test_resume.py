"""Resume: a run killed with SIGKILL mid-epoch and resumed ends exactly where an uninterrupted run
of the same length ends; --average-last saves and reports the averaged weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqserve.model.averaging import average_state_dicts
from seqserve.model.checkpoint import load_checkpoint
from seqserve.model.resume import load_training_state
from seqserve.model.train import TrainOptions, main, resume, train
from seqserve.runtime.errors import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))  # the tests are not a package (--import-mode=importlib)
from user_corpora import write_corpus  # noqa: E402

# Tiny model, 2 epochs of 27 steps each, the training state saved every 3 steps.
FLAGS = ["--preset", "tiny", "--epochs", "2", "--max-tokens", "300", "--save-every", "3", "--seed", "5",
         "--precision", "fp32", "--device", "cpu", "--threads", "1", "--vocab-size", "120", "--average-last", "2"]
KILL_AT_STEP = 39  # mid-way through epoch 2 (27 steps an epoch), just after a save

# The run is killed by SIGKILL from inside, right after the training state of KILL_AT_STEP is on disk.
_KILLED_RUN = """
import os, signal, sys
import seqserve.model.train as t
save = t.save_training_state
def save_then_die(path, state):
    save(path, state)
    if state["step"] == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
t.save_training_state = save_then_die
t.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_corpus("numbers", 400, tmp_path_factory.mktemp("corpus"), n_valid=40)


def _metrics(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    for v in m["history"]:  # timings differ between any two runs
        for key in ("elapsed_s", "target_tokens_per_s"):
            v.pop(key)
    return m


def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(corpus: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    train_tsv, valid_tsv = corpus
    data = ["--data", str(train_tsv), "--valid", str(valid_tsv)]
    assert main([*data, "--out", str(tmp_path / "whole"), *FLAGS]) == 0

    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN.format(step=KILL_AT_STEP), *data,
                             "--out", str(tmp_path / "cut"), *FLAGS], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    state = load_training_state(tmp_path / "cut")
    assert state["step"] == KILL_AT_STEP and state["next_epoch"] == 2 and state["next_batch"] > 0
    assert not (tmp_path / "cut" / "metrics.json").exists()

    assert main(["--resume", str(tmp_path / "cut")]) == 0
    whole, cut = _metrics(tmp_path / "whole"), _metrics(tmp_path / "cut")
    assert cut["history"] == whole["history"] and cut["best"]["epoch"] == whole["best"]["epoch"]
    assert cut["train_loss"] == whole["train_loss"] and cut["averaged"] == whole["averaged"]
    a, b = load_checkpoint(tmp_path / "whole" / "checkpoint.pt"), load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for key, value in a.state_dict.items():
        assert torch.equal(value, b.state_dict[key]), key

    # Averaging: averaged.pt is the mean of the last two epochs' weights, reported beside the best.
    assert whole["averaged"]["epochs"] == [1, 2]
    averaged = load_checkpoint(tmp_path / "whole" / "averaged.pt")
    assert averaged.metrics["exact_match"] == whole["averaged"]["exact_match"]
    epochs = [torch.load(tmp_path / "whole" / "epochs" / f"epoch-{e}.pt", weights_only=True) for e in (1, 2)]
    for key, value in average_state_dicts(epochs).items():
        assert torch.allclose(averaged.state_dict[key], value), key
    # A finished run has nothing left to resume.
    with pytest.raises(Exception, match="already finished"):
        resume(tmp_path / "whole")


def test_average_state_dicts_is_the_elementwise_mean() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(4)}
    avg = average_state_dicts([a, b])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and int(avg["n"]) == 4


def test_resume_without_a_state_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no training state"):
        resume(tmp_path)


def test_divergence_stops_the_run_with_advice(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    train_tsv, valid_tsv = corpus
    with pytest.raises(Exception, match="diverged.*--lr-scale"):
        train(None, str(train_tsv), str(valid_tsv), TrainOptions(
            out=tmp_path / "run", preset="tiny", epochs=30, max_tokens=300, lr_scale=1e4, clip_norm=0,
            device="cpu", vocab_size=120, precision="fp32"))
