"""Shared fixtures: a tiny model really trained on the dates task, and its exported model directory.

Session-scoped so the whole suite trains and exports once (a few seconds on 2 CPU cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` are skipped where ONNX Runtime has no CUDA provider (CI never has one)."""
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs onnxruntime-gpu and a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly which tests never ran because there is no GPU, so a green run is not read as
    proof of the CUDA path."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "cuda" in r.keywords]
    if skipped:
        terminalreporter.section("CUDA path NOT tested", sep="!", yellow=True, bold=True)
        for report in skipped:
            terminalreporter.write_line(f"  not run (no CUDA device here): {report.nodeid}", yellow=True)
        terminalreporter.write_line("  run `make gpu-check` on a host with an NVIDIA GPU to test it", yellow=True)


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training output folder (checkpoint.pt, tokenizer.json, metrics.json, learning_curve.png)."""
    from seqserve.model.train import TrainOptions, train

    out = tmp_path_factory.mktemp("trained")
    train("dates", None, None, TrainOptions(out=out, preset="tiny", epochs=2, train_size=6000, valid_size=200,
                                            batch_size=64, warmup=100, seed=0, device="cpu",
                                            max_source_len=48, max_target_len=24))
    return out


@pytest.fixture(scope="session")
def checkpoint_path(trained_dir: Path) -> Path:
    return trained_dir / "checkpoint.pt"


@pytest.fixture(scope="session")
def model_dir(checkpoint_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exported (and export-verified) model directory of the tiny trained model."""
    from seqserve.export.exporter import export_model_dir
    from seqserve.model.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("exported") / "model"
    export_model_dir(load_checkpoint(checkpoint_path), out)
    return out


@pytest.fixture(scope="session")
def demo_trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full demo model, trained with `make demo`'s settings (about 4 minutes: slow tests only)."""
    from seqserve.model.train import TrainOptions, train

    out = tmp_path_factory.mktemp("demo")
    summary = train("dates", None, None, TrainOptions(out=out, valid_size=1000, target_exact_match=0.99,
                                                      max_minutes=5, device="cpu"))
    (out / "best_exact_match").write_text(str(summary["best"]["exact_match"]))
    return out


@pytest.fixture(scope="session")
def demo_model_dir(demo_trained_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full demo model's exported model directory (slow tests only)."""
    from seqserve.export.exporter import export_model_dir
    from seqserve.model.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("demo-exported") / "model"
    export_model_dir(load_checkpoint(demo_trained_dir / "checkpoint.pt"), out)
    return out
