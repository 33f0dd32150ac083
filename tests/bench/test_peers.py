"""`seqserve bench --peers`: CTranslate2 built from the dims alone and measured like seqserve.

The measurements need `ctranslate2` (the `peers` extra) and are skipped without it; what happens
without it is tested everywhere.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from seqserve.bench import peers
from seqserve.bench.bench import main as bench
from seqserve.bench.bench import model_dims

TINY = dict(vocab_size=300, d_model=32, encoder_layers=1, decoder_layers=2, n_heads=2, d_ff=64)


def test_without_ctranslate2_the_peers_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("ctranslate2", "transformers") else real_find_spec(name, *a))
    assert "seqserve[peers]" in (peers.available(["ct2_fp32"]) or "")
    assert "transformers" in (peers.available(["hf"]) or "")
    with pytest.raises(SystemExit, match="seqserve\\[peers\\]"):
        peers.run(["ct2_fp32"], TINY, batches=[1], new_tokens=4, source_len=3, threads=1, budget=0.1,
                  min_reps=1, max_reps=1, cache=Path("/nonexistent"))


def test_unknown_peer_engines_are_refused() -> None:
    with pytest.raises(SystemExit, match="ct2_fp16"):
        peers.run(["ct2_fp16"], TINY, batches=[1], new_tokens=4, source_len=3, threads=1, budget=0.1,
                  min_reps=1, max_reps=1, cache=Path("/nonexistent"))


def test_model_dims_come_from_the_model_directory(model_dir: Path) -> None:
    model = json.loads((model_dir / "config.json").read_text())["model"]
    dims = model_dims(model_dir)
    assert set(dims) == set(TINY) and all(dims[k] == model[k] for k in dims)


def test_ctranslate2_model_is_built_once_with_the_dims(tmp_path: Path) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    out = peers.build_ct2_model(TINY, tmp_path / "ct2")
    stamp = (out / "seqserve-peer.json").stat().st_mtime_ns
    assert peers.build_ct2_model(TINY, tmp_path / "ct2") == out
    assert (out / "seqserve-peer.json").stat().st_mtime_ns == stamp  # cached
    translator = ctranslate2.Translator(str(out), device="cpu", intra_threads=1)
    result = translator.translate_batch([["t5", "t6", "t7"]], beam_size=1, min_decoding_length=6,
                                        max_decoding_length=6, return_scores=False)
    assert len(result[0].hypotheses[0]) == 6


def test_bench_measures_ctranslate2_beside_seqserve(model_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ctranslate2")
    out = tmp_path / "records.jsonl"
    args = ["--model-dir", str(model_dir), "--batch", "1", "2", "--new-tokens", "6", "--source-len", "4",
            "--threads", "1", "--budget", "0.1", "--min-reps", "1", "--max-reps", "1",
            "--cache-dir", str(tmp_path / "cache"), "--json", str(out), "--peers", "ct2_fp32", "ct2_int8"]
    assert bench(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["engine"], r["batch"]) for r in records) == sorted(
        (e, b) for e in ("seqserve", "ct2_fp32", "ct2_int8") for b in (1, 2))
    for r in records:
        assert r["new_tokens"] == 6 and r["ms_per_step"] > 0 and r["peak_rss_mb"] > 0 and r["threads"] == 1
    table = capsys.readouterr().out
    assert "vs CT2 int8" in table and "| 1.00x | " in table


def test_hf_peer_decodes_exactly_the_asked_tokens(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    records = peers.run(["hf"], TINY, batches=[2], new_tokens=5, source_len=4, threads=1, budget=0.1,
                        min_reps=1, max_reps=1, cache=tmp_path)
    assert "error" not in records[0], records[0]
    assert records[0]["engine"] == "hf" and records[0]["new_tokens"] == 5 and records[0]["ms_per_step"] > 0
    assert "transformers" in records[0]["version"]
