"""`seqserve-client` against a real server: generate (plain, JSON, streamed, from stdin), info, health,
the address from the flag or SEQSERVE_ADDRESS, and one-line errors with a non-zero exit."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from seqserve.client import Client
from seqserve.client.cli import main


def run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = main(argv, out=out)
    return code, out.getvalue()


def test_generate_prints_one_line_per_input(served) -> None:
    with Client(served.address) as client:
        expected = [r.text for r in client.generate(["nov 5 1999", "1 JANUARY 1900"])]
    code, out = run(["generate", "nov 5 1999", "1 JANUARY 1900", "--address", served.address])
    assert code == 0 and out.splitlines() == expected


def test_generate_json_stream_and_stdin(served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQSERVE_ADDRESS", served.address)
    code, out = run(["generate", "nov 5 1999", "--json", "--log-probs", "--alignments", "--max-new-tokens", "4"])
    (result,) = json.loads(out)
    seq = result["sequences"][0]
    assert code == 0 and len(seq["token_ids"]) == 4 and seq["finish_reason"] == "length"
    assert len(seq["log_probs"]) == 4 and len(seq["alignments"]) == 4 and len(result["source_tokens"]) > 0
    code, streamed = run(["generate", "--stream", "nov 5 1999"])
    code2, unary = run(["generate", "nov 5 1999"])
    assert code == code2 == 0 and streamed == unary
    code, events = run(["generate", "--stream", "--json", "nov 5 1999"])
    lines = [json.loads(line) for line in events.splitlines()]
    assert all("token" in e for e in lines[:-1]) and "result" in lines[-1]
    monkeypatch.setattr(sys, "stdin", io.StringIO("nov 5 1999\n\n1 may 2000\n"))
    code, out = run(["generate"])
    assert code == 0 and len(out.splitlines()) == 2


def test_info_and_health(served) -> None:
    code, out = run(["info", "-a", served.address])
    assert code == 0 and "model version" in out and "CPUExecutionProvider" in out
    code, out = run(["info", "-a", served.address, "--json"])
    assert code == 0 and json.loads(out)["limits"]["max_inputs_per_request"] > 0
    assert run(["health", "-a", served.address]) == (0, "SERVING\n")
    assert run(["health", "-a", served.address, "--service", "nope"]) == (1, "SERVICE_UNKNOWN\n")


def test_errors_are_one_line_and_exit_non_zero(served, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run(["generate", "x", "-a", served.address, "--max-new-tokens", "100000"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("seqserve-client: error: INVALID_ARGUMENT: options.max_new_tokens")
    code, _ = run(["health", "-a", "127.0.0.1:1", "--timeout", "3"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("seqserve-client: error: UNAVAILABLE") and err.count("\n") == 1


def test_the_console_script_runs(served) -> None:
    script = Path(sys.executable).with_name("seqserve-client")
    if not script.exists():
        pytest.skip("seqserve-client is not installed in this environment")
    done = subprocess.run([str(script), "generate", "nov 5 1999", "-a", served.address], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    bad = subprocess.run([str(script), "generate", "", "-a", served.address], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("seqserve-client: error: INVALID_ARGUMENT")


def test_alignment_heatmap_in_the_terminal_and_as_png(served, tmp_path: Path) -> None:
    code, out = run(["generate", "nov 5 1999", "--alignments", "--max-new-tokens", "6", "--address", served.address])
    text, header, *rows = out.splitlines()
    assert code == 0 and text and len(rows) == 6  # one row per output token, under a header of source tokens
    assert "_nov" in header or "nov" in header
    plot = tmp_path / "align.png"
    code, _ = run(["generate", "nov 5 1999", "1 may 2000", "--plot", str(plot), "--address", served.address])
    assert code == 0
    for path in (tmp_path / "align-1.png", tmp_path / "align-2.png"):  # one PNG per input
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_heatmap_shades_by_weight() -> None:
    from seqserve.client.heatmap import SHADES, text_heatmap

    weights = [[1.0, 0.0], [0.0, 0.5]]
    header, first, second = text_heatmap(["\u2581a", "b"], ["x", "y"], weights).splitlines()
    assert "_a" in header and "b" in header
    assert SHADES[-1] in first and SHADES[5] in second and SHADES[-1] not in second
    with pytest.raises(ValueError, match="do not match"):
        text_heatmap(["a"], ["x", "y"], weights)
