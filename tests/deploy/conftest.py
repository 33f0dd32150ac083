"""Fixtures for the deployment tests: the repository's container and cluster files, parsed, and the
server's own view of SEQSERVE_* settings, so every file is checked against the code it configures."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from seqserve.server.config import MODEL_DIR_ENV, SETTINGS, ServerConfig, parse_args

ROOT = Path(__file__).resolve().parents[2]


def venv_tool(name: str) -> str:
    """A command-line tool installed beside this Python (the dev extra brings them), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


def server_config_from_env(env: Mapping[str, str]) -> ServerConfig:
    """The configuration `seqserve serve` would build from these variables (the server's own parser:
    an unknown variable, a bad value or a wrong type fails here as it would in the container)."""
    unknown = sorted(k for k in env if k.startswith("SEQSERVE_") and k not in known_server_env())
    assert not unknown, f"variables `seqserve serve` does not read: {unknown}"
    # MODEL_DIR comes from the variable when set (the image sets it), else a stand-in argument.
    return parse_args([] if env.get(MODEL_DIR_ENV) else ["/model"], environ=dict(env))


def known_server_env() -> set[str]:
    return {s.env for s in SETTINGS} | {MODEL_DIR_ENV}


@dataclass
class Stage:
    """One stage of a Dockerfile: its FROM line and its instructions (continuations joined)."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile (enough for the checks here: no heredocs, no parser directives)."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, words[0]))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def env_pairs(stage: Stage) -> dict[str, str]:
    """ENV KEY=VALUE pairs of a stage (the KEY=VALUE form only)."""
    out: dict[str, str] = {}
    for args in stage.all("ENV"):
        for item in args.split():
            key, sep, value = item.partition("=")
            assert sep, f"ENV {args!r}: use the KEY=VALUE form"
            out[key] = value
    return out


# Fixtures handing out the helpers: test modules are imported by path (--import-mode=importlib),
# so they cannot import this file by name.

@pytest.fixture(scope="session")
def tool() -> Callable[[str], str]:
    return venv_tool


@pytest.fixture(scope="session")
def config_from_env() -> Callable[[Mapping[str, str]], ServerConfig]:
    return server_config_from_env


@pytest.fixture(scope="session")
def stage_env() -> Callable[[Stage], dict[str, str]]:
    return env_pairs


@pytest.fixture(scope="session")
def dockerfile_stages() -> list[Stage]:
    return parse_dockerfile(ROOT / "Dockerfile")


@pytest.fixture(scope="session")
def server_stage(dockerfile_stages: list[Stage]) -> Stage:
    """The runtime image's stage (the Dockerfile's last, so a plain `docker build .` builds it)."""
    assert dockerfile_stages[-1].name == "server", "the server stage must be the last (the default target)"
    return dockerfile_stages[-1]
