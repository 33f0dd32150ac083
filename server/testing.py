"""Test harnesses (ours, and those of services that call seqserve): `InProcessServer`, a real
seqserve server inside the calling process (`create_server` runs on an event loop of its own
thread, so blocking test code can call it over loopback and still look at its scheduler); and
`ScriptedEngine`, a fake model with scripted logits that the decode loop can drive without ONNX
Runtime."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from seqserve.runtime.config import ModelConfig
from seqserve.server.config import ServerConfig
from seqserve.server.main import SeqServeServer, create_server
from seqserve.server.scheduler import Scheduler

T = TypeVar("T")

SCRIPTED_CONFIG = ModelConfig(vocab_size=256, d_model=8, encoder_layers=1, decoder_layers=1, n_heads=2, d_ff=8,
                              max_source_len=16, max_target_len=200)


class ScriptedEngine:
    """A fake model for the decode loop: a source whose first token is k makes its row emit
    k, k+1, ... for k steps, then EOS (id 2; k = 2 would start with EOS itself).

    The script is read from the cross-attention cache and the row's position, so a row only gets
    its own tokens if the batch keeps caches, positions and rows lined up through every merge,
    filter and trim. `steps` lists the rows of every decoder step run.
    """

    config = SCRIPTED_CONFIG

    def __init__(self) -> None:
        self.steps: list[int] = []

    @staticmethod
    def expected(k: int) -> list[int]:
        """The tokens a source starting with k gets."""
        return list(range(k, 2 * k))

    def encode(self, source_ids: np.ndarray, source_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b, s = source_ids.shape
        key = np.zeros((1, b, 2, s, 4), np.float32)  # (L, B, H, S, Dh)
        key[0, :, 0, :, 0] = source_ids
        return key, key.copy()

    def decode(self, tokens: np.ndarray, positions: np.ndarray, past_key: np.ndarray, past_value: np.ndarray,
               self_mask: np.ndarray, cross_key: np.ndarray, cross_value: np.ndarray,
               source_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        b = tokens.shape[0]
        if self_mask.shape != (b, past_key.shape[3] + 1) or not (self_mask.sum(axis=1) == positions[:, 0] + 1).all():
            raise AssertionError("cache mask out of step with positions")
        self.steps.append(b)
        first = cross_key[0, :, 0, 0, 0].astype(int)
        logits = np.zeros((b, 1, self.config.vocab_size), np.float32)  # (B, 1, V)
        for row in range(b):
            pos = int(positions[row, 0])
            logits[row, 0, first[row] + pos if pos < first[row] else self.config.eos_id] = 10.0
        present = np.concatenate([past_key, np.zeros((1, b, 2, 1, 4), np.float32)], axis=3)  # (L, B, H, P+1, Dh)
        alignment = np.zeros((b, 1, cross_key.shape[3]), np.float32)  # (B, 1, S)
        return logits, present, present.copy(), alignment


class DelayedEngine:
    """ONNX Runtime's engine with a pause before every decoder step, to hold requests in the batch
    for as long as a test needs; for the engine core process, as
    `EngineCoreOptions(engine_factory="seqserve.server.testing:DelayedEngine", engine={..., "step_delay_s": 0.05})`."""

    def __init__(self, model_dir: Any, *, step_delay_s: float, **engine_options: Any) -> None:
        from seqserve.runtime.engine import OnnxSeq2Seq

        self._engine = OnnxSeq2Seq(model_dir, **engine_options)
        self.step_delay_s = step_delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def decode(self, *args: Any) -> Any:
        time.sleep(self.step_delay_s)
        return self._engine.decode(*args)


def loopback_config(model_dir: str | Path, **overrides: Any) -> ServerConfig:
    """127.0.0.1, a free port, one ONNX Runtime thread, quiet text logs, and decoding in a thread of
    the calling process (its scheduler can be looked at; `engine_core="process"` for the engine
    core process that `seqserve serve` runs by default); overrides on top."""
    return ServerConfig(**{"model_dir": model_dir, "host": "127.0.0.1", "port": 0, "intra_op_threads": 1,
                           "engine_core": "thread", "log_format": "text", "log_level": "warning", **overrides})


class InProcessServer:
    """A started server (health SERVING once the constructor returns); `close()` stops it."""

    def __init__(self, config: ServerConfig, *, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="seqserve-in-process", daemon=True)
        self.thread.start()
        try:
            self.server: SeqServeServer
            self.server, self.port = self.run(create_server(config))
        except BaseException:
            self._stop_loop()
            raise
        self.address = f"127.0.0.1:{self.port}"

    @property
    def scheduler(self) -> Scheduler:
        """The in-process scheduler (with `engine_core="thread"`)."""
        assert isinstance(self.server.scheduler, Scheduler), "the engine core is a process: no scheduler here"
        return self.server.scheduler

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout or self.timeout)

    def close(self) -> None:
        """Stop the server at once, then its loop (again: nothing)."""
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self.run(self.server.stop(0))
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
