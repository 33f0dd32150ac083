"""`seqserve bench`: how fast the in-process engine decodes, measured like the peer engines.

A random-weight model of the requested dimensions is exported through the normal export path
(cached; export runs in a subprocess so this process never imports torch). Each batch size is
then measured in a fresh child process: greedy decoding of exactly `--new-tokens` tokens
(`min_new_tokens`, the option users get too) through the same `Scheduler` the server uses, a
warm-up call, then blocks of back-to-back calls (each block >= 0.5 s) until the time budget is
spent; the figure is the median call time over blocks. Blocks during which other processes used
more than 5% of a core are counted as contended and left out when clean ones exist.

With `--peers`, the same run measures CTranslate2 (`seqserve.bench.peers`: a random-weight model
of the same dimensions, built from them; needs the `peers` extra), and optionally Hugging Face
transformers (`--peers hf`), with the same source lengths, batch sizes, token count, thread count
and timing, and reports the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

PRESETS: dict[str, dict[str, int]] = {  # a small model, and the paper's base dims with a 32k vocabulary
    "small": dict(d_model=256, encoder_layers=3, decoder_layers=3, n_heads=4, d_ff=1024, vocab_size=8000),
    "base": dict(d_model=512, encoder_layers=6, decoder_layers=6, n_heads=8, d_ff=2048, vocab_size=32000),
}
DEFAULT_CACHE = Path(os.environ.get("SEQSERVE_BENCH_CACHE", Path.home() / ".cache" / "seqserve" / "bench"))


def cpu_time_ticks(pid: int | None = None) -> int:
    """CPU time (clock ticks) of the whole machine (pid None) or of one process."""
    if pid is None:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        return sum(int(f) for i, f in enumerate(fields) if i not in (3, 4))  # all but idle and iowait
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[11]) + int(stat[12])  # utime + stime


def peak_rss_mb() -> int:
    """This process's peak resident memory (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


