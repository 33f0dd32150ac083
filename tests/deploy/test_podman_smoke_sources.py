"""deploy/podman-smoke.sh takes its package sources from the host, not from a public host: the
Debian mirror from apt's sources (one-line and deb822 files, in a fake /etc/apt through
APT_SOURCES_DIR), the pip index from pip's own configuration, DEBIAN_MIRROR and PIP_INDEX_URL
over both, and a clear one-line failure where the host has no Debian archive. Through the
script's `--print-sources` mode: no root, no podman."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "podman-smoke.sh"


def print_sources(apt: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`podman-smoke.sh --print-sources` against the fake /etc/apt at `apt`, with no pip
    configuration of this machine's (PIP_CONFIG_FILE=/dev/null, no PIP_* variables) unless given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "DEBIAN_MIRROR"}
    clean.update({"APT_SOURCES_DIR": str(apt), "DEBIAN_SUITE": "bookworm", "PIP_CONFIG_FILE": os.devnull, **env})
    return subprocess.run(["bash", str(SCRIPT), "--print-sources"], env=clean,
                          capture_output=True, text=True, timeout=60)


def mirror(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("debian mirror: ")]
    return line.removeprefix("debian mirror: ").split(" ", 1)[0]


def fake_apt(tmp_path: Path, sources_list: str | None = None, **parts: str) -> Path:
    """/etc/apt in tmp_path: sources.list (when given) and sources.list.d/NAME for each part
    (keyword names: `debian_sources="..."` is written as sources.list.d/debian.sources)."""
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    if sources_list is not None:
        (apt / "sources.list").write_text(sources_list, encoding="utf-8")
    for name, text in parts.items():
        stem, _, ext = name.rpartition("_")
        (apt / "sources.list.d" / f"{stem}.{ext}").write_text(text, encoding="utf-8")
    return apt


def test_one_line_sources_skip_security_src_and_options(tmp_path: Path) -> None:
    apt = fake_apt(tmp_path, """\
# deb http://commented.invalid/debian bookworm main
deb http://security.invalid/debian-security bookworm-security main
deb http://security.invalid/debian-security bookworm/updates main
deb-src http://src.invalid/debian bookworm main
deb http://updates.invalid/debian bookworm-updates main
deb http://contrib.invalid/debian bookworm contrib non-free
deb [trusted=yes arch=amd64] file:/srv/mirror/debian/ bookworm main contrib  # the local one
deb http://later.invalid/debian bookworm main
""")
    assert mirror(print_sources(apt)) == "file:///srv/mirror/debian"


def test_options_in_spaced_brackets_and_https(tmp_path: Path) -> None:
    apt = fake_apt(tmp_path, "deb [ signed-by=/usr/share/keyrings/x.gpg ] https://mirror.invalid/debian bookworm main\n")
    assert mirror(print_sources(apt)) == "https://mirror.invalid/debian"


def test_deb822_sources_in_apt_order(tmp_path: Path) -> None:
    apt = fake_apt(
        tmp_path,
        # sources.list comes first, but has nothing of component main
        sources_list="deb http://only-contrib.invalid/debian bookworm contrib\n",
        # read in name order: a-disabled.sources before debian.sources before z.list
        a_disabled_sources="""\
Types: deb
URIs: http://disabled.invalid/debian
Suites: bookworm
Components: main
Enabled: no
""",
        debian_sources="""\
Types: deb
# a comment inside the stanza
URIs: http://security.invalid/debian-security
Suites: bookworm-security
Components: main

types: deb-src deb
uris:
 file:///srv/deb822/debian
 http://second.invalid/debian
suites: bookworm bookworm-updates
components: contrib
 main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
""",
        z_list="deb http://z.invalid/debian bookworm main\n",
        # neither .list nor .sources: apt does not read it, nor does the script
        ignored_list_disabled="deb http://ignored.invalid/debian bookworm main\n",
    )
    assert mirror(print_sources(apt)) == "file:///srv/deb822/debian"


def test_the_suite_being_built_first_else_the_first_archive(tmp_path: Path) -> None:
    apt = fake_apt(tmp_path, """\
