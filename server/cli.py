"""The `seqserve` command: one entry point whose subcommands load only what they need, so that
serving never imports torch (training and export do, from the `train` extra)."""

from __future__ import annotations

import importlib
import logging
import sys

from seqserve.runtime.errors import SeqserveError

# subcommand -> (module with main(argv), one-line help)
COMMANDS = {
    "train": ("seqserve.model.train", "train a model on a built-in task or a TSV corpus"),
    "export": ("seqserve.export.cli", "export a checkpoint to a verified ONNX model directory"),
    "translate": ("seqserve.server.translate", "decode inputs with an exported model directory"),
    "bench": ("seqserve.bench.bench", "measure decoding speed in-process (optionally beside the peer engines)"),
    "bench-serve": ("seqserve.bench.serve", "measure the served model under streaming load (1 vs N streams)"),
    "serve": ("seqserve.server.main", "serve a model directory over gRPC (health, reflection, metrics)"),
}


def usage() -> str:
    lines = ["usage: seqserve COMMAND [options]   (seqserve COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; user mistakes print one line and exit 1, without a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"seqserve: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The exporter's libraries narrate every graph rewrite at INFO; only their warnings matter here.
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("torch", "onnx", "onnxscript", "sacrebleu", "tqdm", "matplotlib"):
            print(f"seqserve {name}: needs the `train` extra ({exc.name} is not installed): "
                  "pip install 'seqserve[train]'", file=sys.stderr)
            return 1
        raise
    try:
        return int(module.main(rest) or 0)
    except SeqserveError as exc:
        print(f"seqserve {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"seqserve {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
