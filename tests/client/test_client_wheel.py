"""What another service gets from `pip install seqserve`: the built wheel, installed with its
dependencies into a new virtual environment, brings a working client without torch or ONNX Runtime."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "model", "export", "runtime", "server", "bench", "client", "proto")
OFFLINE_SIGNS = ("No matching distribution", "Could not find a version", "Failed to establish", "NewConnectionError")

CHECK = """
import importlib.util, sys
import seqserve.client
from seqserve.client import AsyncClient, Client, GenerationResult, Overloaded
import seqserve.client.loadtest, seqserve.client.cli
assert seqserve.client.__file__.startswith(sys.prefix), seqserve.client.__file__
missing = [m for m in ("torch", "onnxruntime", "onnx") if importlib.util.find_spec(m) is not None]
assert not missing, f"installed but not wanted: {missing}"
assert "torch" not in sys.modules
print("ok")
"""


def _run(cmd: list[str], timeout: float = 240, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.mark.wheel
def test_wheel_installs_a_client_without_torch_or_onnxruntime(tmp_path: Path, served) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # Built from a copy: setuptools leaves build/ in the tree it builds, and reuses what it finds there.
    source = tmp_path / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / name).exists():
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(tmp_path / "dist"), str(source)], env=env)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("seqserve-*.whl")
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], env=env)
    assert made.returncode == 0, made.stderr
    bin_dir = venv / "bin"
    installed = _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel)], env=env)
    if installed.returncode != 0 and any(sign in installed.stderr for sign in OFFLINE_SIGNS):
        pytest.skip(f"the package index is not reachable: {installed.stderr.strip().splitlines()[-1]}")
    assert installed.returncode == 0, installed.stderr
    # Outside the source tree, so only the installed copy can be imported.
    checked = _run([str(bin_dir / "python"), "-c", CHECK], env=env, cwd=tmp_path)
    assert checked.returncode == 0 and checked.stdout.strip() == "ok", checked.stderr
    called = _run([str(bin_dir / "seqserve-client"), "generate", "nov 5 1999", "-a", served.address], env=env,
                  cwd=tmp_path, timeout=60)
    assert called.returncode == 0 and called.stdout.strip(), called.stderr