deb http://trixie.invalid/debian trixie main
deb http://bookworm.invalid/debian bookworm main
""")
    assert mirror(print_sources(apt)) == "http://bookworm.invalid/debian"
    assert mirror(print_sources(apt, DEBIAN_SUITE="trixie")) == "http://trixie.invalid/debian"
    assert mirror(print_sources(apt, DEBIAN_SUITE="forky")) == "http://trixie.invalid/debian"


def test_debian_mirror_overrides_and_needs_no_sources(tmp_path: Path) -> None:
    apt = fake_apt(tmp_path, "deb http://host.invalid/debian bookworm main\n")
    assert mirror(print_sources(apt, DEBIAN_MIRROR="http://override.invalid/debian")) == "http://override.invalid/debian"
    assert mirror(print_sources(tmp_path / "missing", DEBIAN_MIRROR="file:///srv/m")) == "file:///srv/m"


@pytest.mark.parametrize("sources_list", [None, "deb http://security.invalid/debian-security bookworm-security main\n"],
                         ids=["no-files", "only-security"])
def test_no_mirror_fails_in_one_line_naming_the_files_and_DEBIAN_MIRROR(tmp_path: Path, sources_list) -> None:
    apt = fake_apt(tmp_path, sources_list)
    result = print_sources(apt)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    (line,) = lines
    assert "FAILED: no Debian mirror" in line and "set DEBIAN_MIRROR" in line
    assert str(apt / "sources.list") in line  # read, or looked for


def test_pip_index_from_pip_config_and_variables(tmp_path: Path) -> None:
    apt = fake_apt(tmp_path, "deb http://host.invalid/debian bookworm main\n")
    index = tmp_path / "pypi" / "simple"
    wheels = tmp_path / "wheels"
    index.mkdir(parents=True)
    wheels.mkdir()
    conf = tmp_path / "pip.conf"
    conf.write_text(f"""\
[global]
index-url = {index.as_uri()}
extra-index-url = http://extra.invalid/simple
constraint = /not/forwarded.txt
[install]
find-links = {wheels}
""", encoding="utf-8")
    result = print_sources(apt, PIP_CONFIG_FILE=str(conf), PIP_TRUSTED_HOST="extra.invalid")
    assert result.returncode == 0, result.stdout + result.stderr
    pip = [x for x in result.stdout.splitlines() if x.startswith("pip")]
    assert pip == [
        f"pip: index-url = {index.as_uri()}",
        "pip: extra-index-url = http://extra.invalid/simple",
        f"pip: find-links = {wheels}",
        "pip: trusted-host = extra.invalid",
        # the file: index's parent (its links point at ../../files/), and the wheel directory
        f"pip mount: {index.parent}",
        f"pip mount: {wheels}",
    ]
    # PIP_INDEX_URL over the file, as for pip itself; nothing local left to mount for the index
    result = print_sources(apt, PIP_CONFIG_FILE=str(conf), PIP_INDEX_URL="http://override.invalid/simple")
    pip = [x for x in result.stdout.splitlines() if x.startswith("pip")]
    assert pip == [
        "pip: index-url = http://override.invalid/simple",
        "pip: extra-index-url = http://extra.invalid/simple",
        f"pip: find-links = {wheels}",
        f"pip mount: {wheels}",
    ]
    # no pip configuration at all: nothing forwarded (pip in the build keeps its default)
    result = print_sources(apt)
    assert result.returncode == 0 and not [x for x in result.stdout.splitlines() if x.startswith("pip")]


def test_the_script_names_no_package_host() -> None:
    """Every URL the script writes is loopback: package hosts come from the host's configuration."""
    hosts = set(re.findall(r"https?://([^/\s:'\"$]+)", SCRIPT.read_text(encoding="utf-8")))
    assert hosts <= {"127.0.0.1"}, hosts
