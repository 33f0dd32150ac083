"""Worker processes sharing each batch on a CPU (`--workers`): the same training as one process,
and no run left hanging or orphaned when a process of it dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqserve.model.checkpoint import load_checkpoint
from seqserve.model.train import main
from seqserve.runtime.cores import available_cores

sys.path.insert(0, str(Path(__file__).parent))  # the tests are not a package (--import-mode=importlib)
from user_corpora import write_corpus  # noqa: E402

# Tiny model in fp32 without dropout, 2 epochs of 27 steps, the state saved every 3 steps.
FLAGS = ["--preset", "tiny", "--epochs", "2", "--max-tokens", "300", "--save-every", "3", "--seed", "5",
         "--precision", "fp32", "--device", "cpu", "--threads", "1", "--vocab-size", "120"]
KILL_AT_STEP = 39  # mid-way through epoch 2, just after a save

# A run of `seqserve train` that, right after the training state of step {step} is saved, writes
# its workers' pids to {pids} and then SIGKILLs {victim} ("trainer" or "worker").
_SCRIPT = """
import multiprocessing, os, signal, sys
import seqserve.model.train as t
from seqserve.server.cli import main
save = t.save_training_state
def save_then_kill(path, state):
    save(path, state)
    if state["step"] == {step}:
        pids = [p.pid for p in multiprocessing.active_children()]
        open({pids!r}, "w").write(" ".join(map(str, pids)))
        os.kill(os.getpid() if {victim!r} == "trainer" else pids[0], signal.SIGKILL)
t.save_training_state = save_then_kill
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    train_tsv, valid_tsv = write_corpus("numbers", 400, tmp_path_factory.mktemp("corpus"), n_valid=40)
    return ["--data", str(train_tsv), "--valid", str(valid_tsv)]


@pytest.fixture(scope="module")
def two(data: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two")
    assert main([*data, "--out", str(out), "--workers", "2", *FLAGS]) == 0
    return out


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)


def _wait_gone(pids: list[int], timeout_s: float = 30.0) -> list[int]:
    """The pids still alive after waiting up to `timeout_s` for all of them to end."""
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def test_two_processes_train_like_one_on_the_same_batches(data: list[str], two: Path, tmp_path: Path) -> None:
    assert main([*data, "--out", str(tmp_path / "one"), "--workers", "1", *FLAGS]) == 0
    a, b = _metrics(two), _metrics(tmp_path / "one")
    assert all(v["processes"] == 2 and v["threads"] == 1 for v in a["history"])
    assert all(v["processes"] == 1 for v in b["history"])
    # The same batches and steps: each process trains half the rows of a batch, and the sum of the
    # halves' gradients is the whole batch's, up to the order of floating-point sums.
    assert [s for s, _ in a["train_loss"]] == [s for s, _ in b["train_loss"]] and len(a["train_loss"]) >= 4
    for (_, x), (_, y) in zip(a["train_loss"], b["train_loss"]):
        assert x == pytest.approx(y, rel=1e-4)
    for x, y in zip(a["history"], b["history"]):
        assert x["valid_loss"] == pytest.approx(y["valid_loss"], rel=1e-4)
    # Only the trainer writes: the same outputs as one process.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_sigkilled_trainer_takes_its_worker_with_it_and_the_run_resumes_exactly(
        data: list[str], two: Path, tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    script = _SCRIPT.format(step=KILL_AT_STEP, pids=str(pids_file), victim="trainer")
    killed = _run(script, [*data, "--out", str(tmp_path / "cut"), "--workers", "2", *FLAGS])
    assert killed.returncode == -9, killed.stderr
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 1
    assert _wait_gone(pids) == []  # no orphan left training or waiting

    assert main(["--resume", str(tmp_path / "cut")]) == 0
    whole, cut = _metrics(two), _metrics(tmp_path / "cut")
    for m in (whole, cut):
        for v in m["history"]:  # timings differ between any two runs
            v.pop("elapsed_s"), v.pop("target_tokens_per_s")
    assert cut["history"] == whole["history"] and cut["train_loss"] == whole["train_loss"]
    a, b = load_checkpoint(two / "checkpoint.pt"), load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for key, value in a.state_dict.items():
        assert torch.equal(value, b.state_dict[key]), key


