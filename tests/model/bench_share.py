"""One process's share of a training step (forward, loss, backward) of this checkout against
another's, alternating step by step in one process at one thread, so that the machine's drift
hits both alike.

    python tests/model/bench_share.py --tree DIR [--steps 120] [--flat]
    python tests/model/bench_share.py --no-kernels [--steps 120] [--flat]

DIR is another checkout's top-level folders (`git archive COMMIT | tar -x -C DIR`); its
`model/transformer.py` and `model/loss.py` are loaded beside this checkout's (the training pass
they call is this checkout's `training_pass.py`: compare older trees, or use `--no-kernels`).
`--no-kernels` compares this checkout with its fused CPU kernels (`model/kernels.py`) against
itself with PyTorch operations in their place. Both models start
from the same weights, train on the demo preset's batches of the dates task (half of a
2,048-token batch: the share of one of two processes), and must give the same loss to 1%.
`--flat` puts both models' parameters in one flat buffer first, as the worker processes do.
Prints the medians and the median of the per-step ratios (other / this).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path
from types import ModuleType

import torch

from seqserve.model import kernels
from seqserve.model import loss as this_loss
from seqserve.model import transformer as this_transformer
from seqserve.model.allocator import keep_freed_memory
from seqserve.model.batching import Encoded, collate, rank_rows
from seqserve.model.data import task_pairs, train_tokenizer
from seqserve.model.train import PRESETS
from seqserve.model.workers import shared_flat
from seqserve.runtime.config import ModelConfig
from seqserve.runtime.tokenizer import special_ids


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tree", type=Path, help="the other checkout")
    which.add_argument("--no-kernels", action="store_true", help="the other side: this checkout without fused kernels")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--flat", action="store_true", help="parameters in one flat buffer, as with worker processes")
    args = p.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    pairs = task_pairs("dates", 30_000, seed=1, exclude=set())  # 180 batches
    tokenizer = train_tokenizer((t for pair in pairs for t in (pair.source, pair.target)), vocab_size=8000,
                                min_frequency=2)
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), max_source_len=128, max_target_len=128,
                      **special_ids(tokenizer), **PRESETS["demo"])
    data = Encoded(pairs, tokenizer, cfg, what="training")
    batches = data.token_batches(2048, seed=1, epoch=1)[:args.steps + 10]
    if args.no_kernels:
        sides = {"this": (this_transformer, this_loss), "other": (this_transformer, this_loss)}
    else:
        sides = {"this": (this_transformer, this_loss),
                 "other": (_load("other_transformer", args.tree / "model/transformer.py"),
                           _load("other_loss", args.tree / "model/loss.py"))}
    torch.manual_seed(0)
    models = {name: transformer.Transformer(cfg) for name, (transformer, _) in sides.items()}
    models["other"].load_state_dict(models["this"].state_dict())
    flat_grads = {name: shared_flat(m)[1] for name, m in models.items()} if args.flat else {}

    def share(name: str, batch) -> float:  # noqa: ANN001
        model, loss_module = models[name], sides[name][1]
        with kernels.switched(not (args.no_kernels and name == "other")):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(batch.source, batch.target_in)
            loss = loss_module.label_smoothed_nll_sum(logits.flatten(0, 1), batch.target_out.flatten(),
                                                      smoothing=0.1, ignore_index=cfg.pad_id)
            (loss / 1000).backward()
        if name in flat_grads:
            flat_grads[name].zero_()
        else:
            for param in model.parameters():
                param.grad = None
        return loss.item()

    seconds: dict[str, list[float]] = {"this": [], "other": []}
    for i, rows in enumerate(batches):
        batch = collate(data, rank_rows(rows, 0, 2), cfg)
        losses = {}
        for name in (("this", "other") if i % 2 else ("other", "this")):
            start = time.perf_counter()
            losses[name] = share(name, batch)
            if i >= 10:  # the first steps warm allocators and kernels up
                seconds[name].append(time.perf_counter() - start)
        assert abs(losses["this"] - losses["other"]) < 0.01 * abs(losses["other"]), losses
    ratios = [o / t for o, t in zip(seconds["other"], seconds["this"])]
    print(f"this {1e3 * statistics.median(seconds['this']):.2f} ms, other {1e3 * statistics.median(seconds['other']):.2f} ms "
          f"a share (medians of {len(ratios)}); other/this per step: median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
