"""`seqserve bench`: a real (tiny) measurement end to end, through the export subprocess and the
measuring child, with the record and table well-formed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqserve.bench.bench import main as bench
from seqserve.bench.bench import table


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
        assert 0 <= r["python_share"] < 1 and r["kv_cache_on_device"] is False  # auto: numpy on CPU
    assert "| ms/step |" in out
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "decoder.onnx").is_file()
    # A second run reuses the cached export; this one with the KV cache forced onto OrtValues.
    assert bench([*args[:-1], str(tmp_path / "bound.jsonl"), "--io-binding", "on"]) == 0
    assert list((tmp_path / "cache").iterdir()) == cached
    bound = [json.loads(line) for line in (tmp_path / "bound.jsonl").read_text().splitlines()]
    assert [r["kv_cache_on_device"] for r in bound] == [True, True] and all(r["ms_per_step"] > 0 for r in bound)


def test_table_gives_ratios_to_both_ctranslate2_precisions() -> None:
    ours = {"dims": "small", "batch": 1, "threads": 2, "engine": "seqserve", "ms_per_step": 0.5, "tok_per_s": 2000.0,
            "python_share": 0.1, "peak_rss_mb": 120}
    fp32 = {**ours, "engine": "ct2_fp32", "tok_per_s": 1000.0, "python_share": None}
    int8 = {**ours, "engine": "ct2_int8", "tok_per_s": 500.0, "python_share": None}
    lines = table([ours, fp32, int8], {1: fp32}, {1: int8}).splitlines()
    assert "vs CT2 int8" in lines[0] and lines[1].count("---") == lines[0].count(" |")
    assert "| 2.00x | 4.00x | 10% | 120 |" in lines[2]
    assert "vs CT2 int8" not in table([ours], {1: fp32}).splitlines()[0]
