"""The running batch of decoder rows and its cache (TGI's `Batch` in spirit): `concatenate`
admits new rows at a step boundary, `step` runs one decoder step for every row, `reorder` moves
beams, `filter` drops rows that are done.

Rows that joined at different times share one cache length P: a newer row's cache starts with
filler slots that its self-attention mask hides, and its positions count from its own start.
Columns that no live row attends to any more are trimmed away, so the cache never grows past
the longest live row.

K/V live where the engine wants them: numpy arrays on the host (`HOST`), or OrtValues on the
session's device when the engine has a `device_cache` (runtime/device_cache.py). The first step
settles which; tokens, positions and masks always stay on the host, where the choice of the next
token and the bookkeeping read them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from seqserve.runtime.config import ModelConfig


class StepEngine(Protocol):
    """What the batch needs of an engine (`server.engine.OnnxSeq2Seq`, or a fake in tests).

    An engine may also have a `device_cache` (`CacheOps` or None): then the batch keeps K/V there.
    """

    config: ModelConfig

    def encode(self, source_ids: np.ndarray, source_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def decode(self, tokens: np.ndarray, positions: np.ndarray, past_key: np.ndarray, past_value: np.ndarray,
               self_mask: np.ndarray, cross_key: np.ndarray, cross_value: np.ndarray,
               source_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...


class CacheOps(Protocol):
    """Where K/V tensors (L, R, H, P or S, Dh) live and the few operations the batch does on them."""

    on_device: bool  # False: numpy arrays handed to `engine.decode`; True: this object's own `decode`

    def upload(self, x: Any) -> Any: ...

    def take(self, key: Any, value: Any, rows: np.ndarray, start: int, end: int) -> tuple[Any, Any]:
        """key/value[:, rows, :, start:end]."""
        ...

    def pad_concat(self, a_key: Any, a_value: Any, a_pad: tuple[int, int],
                   b_key: Any, b_value: Any, b_pad: tuple[int, int]) -> tuple[Any, Any]:
        """a's rows then b's on axis 1, each first zero-padded (before, after) on axis 3."""
        ...

    def decode(self, tokens: np.ndarray, positions: np.ndarray, past_key: Any, past_value: Any,
               self_mask: np.ndarray, cross_key: Any, cross_value: Any,
               source_mask: np.ndarray) -> tuple[np.ndarray, Any, Any, np.ndarray]: ...


def _pad_len(x: np.ndarray, before: int, after: int) -> np.ndarray:
    """Zero-pad axis 3 of a (L, R, H, P, Dh) tensor."""
    if before == after == 0:
        return x
    return np.pad(x, [(0, 0), (0, 0), (0, 0), (before, after), (0, 0)])


class HostCache:
    """K/V as numpy arrays: ONNX Runtime reads and writes them in place on CPU (the default there)."""

    on_device = False

    @staticmethod
    def upload(x: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def take(key: np.ndarray, value: np.ndarray, rows: np.ndarray, start: int,
             end: int) -> tuple[np.ndarray, np.ndarray]:
        return key[:, rows, :, start:end], value[:, rows, :, start:end]

    @staticmethod
    def pad_concat(a_key: np.ndarray, a_value: np.ndarray, a_pad: tuple[int, int],
                   b_key: np.ndarray, b_value: np.ndarray, b_pad: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([_pad_len(a_key, *a_pad), _pad_len(b_key, *b_pad)], axis=1),
                np.concatenate([_pad_len(a_value, *a_pad), _pad_len(b_value, *b_pad)], axis=1))

    @staticmethod
    def decode(*args: Any) -> tuple[np.ndarray, Any, Any, np.ndarray]:
        raise NotImplementedError("host K/V go through engine.decode")


HOST = HostCache()


def _pad_axis(x: np.ndarray, axis: int, length: int, value: float | bool = 0) -> np.ndarray:
    """Right-pad one axis of x to `length`."""
    missing = length - x.shape[axis]
    if missing <= 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, missing)
    return np.pad(x, widths, constant_values=value)


class DecodeBatch:
    """Rows being decoded together: next input token, position, self-attention cache and mask,
    and each row's cross-attention K/V with its source mask."""

    def __init__(self, cross_key: np.ndarray, cross_value: np.ndarray, source_mask: np.ndarray, bos_id: int) -> None:
        """New rows straight from the encoder: cross K/V (L, R, H, S, Dh), source_mask (R, S)."""
        layers, rows, heads, _, head_dim = cross_key.shape
        self.cross_key, self.cross_value, self.source_mask = cross_key, cross_value, source_mask
        self.tokens = np.full(rows, bos_id, dtype=np.int64)  # (R,) next decoder input per row
        self.positions = np.zeros(rows, dtype=np.int64)  # (R,) its position
        self.past_key = np.zeros((layers, rows, heads, 0, head_dim), dtype=np.float32)  # (L, R, H, P, Dh)
        self.past_value = np.zeros_like(self.past_key)
        self.cache_mask = np.zeros((rows, 0), dtype=bool)  # (R, P) True at the slots a row attends to
        # Where K/V live; None until the first step asks the engine (until then numpy from the encoder).
        self._ops: CacheOps | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def cache_len(self) -> int:
        return self.cache_mask.shape[1]

    @property
    def on_device(self) -> bool:
        """True once K/V are OrtValues on the engine's device."""
        return self._ops is not None and self._ops.on_device

    def _adopt(self, engine: StepEngine) -> CacheOps:
        """Move K/V to where the engine keeps them (once, at the first step)."""
        ops: CacheOps = getattr(engine, "device_cache", None) or HOST
        self.past_key, self.past_value = ops.upload(self.past_key), ops.upload(self.past_value)
        self.cross_key, self.cross_value = ops.upload(self.cross_key), ops.upload(self.cross_value)
        self._ops = ops
        return ops

    def concatenate(self, other: DecodeBatch) -> None:
        """Append another batch's rows (typically just encoded, with an empty cache)."""
        ops = self._ops or other._ops or HOST  # new rows come as numpy; device ops upload them
        source_len = max(self.source_mask.shape[1], other.source_mask.shape[1])
        cache_len = max(self.cache_len, other.cache_len)
        self.cross_key, self.cross_value = ops.pad_concat(
            self.cross_key, self.cross_value, (0, source_len - self.source_mask.shape[1]),
            other.cross_key, other.cross_value, (0, source_len - other.source_mask.shape[1]))
        self.source_mask = np.concatenate([_pad_axis(self.source_mask, 1, source_len, False),
                                           _pad_axis(other.source_mask, 1, source_len, False)], axis=0)
        # Caches are aligned on their newest slot: filler goes in front, hidden by the mask.
        self.past_key, self.past_value = ops.pad_concat(
            self.past_key, self.past_value, (cache_len - self.cache_len, 0),
            other.past_key, other.past_value, (cache_len - other.cache_len, 0))
        self.cache_mask = np.concatenate([self._left_pad_mask(self.cache_mask, cache_len),
                                          self._left_pad_mask(other.cache_mask, cache_len)], axis=0)
        self.tokens = np.concatenate([self.tokens, other.tokens])
        self.positions = np.concatenate([self.positions, other.positions])
        self._ops = self._ops or other._ops

    @staticmethod
    def _left_pad_mask(x: np.ndarray, length: int) -> np.ndarray:
        missing = length - x.shape[1]
        return x if missing <= 0 else np.pad(x, [(0, 0), (missing, 0)], constant_values=False)

    def step(self, engine: StepEngine, clock: Callable[[], float] = time.perf_counter
             ) -> tuple[np.ndarray, np.ndarray, float]:
        """One decoder step for all rows: logits (R, V), alignment (R, S), seconds inside the engine
        (on `clock`: the decode loop passes its own).

        The cache grows by one slot; `tokens` must be set to the chosen tokens before the next step.
        """
        ops = self._ops or self._adopt(engine)
        decode = ops.decode if ops.on_device else engine.decode
        self_mask = np.concatenate([self.cache_mask, np.ones((len(self), 1), dtype=bool)], axis=1)  # (R, P+1)
        start = clock()
        logits, self.past_key, self.past_value, alignment = decode(
            self.tokens[:, None], self.positions[:, None], self.past_key, self.past_value, self_mask,
            self.cross_key, self.cross_value, self.source_mask)
        run_seconds = clock() - start
        self.cache_mask = self_mask
        self.positions = self.positions + 1
        return logits[:, -1], alignment[:, -1], run_seconds

    def subset(self, rows: np.ndarray) -> DecodeBatch:
        """A new batch of these rows only, leaving this one as it is (to step a few rows alone)."""
        ops = self._ops or HOST
        out = DecodeBatch.__new__(DecodeBatch)
        out._ops = self._ops
        out.tokens, out.positions = self.tokens[rows], self.positions[rows]
        out.cache_mask, out.source_mask = self.cache_mask[rows], self.source_mask[rows]
        out.past_key, out.past_value = ops.take(self.past_key, self.past_value, rows, 0, self.cache_len)
        out.cross_key, out.cross_value = ops.take(self.cross_key, self.cross_value, rows, 0,
                                                  self.source_mask.shape[1])
        return out

    def reorder(self, index: np.ndarray) -> None:
        """Row i takes the cache of row index[i] (beam search). Cross K/V stay: a request's beams
        share one source, so their rows hold the same cross K/V."""
        self.past_key, self.past_value = (self._ops or HOST).take(self.past_key, self.past_value, index,
                                                                  0, self.cache_len)
        self.cache_mask = self.cache_mask[index]
        self.positions = self.positions[index]

    def filter(self, keep: np.ndarray) -> None:
        """Keep only rows where `keep` (R,) is True, and trim cache and source columns nobody uses."""
        if keep.all():
            return
        rows = np.flatnonzero(keep)
        old_cache_len = self.cache_len
        self.tokens, self.positions = self.tokens[rows], self.positions[rows]
        self.cache_mask = self.cache_mask[rows]
        self.source_mask = self.source_mask[rows]
        used = self.cache_mask.any(axis=0)
        first = int(used.argmax()) if used.any() else old_cache_len
        source_len = int(self.source_mask.any(axis=0).nonzero()[0].max()) + 1 if self.source_mask.any() else 0
        self.cache_mask = np.ascontiguousarray(self.cache_mask[:, first:])
        self.source_mask = np.ascontiguousarray(self.source_mask[:, :source_len])
        ops = self._ops or HOST
        self.past_key, self.past_value = ops.take(self.past_key, self.past_value, rows, first, old_cache_len)
        self.cross_key, self.cross_value = ops.take(self.cross_key, self.cross_value, rows, 0, source_len)
