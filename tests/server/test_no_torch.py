"""The layers of the package: the serving side runs where torch is not installed, and each layer
imports only the layers under it (runtime under export and server; nothing of the trainer in
the server)."""

from __future__ import annotations

import subprocess
import sys

SERVING_MODULES = ("seqserve.runtime.engine", "seqserve.runtime.decode_loop", "seqserve.runtime.tokenizer",
                   "seqserve.runtime.model_dir", "seqserve.server.translate", "seqserve.server.cli",
                   "seqserve.server.main", "seqserve.server.service", "seqserve.server.validation",
                   "seqserve.server.metrics", "seqserve.server.config", "seqserve.server.scheduler",
                   "seqserve.server.engine_core", "seqserve.server.supervisor", "seqserve.server.testing",
                   "seqserve.bench.bench", "seqserve.bench.serve", "seqserve.bench.transport_floor")


def loaded_after(modules: tuple[str, ...], prefixes: tuple[str, ...]) -> list[str]:
    """The packages (and their modules) among `prefixes` that importing `modules` loads, in a fresh interpreter."""
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {list(modules)!r}]; "
            f"print(sorted(m for m in sys.modules if any(m == p or m.startswith(p + '.') for p in {prefixes!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return eval(result.stdout.strip().splitlines()[-1])  # a list of module names printed by this test


def test_serving_modules_do_not_import_torch() -> None:
    assert loaded_after(SERVING_MODULES, ("torch", "onnx", "onnxscript")) == []


def test_serving_imports_nothing_of_the_trainer_or_exporter() -> None:
    assert loaded_after(SERVING_MODULES, ("seqserve.model", "seqserve.export")) == []


def test_export_does_not_import_the_server() -> None:
    assert loaded_after(("seqserve.export.exporter", "seqserve.export.verify", "seqserve.export.cli"),
                        ("seqserve.server", "seqserve.bench")) == []
