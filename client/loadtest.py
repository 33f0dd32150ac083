"""`seqserve-loadtest`: measure a seqserve server under load.

    seqserve-loadtest --address localhost:50051 --concurrency 1,8,32 --duration 10 --plot load.png
    seqserve-loadtest --mode open --rate 50 --stream --requests 2000 --json

Closed loop (N concurrent callers; a comma list sweeps N) or open loop (Poisson arrivals at a fixed
rate; a comma list sweeps the rate); unary Generate or GenerateStream; inputs from a file (one per
line; a TSV's first column) or the built-in dates generator. Each level runs a warm-up first, then
a measured run bounded by --duration and/or --requests. Prints a table (or --json), optionally a
PNG (--plot). Exit 1 when the server cannot be reached, 2 when the counts do not add up.

A thin `main` over `loadgen` (sending) and `loadreport` (summaries and rendering).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from seqserve.client.aio import AsyncClient
from seqserve.client.cliargs import client_kwargs, connection_parser, generation_kwargs, generation_parser
from seqserve.client.errors import SeqserveClientError
from seqserve.client.loadgen import ARRIVALS, MODES, LoadSpec, RunResult, split_spec, sweep, sweep_in_processes
from seqserve.client.loadreport import CountMismatch, LevelReport, format_table, plot, summarize, to_json
from seqserve.runtime.errors import SeqserveError

PROG = "seqserve-loadtest"
DEFAULT_DURATION_S = 10.0


def _levels(cast: type) -> Any:
    def parse(value: str) -> list[Any]:
        try:
            out = [cast(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}") from None
        if not out or any(v <= 0 for v in out):
            raise argparse.ArgumentTypeError(f"expected positive values, got {value!r}")
        return out
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, parents=[connection_parser(), generation_parser()],
                                description=__doc__.split("\n\n")[2] if __doc__ else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("load")
    g.add_argument("--mode", choices=MODES, default="closed",
                   help="closed: concurrent callers; open: arrivals at a fixed rate (default closed)")
    g.add_argument("--concurrency", "-c", type=_levels(int), default=[1], metavar="N[,N...]",
                   help="closed loop: concurrent callers; a list sweeps them (default 1)")
    g.add_argument("--rate", "-r", type=_levels(float), default=[10.0], metavar="R[,R...]",
                   help="open loop: requests per second; a list sweeps them (default 10)")
    g.add_argument("--arrival", choices=ARRIVALS, default="poisson", help="open loop arrivals (default poisson)")
    g.add_argument("--stream", action="store_true",
                   help="GenerateStream: also time to first token and inter-token latency")
    g.add_argument("--duration", "-d", type=float, metavar="S",
                   help=f"seconds of sending per level (default {DEFAULT_DURATION_S:g} unless --requests is given)")
    g.add_argument("--requests", "-n", type=int, metavar="N",
                   help="requests per level (with --duration: whichever first)")
    g.add_argument("--warmup", type=float, default=2.0, metavar="S",
                   help="warm-up seconds before each level (default 2; 0: none)")
    g.add_argument("--inputs-per-request", type=int, default=1, metavar="K",
                   help="inputs per Generate call (default 1)")
    g.add_argument("--max-in-flight", type=int, default=1024, help="open loop: most unfinished calls (default 1024)")
    g.add_argument("--processes", type=int, default=1, metavar="N",
                   help="sending processes, each with its own client and connections, sharing each level's "
                        "rate or callers (one Python process sends about a thousand calls a second at most; "
                        "default 1)")
    d = p.add_argument_group("inputs")
    d.add_argument("--inputs", type=Path, metavar="FILE", help="one input per line (a TSV's first column)")
    d.add_argument("--task", default="dates", choices=("dates",), help="built-in input generator (default dates)")
    d.add_argument("--num-inputs", type=int, default=1000, help="distinct generated inputs (default 1000)")
    d.add_argument("--data-seed", type=int, default=0, help="seed of the generated inputs and the arrival times")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    o.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="write a PNG: latency distribution, throughput vs level")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    return p


def read_inputs(path: Path) -> list[str]:
    """Inputs of a file: one per non-blank line; a TSV line's first column."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SeqserveError(f"{path}: cannot read inputs: {exc}") from None
    texts = [line.split("\t", 1)[0].strip() for line in lines]
    texts = [t for t in texts if t]
    if not texts:
        raise SeqserveError(f"{path}: no inputs (one per line expected)")
    return texts


