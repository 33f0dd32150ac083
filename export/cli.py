"""`seqserve export CHECKPOINT --out MODEL_DIR`: thin command line over `export.exporter`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seqserve.export.exporter import export_model_dir
from seqserve.model.checkpoint import load_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqserve export", description=__doc__)
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by `seqserve train`")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument("--quantize", choices=("int8",), help="also quantize the graphs (ONNX Runtime dynamic int8)")
    p.add_argument("--samples", type=int, default=200, help="held-out inputs for the greedy parity check (default 200)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    meta = export_model_dir(ckpt, args.out, quantize=args.quantize, force=args.force, samples=args.samples)
    graphs = meta["graphs"]
    summary = {
        "model_dir": str(args.out),
        "encoder_bytes": graphs["encoder"]["bytes"],
        "decoder_bytes": graphs["decoder"]["bytes"],
        "parity": meta["parity"],
        **({"validation": meta["validation"]} if "validation" in meta else {}),
        **({"quantization": meta["quantization_report"]} if "quantization_report" in meta else {}),
    }
    print(json.dumps(summary, indent=2))
    return 0
