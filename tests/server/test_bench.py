"""`seqserve bench`: a real (tiny) measurement end to end, through the export subprocess and the
measuring child, with the record and table well-formed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqserve.server.bench import main as bench


def test_bench_exports_caches_and_measures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dims = json.dumps(dict(vocab_size=300, d_model=32, encoder_layers=1, decoder_layers=1, n_heads=2, d_ff=64))
    args = ["--dims", dims, "--batch", "1", "3", "--new-tokens", "8", "--source-len", "5", "--threads", "1",
            "--budget", "0.2", "--min-reps", "1", "--max-reps", "2", "--cache-dir", str(tmp_path / "cache"),
            "--json", str(tmp_path / "out.jsonl")]
    assert bench(args) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in records] == [1, 3]
    for r in records:
        assert r["new_tokens"] == 8 and r["ms_per_step"] > 0 and r["peak_rss_mb"] > 0
        assert r["tok_per_s"] == pytest.approx(1e3 * r["batch"] / r["ms_per_step"], rel=0.05)
        assert 0 <= r["python_share"] < 1
    assert "| ms/step |" in out
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "decoder.onnx").is_file()
    assert bench(args) == 0  # second run reuses the cached export
    assert list((tmp_path / "cache").iterdir()) == cached
