"""`seqserve train`: teacher-forced parallel training of the Transformer on a built-in task or a
TSV corpus, with defaults that suit a small corpus without flags.

Batches hold a token count, not a pair count, with pairs of one length together (batching.py);
the paper's Adam and warm-up schedule with its peak set by the model's width and its warm-up by
the run's length (schedule.py); the label-smoothed loss in one pass (loss.py); gradients
clipped; a run whose loss diverges stops with advice; on a CPU, worker processes that train
shares of each batch in shared memory (workers.py), in the layout of processes and threads that
trains fastest by timing (layout.py); malloc keeping what a step frees for the next (allocator.py).
Validation exact match after every epoch, the best checkpoint kept, optionally the last epochs
averaged (averaging.py); the whole state saved so `--resume` continues exactly (resume.py);
data-parallel under torchrun (distributed.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqserve.model import kernels
from seqserve.model.allocator import keep_freed_memory
from seqserve.model.averaging import EpochSnapshots
from seqserve.model.batching import MAX_TOKENS, Encoded, _pad, collate, rank_rows
from seqserve.model.checkpoint import Checkpoint, save_checkpoint
from seqserve.model.data import TASKS, Pair, read_tsv, task_pairs, train_tokenizer
from seqserve.model.distributed import World, all_sum, close_world, from_main, init_world
from seqserve.model.progress import Progress
from seqserve.model.resume import STATE_FILE, load_training_state, save_training_state
from seqserve.model.schedule import DivergenceCheck, auto_epochs, auto_warmup, scheduled_lr
from seqserve.model.flat_adam import FlatAdam
from seqserve.model.layout import Layout, LayoutTuner, layout_candidates
from seqserve.model.workers import CpuWorkers, WorkerSetup, shared_flat, shm_room, train_share
from seqserve.model.transformer import Transformer, count_parameters, greedy_decode
from seqserve.runtime.config import BASE, ModelConfig
from seqserve.runtime.cores import available_cores
from seqserve.runtime.errors import DataError, SeqserveError
from seqserve.runtime.tokenizer import decode, special_ids, tokenizer_from_str

log = logging.getLogger(__name__)

# Named model sizes; `demo` is what the built-in dates task trains in a few minutes on 2 CPU cores.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(d_model=128, encoder_layers=2, decoder_layers=2, n_heads=4, d_ff=256, dropout=0.0),
    "tiny": dict(d_model=64, encoder_layers=1, decoder_layers=1, n_heads=2, d_ff=128, dropout=0.0),
    "small": dict(d_model=256, encoder_layers=3, decoder_layers=3, n_heads=4, d_ff=1024, dropout=0.1),
    "base": BASE,
}
SAVE_INTERVAL_S = 300.0  # the training state is also saved this often within an epoch
# A process's smallest share of a batch: below it, a share's step is mostly eager PyTorch's fixed
# cost per operation. (The demo's 2,048 tokens on 2 cores: 1,024 for each of two processes.)
MIN_SHARE_TOKENS = 1024


@dataclass
class TrainOptions:
    """Everything `train` needs besides the data; mirrors the CLI flags."""

    out: Path
    preset: str = "demo"
    epochs: int | None = None  # passes over the data; None: 10, or more for a run of at least 2000 steps
    max_tokens: int | None = None  # padded tokens per batch and device (longer side); None: 2048 on a CPU,
    # 4096 on a GPU, less for a corpus too small for 64 batches an epoch
    batch_size: int | None = None  # optional cap on pairs per batch and device
    train_size: int = 40_000  # pairs generated per epoch for a built-in task
    valid_size: int = 1_000  # held-out pairs for a built-in task
    vocab_size: int = 8_000
    min_frequency: int = 10  # a BPE merge seen fewer times is no token: its embedding could not be learned
    warmup: int | None = None  # warm-up steps; None: 5% of the planned steps (50..4000)
    lr_scale: float = 1.0  # multiplies the schedule's peak, the paper's for the model's width
    clip_norm: float = 1.0  # gradient norm clipping; 0 turns it off
    label_smoothing: float = 0.1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto, bf16 or fp32: auto is bf16 autocast where the device has bf16 units
    threads: int | None = None  # CPU threads per process; None: the cores shared among the processes
    workers: int | None = None  # processes sharing each batch on a CPU; None: with --threads, 1, else
    # the layout of processes and threads that trains fastest, by timing (layout.py)
    max_minutes: float | None = None  # wall-clock budget: no epoch starts that would end past it
    target_exact_match: float | None = None  # stop once validation reaches it
    max_source_len: int = 256
    max_target_len: int = 256
    average_last: int = 0  # also average the weights of the last N epochs (0: off)
    save_every: int = 0  # save the training state every N steps too (0: every epoch and 5 minutes)
    progress: bool = True  # progress bar on a terminal, plain lines otherwise
    overrides: dict[str, Any] = field(default_factory=dict)  # explicit model dims over the preset

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for the training state."""
        return {**asdict(self), "out": str(self.out)}


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SeqserveError("--device cuda: no CUDA device is available to torch")
    if name not in ("cpu", "cuda"):
        raise SeqserveError(f"--device: expected auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. `auto` picks bf16 where the hardware has bf16
    arithmetic (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX, where oneDNN's bf16 matrix
    multiplies ran about 4x the fp32 rate on the demo model) and fp32 elsewhere, where bf16
    would only be emulated."""
    if name not in ("auto", "bf16", "fp32"):
        raise SeqserveError(f"--precision: expected auto, bf16 or fp32, got {name!r}")
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    cpu = torch.cpu
    native = cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else None


def evaluate(model: Transformer, data: Encoded, tokenizer, device: torch.device, *,  # noqa: ANN001
             batch_size: int = 500) -> dict[str, float]:
    """Greedy-decode the held-out set in fp32 (as exported): exact match, BLEU, chrF and mean loss."""
    import sacrebleu

    model.eval()
    hyps: list[str] = []
    loss_sum, tokens = 0.0, 0
    pad = model.cfg.pad_id
    with torch.no_grad():
        for start in range(0, len(data.sources), batch_size):
            src = torch.from_numpy(_pad(data.sources[start:start + batch_size], pad)).to(device)
            longest = max(len(t) for t in data.targets[start:start + batch_size])
            outs = greedy_decode(model, src, max_new_tokens=min(model.cfg.max_target_len, longest + 8))
            hyps += [decode(tokenizer, o) for o in outs]
            tgt = torch.from_numpy(_pad(data.targets[start:start + batch_size], pad)).to(device)
            tgt_in = torch.cat([torch.full_like(tgt[:, :1], model.cfg.bos_id), tgt[:, :-1]], dim=1)
            logits = model(src, tgt_in)
            loss_sum += float(nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(),
                                                          ignore_index=pad, reduction="sum"))
            tokens += int((tgt != pad).sum())
    model.train()
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


def _epoch_data(task: str | None, epoch: int, first: Encoded, valid_pairs: list[Pair], tokenizer,  # noqa: ANN001
                cfg: ModelConfig, opts: TrainOptions) -> Encoded:
    """The epoch's training pairs: fresh generated pairs every epoch for a task (never the held-out ones)."""
    if task is None or epoch == 1:
        return first
    exclude = {p.source for p in valid_pairs}
    return Encoded(task_pairs(task, opts.train_size, seed=opts.seed + epoch, exclude=exclude), tokenizer, cfg,
                   what="training")


def _epoch_batches(data: Encoded, epoch: int, opts: TrainOptions, world: World) -> list[list[int]]:
    """The epoch's global batches: every rank computes the same ones and trains on its rows of each."""
    batches = data.token_batches(opts.max_tokens * world.size, seed=opts.seed, epoch=epoch)
    if opts.batch_size is not None:
        cap = opts.batch_size * world.size
        batches = [b[i:i + cap] for b in batches for i in range(0, len(b), cap)]
    if world.distributed:  # a rank with no rows could not take part in the gradient all-reduce
        batches = [b for b in batches if len(b) >= world.size]
    return batches


def _step_seed(seed: int, step: int, world: World, share: int = 0) -> int:
    """Dropout's seed for one rank's step (and a worker's `share` of it): a resumed run draws the
    masks the interrupted one would have."""
    return (seed * 1_000_003 + step * world.size + world.rank + 1 + share * 7_919_000_001) % (2 ** 63)


def train(task: str | None, data: str | None, valid: str | None, opts: TrainOptions, *,
          state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or, given a saved `state`, continue) and save the best checkpoint into opts.out;
    returns the summary written to metrics.json (on every rank; only rank 0 writes files)."""
    keep_freed_memory()  # a step reuses the memory the last one freed (allocator.py)
    world, device = init_world(resolve_device(opts.device))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(opts.threads or default_threads(device))
    # Started first, so that they import torch while this process prepares the data; closed
    # again if the batch turns out too small to share.
    most = max_processes(opts, device, world, opts.max_tokens or MAX_TOKENS["cpu"])
    workers = CpuWorkers(most - 1) if most > 1 else None
    try:
        return _train(task, data, valid, opts, state, world, device, workers)
    finally:
        if workers is not None:
            workers.close()
        torch.set_num_threads(threads_before)
        close_world(world)


def max_processes(opts: TrainOptions, device: torch.device, world: World, max_tokens: int) -> int:
    """The most processes that may share a step's batch: --workers, else on a CPU outside
    torchrun (and without --threads) one per core while each share is at least MIN_SHARE_TOKENS."""
    if opts.workers is not None:
        if opts.workers < 1:
            raise SeqserveError(f"--workers must be at least 1, got {opts.workers}")
        if opts.workers > 1 and (device.type != "cpu" or world.distributed):
            raise SeqserveError("--workers: for one machine's CPU; on GPUs, and across machines, start one "
                                "process per device with torchrun")
        return opts.workers
    if device.type != "cpu" or world.distributed or opts.threads is not None:
        return 1
    return max(1, min(available_cores(), max_tokens // MIN_SHARE_TOKENS))


def _layouts(opts: TrainOptions, device: torch.device, world: World, model: nn.Module) -> list[Layout]:
    """The layouts to train in: one when --threads or --workers fix it (or on a GPU, or under
    torchrun), else the candidates the tuner times."""
    most = max_processes(opts, device, world, opts.max_tokens)
    # shared memory: parameters once, gradients once per process, with room to spare (a
    # container's /dev/shm is 64 MiB unless raised; training in one process needs none)
    need = 2 * (most + 1) * sum(p.numel() * p.element_size() for p in model.parameters())
    if most > 1 and not shm_room(need):
        if opts.workers is not None:
            raise SeqserveError(f"--workers {most}: the workers share {need >> 20} MiB through /dev/shm, which has "
                                "less free; raise it (docker run --shm-size) or train with fewer workers")
        log.info("one training process: /dev/shm has less than the %d MiB that %d would share", need >> 20, most)
        most = 1
    if opts.workers is not None:
        return [Layout(most, opts.threads or max(1, available_cores() // most))]
    if opts.threads is not None or device.type != "cpu" or world.distributed:
        return [Layout(1, torch.get_num_threads())]
    return layout_candidates(max_processes=most)


@contextlib.contextmanager
def _all_threads(device: torch.device, world: World) -> Iterator[None]:
    """Every usable core's thread for this process's validation, while the workers wait."""
    if device.type != "cpu" or world.distributed:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(available_cores())
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def default_threads(device: torch.device) -> int:
    """CPU threads for torch before the tuner has timed any (and for every step of a distributed
    run): one core left free (for the process's own Python, collation and whatever else runs on
    the machine). torch's default, one thread per core, waits at every parallel region for the
    slowest thread: on 2 cores with anything else running, that one thread gets a fraction of its
    core and a step took 1.3-4x as long as with one thread."""
    if device.type != "cpu":
        return torch.get_num_threads()
    return max(1, available_cores() - 1)


def _train(task: str | None, data: str | None, valid: str | None, opts: TrainOptions,  # noqa: C901, PLR0912, PLR0913, PLR0915
           state: dict[str, Any] | None, world: World, device: torch.device,
           workers: CpuWorkers | None) -> dict[str, Any]:
    if opts.preset not in PRESETS:
        raise SeqserveError(f"--preset: unknown {opts.preset!r}; known: {', '.join(PRESETS)}")
    autocast_dtype = resolve_precision(opts.precision, device)
    # built now, if need be, so that no timed step (the layout trial's) waits on the compiler
    fused = kernels.get(device, autocast_dtype or torch.float32) is not None
    torch.manual_seed(opts.seed)
    train_pairs, valid_pairs = load_corpus(task, data, valid, opts)
    if state is not None:
        tokenizer_json = state["tokenizer"]
    else:  # trained once, on rank 0, so every rank has the very same vocabulary
        tokenizer_json = from_main(train_tokenizer((t for p in train_pairs for t in (p.source, p.target)),
                                                   vocab_size=opts.vocab_size,
                                                   min_frequency=opts.min_frequency).to_str() if world.is_main else None,
                                   world)
    tokenizer = tokenizer_from_str(tokenizer_json)
    if state is not None:
        cfg = ModelConfig.from_dict(state["config"])
    else:
        dims = {**PRESETS[opts.preset], **opts.overrides}
        cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), max_source_len=opts.max_source_len,
                          max_target_len=opts.max_target_len, **special_ids(tokenizer), **dims)
    first_data = Encoded(train_pairs, tokenizer, cfg, what="training")
    valid_data = Encoded(valid_pairs, tokenizer, cfg, what="validation")
    model = Transformer(cfg).to(device)
    # DDP broadcasts rank 0's initial weights to the others when it wraps the model.
    net: nn.Module = model
    if world.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if opts.max_tokens is None:
        opts = replace(opts, max_tokens=first_data.auto_max_tokens(device.type))
    if opts.max_tokens < 1:
        raise SeqserveError(f"--max-tokens must be at least 1, got {opts.max_tokens}")
    steps_per_epoch = len(_epoch_batches(first_data, 1, opts, world))
    if opts.epochs is None:
        opts = replace(opts, epochs=auto_epochs(steps_per_epoch))
    warmup = state["warmup"] if state is not None else (opts.warmup or auto_warmup(opts.epochs * steps_per_epoch))
    layouts = _layouts(opts, device, world, model)
    own_grads = None  # with workers: this process's flat gradient buffer (its parameters' .grad)
    if workers is not None and max(layouts).processes > 1:
        flat, own_grads = shared_flat(model)
        try:
            workers.attach(WorkerSetup(cfg.to_dict(), autocast_dtype, opts.label_smoothing, fused), flat)
        except SeqserveError as e:
            if opts.workers is not None:
                raise
            log.warning("%s; training in one process", e)  # the layouts of one process still work
            layouts = [c for c in layouts if c.processes == 1]
    if workers is not None and max(layouts).processes == 1:
        workers.close()
        workers = None
    # fused: one kernel for all parameters, 3.6 against 6.0 ms a demo step on a CPU; with workers
    # the parameters are one flat buffer, stepped as one tensor (flat_adam.py)
    adam = dict(lr=1.0, betas=(0.9, 0.98), eps=1e-9, fused=True)
    optimizer = (FlatAdam(flat, own_grads, list(model.parameters()), **adam) if own_grads is not None
                 else torch.optim.Adam(model.parameters(), **adam))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: scheduled_lr(s + 1, cfg.d_model, warmup, opts.lr_scale))
    divergence = DivergenceCheck()
    layout = layouts[0]
    tuner = None  # with several layouts to choose from: the one that trains fastest now

    def apply(chosen: Layout) -> None:
        nonlocal layout
        layout = chosen
        torch.set_num_threads(chosen.threads)

    if len(layouts) > 1:
        tuner = LayoutTuner(layouts, apply)
    else:
        apply(layout)
    snapshots = EpochSnapshots(opts.out, opts.average_last) if opts.average_last > 0 else None
    history: dict[str, list] = {"train_loss": [], "valid": []}
    best: dict[str, Any] | None = None
    step, start_epoch, start_batch, elapsed_before = 0, 1, 0, 0.0
    totals = {"target_tokens": 0, "real_tokens": 0, "padded_tokens": 0, "train_seconds": 0.0}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        divergence.load_state_dict(state["divergence"])
        history, best, totals = state["history"], state["best"], state["totals"]
        step, start_epoch, start_batch = state["step"], state["next_epoch"], state["next_batch"]
        elapsed_before = state["elapsed_s"]
        log.info("resuming %s at epoch %d, step %d", opts.out, start_epoch, step)
    if world.is_main:
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        log.info("model: %s parameters, %s; %s on %s x %d; %s", f"{count_parameters(model):,}", cfg,
                 "bf16 autocast" if autocast_dtype else "fp32", device.type, world.size,
                 "fused CPU kernels" if fused else
                 f"PyTorch operations ({kernels.unavailable() or 'the fused kernels are for CPUs'})")
        log.info("%d pairs, batches of %d tokens: %d steps an epoch, %d epochs; warm-up %d steps to lr %.2e",
                 len(first_data), opts.max_tokens, steps_per_epoch, opts.epochs, warmup,
                 scheduled_lr(warmup, cfg.d_model, warmup, opts.lr_scale))
    started = time.perf_counter() - elapsed_before
    last_save = time.monotonic()
    epoch_counts: dict[str, int] = {}
    epoch_start = time.perf_counter()

    def snapshot(next_epoch: int, next_batch: int) -> None:
        """Save the whole training state (rank 0), so that a killed run resumes from here."""
        nonlocal last_save
        last_save = time.monotonic()
        if not world.is_main:
            return
        save_training_state(opts.out / STATE_FILE, {
            "task": task, "data": data, "valid": valid, "options": opts.to_dict(), "config": cfg.to_dict(),
            "tokenizer": tokenizer_json, "warmup": warmup, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "divergence": divergence.state_dict(), "history": history, "best": best, "totals": totals,
            "step": step, "next_epoch": next_epoch, "next_batch": next_batch,
            "epoch_counts": epoch_counts if next_batch else {}, "epoch_seconds": time.perf_counter() - epoch_start,
            "elapsed_s": time.perf_counter() - started})

    stopped = "epochs"
    for epoch in range(start_epoch, opts.epochs + 1):
        train_data = _epoch_data(task, epoch, first_data, valid_pairs, tokenizer, cfg, opts)
        batches = _epoch_batches(train_data, epoch, opts, world)
        first = start_batch if epoch == start_epoch else 0
        progress = Progress(len(batches), f"epoch {epoch}/{opts.epochs}", enabled=world.is_main and opts.progress)
        progress.update(first)
        net.train()
        epoch_counts = {"target_tokens": 0, "real_tokens": 0, "padded_tokens": 0}
        epoch_start = time.perf_counter()
        if first and state is not None:  # resumed mid-epoch: the epoch's figures so far
            epoch_counts.update(state["epoch_counts"])
            epoch_start -= state["epoch_seconds"]
        if tuner is not None:
            tuner.restart_clock()
        for index in range(first, len(batches)):
            global_rows = batches[index]
            global_target_tokens = sum(len(train_data.targets[i]) for i in global_rows)
            # Summed over tokens and divided by the global batch's count: DDP then averages over
            # ranks, so the step equals one process's on the whole global batch.
            scale = world.size / global_target_tokens
            rows = rank_rows(global_rows, world.rank, world.size)
            shares = min(layout.processes, len(rows))  # this process's and its workers' rows
            # the workers' rows first: they start on them while this process collates its own
            parts = [collate(train_data, rank_rows(rows, i, shares), cfg) for i in range(1, shares)]
            if shares > 1:
                workers.start_step([(b.source.numpy(), b.target_in.numpy(), b.target_out.numpy()) for b in parts],
                                   scale, [_step_seed(opts.seed, step, world, share=i) for i in range(1, shares)],
                                   layout.threads)
            batch = collate(train_data, rank_rows(rows, 0, shares), cfg)
            parts.append(batch)
            step_loss = train_share(net, *(t.to(device, non_blocking=True)
                                           for t in (batch.source, batch.target_in, batch.target_out)),
                                    seed=_step_seed(opts.seed, step, world), scale=scale, autocast_dtype=autocast_dtype,
                                    smoothing=opts.label_smoothing, pad_id=cfg.pad_id)
            if shares > 1:
                step_loss += workers.finish_step(shares - 1, into=own_grads)
            if opts.clip_norm > 0:
                if own_grads is not None:  # one flat buffer: its norm is the gradient's, in one pass
                    own_grads.mul_((opts.clip_norm / (torch.linalg.vector_norm(own_grads) + 1e-6)).clamp(max=1.0))
                else:
                    nn.utils.clip_grad_norm_(model.parameters(), opts.clip_norm)
            optimizer.step()
            if own_grads is not None:
                own_grads.zero_()  # the parameters' .grad are views of it: keep them
            else:
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            loss_total, real, padded = all_sum([step_loss, sum(b.real_tokens for b in parts),
                                                sum(b.padded_tokens for b in parts)], world, device)
            loss = loss_total / global_target_tokens
            divergence.update(step, loss)
            epoch_counts["target_tokens"] += global_target_tokens
            epoch_counts["real_tokens"] += int(real)
            epoch_counts["padded_tokens"] += int(padded)
            if tuner is not None:
                tuner.step_done(global_target_tokens)
            if step % 10 == 0:
                history["train_loss"].append((step, loss))
                seconds = time.perf_counter() - epoch_start
                progress.update(1, loss=f"{loss:.3f}", tok_s=f"{epoch_counts['target_tokens'] / seconds:.0f}",
                                pad=f"{1 - epoch_counts['real_tokens'] / epoch_counts['padded_tokens']:.1%}",
                                lr=f"{scheduler.get_last_lr()[0]:.2e}", cpu=str(layout))
            else:
                progress.update(1)
            if (opts.save_every and step % opts.save_every == 0) or time.monotonic() - last_save > SAVE_INTERVAL_S:
                snapshot(epoch, index + 1)
                if tuner is not None:
                    tuner.restart_clock()
        progress.close()
        epoch_seconds = time.perf_counter() - epoch_start
        for k, v in epoch_counts.items():
            totals[k] += v
        totals["train_seconds"] += epoch_seconds
        decision = None
        if world.is_main:
            with _all_threads(device, world):  # workers idle meanwhile
                scores = evaluate(model, valid_data, tokenizer, device)
            metrics = {"epoch": epoch, "step": step, "elapsed_s": round(time.perf_counter() - started, 1), **scores,
                       "target_tokens_per_s": round(epoch_counts["target_tokens"] / max(epoch_seconds, 1e-9)),
                       "padding_share": round(1 - epoch_counts["real_tokens"] / max(1, epoch_counts["padded_tokens"]), 4),
                       "lr": scheduler.get_last_lr()[0], "processes": layout.processes, "threads": layout.threads}
            history["valid"].append(metrics)
            log.info("epoch %d: exact match %.2f%%, BLEU %.1f, chrF %.1f, valid loss %.3f; %.0f target tokens/s, "
                     "%.1f%% padding, %d processes x %d threads (%.0f s)", epoch, 100 * metrics["exact_match"],
                     metrics["bleu"], metrics["chrf"], metrics["valid_loss"], metrics["target_tokens_per_s"],
                     100 * metrics["padding_share"], metrics["processes"], metrics["threads"], metrics["elapsed_s"])
            if best is None or (metrics["exact_match"], -metrics["valid_loss"]) > (best["exact_match"], -best["valid_loss"]):
                best = metrics
                save_checkpoint(opts.out / "checkpoint.pt", Checkpoint(
                    config=cfg, state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                    tokenizer_json=tokenizer_json, validation=valid_pairs[:200],
                    metrics={"task": task or str(data), **best}))
            if snapshots is not None:
                snapshots.add(epoch, {k: v.detach().cpu() for k, v in model.state_dict().items()})
            plot_learning_curve(history, opts.out / "learning_curve.png")
            elapsed = time.perf_counter() - started
            if opts.target_exact_match is not None and metrics["exact_match"] >= opts.target_exact_match:
                log.info("reached target exact match %.2f%%", 100 * opts.target_exact_match)
                decision = "target"
            # Stop before an epoch that would not finish within the budget (judged by the last one).
            elif (opts.max_minutes is not None and epoch < opts.epochs
                  and elapsed + (time.perf_counter() - epoch_start) > 60 * opts.max_minutes):
                log.info("stopping: another epoch would pass the %.1f min budget", opts.max_minutes)
                decision = "budget"
        decision, best = from_main((decision, best), world)
        snapshot(epoch + 1, 0)
        if decision is not None:
            stopped = decision
            break
    summary = {"best": best, "history": history["valid"], "train_loss": history["train_loss"],
               "parameters": count_parameters(model), "config": cfg.to_dict(), "stopped": stopped,
               "train_seconds": round(time.perf_counter() - started, 1), "world_size": world.size,
               "precision": "bf16" if autocast_dtype else "fp32", "fused_kernels": fused, "warmup": warmup,
               "throughput": {"target_tokens_per_s": round(totals["target_tokens"] / max(totals["train_seconds"], 1e-9)),
                              "padding_share": round(1 - totals["real_tokens"] / max(1, totals["padded_tokens"]), 4),
                              "median_epoch_target_tokens_per_s": statistics.median(
                                  [v["target_tokens_per_s"] for v in history["valid"]] or [0])}}
    if world.is_main:
        if snapshots is not None and snapshots.paths():
            with _all_threads(device, world):
                summary["averaged"] = _average(snapshots, cfg, valid_data, valid_pairs, tokenizer, tokenizer_json,
                                               device, task or str(data), opts)
        (opts.out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _average(snapshots: EpochSnapshots, cfg: ModelConfig, valid_data: Encoded, valid_pairs: list[Pair],  # noqa: PLR0913
             tokenizer, tokenizer_json: str, device: torch.device, source: str,  # noqa: ANN001
             opts: TrainOptions) -> dict[str, Any]:
    """Average the kept epochs' weights, evaluate them and save averaged.pt beside checkpoint.pt."""
    weights, epochs = snapshots.average()
    model = Transformer(cfg).to(device)
    model.load_state_dict(weights)
    metrics = {"epochs": epochs, **evaluate(model, valid_data, tokenizer, device)}
    save_checkpoint(opts.out / "averaged.pt", Checkpoint(config=cfg, state_dict=weights, tokenizer_json=tokenizer_json,
                                                         validation=valid_pairs[:200],
                                                         metrics={"task": source, "averaged_epochs": epochs, **metrics}))
    log.info("average of epochs %s: exact match %.2f%%, BLEU %.1f, valid loss %.3f (averaged.pt)",
             ",".join(map(str, epochs)), 100 * metrics["exact_match"], metrics["bleu"], metrics["valid_loss"])
    return metrics


def resume(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """Continue the run saved in `run_dir` where it stopped; `changes` may raise epochs or the budget."""
    state = load_training_state(run_dir)
    saved = dict(state["options"])
    saved.update({k: v for k, v in changes.items() if v is not None})
    saved["out"] = Path(run_dir)
    opts = TrainOptions(**saved)
    if state["next_epoch"] > opts.epochs:
        raise SeqserveError(f"{run_dir}: the run already finished its {opts.epochs} epochs; "
                            "pass --epochs to train for more")
    return train(state["task"], state["data"], state["valid"], opts, state=state)


def build_parser() -> argparse.ArgumentParser:
    """Flags of `seqserve train`."""
    p = argparse.ArgumentParser(prog="seqserve train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help=f"built-in task ({', '.join(TASKS)})")
    src.add_argument("--data", help="TSV training corpus: source<TAB>target per line, UTF-8")
    src.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue the interrupted run in RUN_DIR (its data and options; --epochs, "
                          "--max-minutes and --target-exact-match may be changed)")
    p.add_argument("--valid", help="TSV validation corpus (default: a tenth of --data held out, at most 1000)")
    p.add_argument("--out", type=Path, help="output folder: checkpoint.pt, tokenizer.json, "
                   "metrics.json, learning_curve.png, training_state.pt")
    p.add_argument("--preset", default="demo", help=f"model size: {', '.join(PRESETS)} (default demo)")
    for dim in ("d_model", "encoder_layers", "decoder_layers", "n_heads", "d_ff"):
        p.add_argument(f"--{dim.replace('_', '-')}", type=int, help=f"override the preset's {dim}")
    p.add_argument("--dropout", type=float, help="override the preset's dropout")
    p.add_argument("--epochs", type=int, help="passes over the data (default 10, more for a small corpus: "
                   "at least 2000 steps in all)")
    p.add_argument("--max-tokens", type=int, help="padded tokens per batch and device, longer side "
                   "(default 2048 on a CPU, 4096 on a GPU, less for a corpus too small for 64 batches an epoch)")
    p.add_argument("--batch-size", type=int, help="also cap pairs per batch and device (default: no cap)")
    p.add_argument("--train-size", type=int, default=40_000, help="pairs generated per epoch, built-in task")
    p.add_argument("--valid-size", type=int, default=1_000, help="held-out pairs, built-in task (default 1000)")
    p.add_argument("--vocab-size", type=int, default=8_000, help="tokenizer vocabulary ceiling (default 8000)")
    p.add_argument("--min-frequency", type=int, default=10,
                   help="occurrences a BPE merge needs to become a token (default 10)")
    p.add_argument("--max-source-len", type=int, default=256, help="longest source in tokens (default 256)")
    p.add_argument("--max-target-len", type=int, default=256, help="longest target in tokens (default 256)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default: 5%% of the planned steps, 50-4000)")
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="factor on the peak learning rate, d_model^-0.5 * 4000^-0.5 (default 1)")
    p.add_argument("--clip-norm", type=float, default=1.0, help="gradient norm clipping, 0 for none (default 1)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="(default 0.1, as in the paper)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialization and order (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default auto)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="bf16 autocast or fp32 (default auto: bf16 where the hardware has it)")
    p.add_argument("--workers", type=int, help="processes that share each batch on a CPU (default: picked "
                   "by timing a few steps in each layout, one process with all cores' threads or all but "
                   "one, or one process per core, and checked again now and then)")
    p.add_argument("--threads", type=int, help="CPU threads per process (default: picked with --workers; "
                   "given alone, one process)")
    p.add_argument("--max-minutes", type=float, help="time budget: no epoch starts that would end past it")
    p.add_argument("--target-exact-match", type=float, help="stop once validation exact match reaches this (0-1)")
    p.add_argument("--average-last", type=int, default=0, metavar="N",
                   help="also save averaged.pt, the mean of the last N epochs' weights (default 0: off)")
    p.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="save the training state every STEPS steps too (default: each epoch and every 5 minutes)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `seqserve train`."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.resume is not None:
        summary = resume(args.resume, epochs=args.epochs, max_minutes=args.max_minutes,
                         target_exact_match=args.target_exact_match)
        out = args.resume
    else:
        if args.out is None:
            p.error("--out is required (except with --resume)")
        overrides = {k: getattr(args, k) for k in ("d_model", "encoder_layers", "decoder_layers", "n_heads", "d_ff",
                                                  "dropout") if getattr(args, k) is not None}
        opts = TrainOptions(out=args.out, preset=args.preset, epochs=args.epochs, max_tokens=args.max_tokens,
                            batch_size=args.batch_size, train_size=args.train_size, valid_size=args.valid_size,
                            vocab_size=args.vocab_size, min_frequency=args.min_frequency, warmup=args.warmup, lr_scale=args.lr_scale,
                            clip_norm=args.clip_norm, label_smoothing=args.label_smoothing, seed=args.seed,
                            device=args.device, precision=args.precision, threads=args.threads, workers=args.workers,
                            max_minutes=args.max_minutes, target_exact_match=args.target_exact_match,
                            max_source_len=args.max_source_len, max_target_len=args.max_target_len,
                            average_last=args.average_last, save_every=args.save_every, overrides=overrides)
        summary = train(args.task, args.data, args.valid, opts)
        out = args.out
    best = summary["best"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"best: epoch {best['epoch']}, exact match {100 * best['exact_match']:.2f}%, BLEU {best['bleu']:.1f}, "
              f"chrF {best['chrf']:.1f}; {summary['train_seconds']:.0f} s, "
              f"{summary['throughput']['target_tokens_per_s']} target tokens/s; checkpoint {out / 'checkpoint.pt'}")
        if "averaged" in summary:
            avg = summary["averaged"]
            print(f"averaged epochs {','.join(map(str, avg['epochs']))}: exact match {100 * avg['exact_match']:.2f}%, "
                  f"BLEU {avg['bleu']:.1f}; checkpoint {out / 'averaged.pt'}")
    return 0


if __name__ == "__main__":  # torchrun -m seqserve.model.train ... (same flags as `seqserve train`)
    from seqserve.server.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
