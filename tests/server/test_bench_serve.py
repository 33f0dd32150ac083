"""`seqserve bench-serve`: the real server process under a short streaming load, with the report
well-formed (tokens/s per level, Python share, cores used by server and client, clean SIGTERM)."""

from __future__ import annotations

import json
from pathlib import Path

from seqserve.server.bench_serve import main as bench_serve


def test_bench_serve_reports_each_level(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    assert bench_serve([str(model_dir), "--streams", "1,3", "--duration", "0.6", "--warmup", "0.2",
                        "--max-new-tokens", "4", "--threads", "1", "--spinning", "off", "--unary", "2x3",
                        "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["exit_code_on_sigterm"] == 0 and report["spinning"] == "off"
    assert 0 < report["start_to_serving_s"] < 60 and report["rss_mb_peak"] >= report["rss_mb_ready"] > 0
    assert [(level["kind"], level["concurrency"], level["inputs_per_call"]) for level in report["levels"]] == [
        ("stream", 1, 1), ("stream", 3, 1), ("unary", 2, 3)]
    for level in report["levels"]:
        assert level["failed"] == 0 and level["requests"] > 0 and level["output_tokens_per_s"] > 0
        assert 0 <= level["python_share"] < 1 and level["step_ms"] > 0
        assert 0 < level["server_cores"] <= 4 and 0 < level["client_cores"] <= 4
