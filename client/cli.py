"""`seqserve-client`: call a seqserve server from the shell.

    seqserve-client generate "25 November 2026" [--stream] [--json] [options]
    echo "nov 5 1999" | seqserve-client generate
    seqserve-client info [--json]
    seqserve-client health [--wait S]

The address comes from --address or $SEQSERVE_ADDRESS. A failed call prints one line
(`seqserve-client: error: CODE: message`) and exits 1; `health` exits 1 unless SERVING.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from seqserve.client.blocking import Client
from seqserve.client.channel import SERVICE_NAME
from seqserve.client.cliargs import client_kwargs, connection_parser, generation_kwargs, generation_parser
from seqserve.client.errors import SeqserveClientError
from seqserve.client.heatmap import plot_heatmap, text_heatmap
from seqserve.client.results import GenerationResult, HealthStatus, ModelInfo, TokenPiece

PROG = "seqserve-client"


def to_jsonable(value: Any) -> Any:
    """Result records as JSON values (arrays as nested lists, enums as their values)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays
        return value.tolist()
    return value


def build_parser() -> argparse.ArgumentParser:
    conn, gen = connection_parser(), generation_parser()
    p = argparse.ArgumentParser(prog=PROG, description="Call a seqserve server (seqserve.v1.SeqServe).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("generate", parents=[conn, gen], help="generate for one or more inputs",
                       description="Generate for each TEXT (default: one per line from standard input); "
                                   "prints one line per output sequence.")
    g.add_argument("texts", nargs="*", metavar="TEXT")
    g.add_argument("--stream", action="store_true", help="print tokens as they are decoded (one input)")
    g.add_argument("--json", action="store_true",
                   help="print the full results as JSON (with --stream: one JSON object per event)")
    g.add_argument("--request-id", help="an id echoed in the result and the server's logs")
    g.add_argument("--plot", metavar="FILE.png",
                   help="write each input's alignment heatmap as a PNG (implies --alignments; several inputs: "
                        "FILE-1.png, FILE-2.png, ...; needs matplotlib)")
    i = sub.add_parser("info", parents=[conn], help="describe the served model and the server's limits")
    i.add_argument("--json", action="store_true", help="print JSON")
    h = sub.add_parser("health", parents=[conn], help="print the server's health (exit 0 only when SERVING)")
    h.add_argument("--service", default=SERVICE_NAME,
                   help=f"service to ask about ('' = the server; default {SERVICE_NAME})")
    h.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for SERVING")
    return p


def print_results(results: Sequence[GenerationResult], out: TextIO) -> None:
    """One line per sequence; with alignments, each followed by its text heatmap."""
    for result in results:
        for seq in result.sequences:
            print(seq.text, file=out)
            if seq.alignments is not None and result.source_tokens and seq.alignment_tokens:
                print(text_heatmap(result.source_tokens, seq.alignment_tokens, seq.alignments), file=out)


def plot_results(texts: Sequence[str], results: Sequence[GenerationResult], path: str) -> list[Path]:
    """Each input's first sequence as a heatmap PNG at `path` (numbered when there are several)."""
    written = []
    target = Path(path)
    for i, (text, result) in enumerate(zip(texts, results), start=1):
        seq = result.sequences[0]
        if seq.alignments is None or not result.source_tokens or not seq.alignment_tokens:
            continue
        file = target if len(results) == 1 else target.with_name(f"{target.stem}-{i}{target.suffix or '.png'}")
        written.append(plot_heatmap(result.source_tokens, seq.alignment_tokens, seq.alignments, file,
                                    title=f"{text} -> {seq.text}"))
    return written


def run_generate(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise SystemExit(f"{PROG} generate: no input (give TEXT arguments or lines on standard input)")
    options = generation_kwargs(args)
    if args.plot:
        options["return_alignments"] = True
    if args.stream:
        if len(texts) != 1:
            raise SystemExit(f"{PROG} generate --stream: exactly one input, got {len(texts)}")
        sequences_seen: set[int] = set()
        for item in client.generate_stream(texts[0], request_id=args.request_id, **options):
            if args.json:
                kind = "token" if isinstance(item, TokenPiece) else "result"
                print(json.dumps({kind: to_jsonable(item)}, ensure_ascii=False), file=out, flush=True)
            elif isinstance(item, TokenPiece):
                if item.sequence not in sequences_seen and sequences_seen:
                    print(file=out)  # several samples: one line each (they may interleave)
                sequences_seen.add(item.sequence)
                print(item.text, end="", file=out, flush=True)
        if not args.json:
            print(file=out)
        return 0
    results = client.generate(texts, request_id=args.request_id, **options)
    if args.json:
        print(json.dumps(to_jsonable(results), ensure_ascii=False, indent=2), file=out)
    else:
        print_results(results, out)
    if args.plot:
        for path in plot_results(texts, results, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def format_info(info: ModelInfo) -> str:
    d, lim, sp = info.dims, info.limits, info.special_tokens
    rows = [
        ("model version", info.model_version),
        ("dims", f"d_model {d.d_model}, layers {d.encoder_layers}+{d.decoder_layers}, heads {d.n_heads}, "
                 f"d_ff {d.d_ff}"),
        ("vocab size", str(info.vocab_size)),
        ("max source/target len", f"{info.max_source_len}/{info.max_target_len}"),
        ("special ids", f"pad {sp.pad_id}, bos {sp.bos_id}, eos {sp.eos_id}, unk {sp.unk_id}"),
        ("providers", ", ".join(info.providers)),
        ("quantization", info.quantization or "none"),
        ("limits", f"batch {lim.max_batch_size}, queue {lim.max_queue}, inputs/call {lim.max_inputs_per_request}, "
                   f"max_new_tokens {lim.max_new_tokens_limit}, beams {lim.max_beams}, "
                   f"return sequences {lim.max_return_sequences}, message {lim.max_message_bytes} B"),
        ("encoder sha256", info.encoder_sha256),
        ("decoder sha256", info.decoder_sha256),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Entry point; a failed call prints one line on stderr and returns 1."""
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        with Client(**client_kwargs(args)) as client:
            if args.command == "generate":
                return run_generate(client, args, out)
            if args.command == "info":
                info = client.model_info()
                print(json.dumps(to_jsonable(info), indent=2) if args.json else format_info(info), file=out)
                return 0
            if args.wait > 0:
                try:
                    client.wait_ready(args.wait, service=args.service)
                except SeqserveClientError:
                    pass  # the status printed below says what it is
            status = client.health(args.service)
            print(status.value, file=out)
            return 0 if status is HealthStatus.SERVING else 1
    except SeqserveClientError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
