"""torchrun with 2 CPU processes (gloo): the same loss curve as one process with twice the batch.

Every rank builds the same global batches (max_tokens x world size) and trains on its half of
each; the loss is divided by the global batch's token count, so the two processes' step is the
one process's step on the whole batch. What differs is only the order of floating-point sums
(each rank's gradient, then the all-reduce), so the curves agree to 1e-4 relative, not bitwise.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from seqserve.model.train import main

sys.path.insert(0, str(Path(__file__).parent))  # the tests are not a package (--import-mode=importlib)
from user_corpora import write_corpus  # noqa: E402

FLAGS = ["--preset", "tiny", "--epochs", "2", "--seed", "2", "--precision", "fp32", "--device", "cpu",
         "--threads", "1", "--vocab-size", "120"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_follow_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    train_tsv, valid_tsv = write_corpus("numbers", 400, tmp_path / "corpus", n_valid=40)
    data = ["--data", str(train_tsv), "--valid", str(valid_tsv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(_free_port()), "-m", "seqserve.model.train", *data,
                          "--out", str(tmp_path / "ddp"), "--max-tokens", "150", *FLAGS],
                         capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert main([*data, "--out", str(tmp_path / "one"), "--max-tokens", "300", *FLAGS]) == 0
    two = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [s for s, _ in two["train_loss"]] == [s for s, _ in one["train_loss"]] and len(one["train_loss"]) >= 4
    for (_, a), (_, b) in zip(two["train_loss"], one["train_loss"]):
        assert a == pytest.approx(b, rel=1e-4)
    for a, b in zip(two["history"], one["history"]):
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-4)
    # Only rank 0 wrote: one set of outputs, no stray files from rank 1.
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
