"""Data-parallel training over one machine's CPU cores: worker processes that share the model's
parameters and gradients with the trainer through shared memory.

A small model's step is many small operations, and torch's intra-op threads scale poorly over
them: on 2 cores the demo model trained 1.3-1.5x as fast on two threads as on one. Two processes
of one thread each have no GIL, thread pool or barrier in common, and each keeps its core busy.

The trainer's parameters live in one flat shared buffer that every worker's copy of the model
points into, so an optimizer step is seen by all at once and nothing is broadcast. Each process
has its own flat gradient buffer (its parameters' `.grad` are views into it). A step: the trainer
sends each worker its rows of the batch, runs its own rows, waits for the workers' losses, adds
their gradient buffers into its own (one addition per worker) and steps the optimizer; a worker
zeroes its buffer as it starts its next rows. The sum of the parts' gradients is the gradient of
the whole batch, so the step is the one-process step up to the order of floating-point sums.

Workers are fresh interpreters (multiprocessing's spawn: no fork of a process whose thread pools
are running). A worker dies with the trainer (Linux's parent-death signal), and a worker that
dies is reported by its exit status instead of leaving the trainer waiting.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn

from seqserve.model import kernels
from seqserve.model.allocator import keep_freed_memory
from seqserve.model.loss import label_smoothed_nll_sum
from seqserve.model.transformer import Transformer
from seqserve.runtime.config import ModelConfig
from seqserve.runtime.errors import SeqserveError

READY_TIMEOUT_S = 300.0  # for a worker to start (import torch) and build its model


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs to train rows of a batch like the trainer does."""

    config: dict[str, Any]  # ModelConfig.to_dict()
    autocast_dtype: torch.dtype | None  # None: fp32
    label_smoothing: float
    fused_kernels: bool  # whether the trainer has them (kernels.py); a worker then loads them too


