"""`seqserve bench-serve`: the real server process under a short streaming load, with the report
well-formed (tokens/s per level, Python share, cores and CPU per token of server and client, clean
SIGTERM), then the same levels against the transport floor (a server with no model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from seqserve.client import Client
from seqserve.bench.serve import free_port, server_pids, wait_serving
from seqserve.bench.serve import main as bench_serve


def test_bench_serve_reports_each_level(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    assert bench_serve([str(model_dir), "--streams", "1,3", "--duration", "0.6", "--warmup", "0.2",
                        "--max-new-tokens", "4", "--threads", "1", "--spinning", "off", "--unary", "2x3",
                        "--frontends", "1,2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "--intra-op-spinning off" in report["server_flags"]
    # One server with one front-end (and its engine core), one with a supervisor and two front-ends.
    assert [(s["frontends"], s["server_processes"]) for s in report["servers"]] == [("1", 2), ("2", 4)]
    for served in report["servers"]:
        assert served["exit_code_on_sigterm"] == 0
        assert 0 < served["start_to_serving_s"] < 60 and served["rss_mb_peak"] >= served["rss_mb_ready"] > 0
        assert [(level["kind"], level["concurrency"], level["inputs_per_call"]) for level in served["levels"]] == [
            ("stream", 1, 1), ("stream", 3, 1), ("unary", 2, 3)]
        for level in served["levels"]:
            assert level["failed"] == 0 and level["requests"] > 0 and level["output_tokens_per_s"] > 0
            assert 0 <= level["python_share"] < 1 and level["step_ms"] > 0
            assert 0 < level["server_cores"] <= 4 and 0 < level["client_cores"] <= 4
            assert level["server_cpu_us_per_token"] > 0 and level["client_cpu_us_per_token"] > 0
    floor = report["transport_floor"]
    assert floor["exit_code_on_sigterm"] == 0
    assert [(level["kind"], level["concurrency"]) for level in floor["levels"]] == [
        ("stream", 1), ("stream", 3), ("unary", 2)]
    for level in floor["levels"]:
        assert level["failed"] == 0 and level["output_tokens_per_s"] > 0 and level["step_ms"] is None
    # The engine alone, for the served/in-process ratios: batch 1 and each level's batch.
    assert [(r["batch"], r["new_tokens"]) for r in report["in_process"]] == [(1, 4), (3, 4), (6, 4)]
    assert all(r["tok_per_s"] > 0 for r in report["in_process"])
    first = report["servers"][0]["levels"][0]["output_tokens_per_s"]
    assert report["floor_last_vs_model_first"] == pytest.approx(floor["levels"][1]["output_tokens_per_s"] / first,
                                                                rel=0.01)


def test_transport_floor_answers_like_the_server(tmp_path: Path) -> None:
    """The floor server speaks the real contract: the client library's calls work against it
    unchanged, with the token count asked for."""
    port = free_port()
    floor = subprocess.Popen([sys.executable, "-m", "seqserve.bench.transport_floor", "--port", str(port)])
    try:
        wait_serving(port, floor, timeout=30)
        with Client(f"127.0.0.1:{port}") as client:
            items = list(client.generate_stream("hello", max_new_tokens=5))
            pieces, result = items[:-1], items[-1]
            assert [p.index for p in pieces] == [0, 1, 2, 3, 4]
            assert "".join(p.text for p in pieces) == result.text and result.usage.output_tokens == 5
            results = client.generate(["a", "b", "c"], max_new_tokens=3)
            assert [len(r.sequences[0].token_ids) for r in results] == [3, 3, 3]
        floor.send_signal(signal.SIGTERM)
        assert floor.wait(timeout=30) == 0
    finally:
        if floor.poll() is None:
            floor.kill()
            floor.wait()


def test_server_pids_skips_threads_that_end_while_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    real_iterdir = Path.iterdir

    def iterdir(self: Path):  # noqa: ANN202 - the listing still names a thread that has just ended
        yield from real_iterdir(self)
        if self.name == "task":
            yield self / "999999999"

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert server_pids(os.getpid())[0] == os.getpid()  # no FileNotFoundError for the thread that ended
