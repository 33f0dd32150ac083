"""The Dockerfile, without building it: hadolint finds nothing in any Dockerfile of the repository,
and the server image is what the README promises (non-root, no torch, one ONNX Runtime, health
probe, ports and SEQSERVE_* settings the server really reads, every package and file it needs in
the build context). deploy/podman-smoke.sh builds and runs it for real (opt-in)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from seqserve.server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "node_modules", "runs", "build", "dist"}


def dockerfiles() -> list[Path]:
    """Every Dockerfile/Containerfile in the repository, outside environments and outputs."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in files:
            if name in ("Dockerfile", "Containerfile") or name.startswith(("Dockerfile.", "Containerfile.")) \
                    or name.endswith(".Dockerfile"):
                found.append(Path(folder) / name)
    return sorted(found)


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_finds_nothing(path: Path, tool) -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "info", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint {path.relative_to(ROOT)}:\n{result.stdout}{result.stderr}"


def test_there_is_a_dockerfile() -> None:
    assert ROOT / "Dockerfile" in dockerfiles()


def test_server_image_runs_as_non_root_with_a_grpc_health_probe(server_stage) -> None:
    user = server_stage.all("USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: a numeric non-root uid (Kubernetes runAsNonRoot checks it)"
    (healthcheck,) = server_stage.all("HEALTHCHECK")
    assert "/opt/seqserve/healthcheck.py" in healthcheck and "CMD [" in healthcheck
    assert any(c.split() == ["deploy/healthcheck.py", "/opt/seqserve/healthcheck.py"] for c in server_stage.all("COPY"))
    assert server_stage.all("ENTRYPOINT") == ['["seqserve", "serve"]']
    probe = (ROOT / "deploy" / "healthcheck.py").read_text()
    assert "grpc_health.v1" in probe and "seqserve.v1.SeqServe" in probe


def test_server_image_ports_and_settings_are_the_servers(server_stage, stage_env, config_from_env) -> None:
    env = stage_env(server_stage)
    config = config_from_env(env)  # every SEQSERVE_* the image sets is one the server reads
    assert env["SEQSERVE_MODEL_DIR"] == "/model"
    exposed = {int(p.split("/")[0]) for args in server_stage.all("EXPOSE") for p in args.split()}
    assert exposed == {config.port, config.metrics_port} and config.metrics_port != 0
    assert config.grace_period_s == ServerConfig.grace_period_s  # the documented 20 s drain


def test_server_image_has_no_torch_and_one_onnx_runtime(dockerfile_stages, server_stage) -> None:
    stages = {s.name: s for s in dockerfile_stages}
    copied_from = {c.split()[0].removeprefix("--from=") for c in server_stage.all("COPY") if c.startswith("--from=")}
    assert copied_from == {"builder"}, "the runtime image takes only the builder's venv"
    (install,) = stages["builder"].all("RUN")
    assert '"/src[${VARIANT}]"' in install and "torch" not in install and "train" not in install
    assert "sys.exit(len(ort) != 1)" in install  # the build fails with both ONNX Runtime packages
    # The runtime stage starts from the same base, not from a stage that has build tools or torch.
    assert server_stage.base == "base" and stages["base"].base == "${BASE_IMAGE}"
    assert not any("pip install" in r or "apt-get install" in r for r in server_stage.all("RUN"))
    # The trainer's torch comes from the CPU wheel index by default.
    assert any("TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in a for a in stages["trainer"].all("ARG"))


def ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regular expression (Go's filepath.Match plus `**`)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` ('/'-separated, relative) out of the build context: the
    last pattern that matches the path or one of its parent folders decides; `!` keeps it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = ignore_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_build_context_holds_every_package_and_file_the_image_copies(dockerfile_stages) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    package_dirs = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied: set[str] = set()
    for stage in dockerfile_stages:
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            *sources, _dest = args.split()
            for source in sources:
                if "$" in source:
                    continue
                copied.add(source.strip("/"))
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert not dockerignored(source.strip("/"), patterns), f"COPY {source}: excluded by .dockerignore"
    assert package_dirs <= copied, f"packages the image would miss: {sorted(package_dirs - copied)}"
    # The default MODEL_DIR is a placeholder that says what to do; exported models may be baked in,
    # checkpoints and environments stay out of the context.
    (model_arg,) = [a for s in dockerfile_stages for a in s.all("ARG") if a.startswith("MODEL_DIR=")]
    placeholder = model_arg.split("=", 1)[1]
    assert (ROOT / placeholder / "README.md").is_file() and not dockerignored(placeholder, patterns)
    for kept in ("runs/dates-model/encoder.onnx", "runs/dates-model/config.json", "deploy/healthcheck.py"):
        assert not dockerignored(kept, patterns), kept
    for left_out in (".venv/bin/python", ".git/HEAD", "runs/dates/checkpoint.pt", "server/__pycache__/x.pyc",
                     "tests/conftest.py"):
        assert dockerignored(left_out, patterns), left_out


def test_podman_smoke_script_parses_and_passes_shellcheck() -> None:
    """deploy/podman-smoke.sh is opt-in (root, podman, debootstrap); here only its syntax, and
    shellcheck where it is installed."""
    script = ROOT / "deploy" / "podman-smoke.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