def train_share(net: nn.Module, source: torch.Tensor, target_in: torch.Tensor, target_out: torch.Tensor, *,
                seed: int, scale: float, autocast_dtype: torch.dtype | None, smoothing: float, pad_id: int) -> float:
    """Forward and backward of one process's share of a batch (the trainer's or a worker's):
    dropout seeded by `seed`, the label-smoothed loss summed over its tokens and times `scale`
    into the parameters' gradients. Returns the unscaled loss."""
    torch.manual_seed(seed)
    with torch.autocast(source.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logits = net(source, target_in)  # (B, T, V)
    loss = label_smoothed_nll_sum(logits.flatten(0, 1), target_out.flatten(), smoothing=smoothing, ignore_index=pad_id)
    (loss * scale).backward()
    return loss.item()


def shared_flat(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Move `model`'s parameters into one flat buffer in shared memory (each parameter becomes a
    view of it, same values) and give them `.grad` views of a second, zeroed one; returns both."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    flat = torch.empty(total, dtype=params[0].dtype).share_memory_()
    grads = torch.zeros(total, dtype=params[0].dtype).share_memory_()
    _bind(params, flat, grads, copy=True)
    return flat, grads


def _bind(params: list[nn.Parameter], flat: torch.Tensor, grads: torch.Tensor, *, copy: bool) -> None:
    offset = 0
    for p in params:
        view = flat[offset:offset + p.numel()].view_as(p)
        if copy:
            view.copy_(p.data)
        p.data = view
        p.grad = grads[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


def shm_room(nbytes: int) -> bool:
    """Whether the shared-memory filesystem has `nbytes` free (a container's /dev/shm is 64 MiB by
    default; torch's shared tensors live there)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return True  # not Linux: shared memory is not a size-limited filesystem there
    return st.f_bavail * st.f_frsize >= nbytes


class CpuWorkers:
    """`n` worker processes that train their share of each batch into their own gradient buffer."""

    def __init__(self, n: int) -> None:
        context = mp.get_context("spawn")
        self.conns, self.processes = [], []
        for i in range(n):
            here, there = context.Pipe()
            p = context.Process(target=_worker_main, args=(there,), name=f"seqserve-train-worker-{i + 1}", daemon=True)
            p.start()
            there.close()
            self.conns.append(here)
            self.processes.append(p)
        self.grads: list[torch.Tensor] = []

    def attach(self, setup: WorkerSetup, flat: torch.Tensor) -> None:
        """Give every worker the model (its parameters: views of `flat`) and a gradient buffer of
        its own; waits until all are ready."""
        self.grads = [torch.zeros_like(flat).share_memory_() for _ in self.processes]
        try:
            for conn, grads in zip(self.conns, self.grads):
                conn.send((setup, flat, grads))
            for i in range(len(self.processes)):
                self._receive(i, timeout_s=READY_TIMEOUT_S)
        except (SeqserveError, OSError):
            failed = next((i for i, p in enumerate(self.processes) if p.exitcode not in (None, 0)), 0)
            raise SeqserveError(
                f"training worker {failed + 1} {_how_it_ended(self.processes[failed].exitcode)} before it was ready "
                "(its error is above). Each worker imports the script that started training, so a script "
                'that calls train() must do so under `if __name__ == "__main__":`') from None

    def start_step(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], scale: float,
                   seeds: list[int], threads: int) -> None:
        """Send worker i the padded rows `parts[i]` (source, target in, target out): it trains
        them, its loss times `scale` into its gradient buffer, dropout seeded by `seeds[i]`."""
        for i, (part, seed) in enumerate(zip(parts, seeds)):
            try:
                self.conns[i].send((part, scale, seed, threads))
            except OSError:  # a broken pipe: the worker is gone
                raise self._ended(i) from None

    def finish_step(self, count: int, into: torch.Tensor) -> float:
        """Wait for the first `count` workers' steps, add their gradients into `into`; returns
        the sum of their label-smoothed losses."""
        loss = 0.0
        for i in range(count):
            loss += self._receive(i)
            into.add_(self.grads[i])
        return loss

    def _receive(self, i: int, timeout_s: float | None = None) -> Any:
        conn = self.conns[i]
        try:
            if timeout_s is not None and not conn.poll(timeout_s):
                raise SeqserveError(f"training worker {i + 1} did not start within {timeout_s:.0f} s")
            kind, value = conn.recv()
        except (EOFError, OSError):
            raise self._ended(i) from None
        if kind == "error":
            raise SeqserveError(f"training worker {i + 1} failed:\n{value}")
        return value

    def _ended(self, i: int) -> SeqserveError:
        """The error for worker i's pipe having closed: how the process ended."""
        self.processes[i].join(5.0)
        return SeqserveError(f"training worker {i + 1} {_how_it_ended(self.processes[i].exitcode)}, so the run "
                             "stopped; its last saved state continues with --resume")

    def close(self) -> None:
        """Stop the workers (they are idle between steps; a busy one is killed) and reap them."""
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for p in self.processes:
            p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()


def _how_it_ended(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when the trainer dies (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the trainer died before the call above
            os._exit(1)


def _worker_main(conn: Any) -> None:
    """A worker's life: wait for the model, then train the rows it is sent until told to stop."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it stops us
    keep_freed_memory()
    torch.set_num_threads(1)
    try:
        message = conn.recv()
        if message is None:
            return
        setup, flat, grads = message
        if setup.fused_kernels:  # from the trainer's cache, before any timed step
            kernels.load()
        else:  # the same arithmetic as the trainer's, and no second try at a build that failed
            kernels.disable("the trainer has none")
        cfg = ModelConfig.from_dict(setup.config)
        model = Transformer(cfg)
        _bind(list(model.parameters()), flat, grads, copy=False)
        model.train()
        conn.send(("ready", None))
        while (message := conn.recv()) is not None:
            (source, target_in, target_out), scale, seed, threads = message
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            grads.zero_()
            conn.send(("loss", train_share(model, torch.from_numpy(source), torch.from_numpy(target_in),
                                           torch.from_numpy(target_out), seed=seed, scale=scale,
                                           autocast_dtype=setup.autocast_dtype, smoothing=setup.label_smoothing,
                                           pad_id=cfg.pad_id)))
    except (EOFError, KeyboardInterrupt):
        return  # the trainer is gone or stopping
    except Exception:  # noqa: BLE001 - reported to the trainer, which raises it
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
