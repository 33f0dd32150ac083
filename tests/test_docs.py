"""The documentation checks itself: README.md and docs/*.md against the code.

- every relative link and image resolves (files, and `#anchors` against the target's headings);
- every `--flag` named with a seqserve command exists in that command's `--help`, every flag in
  the README's configuration table exists in `seqserve serve --help`, and any other flag named
  on its own exists in some seqserve command's `--help`;
- every command of the README's tour runs, in order, on the suite's tiny model: a sandbox folder,
  `runs/dates` holding the suite's tiny trained model, the tour's ports swapped for free ones,
  `seqserve serve` started in the background for the blocks after it and stopped with SIGTERM at
  the end (exit 0); Python blocks after it run too. A `<!-- docs-check: ... -->`
  comment just before a block says what the test changes or why it does not run the block:
  `append ARGS` (added to every seqserve command of the block, e.g. the tiny model's sizes, or a
  short load test), `needs-demo-model` (not run: the output only makes sense on the trained demo);
- the README stays a product page (at most about 15 KB), and every number of its "How fast"
  table is one of docs/benchmarks.md's, so a figure has one source.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").glob("*.md")])
BIN = Path(sys.executable).parent  # the environment's console scripts (seqserve, seqserve-client, ...)
TOOLS = ("seqserve", "seqserve-client", "seqserve-loadtest")
README_MAX_BYTES = 15 * 1024

# Flags the docs may name although no --help has them (each with its reason):
RETIRED_FLAGS = {
    "--worker-process",  # `seqserve serve` before the engine core: named in dated measurements as they were run
}

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
COMMENT = re.compile(r"<!--.*?-->", re.S)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")
DIRECTIVE = re.compile(r"<!--\s*docs-check:\s*(.*?)\s*-->", re.S)


def prose(text: str) -> str:
    """The text without fenced code blocks and HTML comments (where links are not links)."""
    return COMMENT.sub("", FENCE.sub("", text))


# -- links ----------------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> Iterator[str]:
    text = INLINE.sub("", prose(path.read_text()))
    for m in LINK.finditer(text):
        yield m.group(1)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(doc: Path) -> None:
    broken = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}:\n  " + "\n  ".join(broken)


def test_the_link_check_sees_links() -> None:
    assert "docs/architecture.md" in set(links(README))
    assert "docs/images/alignment-demo.png" in set(links(README))
    assert slug("The transport floor: what gRPC alone reaches here") == "the-transport-floor-what-grpc-alone-reaches-here"


# -- flags ----------------------------------------------------------------------------------------

def command_key(words: list[str]) -> tuple[str, ...] | None:
    """('seqserve', 'serve'), ('seqserve-client', 'generate'), ('seqserve-loadtest',), a tool alone
    when no subcommand is named (its flags then checked against all of its subcommands), or None."""
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the command
        words = words[1:]
    if not words or Path(words[0]).name not in TOOLS:
        return None
    tool = Path(words[0]).name
    sub = next((w for w in words[1:] if (tool, w) in all_commands()), None)
    return (tool, sub) if sub else (tool,)


@cache
def help_flags(key: tuple[str, ...]) -> frozenset[str]:
    """The flags of one command's --help; of a tool named alone, those of all its subcommands."""
    if len(key) == 1 and key[0] != "seqserve-loadtest":
        return frozenset().union(*(help_flags(k) for k in all_commands() if k[0] == key[0]))
    proc = subprocess.run([str(BIN / key[0]), *key[1:], "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(key)} --help failed: {proc.stderr.strip()[-300:]}"
    return frozenset(FLAG.findall(proc.stdout))


@cache
def all_commands() -> tuple[tuple[str, ...], ...]:
    """Every command with a --help: seqserve's subcommands, seqserve-client's, seqserve-loadtest."""
    def subcommands(tool: str, pattern: str) -> list[str]:
        out = subprocess.run([str(BIN / tool), "--help"], capture_output=True, text=True, timeout=60).stdout
        return re.findall(pattern, out, re.M)

    return (*((("seqserve", s) for s in subcommands("seqserve", r"^  ([a-z][a-z-]+)\s"))),
            *((("seqserve-client", s) for s in subcommands("seqserve-client", r"^    ([a-z][a-z-]+)\s"))),
            ("seqserve-loadtest",))


def any_help_flags() -> frozenset[str]:
    return frozenset().union(*(help_flags(k) for k in all_commands()))


def segments(line: str) -> Iterator[list[str]]:
    """The simple commands of one shell line (split at pipes, ;, && and ||), as words."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    current: list[str] = []
    for w in words:
        if w in ("|", "||", "&&", ";", "&"):
            yield current
            current = []
        else:
            current.append(w)
    yield current


def shell_lines(block: str) -> Iterator[str]:
    """Logical lines of a shell block (backslash continuations joined)."""
    yield from block.replace("\\\n", " ").splitlines()


@dataclass
class FlagUse:
    where: str
    flag: str
    allowed: frozenset[str]
    context: str


def flag_uses(doc: Path) -> Iterator[FlagUse]:
    name = str(doc.relative_to(ROOT))
    text = COMMENT.sub("", doc.read_text())
    for m in FENCE.finditer(text):
        if m.group(1) not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in shell_lines(m.group(2)):
            for words in segments(line):
                if key := command_key(words):
                    for w in words:
                        for flag in FLAG.findall(w.split("=", 1)[0]) if w.startswith("--") else []:
                            yield FlagUse(name, flag, help_flags(key), " ".join(key))
    section = ""
    for line in FENCE.sub("", text).splitlines():
        if line.startswith("#"):
            section = line.strip("# ").lower()
        for span in INLINE.findall(line):
            words = span.split()
            key = command_key(words)
            if key:
                for flag in FLAG.findall(span):
                    yield FlagUse(name, flag, help_flags(key), " ".join(key))
            elif words and words[0].startswith("--"):  # a flag named on its own
                for flag in FLAG.findall(span):
                    if doc == README and section == "configuration":
                        yield FlagUse(name, flag, help_flags(("seqserve", "serve")), "seqserve serve")
                    else:
                        yield FlagUse(name, flag, any_help_flags(), "any seqserve command")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_flags_named_in_the_docs_exist(doc: Path) -> None:
    unknown = sorted({f"{u.flag} (checked against {u.context})" for u in flag_uses(doc)
                      if u.flag not in u.allowed and u.flag not in RETIRED_FLAGS})
    assert not unknown, f"{doc.relative_to(ROOT)} names flags no --help has:\n  " + "\n  ".join(unknown)


def test_configuration_table_variables_are_the_flags_variables() -> None:
    """Every SEQSERVE_* variable the README's configuration table names belongs to a serve flag."""
    table = section(README.read_text(), "Configuration")
    names = set(re.findall(r"SEQSERVE_([A-Z0-9_]+)", table))
    assert len(names) > 10
    flags = help_flags(("seqserve", "serve"))
    unknown = sorted(f"SEQSERVE_{n}" for n in names if "--" + n.lower().replace("_", "-") not in flags)
    assert not unknown, f"README configuration table names variables of no flag: {unknown}"


def test_the_flag_check_sees_flags() -> None:
    uses = list(flag_uses(README))
    assert any(u.flag == "--max-queue" and u.context == "seqserve serve" for u in uses)
    assert any(u.flag == "--port" and u.context == "seqserve serve" for u in uses)
    assert any(u.flag == "--concurrency" and u.context == "seqserve-loadtest" for u in uses)
    assert ("seqserve", "bench-serve") in all_commands() and ("seqserve-client", "health") in all_commands()
    assert "--no-such-flag" not in help_flags(("seqserve", "serve"))


# -- the README ------------------------------------------------------------------------------------

def section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_readme_is_a_product_page() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail to docs/ (at most {README_MAX_BYTES})"
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert "../shared" not in text


def test_readme_figures_come_from_the_benchmarks_page() -> None:
    """Each number of the README's "How fast" section is one docs/benchmarks.md states."""
    numbers = re.compile(r"(?<![\w.,])\d[\d,]*(?:\.\d+)?")
    benchmarks = set(numbers.findall((ROOT / "docs" / "benchmarks.md").read_text()))
    fast = COMMENT.sub("", section(README.read_text(), "How fast"))
    missing = sorted({n for n in numbers.findall(INLINE.sub("", fast)) if n not in benchmarks})
    assert not missing, f"README 'How fast' figures not in docs/benchmarks.md: {missing}"


# -- the tour ---------------------------------------------------------------------------------------

@dataclass
class Block:
    lang: str
    body: str
    directives: list[str] = field(default_factory=list)


def tour_blocks() -> list[Block]:
    tour = section(README.read_text(), "A five-minute tour")
    blocks = []
    for m in FENCE.finditer(tour):
        before = tour[:m.start()].rstrip()
        directives = []
        while (d := re.search(r"<!--\s*docs-check:((?:(?!-->).)*)-->$", before, re.S)):
            directives.insert(0, d.group(1).strip())
            before = before[:d.start()].rstrip()
        blocks.append(Block(m.group(1), m.group(2), directives))
    return blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tour_blocks_are_found() -> None:
    blocks = tour_blocks()
    commands = [line for b in blocks if b.lang == "bash" for line in shell_lines(b.body)
                if any(command_key(w) for w in segments(line))]
    assert any("seqserve serve" in c for c in commands)
    assert any("seqserve train" in c for c in commands) and any("seqserve export" in c for c in commands)
    assert any(b.directives for b in blocks)


def write_corpus(folder: Path) -> None:
    """train.tsv and valid.tsv for the tour's own-corpus line: dates in a few spellings -> ISO."""
    import datetime
    import random

    rng = random.Random(0)
    for name, n in (("train.tsv", 400), ("valid.tsv", 40)):
        lines = []
        for _ in range(n):
            d = datetime.date(1900, 1, 1) + datetime.timedelta(days=rng.randrange(60000))
            lines.append(f"{d.strftime(rng.choice(['%d %B %Y', '%b %d %Y', '%m/%d/%Y']))}\t{d.isoformat()}")
        (folder / name).write_text("\n".join(lines) + "\n")


@pytest.mark.timeout(600)
def test_readme_tour_runs(tmp_path: Path, trained_dir: Path) -> None:
    """Every command of the README's tour, in order, in a sandbox, on the suite's tiny model.

    `runs/dates` starts as a copy of the suite's tiny trained model, so export, serve and the
    calls work on a model as good as the rest of the suite's; the tour's own training lines run
    too, with the tiny sizes and their output folder that their `docs-check` comment appends.
    """
    shutil.copytree(trained_dir, tmp_path / "runs" / "dates")
    write_corpus(tmp_path)
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("SEQSERVE_")}
    server: subprocess.Popen | None = None
    server_log = tmp_path / "serve.log"
    ran: list[str] = []

    def localize(text: str) -> str:
        return text.replace("50051", str(port)).replace("9090", str(metrics_port))

    def run(command: str, timeout: float = 300) -> None:
        start = time.monotonic()
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"tour command failed ({proc.returncode}): {command}\n{proc.stderr[-3000:]}"
        ran.append(command)
        print(f"{time.monotonic() - start:6.1f} s  {command}")  # shown with -s: where the test's time goes

    try:
        for block in tour_blocks():
            if any(d.startswith("needs-demo-model") for d in block.directives):
                continue
            append = " ".join(d.removeprefix("append").strip() for d in block.directives if d.startswith("append"))
            if block.lang == "python":
                if server is not None:
                    run(f"python - <<'EOF'\n{localize(block.body)}EOF")
                continue
            if block.lang != "bash":
                continue
            for line in shell_lines(block.body):
                line = line.split(" #")[0].strip()
                if not any(command_key(w) for w in segments(line)):
                    continue  # grpcurl, make, docker, kubectl: not seqserve's to test here
                command = localize(line) + (f" {append}" if append else "")
                if command_key(line.split()) == ("seqserve", "serve"):
                    assert server is None, "the tour starts two servers"
                    log = server_log.open("w")
                    server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=tmp_path, env=env,
                                              stdout=log, stderr=subprocess.STDOUT)
                    run(f"seqserve-client health --address localhost:{port} --wait 60", timeout=90)
                    continue
                run(command)
        assert server is not None, "the tour never starts a server"
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
    assert server.returncode == 0, f"seqserve serve exited {server.returncode}:\n{server_log.read_text()[-3000:]}"
    assert any(c.startswith("seqserve-loadtest") for c in ran)
    assert (tmp_path / "runs" / "dates-model" / "config.json").is_file()