def generated_inputs(task: str, n: int, seed: int) -> list[str]:
    """Sources of the built-in task's generator (torch-free)."""
    from seqserve.model.data import task_pairs

    return [pair.source for pair in task_pairs(task, n, seed=seed)]


def specs_from_args(args: argparse.Namespace) -> list[LoadSpec]:
    """One LoadSpec per swept level."""
    duration = args.duration if args.duration is not None else (None if args.requests else DEFAULT_DURATION_S)
    common = dict(mode=args.mode, arrival=args.arrival, stream=args.stream, duration_s=duration,
                  requests=args.requests, inputs_per_request=args.inputs_per_request, timeout_s=args.timeout,
                  max_in_flight=args.max_in_flight, seed=args.data_seed)
    if args.mode == "closed":
        return [LoadSpec(concurrency=c, **common) for c in args.concurrency]
    return [LoadSpec(rate=r, **common) for r in args.rate]


async def run(args: argparse.Namespace, texts: list[str], log: TextIO | None
              ) -> tuple[list[LevelReport], list[RunResult], dict[str, Any]]:
    """Connect, check the server answers, run every level; returns reports, runs and metadata."""
    specs = specs_from_args(args)
    options = generation_kwargs(args)
    async with AsyncClient(**client_kwargs(args)) as client:
        info = await client.model_info()
        meta = {"target": client.target, "model_version": info.model_version, "providers": list(info.providers),
                "max_batch_size": info.limits.max_batch_size, "mode": args.mode, "stream": args.stream,
                "warmup_s": args.warmup, "duration_s": specs[0].duration_s, "requests": args.requests,
                "timeout_s": args.timeout, "retry_overloaded": args.retry_overloaded,
                "inputs": str(args.inputs) if args.inputs else f"{args.task} x{len(texts)} (seed {args.data_seed})",
                "options": {k: v for k, v in options.items() if v not in (None, False, [], 0)},
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        reports: list[LevelReport] = []

        def done(result: RunResult) -> None:
            report = summarize(result)  # CountMismatch stops the sweep here
            reports.append(report)
            if log is not None:
                level = f"concurrency {report.concurrency}" if report.mode == "closed" else f"rate {report.rate:g}/s"
                print(f"{PROG}: {level}: {report.sent} sent, {report.failed} failed, "
                      f"{report.requests_per_s:.1f} req/s ({report.goodput_per_s:.1f} within their deadline), "
                      f"{report.output_tokens_per_s:.0f} tok/s",
                      file=log, flush=True)

        if args.processes == 1:
            runs = await sweep(client, texts, specs, options, warmup_s=args.warmup, on_done=done)
    if args.processes > 1:  # after this process's own connections are closed: it only gathers
        meta["processes"] = args.processes
        runs = await asyncio.to_thread(sweep_in_processes, client_kwargs(args), texts, specs, options,
                                       processes=args.processes, warmup_s=args.warmup, on_done=done)
    return reports, runs, meta


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    log = None if args.quiet else sys.stderr
    try:
        if args.inputs:
            texts = read_inputs(args.inputs)
        else:
            texts = generated_inputs(args.task, args.num_inputs, args.data_seed)
        for spec in specs_from_args(args):  # bad combinations fail here, before connecting
            split_spec(spec, args.processes)
        started = time.monotonic()
        reports, runs, meta = asyncio.run(run(args, texts, log))
        meta["elapsed_s"] = round(time.monotonic() - started, 3)
    except CountMismatch as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SeqserveClientError as exc:
        print(f"{PROG}: error: cannot use the server: {exc}", file=sys.stderr)
        return 1
    except (SeqserveError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(to_json(reports, meta) if args.json else format_table(reports), file=out)
    if args.plot:
        try:
            path = plot(reports, runs, args.plot)
        except RuntimeError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 1
        if log is not None:
            print(f"{PROG}: wrote {path}", file=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
