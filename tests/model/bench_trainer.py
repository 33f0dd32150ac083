"""Trainer throughput on the demo preset: one epoch of generated dates, training loop only.

    python tests/model/bench_trainer.py [--tree DIR] [--train-size 12000] [--workers N] [--threads N]

Validation, the learning-curve plot and checkpoint saving are stubbed out, so the figure is the
training loop alone: target tokens (EOS included) of the epoch over its seconds. `--tree DIR`
times the trainer of another checkout (e.g. `git archive 159bcd6 | tar -x -C DIR`) in the same
way, for A/B runs in one sitting. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import types
from pathlib import Path


def _use_tree(tree: Path) -> None:
    """Import seqserve.* from `tree` (a checkout's top-level folders) instead of the installed one."""
    for name in [m for m in sys.modules if m == "seqserve" or m.startswith("seqserve.")]:
        del sys.modules[name]
    package = types.ModuleType("seqserve")
    package.__path__ = [str(tree)]  # seqserve.model -> tree/model, and so on
    sys.modules["seqserve"] = package


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", type=Path, help="time the trainer of this checkout instead")
    p.add_argument("--train-size", type=int, default=12_000)
    p.add_argument("--threads", type=int, help="torch threads per process (default: the trainer's own choice)")
    p.add_argument("--workers", type=int, help="training processes (default: the trainer's own choice)")
    args = p.parse_args()
    if args.tree is not None:
        _use_tree(args.tree.resolve())
    train = importlib.import_module("seqserve.model.train")
    import torch

    train.evaluate = lambda *a, **k: {"exact_match": 0.0, "bleu": 0.0, "chrf": 0.0, "valid_loss": 0.0}
    train.plot_learning_curve = lambda *a, **k: None
    train.save_checkpoint = lambda *a, **k: None
    tokens = 0
    original = train.Encoded.__init__

    def counting_init(self, pairs, tokenizer, cfg, *, what):  # noqa: ANN001, ANN202
        nonlocal tokens
        original(self, pairs, tokenizer, cfg, what=what)
        if what == "training":
            tokens = sum(len(t) for t in self.targets)

    train.Encoded.__init__ = counting_init
    fields = train.TrainOptions.__dataclass_fields__
    extra = {"progress": False} if "progress" in fields else {}
    if args.threads is not None:
        if "threads" in fields:
            extra["threads"] = args.threads
        else:
            torch.set_num_threads(args.threads)
    if args.workers is not None:
        if "workers" not in fields:
            p.error(f"--workers: the trainer of {args.tree} has no workers")
        extra["workers"] = args.workers
    with tempfile.TemporaryDirectory() as out:
        opts = train.TrainOptions(out=Path(out), epochs=1, train_size=args.train_size, valid_size=50, device="cpu",
                                  **extra)
        summary = train.train("dates", None, None, opts)
    seconds = summary["history"][0]["elapsed_s"]
    epoch = summary["history"][0]
    print(json.dumps({"tree": str(args.tree or "installed"), "processes": epoch.get("processes", 1),
                      "threads": epoch.get("threads"), "target_tokens": tokens,
                      "seconds": seconds, "target_tokens_per_s": round(tokens / seconds),
                      "vocab": summary["config"]["vocab_size"]}))


if __name__ == "__main__":
    main()