def source_ids(vocab_size: int, batch: int, source_len: int) -> list[list[int]]:
    """The random source ids every engine decodes from (seed 0; ids 0-3 are the special tokens)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [[int(i) for i in rng.integers(4, vocab_size, source_len)] for _ in range(batch)]


def timed_blocks(call: Callable[[], None], *, budget: float, min_reps: int, max_reps: int,
                 after_warmup: Callable[[], None] | None = None) -> dict[str, Any]:
    """Time `call`: one warm-up call, then blocks of back-to-back calls (each about 0.5 s) until
    `budget` seconds and at least `min_reps` blocks (at most `max_reps`). A block during which other
    processes used more than 5% of a core is contended, and left out when clean blocks exist.
    Returns the median seconds per call over blocks, and how the blocks went."""
    start = time.perf_counter()
    call()
    warmup_s = time.perf_counter() - start
    if after_warmup is not None:
        after_warmup()
    per_block = max(1, int(0.5 / max(warmup_s, 1e-3)))
    me, cpu_ticks = os.getpid(), os.sysconf("SC_CLK_TCK")
    blocks: list[tuple[float, bool]] = []
    deadline = time.perf_counter() + budget
    while len(blocks) < max_reps and (len(blocks) < min_reps or time.perf_counter() < deadline):
        machine, own = cpu_time_ticks(), cpu_time_ticks(me)
        start = time.perf_counter()
        for _ in range(per_block):
            call()
        elapsed = time.perf_counter() - start
        others = (cpu_time_ticks() - machine) - (cpu_time_ticks(me) - own)
        blocks.append((elapsed / per_block, others / cpu_ticks > 0.05 * elapsed))
    clean = [t for t, contended in blocks if not contended]
    return {"median_s": statistics.median(clean or [t for t, _ in blocks]), "reps": f"{len(blocks)}x{per_block}",
            "contended_blocks": sum(c for _, c in blocks), "clean": bool(clean), "warmup_s": round(warmup_s, 3)}


def measure(model_dir: str, *, batch: int, new_tokens: int, source_len: int, threads: int, budget: float,
            min_reps: int, max_reps: int, device: str = "cpu", spinning: str = "on",
            io_binding: str = "auto") -> dict[str, Any]:
    """Median time of one call (encoder + exactly new_tokens steps for `batch` inputs); runs in a child."""
    from seqserve.runtime.engine import OnnxSeq2Seq
    from seqserve.runtime.generation import GenerationParams
    from seqserve.server.scheduler import Scheduler

    class StepTimes:
        def __init__(self) -> None:
            self.step = self.run = 0.0

        def on_encode(self, requests: int, seconds: float) -> None: ...

        def on_step(self, rows: int, seconds: float, run_seconds: float) -> None:
            self.step += seconds
            self.run += run_seconds

        def on_queue_depth(self, depth: int) -> None: ...

    load_start = time.perf_counter()
    engine = OnnxSeq2Seq(model_dir, device=device, intra_op_threads=threads, spinning=spinning,  # type: ignore[arg-type]
                         io_binding=io_binding)  # type: ignore[arg-type]
    load_s = time.perf_counter() - load_start
    sources = source_ids(engine.config.vocab_size, batch, source_len)
    params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    times = StepTimes()
    scheduler = Scheduler(engine, max_batch_size=batch, max_queue=batch, observer=times)
    scheduler.start()

    def call() -> None:
        handles = [scheduler.submit(s, params) for s in sources]
        for h in handles:
            tokens = h.future.result().sequences[0].token_ids
            if len(tokens) != new_tokens:
                raise RuntimeError(f"expected {new_tokens} tokens, got {len(tokens)}")

    def reset() -> None:
        times.step = times.run = 0.0

    timing = timed_blocks(call, budget=budget, min_reps=min_reps, max_reps=max_reps, after_warmup=reset)
    scheduler.stop()
    median = timing.pop("median_s")
    return {
        "engine": "seqserve", "batch": batch, "src_len": source_len, "new_tokens": new_tokens, "threads": threads,
        "ms_per_step": round(1e3 * median / new_tokens, 3), "tok_per_s": round(batch * new_tokens / median, 1),
        "spinning": spinning, "kv_cache_on_device": engine.device_cache is not None, "median_s": round(median, 4),
        **timing, "python_share": round(1 - times.run / times.step, 3) if times.step else None,
        "peak_rss_mb": peak_rss_mb(), "load_s": round(load_s, 2), "providers": engine.providers,
    }


def measure_in_child(model_dir: str | Path, *, batch: int, new_tokens: int, source_len: int, threads: int,
                     budget: float, min_reps: int = 3, max_reps: int = 10, device: str = "cpu",
                     spinning: str = "on", io_binding: str = "auto", command: str = "seqserve bench") -> dict[str, Any]:
    """`measure` in a fresh process (`seqserve bench --child`), so that each batch size has its own
    thread pools and peak RSS; a failed child is a SystemExit naming `command` and the batch."""
    cmd = [sys.executable, "-m", "seqserve.bench.bench", "--child", "--model-dir", str(model_dir),
           "--batch", str(batch), "--new-tokens", str(new_tokens), "--source-len", str(source_len),
           "--threads", str(threads), "--budget", str(budget), "--min-reps", str(min_reps),
           "--max-reps", str(max_reps), "--device", device, "--spinning", spinning, "--io-binding", io_binding]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"{command}: batch {batch} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1])


def model_dims(model_dir: Path) -> dict[str, int]:
    """The dims a peer engine needs to build the same model, from a model directory's config.json."""
    from seqserve.runtime import names

    model = json.loads((model_dir / names.CONFIG_FILE).read_text())["model"]
    return {k: int(model[k]) for k in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "n_heads", "d_ff")}


