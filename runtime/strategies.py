"""Choosing the next token, in numpy: greedy, sampling (temperature, top-k, top-p, seeded) and
beam search. Nothing here knows about batches of other requests or about gRPC."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, V) logits, in float64 for stable sums over long beams."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def sample(logits: np.ndarray, rng: np.random.Generator, *, temperature: float, top_k: int,
           top_p: float) -> np.ndarray:
    """One token per row of (N, V) logits. temperature 0 means greedy."""
    if temperature == 0.0:
        return logits.argmax(axis=-1)
    # Shifted so that each row's best logit is 0 before dividing: any temperature > 0, however
    # small, then gives finite or -inf values and never inf - inf.
    x = logits.astype(np.float64)
    with np.errstate(over="ignore", under="ignore"):
        x = (x - x.max(axis=-1, keepdims=True)) / temperature
    if 0 < top_k < x.shape[-1]:
        kth = np.partition(x, -top_k, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    cumulative = probs.cumsum(axis=-1)
    draws = rng.random((x.shape[0], 1)) * cumulative[:, -1:]
    return np.minimum((cumulative < draws).sum(axis=-1), x.shape[-1] - 1)


@dataclass
class Hypothesis:
    """A finished beam hypothesis."""

    tokens: list[int]
    log_probs: list[float]
    score: float  # sum of log-probs / length ** length_penalty
    finished_by_eos: bool
    alignments: list[np.ndarray] = field(default_factory=list)


@dataclass
class BeamSearch:
    """Beam search over `num_beams` rows of one request.

    Each step takes the beams' log-probs (num_beams, V) and returns, for every beam row, which
    old row it continues and its new token. Hypotheses that end (EOS) are set aside; the search
    is done when `num_beams` finished ones exist and no live beam can beat the worst of them.
    """

    num_beams: int
    eos_id: int
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    stop_ids: frozenset[int] = frozenset()
    keep_alignments: bool = False
    scores: np.ndarray = field(init=False)  # (num_beams,) cumulative log-prob of each live beam
    tokens: list[list[int]] = field(init=False)
    log_probs: list[list[float]] = field(init=False)
    alignments: list[list[np.ndarray]] = field(init=False)
    finished: list[Hypothesis] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        # All beams start identical: only the first may expand, or the top-k would be k copies.
        self.scores = np.full(self.num_beams, -np.inf)
        self.scores[0] = 0.0
        self.tokens = [[] for _ in range(self.num_beams)]
        self.log_probs = [[] for _ in range(self.num_beams)]
        self.alignments = [[] for _ in range(self.num_beams)]

    def _score(self, total: float, length: int) -> float:
        """total / length ** length_penalty, for any finite penalty: a power that overflows or
        underflows gives an infinite or zero score instead of an exception, and an undefined one
        (-inf / inf, 0 / 0) the worst score."""
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            score = np.float64(total) / np.power(np.float64(max(1, length)), self.length_penalty)
        return -math.inf if math.isnan(score) else float(score)

    def step(self, step_log_probs: np.ndarray, alignment: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Advance one token: returns (source row per beam (num_beams,), new token per beam (num_beams,))."""
        n, vocab = step_log_probs.shape
        length = len(self.tokens[0]) + 1
        if length <= self.min_new_tokens:
            step_log_probs = step_log_probs.copy()
            step_log_probs[:, self.eos_id] = -np.inf
        candidates = (self.scores[:, None] + step_log_probs).ravel()  # (n * V,)
        top = np.argpartition(-candidates, 2 * n)[: 2 * n]
        top = top[np.argsort(-candidates[top], kind="stable")]
        sources, new_tokens, new_scores = [], [], []
        for flat in top:
            beam, token = divmod(int(flat), vocab)
            total = float(candidates[flat])
            if total == -np.inf:
                break
            if token == self.eos_id or token in self.stop_ids:
                if len(self.finished) < self.num_beams or self._score(total, length) > min(h.score for h in self.finished):
                    seq = self.tokens[beam] + ([token] if token != self.eos_id else [])
                    lps = self.log_probs[beam] + [float(step_log_probs[beam, token])]
                    al = self.alignments[beam] + ([alignment[beam]] if self.keep_alignments and alignment is not None
                                                  and token != self.eos_id else [])
                    self.finished.append(Hypothesis(seq, lps[: len(seq)] if token == self.eos_id else lps,
                                                    self._score(total, length), token == self.eos_id, al))
                    self.finished.sort(key=lambda h: -h.score)
                    del self.finished[self.num_beams:]
                continue
            sources.append(beam)
            new_tokens.append(token)
            new_scores.append(total)
            if len(sources) == n:
                break
        while len(sources) < n:  # fewer live continuations than beams: pad with dead copies
            sources.append(sources[0] if sources else 0)
            new_tokens.append(self.eos_id)
            new_scores.append(-np.inf)
        self.tokens = [self.tokens[s] + [t] for s, t in zip(sources, new_tokens)]
        self.log_probs = [self.log_probs[s] + [float(step_log_probs[s, t])] for s, t in zip(sources, new_tokens)]
        if self.keep_alignments and alignment is not None:
            self.alignments = [self.alignments[s] + [alignment[s]] for s in sources]
        self.scores = np.array(new_scores)
        return np.array(sources), np.array(new_tokens, dtype=np.int64)

    def done(self) -> bool:
        """True when no live beam can still beat the worst of num_beams finished hypotheses."""
        if not np.isfinite(self.scores).any():
            return True
        if len(self.finished) < self.num_beams:
            return False
        best_live = self._score(float(self.scores.max()), len(self.tokens[0]))
        return best_live <= self.finished[-1].score

    def best(self, count: int) -> list[Hypothesis]:
        """The `count` best hypotheses, live beams counting as cut off by length."""
        pool = list(self.finished)
        for i in np.argsort(-self.scores):
            if np.isfinite(self.scores[i]):
                pool.append(Hypothesis(self.tokens[i], self.log_probs[i],
                                       self._score(float(self.scores[i]), len(self.tokens[i])), False,
                                       self.alignments[i]))
        pool.sort(key=lambda h: -h.score)
        return pool[:count]
