"""Training: schedule, outputs written, reproducibility, TSV corpora, and user mistakes reported."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from seqserve.model import kernels, training_pass
from seqserve.model.checkpoint import load_checkpoint
from seqserve.model.schedule import auto_epochs, auto_warmup, noam_lr, peak_lr, scheduled_lr
from seqserve.model.layout import Layout, layout_candidates
from seqserve.model.train import TrainOptions, train
from seqserve.server.cli import main as seqserve


def test_noam_schedule_warms_up_then_decays() -> None:
    lrs = [noam_lr(s, 512, 4000) for s in (1, 2000, 4000, 8000, 16000)]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[2] > lrs[3] > lrs[4]
    assert lrs[2] == pytest.approx(512 ** -0.5 * 4000 ** -0.5)


def test_schedule_is_the_papers_at_its_warmup_and_keeps_its_peak_for_short_warmups() -> None:
    for step in (1, 100, 4000, 9000):
        assert scheduled_lr(step, 512, 4000) == pytest.approx(noam_lr(step, 512, 4000))
    # A short warm-up (a small corpus) reaches the same peak as the paper's, not a higher one.
    assert max(scheduled_lr(s, 128, 60) for s in range(1, 500)) == pytest.approx(peak_lr(128))
    assert max(noam_lr(s, 128, 60) for s in range(1, 500)) > 8 * peak_lr(128)
    assert scheduled_lr(240, 128, 60) == pytest.approx(peak_lr(128) / 2)  # inverse square root after it
    assert [auto_warmup(n) for n in (10, 2000, 40_000, 10 ** 6)] == [50, 100, 2000, 4000]
    # At least 2000 updates: a small corpus gets more epochs, a large one the usual 10.
    assert [auto_epochs(n) for n in (5, 64, 200, 5000)] == [200, 32, 10, 10]


def test_training_writes_checkpoint_metrics_plot_and_tokenizer(trained_dir: Path) -> None:
    for name in ("checkpoint.pt", "tokenizer.json", "metrics.json", "learning_curve.png"):
        assert (trained_dir / name).stat().st_size > 0, name
    assert (trained_dir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((trained_dir / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert {"exact_match", "bleu", "chrf", "valid_loss"} <= set(metrics["best"])
    assert metrics["fused_kernels"] is (kernels.load() is not None)  # which ran: kernels or PyTorch operations
    ckpt = load_checkpoint(trained_dir / "checkpoint.pt")
    assert len(ckpt.validation) == 200
    assert ckpt.metrics["exact_match"] == metrics["best"]["exact_match"]
    assert 0.0 <= metrics["best"]["exact_match"] <= 1.0
    # The loss falls. How far two tiny epochs get in exact match depends on the floating-point
    # kernels a CPU picks, so quality is asserted by the slow demo test; these margins are wide:
    # the training loss falls to about a third, the validation loss to about a tenth of a guess's.
    losses = [loss for _, loss in metrics["train_loss"]]
    assert len(losses) >= 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3
    uniform_guess = math.log(metrics["config"]["vocab_size"])
    assert metrics["best"]["valid_loss"] < 0.5 * uniform_guess
    # Throughput in the summary and per epoch: target tokens per second and the padding share.
    assert metrics["throughput"]["target_tokens_per_s"] > 0
    assert 0.0 <= metrics["throughput"]["padding_share"] < 0.5
    assert all(v["target_tokens_per_s"] > 0 and 0 <= v["padding_share"] < 1 for v in metrics["history"])
    # picked by timing among the layouts of this machine (2x1 included where it has 2 cores)
    assert all(any(Layout(v["processes"], v["threads"]) in layout_candidates(max_processes=m) for m in range(1, 65))
               for v in metrics["history"])


def _write_tsv(path: Path, n: int) -> Path:
    words = ["red", "green", "blue", "black", "white", "small", "big", "cat", "dog", "house"]
    lines = [f"{words[i % 10]} {words[(i * 3) % 10]}\t{words[(i * 3) % 10]} {words[i % 10]}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_training_on_a_tsv_corpus_is_reproducible(tmp_path: Path) -> None:
    # With a fixed thread count: the default picks one by timing, and sums split over two threads
    # round differently in the last bits.
    data = _write_tsv(tmp_path / "train.tsv", 60)
    outs = []
    for run in ("a", "b"):
        summary = train(None, str(data), None, TrainOptions(out=tmp_path / run, preset="tiny", epochs=1,
                                                            batch_size=16, seed=3, device="cpu", threads=1))
        assert summary["best"]["bleu"] >= 0.0
        outs.append(load_checkpoint(tmp_path / run / "checkpoint.pt"))
    for key, value in outs[0].state_dict.items():
        assert torch.equal(value, outs[1].state_dict[key]), key


def test_the_fused_kernels_are_loaded_before_the_first_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A first build takes seconds: inside a step, the layout trial would time the compiler.
    events: list[str] = []
    real_load, real_pass = kernels.load, training_pass.training_pass
    monkeypatch.setattr(kernels, "load", lambda *args, **kw: events.append("kernels") or real_load(*args, **kw))
    monkeypatch.setattr(training_pass, "training_pass", lambda *args: events.append("step") or real_pass(*args))
    train(None, str(_write_tsv(tmp_path / "train.tsv", 40)), None,
          TrainOptions(out=tmp_path / "run", preset="tiny", epochs=1, batch_size=16, device="cpu", threads=1))
    assert events[0] == "kernels" and "step" in events


def test_malformed_tsv_line_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bad.tsv"
    data.write_text("a b\tb a\nno tab here\n", encoding="utf-8")
    assert seqserve(["train", "--data", str(data), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{data}:2:" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_unknown_task_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert seqserve(["train", "--task", "poetry", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "poetry" in err and "dates" in err and "Traceback" not in err


def test_unknown_command_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert seqserve(["fly"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert seqserve(["--help"]) == 0
    assert "export" in capsys.readouterr().out
