"""Peer engines for `seqserve bench --peers`: CTranslate2 (and, optionally, Hugging Face
transformers) on a random-weight model of the same dimensions, measured the way `seqserve bench`
measures seqserve.

The CTranslate2 model is built here from the dimensions alone, with CTranslate2's own model
specification (`ctranslate2.specs.TransformerSpec`): the vanilla post-norm Transformer with ReLU
feed-forward layers, sinusoidal positions, scaled embeddings shared by the encoder, the decoder
and the output projection, and seeded random weights. Nothing is downloaded and torch is not
needed; the `peers` extra (`pip install 'seqserve[peers]'`) brings `ctranslate2`. Speed does not
depend on the weights, so both engines decode exactly `--new-tokens` tokens (the end token is
held back by `min_decoding_length`) from the same random source ids.

`hf` is the same Transformer as a Hugging Face `MarianMTModel` built from its config (post-norm,
ReLU, sinusoidal positions, tied scaled embeddings) with seeded random weights, decoded by
`generate` with its KV cache; it needs torch and transformers (`pip install transformers` beside
the `train` extra), and is measured only when named (`--peers hf`).

Each engine and batch size runs in a fresh child process (`python -m seqserve.bench.peers
--child ...`), so its peak memory is its own, and is timed with the same blocks as seqserve
(`bench.timed_blocks`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from seqserve.bench.bench import peak_rss_mb, source_ids, timed_blocks

CT2 = {"ct2_fp32": "float32", "ct2_int8": "int8"}  # engine name -> CTranslate2 compute type
ENGINES = (*CT2, "hf")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3, as in seqserve's tokenizers
FORMAT = 1  # bump when the built model changes, so cached copies are rebuilt


def vocabulary(vocab_size: int) -> list[str]:
    """Token strings of ids 0..V-1: the specials, then `t4`, `t5`, ... (seqserve's random models' names)."""
    return SPECIALS + [f"t{i}" for i in range(len(SPECIALS), vocab_size)]


def build_ct2_model(dims: dict[str, int], out: Path, *, seed: int = 0) -> Path:
    """Write a CTranslate2 model of these dims with seeded random weights to `out` (cached)."""
    import ctranslate2
    from ctranslate2.specs import common_spec, transformer_spec

    stamp = out / "seqserve-peer.json"
    key = {"dims": dims, "seed": seed, "format": FORMAT, "ctranslate2": ctranslate2.__version__}
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        return out
    d, ff, v = dims["d_model"], dims["d_ff"], dims["vocab_size"]
    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * cols ** -0.5).astype(np.float32)

    def linear(spec: common_spec.LinearSpec, rows: int, cols: int) -> None:
        spec.weight = weight(rows, cols)
        spec.bias = np.zeros(rows, np.float32)

    def layer_norm(spec: common_spec.LayerNormSpec) -> None:
        spec.gamma = np.ones(d, np.float32)
        spec.beta = np.zeros(d, np.float32)

    def feed_forward(spec: transformer_spec.FeedForwardSpec) -> None:
        layer_norm(spec.layer_norm)
        linear(spec.linear_0, ff, d)  # (d_ff, d)
        linear(spec.linear_1, d, ff)  # (d, d_ff)

    spec = transformer_spec.TransformerSpec.from_config(
        (dims["encoder_layers"], dims["decoder_layers"]), dims["n_heads"], pre_norm=False,
        activation=common_spec.Activation.RELU)
    embeddings = weight(v, d)  # (V, d), one table for both sides and the output, as in seqserve
    for side in (spec.encoder, spec.decoder):
        for table in side.embeddings if isinstance(side.embeddings, list) else [side.embeddings]:
            table.weight = embeddings
        side.scale_embeddings = True
    for layer in spec.encoder.layer:
        linear(layer.self_attention.linear[0], 3 * d, d)  # fused Q, K, V
        linear(layer.self_attention.linear[1], d, d)
        layer_norm(layer.self_attention.layer_norm)
        feed_forward(layer.ffn)
    for layer in spec.decoder.layer:
        linear(layer.self_attention.linear[0], 3 * d, d)  # fused Q, K, V
        linear(layer.self_attention.linear[1], d, d)
        layer_norm(layer.self_attention.layer_norm)
        linear(layer.attention.linear[0], d, d)  # Q from the decoder
        linear(layer.attention.linear[1], 2 * d, d)  # fused K, V from the encoder output
        linear(layer.attention.linear[2], d, d)
        layer_norm(layer.attention.layer_norm)
        feed_forward(layer.ffn)
    spec.decoder.projection.weight = embeddings
    spec.register_source_vocabulary(vocabulary(v))
    spec.register_target_vocabulary(vocabulary(v))
    spec.validate()
    spec.optimize()  # float32 on disk; int8 is applied when the model is loaded
    out.mkdir(parents=True, exist_ok=True)
    spec.save(str(out))
    stamp.write_text(json.dumps(key))
    return out


def ct2_call(model: Path, *, engine: str, vocab_size: int, batch: int, new_tokens: int, source_len: int,
             threads: int) -> tuple[Callable[[], None], str]:
    """One CTranslate2 call decoding `batch` sources, and the engine's version."""
    import ctranslate2

    translator = ctranslate2.Translator(str(model), device="cpu", compute_type=CT2[engine],
                                        intra_threads=threads, inter_threads=1)
    names = vocabulary(vocab_size)
    sources = [[names[i] for i in row] for row in source_ids(vocab_size, batch, source_len)]

    def call() -> None:
        results = translator.translate_batch(sources, beam_size=1, min_decoding_length=new_tokens,
                                             max_decoding_length=new_tokens)
        for r in results:
            if len(r.hypotheses[0]) != new_tokens:
                raise RuntimeError(f"expected {new_tokens} tokens, got {len(r.hypotheses[0])}")

    return call, f"ctranslate2 {ctranslate2.__version__}"