def ensure_model_dir(dims: dict[str, int], quantize: str | None, cache: Path) -> Path:
    """The exported random-weight model for these dims, exporting it (in a subprocess) if not cached."""
    from seqserve.runtime import names

    key = json.dumps({"dims": dims, "quantize": quantize, "format": names.FORMAT_VERSION,
                      "weights": names.WEIGHTS_SUFFIX}, sort_keys=True)
    out = cache / f"{dims['d_model']}x{dims['encoder_layers']}-{'int8' if quantize else 'fp32'}-" \
                  f"{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if not (out / names.CONFIG_FILE).is_file():
        cmd = [sys.executable, "-m", "seqserve.export.random_model", "--dims", json.dumps(dims), "--out", str(out)]
        if quantize:
            cmd += ["--quantize", quantize]
        print(f"exporting a random-weight model to {out} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"seqserve bench: export failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return out


def table(rows: list[dict], reference: dict[int, dict], int8_reference: dict[int, dict] | None = None) -> str:
    """Markdown table of our rows, with the ratio to CTranslate2 fp32 (and int8, when measured)."""
    int8_reference = int8_reference or {}
    head = "| dims | batch | threads | engine | ms/step | tok/s | vs CT2 fp32 (tok/s ratio) |"
    head += " vs CT2 int8 |" if int8_reference else ""
    head += " Python share | peak RSS MB |"
    lines = [head, "|" + "---|" * head.count(" |")]

    def ratio(row: dict, ref: dict | None) -> str:
        return f"{row['tok_per_s'] / ref['tok_per_s']:.2f}x" if ref and "tok_per_s" in ref else "-"

    for r in rows:
        share = f"{100 * r['python_share']:.0f}%" if r.get("python_share") is not None else "-"
        int8 = f" {ratio(r, int8_reference.get(r['batch']))} |" if int8_reference else ""
        lines.append(f"| {r['dims']} | {r['batch']} | {r['threads']} | {r['engine']} | {r['ms_per_step']:.2f} | "
                     f"{r['tok_per_s']:.0f} | {ratio(r, reference.get(r['batch']))} |{int8} {share} | {r['peak_rss_mb']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqserve bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model dimensions (default small)")
    p.add_argument("--dims", help="explicit dims as JSON (vocab_size, d_model, encoder_layers, ...), over --preset")
    p.add_argument("--model-dir", help="measure this model directory instead of a random-weight one")
    p.add_argument("--quantize", choices=("int8",), help="measure the int8 export")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per input, exactly (default 64)")
    p.add_argument("--source-len", type=int, default=32, help="source tokens per input (default 32)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--spinning", choices=("on", "run", "off"), default="on",
                   help="ONNX Runtime intra-op spin-waiting, as the server's --intra-op-spinning (default on)")
    p.add_argument("--io-binding", choices=("auto", "on", "off"), default="auto",
                   help="KV cache on the device between steps, as the server's --io-binding (default auto: on with CUDA)")
    p.add_argument("--budget", type=float, default=10.0, help="seconds of timed blocks per batch size (default 10)")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=10)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"exported models (default {DEFAULT_CACHE})")
    p.add_argument("--json", type=Path, help="also write the records here, one JSON object per line")
    p.add_argument("--peers", nargs="*", metavar="ENGINE",
                   help="also measure peer engines at the same dims in this run: ct2_fp32, ct2_int8 (CTranslate2, "
                        "the peers extra), hf (Hugging Face transformers with torch); default ct2_fp32, plus "
                        "ct2_int8 with --quantize")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:  # one measurement, in a fresh process
        record = measure(args.model_dir, batch=args.batch[0], new_tokens=args.new_tokens, source_len=args.source_len,
                         threads=args.threads, budget=args.budget, min_reps=args.min_reps, max_reps=args.max_reps,
                         device=args.device, spinning=args.spinning, io_binding=args.io_binding)
        print(json.dumps(record), flush=True)
        return 0

    dims = json.loads(args.dims) if args.dims else PRESETS[args.preset]
    model_dir = Path(args.model_dir) if args.model_dir else ensure_model_dir(dims, args.quantize, args.cache_dir)
    label = args.preset if not (args.dims or args.model_dir) else str(model_dir.name)
    rows: list[dict] = []
    for batch in args.batch:
        record = {**measure_in_child(model_dir, batch=batch, new_tokens=args.new_tokens,
                                     source_len=args.source_len, threads=args.threads, budget=args.budget,
                                     min_reps=args.min_reps, max_reps=args.max_reps, device=args.device,
                                     spinning=args.spinning, io_binding=args.io_binding),
                  "dims": label, "quantize": args.quantize}
        print(json.dumps(record), flush=True)
        rows.append(record)
    reference: dict[int, dict] = {}
    int8_reference: dict[int, dict] = {}
    if args.peers is not None:
        from seqserve.bench import peers

        engines = args.peers or (["ct2_fp32", "ct2_int8"] if args.quantize else ["ct2_fp32"])
        for record in peers.run(engines, model_dims(model_dir), batches=args.batch, new_tokens=args.new_tokens,
                                source_len=args.source_len, threads=args.threads, budget=args.budget,
                                min_reps=args.min_reps, max_reps=args.max_reps, cache=args.cache_dir):
            record = {**record, "dims": label}
            print(json.dumps(record), flush=True)
            if "error" not in record:
                rows.append(record)
                if record["engine"] == "ct2_fp32":
                    reference[record["batch"]] = record
                elif record["engine"] == "ct2_int8":
                    int8_reference[record["batch"]] = record
    if args.json:
        with args.json.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(table([{**r, "threads": r.get("threads", args.threads), "python_share": r.get("python_share")} for r in rows],
                reference, int8_reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
