"""`seqserve train`: teacher-forced parallel training of the Transformer on a built-in task or a
TSV corpus, with the paper's optimizer and schedule, per-epoch validation, the best checkpoint
kept, and a learning-curve plot beside it."""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seqserve.model.checkpoint import Checkpoint, save_checkpoint
from seqserve.model.config import BASE, ModelConfig
from seqserve.model.data import (TASKS, Pair, decode, encode_source, encode_target, read_tsv, special_ids,
                                 task_pairs, train_tokenizer)
from seqserve.model.errors import DataError, SeqserveError
from seqserve.model.transformer import Transformer, count_parameters, greedy_decode

log = logging.getLogger(__name__)

# Named model sizes; `demo` is what the built-in dates task trains in a few minutes on 2 CPU cores.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(d_model=128, encoder_layers=2, decoder_layers=2, n_heads=4, d_ff=256, dropout=0.0),
    "tiny": dict(d_model=64, encoder_layers=1, decoder_layers=1, n_heads=2, d_ff=128, dropout=0.0),
    "small": dict(d_model=256, encoder_layers=3, decoder_layers=3, n_heads=4, d_ff=1024, dropout=0.1),
    "base": BASE,
}


@dataclass
class TrainOptions:
    """Everything `train` needs besides the data; mirrors the CLI flags."""

    out: Path
    preset: str = "demo"
    epochs: int = 10
    batch_size: int = 128
    train_size: int = 40_000  # pairs generated per epoch for a built-in task
    valid_size: int = 1_000  # held-out pairs for a built-in task
    vocab_size: int = 8_000
    warmup: int = 400
    lr_scale: float = 1.0  # multiplies the paper's learning-rate schedule
    label_smoothing: float = 0.1
    seed: int = 0
    device: str = "auto"
    max_minutes: float | None = None  # wall-clock budget: no epoch starts that would end past it
    target_exact_match: float | None = None  # stop once validation reaches it
    max_source_len: int = 256
    max_target_len: int = 256
    overrides: dict[str, Any] = field(default_factory=dict)  # explicit model dims over the preset


def noam_lr(step: int, d_model: int, warmup: int, scale: float = 1.0) -> float:
    """The paper's schedule: linear warm-up, then decay with the inverse square root of the step."""
    step = max(step, 1)
    return scale * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def _pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class Encoded:
    """A corpus turned into token ids, ready for batching."""

    def __init__(self, pairs: list[Pair], tokenizer, cfg: ModelConfig, *, what: str) -> None:  # noqa: ANN001
        self.pairs = pairs
        self.sources = [encode_source(tokenizer, p.source) for p in pairs]
        self.targets = [encode_target(tokenizer, p.target) + [cfg.eos_id] for p in pairs]
        for i, (s, t) in enumerate(zip(self.sources, self.targets)):
            if len(s) > cfg.max_source_len or len(t) > cfg.max_target_len:
                raise DataError(f"{what} pair {i + 1}: {len(s)} source / {len(t)} target tokens exceed "
                                f"max_source_len {cfg.max_source_len} / max_target_len {cfg.max_target_len}")

    def batches(self, batch_size: int, rng: random.Random) -> list[list[int]]:
        """Shuffled batches of indices, grouped by length so little compute goes to padding."""
        order = list(range(len(self.sources)))
        rng.shuffle(order)
        # Sort within windows of 50 batches: length-homogeneous batches, still random across windows.
        window = batch_size * 50
        order = [i for w in range(0, len(order), window)
                 for i in sorted(order[w:w + window], key=lambda i: len(self.sources[i]))]
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(batches)
        return batches


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SeqserveError("--device cuda: no CUDA device is available to torch")
    if name not in ("cpu", "cuda"):
        raise SeqserveError(f"--device: expected auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def evaluate(model: Transformer, data: Encoded, tokenizer, device: torch.device, *,  # noqa: ANN001
             batch_size: int = 256) -> dict[str, float]:
    """Greedy-decode the held-out set: exact match, BLEU and chrF (sacrebleu), and mean loss."""
    import sacrebleu

    model.eval()
    hyps: list[str] = []
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data.sources), batch_size):
            src = _pad(data.sources[start:start + batch_size], model.cfg.pad_id).to(device)
            longest = max(len(t) for t in data.targets[start:start + batch_size])
            outs = greedy_decode(model, src, max_new_tokens=min(model.cfg.max_target_len, longest + 8))
            hyps += [decode(tokenizer, o) for o in outs]
            tgt = _pad(data.targets[start:start + batch_size], model.cfg.pad_id).to(device)
            tgt_in = torch.cat([torch.full_like(tgt[:, :1], model.cfg.bos_id), tgt[:, :-1]], dim=1)
            logits = model(src, tgt_in)
            loss_sum += float(nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(),
                                                          ignore_index=model.cfg.pad_id, reduction="sum"))
            tokens += int((tgt != model.cfg.pad_id).sum())
    refs = [p.target for p in data.pairs]
    return {
        "exact_match": sum(h == r for h, r in zip(hyps, refs)) / len(refs),
        "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
        "valid_loss": loss_sum / max(1, tokens),
    }