def test_a_worker_killed_mid_run_stops_the_run_with_a_clear_error(data: list[str], tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    script = _SCRIPT.format(step=6, pids=str(pids_file), victim="worker")
    run = _run(script, [*data, "--out", str(tmp_path / "run"), "--workers", "2", *FLAGS])
    assert run.returncode == 1, run.stderr
    assert "training worker 1 was killed by SIGKILL" in run.stderr and "--resume" in run.stderr
    assert "Traceback" not in run.stderr
    # The state saved before the kill is there to resume from.
    assert (tmp_path / "run" / "training_state.pt").exists()
    assert _wait_gone([int(p) for p in pids_file.read_text().split()]) == []


def test_workers_follow_the_trainer_without_fused_kernels(data: list[str], tmp_path: Path) -> None:
    # Without a compiler the trainer says so once; its workers do not try a build of their own
    # (each would have printed the same line, and a failing build costs seconds in a timed step).
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "SEQSERVE_KERNEL_CACHE": str(tmp_path / "cache")}
    flags = [*data, "--out", str(tmp_path / "run"), "--workers", "2", *FLAGS, "--epochs", "1"]
    run = subprocess.run([sys.executable, "-m", "seqserve.server.cli", "train", *flags], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("no fused CPU kernels") == 1, run.stderr
    assert all(v["processes"] == 2 for v in _metrics(tmp_path / "run")["history"])


def test_workers_are_for_a_cpu_and_at_least_one(data: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from seqserve.server.cli import main as seqserve

    assert seqserve(["train", *data, "--out", str(tmp_path / "x"), "--workers", "0", *FLAGS]) == 1
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_without_room_in_dev_shm_workers_are_left_out_or_refused(data: list[str], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    import seqserve.model.train as train_module
    from seqserve.server.cli import main as seqserve

    monkeypatch.setattr(train_module, "shm_room", lambda nbytes: False)  # a container's small /dev/shm
    monkeypatch.setattr(train_module, "available_cores", lambda: 2)  # workers worth it (the machine may have 1)
    flags = ["--preset", "tiny", "--epochs", "1", "--max-tokens", "2048", "--precision", "fp32", "--device", "cpu",
             "--vocab-size", "120"]
    assert seqserve(["train", *data, "--out", str(tmp_path / "asked"), "--workers", "2", *flags]) == 1
    assert "/dev/shm" in capsys.readouterr().err
    # Left to the trainer, the layouts timed are one process's only.
    with caplog.at_level("INFO", logger="seqserve.model.train"):
        assert main([*data, "--out", str(tmp_path / "auto"), *flags]) == 0
    assert "one training process: /dev/shm has less than" in caplog.text
    assert all(v["processes"] == 1 for v in _metrics(tmp_path / "auto")["history"])


@pytest.mark.skipif(available_cores() < 2, reason="the default starts workers only with 2 cores or more")
def test_workers_that_cannot_start_leave_training_to_one_process_or_say_why(data: list[str], tmp_path: Path) -> None:
    # A script read from stdin cannot be imported again by the workers (spawned interpreters
    # import the script that started training), as with a script that trains at its top level.
    def run_from_stdin(args: list[str]) -> subprocess.CompletedProcess:
        script = f"import sys\nfrom seqserve.server.cli import main\nsys.exit(main({['train', *args]!r}))\n"
        return subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300)

    flags = ["--preset", "tiny", "--epochs", "1", "--max-tokens", "2048", "--precision", "fp32", "--device", "cpu",
             "--vocab-size", "120"]
    auto = run_from_stdin([*data, "--out", str(tmp_path / "auto"), *flags])
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert "training worker 1 exited with status 1 before it was ready" in auto.stderr
    assert "training in one process" in auto.stderr
    assert all(v["processes"] == 1 for v in _metrics(tmp_path / "auto")["history"])
    asked = run_from_stdin([*data, "--out", str(tmp_path / "asked"), "--workers", "2", *flags])
    assert asked.returncode == 1
    assert 'under `if __name__ == "__main__":`' in asked.stderr
    assert not (tmp_path / "asked" / "metrics.json").exists()
