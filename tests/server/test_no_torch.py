"""The serving side must run where torch is not installed: importing it must not pull torch in."""

from __future__ import annotations

import subprocess
import sys


def test_serving_modules_do_not_import_torch() -> None:
    code = ("import sys; import seqserve.server.engine, seqserve.server.translate, seqserve.server.cli, "
            "seqserve.server.main, seqserve.server.service, seqserve.server.validation, seqserve.server.metrics, "
            "seqserve.server.config, seqserve.server.scheduler, seqserve.server.bench, seqserve.server.testing, "
            "seqserve.export.model_dir, seqserve.model.data; "
            "bad = sorted(m for m in ('torch', 'onnx', 'onnxscript') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