def hf_call(dims: dict[str, int], *, batch: int, new_tokens: int, source_len: int,
            threads: int) -> tuple[Callable[[], None], str]:
    """One Hugging Face `generate` call (greedy, KV cache) decoding `batch` sources, and the versions."""
    import torch
    import transformers
    from transformers import MarianConfig, MarianMTModel

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    config = MarianConfig(
        vocab_size=dims["vocab_size"], d_model=dims["d_model"], encoder_layers=dims["encoder_layers"],
        decoder_layers=dims["decoder_layers"], encoder_attention_heads=dims["n_heads"],
        decoder_attention_heads=dims["n_heads"], encoder_ffn_dim=dims["d_ff"], decoder_ffn_dim=dims["d_ff"],
        activation_function="relu", max_position_embeddings=max(512, source_len + new_tokens + 2),
        scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True, dropout=0.0,
        pad_token_id=0, decoder_start_token_id=1, eos_token_id=2, bos_token_id=None, forced_eos_token_id=None)
    torch.manual_seed(0)
    model = MarianMTModel(config).eval()
    ids = torch.tensor(source_ids(dims["vocab_size"], batch, source_len))
    mask = torch.ones_like(ids)

    def call() -> None:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, use_cache=True,
                                 min_new_tokens=new_tokens, max_new_tokens=new_tokens)
        if out.shape[1] - 1 != new_tokens:  # the decoder start token comes first
            raise RuntimeError(f"expected {new_tokens} tokens, got {out.shape[1] - 1}")

    return call, f"torch {torch.__version__}, transformers {transformers.__version__}"


def measure(model: Path, *, engine: str, dims: dict[str, int], batch: int, new_tokens: int, source_len: int,
            threads: int, budget: float, min_reps: int, max_reps: int) -> dict[str, Any]:
    """Median time of one call (encoder + exactly new_tokens steps for `batch` inputs); runs in a child."""
    load_start = time.perf_counter()
    if engine in CT2:
        call, version = ct2_call(model, engine=engine, vocab_size=dims["vocab_size"], batch=batch,
                                 new_tokens=new_tokens, source_len=source_len, threads=threads)
    else:
        call, version = hf_call(dims, batch=batch, new_tokens=new_tokens, source_len=source_len, threads=threads)
    load_s = time.perf_counter() - load_start
    timing = timed_blocks(call, budget=budget, min_reps=min_reps, max_reps=max_reps)
    median = timing.pop("median_s")
    return {
        "engine": engine, "batch": batch, "src_len": source_len, "new_tokens": new_tokens, "threads": threads,
        "ms_per_step": round(1e3 * median / new_tokens, 3), "tok_per_s": round(batch * new_tokens / median, 1),
        "median_s": round(median, 4), **timing, "python_share": None, "peak_rss_mb": peak_rss_mb(),
        "load_s": round(load_s, 2), "version": version,
    }


def available(engines: list[str]) -> str | None:
    """None when these engines can run here, else what to install."""
    import importlib.util

    if any(e in CT2 for e in engines) and importlib.util.find_spec("ctranslate2") is None:
        return "CTranslate2 is not installed: pip install 'seqserve[peers]' (or ctranslate2)"
    if "hf" in engines and not all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
        return "the hf peer needs torch and transformers: pip install 'seqserve[train]' transformers"
    return None


def run(engines: list[str], dims: dict[str, int], *, batches: list[int], new_tokens: int, source_len: int,
        threads: int, budget: float, min_reps: int, max_reps: int, cache: Path) -> list[dict[str, Any]]:
    """Measure each engine at each batch size, each in a fresh child process; one record each
    (an `error` field instead of figures when that measurement failed)."""
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise SystemExit(f"seqserve bench: unknown peer engine(s) {', '.join(unknown)}; known: {', '.join(ENGINES)}")
    if (missing := available(engines)) is not None:
        raise SystemExit(f"seqserve bench: --peers: {missing}")
    model = cache / ("ct2-" + "-".join(f"{k}{dims[k]}" for k in sorted(dims)))
    if any(e in CT2 for e in engines):
        print(f"building the CTranslate2 model in {model} ...", file=sys.stderr, flush=True)
        build_ct2_model(dims, model)
    records = []
    for batch in batches:
        for engine in engines:
            cmd = [sys.executable, "-m", "seqserve.bench.peers", "--child", "--model", str(model), "--engine", engine,
                   "--dims", json.dumps(dims), "--batch", str(batch), "--new-tokens", str(new_tokens),
                   "--source-len", str(source_len), "--threads", str(threads), "--budget", str(budget),
                   "--min-reps", str(min_reps), "--max-reps", str(max_reps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                records.append({"engine": engine, "batch": batch,
                                "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                records.append(json.loads(lines[-1]))
    return records


def main(argv: list[str] | None = None) -> int:
    """The measuring child: one engine, one batch size, one JSON record on stdout."""
    p = argparse.ArgumentParser(prog="python -m seqserve.bench.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--engine", choices=sorted(ENGINES), required=True)
    p.add_argument("--dims", type=json.loads, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--source-len", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--min-reps", type=int, required=True)
    p.add_argument("--max-reps", type=int, required=True)
    a = p.parse_args(argv)
    record = measure(a.model, engine=a.engine, dims=a.dims, batch=a.batch, new_tokens=a.new_tokens,
                     source_len=a.source_len, threads=a.threads, budget=a.budget, min_reps=a.min_reps,
                     max_reps=a.max_reps)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