def plot_learning_curve(history: dict[str, list], path: Path) -> None:
    """Training loss per step and validation exact match per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*history["train_loss"]) if history["train_loss"] else ((), ())
    ax.plot(steps, losses, color="tab:blue", linewidth=0.8, label="train loss (label-smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax2 = ax.twinx()
    if history["valid"]:
        ax2.plot([v["step"] for v in history["valid"]], [100 * v["exact_match"] for v in history["valid"]],
                 "o-", color="tab:red", label="validation exact match")
    ax2.set_ylabel("validation exact match (%)", color="tab:red")
    ax2.set_ylim(0, 100)
    ax.set_title("seqserve training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_corpus(task: str | None, data: str | None, valid: str | None, opts: TrainOptions) -> tuple[
        list[Pair], list[Pair]]:
    """Training and held-out pairs from a built-in task or TSV files (a tenth held out if no --valid)."""
    if task is not None:
        if task not in TASKS:
            raise DataError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
        held_out = task_pairs(task, opts.valid_size, seed=opts.seed + 1_000_003)
        exclude = {p.source for p in held_out}
        return task_pairs(task, opts.train_size, seed=opts.seed, exclude=exclude), held_out
    assert data is not None  # argparse guarantees one of the two
    train_pairs = read_tsv(data)
    if valid is not None:
        return train_pairs, read_tsv(valid)
    if len(train_pairs) < 20:
        raise DataError(f"{data}: {len(train_pairs)} pairs is too few to hold out a validation set; pass --valid")
    rng = random.Random(opts.seed)
    shuffled = train_pairs[:]
    rng.shuffle(shuffled)
    n_valid = max(1, min(1000, len(shuffled) // 10))
    return shuffled[n_valid:], shuffled[:n_valid]


def train(task: str | None, data: str | None, valid: str | None, opts: TrainOptions) -> dict[str, Any]:
    """Train and save the best checkpoint into opts.out; returns the summary written to metrics.json."""
    random.seed(opts.seed)
    np.random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    device = resolve_device(opts.device)
    train_pairs, valid_pairs = load_corpus(task, data, valid, opts)
    tokenizer = train_tokenizer((t for p in train_pairs for t in (p.source, p.target)), vocab_size=opts.vocab_size)
    if opts.preset not in PRESETS:
        raise SeqserveError(f"--preset: unknown {opts.preset!r}; known: {', '.join(PRESETS)}")
    dims = {**PRESETS[opts.preset], **opts.overrides}
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), max_source_len=opts.max_source_len,
                      max_target_len=opts.max_target_len, **special_ids(tokenizer), **dims)
    train_data = Encoded(train_pairs, tokenizer, cfg, what="training")
    valid_data = Encoded(valid_pairs, tokenizer, cfg, what="validation")
    model = Transformer(cfg).to(device)
    log.info("model: %s parameters, %s", f"{count_parameters(model):,}", cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: noam_lr(step + 1, cfg.d_model, opts.warmup, opts.lr_scale))
    criterion = nn.CrossEntropyLoss(ignore_index=cfg.pad_id, label_smoothing=opts.label_smoothing)
    rng = random.Random(opts.seed)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    history: dict[str, list] = {"train_loss": [], "valid": []}
    best: dict[str, Any] | None = None
    step, started = 0, time.perf_counter()
    from tqdm import tqdm

    for epoch in range(1, opts.epochs + 1):
        if task is not None and epoch > 1:  # fresh generated pairs every epoch, never the held-out ones
            exclude = {p.source for p in valid_pairs}
            train_data = Encoded(task_pairs(task, opts.train_size, seed=opts.seed + epoch, exclude=exclude),
                                 tokenizer, cfg, what="training")
        model.train()
        batches = train_data.batches(opts.batch_size, rng)
        bar = tqdm(batches, desc=f"epoch {epoch}/{opts.epochs}", unit="batch", file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)
        tokens_seen, epoch_start = 0, time.perf_counter()
        for batch in bar:
            src = _pad([train_data.sources[i] for i in batch], cfg.pad_id).to(device)
            tgt = _pad([train_data.targets[i] for i in batch], cfg.pad_id).to(device)
            tgt_in = torch.cat([torch.full_like(tgt[:, :1], cfg.bos_id), tgt[:, :-1]], dim=1)  # shift right
            logits = model(src, tgt_in)  # (B, T, V)
            loss = criterion(logits.flatten(0, 1), tgt.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            tokens_seen += int((tgt != cfg.pad_id).sum())
            if step % 10 == 0:
                history["train_loss"].append((step, loss.item()))
                bar.set_postfix(loss=f"{history['train_loss'][-1][1]:.3f}",
                                tok_s=f"{tokens_seen / (time.perf_counter() - epoch_start):.0f}",
                                lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        metrics = {"epoch": epoch, "step": step, "elapsed_s": round(time.perf_counter() - started, 1),
                   **evaluate(model, valid_data, tokenizer, device)}
        history["valid"].append(metrics)
        log.info("epoch %d: exact match %.2f%%, BLEU %.1f, chrF %.1f, valid loss %.3f (%.0f s)", epoch,
                 100 * metrics["exact_match"], metrics["bleu"], metrics["chrf"], metrics["valid_loss"],
                 metrics["elapsed_s"])
        if best is None or (metrics["exact_match"], -metrics["valid_loss"]) > (best["exact_match"], -best["valid_loss"]):
            best = metrics
            save_checkpoint(opts.out / "checkpoint.pt", Checkpoint(
                config=cfg, state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                tokenizer_json=tokenizer.to_str(), validation=valid_pairs[:200],
                metrics={"task": task or str(data), **best}))
        plot_learning_curve(history, opts.out / "learning_curve.png")
        if opts.target_exact_match is not None and metrics["exact_match"] >= opts.target_exact_match:
            log.info("reached target exact match %.2f%%", 100 * opts.target_exact_match)
            break
        # Stop before an epoch that would not finish within the budget (judged by the last one).
        elapsed = time.perf_counter() - started
        epoch_seconds = time.perf_counter() - epoch_start
        if opts.max_minutes is not None and elapsed + epoch_seconds > 60 * opts.max_minutes:
            log.info("stopping: another epoch would pass the %.1f min budget", opts.max_minutes)
            break
    summary = {"best": best, "history": history["valid"], "train_loss": history["train_loss"],
               "parameters": count_parameters(model),
               "config": cfg.to_dict(), "train_seconds": round(time.perf_counter() - started, 1)}
    (opts.out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Flags of `seqserve train`."""
    p = argparse.ArgumentParser(prog="seqserve train", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help=f"built-in task ({', '.join(TASKS)})")
    src.add_argument("--data", help="TSV training corpus: source<TAB>target per line, UTF-8")
    p.add_argument("--valid", help="TSV validation corpus (default: a tenth of --data held out)")
    p.add_argument("--out", required=True, type=Path, help="output folder: checkpoint.pt, tokenizer.json, "
                   "metrics.json, learning_curve.png")
    p.add_argument("--preset", default="demo", help=f"model size: {', '.join(PRESETS)} (default demo)")
    for dim in ("d_model", "encoder_layers", "decoder_layers", "n_heads", "d_ff"):
        p.add_argument(f"--{dim.replace('_', '-')}", type=int, help=f"override the preset's {dim}")
    p.add_argument("--dropout", type=float, help="override the preset's dropout")
    p.add_argument("--epochs", type=int, default=10, help="passes over the data (default 10)")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per batch (default 128)")
    p.add_argument("--train-size", type=int, default=40_000, help="pairs generated per epoch, built-in task")
    p.add_argument("--valid-size", type=int, default=1_000, help="held-out pairs, built-in task (default 1000)")
    p.add_argument("--vocab-size", type=int, default=8_000, help="tokenizer vocabulary ceiling (default 8000)")
    p.add_argument("--max-source-len", type=int, default=256, help="longest source in tokens (default 256)")
    p.add_argument("--max-target-len", type=int, default=256, help="longest target in tokens (default 256)")
    p.add_argument("--warmup", type=int, default=400, help="warm-up steps of the schedule (default 400)")
    p.add_argument("--lr-scale", type=float, default=1.0, help="factor on the paper's schedule (default 1)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="(default 0.1, as in the paper)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialization and order (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default auto)")
    p.add_argument("--max-minutes", type=float, help="time budget: no epoch starts that would end past it")
    p.add_argument("--target-exact-match", type=float, help="stop once validation exact match reaches this (0-1)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `seqserve train`."""
    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("d_model", "encoder_layers", "decoder_layers", "n_heads", "d_ff",
                                              "dropout") if getattr(args, k) is not None}
    opts = TrainOptions(out=args.out, preset=args.preset, epochs=args.epochs, batch_size=args.batch_size,
                        train_size=args.train_size, valid_size=args.valid_size, vocab_size=args.vocab_size,
                        warmup=args.warmup, lr_scale=args.lr_scale, label_smoothing=args.label_smoothing,
                        seed=args.seed, device=args.device, max_minutes=args.max_minutes,
                        target_exact_match=args.target_exact_match, max_source_len=args.max_source_len,
                        max_target_len=args.max_target_len, overrides=overrides)
    summary = train(args.task, args.data, args.valid, opts)
    best = summary["best"]
    print(f"best: epoch {best['epoch']}, exact match {100 * best['exact_match']:.2f}%, BLEU {best['bleu']:.1f}, "
          f"chrF {best['chrf']:.1f}; {summary['train_seconds']:.0f} s; checkpoint {opts.out / 'checkpoint.pt'}")
    return 0
