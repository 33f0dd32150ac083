"""The running batch of decoder rows and its cache, as numpy arrays (TGI's `Batch` in spirit):
`concatenate` admits new rows at a step boundary, `step` runs one decoder step for every row,
`reorder` moves beams, `filter` drops rows that are done.

Rows that joined at different times share one cache length P: a newer row's cache starts with
filler slots that its self-attention mask hides, and its positions count from its own start.
Columns that no live row attends to any more are trimmed away, so the cache never grows past
the longest live row.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from seqserve.model.config import ModelConfig


class StepEngine(Protocol):
    """What the batch needs of an engine (`server.engine.OnnxSeq2Seq`, or a fake in tests)."""

    config: ModelConfig

    def encode(self, source_ids: np.ndarray, source_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def decode(self, tokens: np.ndarray, positions: np.ndarray, past_key: np.ndarray, past_value: np.ndarray,
               self_mask: np.ndarray, cross_key: np.ndarray, cross_value: np.ndarray,
               source_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...


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

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def cache_len(self) -> int:
        return self.cache_mask.shape[1]

    def concatenate(self, other: DecodeBatch) -> None:
        """Append another batch's rows (typically just encoded, with an empty cache)."""
        source_len = max(self.source_mask.shape[1], other.source_mask.shape[1])
        cache_len = max(self.cache_len, other.cache_len)
        mine = [_pad_axis(x, 3, source_len) for x in (self.cross_key, self.cross_value)]
        theirs = [_pad_axis(x, 3, source_len) for x in (other.cross_key, other.cross_value)]
        self.cross_key = np.concatenate([mine[0], theirs[0]], axis=1)
        self.cross_value = np.concatenate([mine[1], theirs[1]], axis=1)
        self.source_mask = np.concatenate([_pad_axis(self.source_mask, 1, source_len, False),
                                           _pad_axis(other.source_mask, 1, source_len, False)], axis=0)
        # Caches are aligned on their newest slot: filler goes in front, hidden by the mask.
        self.past_key = np.concatenate([self._left_pad_cache(self.past_key, cache_len),
                                        self._left_pad_cache(other.past_key, cache_len)], axis=1)
        self.past_value = np.concatenate([self._left_pad_cache(self.past_value, cache_len),
                                          self._left_pad_cache(other.past_value, cache_len)], axis=1)
        self.cache_mask = np.concatenate([self._left_pad_mask(self.cache_mask, cache_len),
                                          self._left_pad_mask(other.cache_mask, cache_len)], axis=0)
        self.tokens = np.concatenate([self.tokens, other.tokens])
        self.positions = np.concatenate([self.positions, other.positions])

    @staticmethod
    def _left_pad_cache(x: np.ndarray, length: int) -> np.ndarray:
        missing = length - x.shape[3]
        return x if missing <= 0 else np.pad(x, [(0, 0), (0, 0), (0, 0), (missing, 0), (0, 0)])

    @staticmethod
    def _left_pad_mask(x: np.ndarray, length: int) -> np.ndarray:
        missing = length - x.shape[1]
        return x if missing <= 0 else np.pad(x, [(0, 0), (missing, 0)], constant_values=False)

    def step(self, engine: StepEngine) -> tuple[np.ndarray, np.ndarray, float]:
        """One decoder step for all rows: logits (R, V), alignment (R, S), seconds inside the engine.

        The cache grows by one slot; `tokens` must be set to the chosen tokens before the next step.
        """
        self_mask = np.concatenate([self.cache_mask, np.ones((len(self), 1), dtype=bool)], axis=1)  # (R, P+1)
        start = time.perf_counter()
        logits, self.past_key, self.past_value, alignment = engine.decode(
            self.tokens[:, None], self.positions[:, None], self.past_key, self.past_value, self_mask,
            self.cross_key, self.cross_value, self.source_mask)
        run_seconds = time.perf_counter() - start
        self.cache_mask = self_mask
        self.positions = self.positions + 1
        return logits[:, -1], alignment[:, -1], run_seconds

    def reorder(self, index: np.ndarray) -> None:
        """Row i takes the cache of row index[i] (beam search); cross K/V follow for safety."""
        self.past_key = self.past_key[:, index]
        self.past_value = self.past_value[:, index]
        self.cache_mask = self.cache_mask[index]
        self.positions = self.positions[index]

    def filter(self, keep: np.ndarray) -> None:
        """Keep only rows where `keep` (R,) is True, and trim cache and source columns nobody uses."""
        if keep.all():
            return
        self.tokens, self.positions = self.tokens[keep], self.positions[keep]
        self.cache_mask = self.cache_mask[keep]
        self.source_mask = self.source_mask[keep]
        used = self.cache_mask.any(axis=0)
        first = int(used.argmax()) if used.any() else self.cache_len
        source_len = int(self.source_mask.any(axis=0).nonzero()[0].max()) + 1 if self.source_mask.any() else 0
        self.cache_mask = np.ascontiguousarray(self.cache_mask[:, first:])
        self.source_mask = np.ascontiguousarray(self.source_mask[:, :source_len])
        self.past_key = self.past_key[:, keep, :, first:]
        self.past_value = self.past_value[:, keep, :, first:]
        self.cross_key = self.cross_key[:, keep, :, :source_len]
        self.cross_value = self.cross_value[:, keep, :, :source_len]
