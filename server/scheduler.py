"""Step-level continuous batching: one worker thread owns the running batch.

At every step boundary the worker drops rows whose request finished, was cancelled or passed
its deadline, admits waiting requests (one encoder pass for all of them, their rows merged into
the batch), runs one decoder step for every row, and hands each row its token. A short request
that arrives while long ones decode joins at the next step instead of waiting for them.

Nothing here knows about gRPC: callers submit token ids with `GenerationParams` and get a
`concurrent.futures.Future` plus, optionally, a callback per token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from seqserve.model.config import ModelConfig
from seqserve.server import errors
from seqserve.server.batch import DecodeBatch, StepEngine
from seqserve.server.engine import pad_batch
from seqserve.server.generation import (FinishReason, GenerationParams, RequestResult, SequenceResult, Strategy,
                                        Timings, TokenEvent)
from seqserve.server.strategies import BeamSearch, log_softmax, sample

log = logging.getLogger(__name__)

TokenCallback = Callable[[TokenEvent], None]


class SchedulerObserver(Protocol):
    """Receives step-level measurements (the metrics module implements it)."""

    def on_encode(self, requests: int, seconds: float) -> None: ...

    def on_step(self, rows: int, seconds: float, run_seconds: float) -> None: ...

    def on_queue_depth(self, depth: int) -> None: ...


def check_request(config: ModelConfig, max_batch_size: int, source_ids: list[int], params: GenerationParams) -> None:
    """What the decoding loop itself cannot take (InvalidRequest).

    The service validates requests with friendlier messages; these guard the graphs' position
    table, which an out-of-range position would crash for the whole batch.
    """
    if not 1 <= params.max_new_tokens <= config.max_target_len:
        raise errors.InvalidRequest("max_new_tokens", f"must be in [1, {config.max_target_len}]")
    if not 1 <= len(source_ids) <= config.max_source_len:
        raise errors.InvalidRequest("input", f"must have 1 to {config.max_source_len} tokens")
    if params.rows > max_batch_size:
        field = "num_beams" if params.strategy is Strategy.BEAM else "num_return_sequences"
        raise errors.InvalidRequest(field, f"needs {params.rows} rows; max_batch_size is {max_batch_size}")


class RequestScheduler(Protocol):
    """What the service needs of a scheduler: `Scheduler` (a thread of the server process) or
    `worker.ProcessScheduler` (a process of its own)."""

    def submit(self, source_ids: list[int], params: GenerationParams, *, deadline: float | None = None,
               on_token: TokenCallback | None = None) -> RequestHandle: ...

    def close(self) -> None: ...

    def wait_idle(self, timeout: float | None = None) -> bool: ...

    def stop(self) -> None: ...


class RequestHandle:
    """The caller's side of a submitted request."""

    def __init__(self, wake: Callable[[], None] | None = None) -> None:
        self.future: Future[RequestResult] = Future()
        self._cancelled = threading.Event()
        self._wake = wake

    def cancel(self) -> None:
        """Ask for the request's rows (or its place in the queue) to go at the next step boundary."""
        self._cancelled.set()
        if self._wake is not None:
            self._wake()

    @property
    def cancel_requested(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Sequence:
    """One output sequence being built (one row, except for beam search)."""

    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    alignments: list[np.ndarray] = field(default_factory=list)
    finish: FinishReason | None = None


@dataclass
class _Request:
    """A submitted request and its progress."""

    source_ids: list[int]
    params: GenerationParams
    deadline: float | None
    on_token: TokenCallback | None
    handle: RequestHandle
    submitted: float
    admitted: float = 0.0
    encoder_seconds: float = 0.0
    first_token: float = 0.0
    sequences: list[_Sequence] = field(default_factory=list)
    beam: BeamSearch | None = None
    rng: np.random.Generator | None = None
    fast: bool = False  # plain greedy with nothing extra to record: the step's fast path
    done: bool = False


class Scheduler:
    """Runs requests through one continuously batched decoding loop on a worker thread."""

    def __init__(self, engine: StepEngine, *, max_batch_size: int = 32, max_queue: int = 128,
                 observer: SchedulerObserver | None = None) -> None:
        self.engine = engine
        self.config = engine.config
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.observer = observer
        self._waiting: deque[_Request] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        # The running batch. Each active request owns params.rows consecutive rows, in the order
        # of self._active; self._min_new holds every row's min_new_tokens.
        self._batch: DecodeBatch | None = None
        self._active: list[_Request] = []
        self._row_count = 0
        self._min_new = np.zeros(0, dtype=np.int64)
        self._idle = threading.Event()
        self._idle.set()

    # -- the caller's side -------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="seqserve-scheduler", daemon=True)
            self._thread.start()

    def submit(self, source_ids: list[int], params: GenerationParams, *, deadline: float | None = None,
               on_token: TokenCallback | None = None, submitted: float | None = None) -> RequestHandle:
        """Queue a request; Overloaded at once when the wait queue is full, Unavailable when closed.

        `submitted` (time.monotonic()) is when the caller received it, if earlier than now.
        """
        check_request(self.config, self.max_batch_size, source_ids, params)
        handle = RequestHandle(self._wake)
        request = _Request(list(source_ids), params, deadline, on_token, handle,
                           time.monotonic() if submitted is None else submitted)
        with self._lock:
            if self._closed:
                raise errors.Unavailable("server is shutting down")
            if len(self._waiting) >= self.max_queue:
                self._purge_waiting(time.monotonic())  # cancelled or expired requests hold no place
            if len(self._waiting) >= self.max_queue:
                raise errors.Overloaded(f"wait queue is full ({self.max_queue} requests); retry later")
            self._waiting.append(request)
            self._idle.clear()
            self._lock.notify()
            depth = len(self._waiting)
        if self.observer:
            self.observer.on_queue_depth(depth)
        return handle

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def _purge_waiting(self, now: float) -> None:
        """Fail queued requests that were cancelled or passed their deadline (lock held)."""
        if any(self._expired(r, now) for r in self._waiting):
            keep: deque[_Request] = deque()
            for request in self._waiting:
                error = self._expired(request, now)
                if error is None:
                    keep.append(request)
                else:
                    self._fail(request, error)
            self._waiting = keep

    def close(self) -> None:
        """Refuse new requests; queued and running ones still finish."""
        with self._lock:
            self._closed = True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once nothing is queued or running."""
        return self._idle.wait(timeout)

    def stop(self) -> None:
        """Stop the worker; unfinished requests end with Unavailable."""
        with self._lock:
            self._closed = True
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        for request in [*self._waiting, *self._active]:
            self._fail(request, errors.Unavailable("server stopped before the request finished"))
        self._waiting.clear()
        self._clear_batch()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_rows(self) -> int:
        return self._row_count

    # -- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._active and not self._stopping:
                    self._idle.set()
                    self._lock.wait()
                if self._stopping:
                    return
            self.step_boundary()

    @property
    def has_work(self) -> bool:
        """Requests are queued or decoding (what `step_boundary` would act on)."""
        return bool(self._waiting or self._active)

    def step_boundary(self) -> None:
        """One step boundary: drop finished rows, admit waiting requests, one decoder step.

        The worker thread calls it in a loop; a caller that drives the loop itself (the worker
        process, which reads its commands between steps on the same thread) calls it instead of
        `start()`.
        """
        try:
            # What the observer gets as the step's time is the whole boundary minus the encoder
            # pass, so Python's share is honest.
            start = time.perf_counter()
            self._drop_finished()
            encoder_seconds = self._admit()
            if self._active:
                rows = self._row_count
                run_seconds = self._step()
                self._drop_finished()
                if self.observer:
                    self.observer.on_step(rows, time.perf_counter() - start - encoder_seconds, run_seconds)
        except Exception:  # a bug outside any one request's work: fail the batch, keep serving
            log.exception("decoding step failed")
            for request in self._active:
                self._fail(request, errors.ServingError("decoding failed (see the server log)"))
            self._clear_batch()

    def _clear_batch(self) -> None:
        self._active, self._batch, self._row_count = [], None, 0
        self._min_new = np.zeros(0, dtype=np.int64)

    def _expired(self, request: _Request, now: float) -> errors.ServingError | None:
        if request.handle.cancel_requested:
            return errors.Cancelled("request cancelled by the caller")
        if request.deadline is not None and now > request.deadline:
            return errors.DeadlineExceeded("deadline passed before the request finished")
        return None

    def _admit(self) -> float:
        """Move waiting requests into the batch while rows are free: one encoder pass for all.

        Returns the seconds spent in the encoder.
        """
        free = self.max_batch_size - self._row_count
        admitted: list[_Request] = []
        now = time.monotonic()
        with self._lock:
            self._purge_waiting(now)
            while self._waiting and self._waiting[0].params.rows <= free:
                request = self._waiting.popleft()
                admitted.append(request)
                free -= request.params.rows
            depth = len(self._waiting)
        if self.observer:
            self.observer.on_queue_depth(depth)
        if not admitted:
            return 0.0
        start = time.perf_counter()
        ids, mask = pad_batch([r.source_ids for r in admitted], self.config.pad_id)
        cross_key, cross_value = self.engine.encode(ids, mask)
        seconds = time.perf_counter() - start
        if self.observer:
            self.observer.on_encode(len(admitted), seconds)
        # Each request takes params.rows identical rows (beams, or independent samples).
        repeats = np.array([r.params.rows for r in admitted])
        new = DecodeBatch(np.repeat(cross_key, repeats, axis=1), np.repeat(cross_value, repeats, axis=1),
                          np.repeat(mask, repeats, axis=0), self.config.bos_id)
        admitted_at = time.monotonic()
        for request in admitted:
            request.admitted = admitted_at
            request.encoder_seconds = seconds
            params = request.params
            if params.strategy is Strategy.BEAM:
                request.beam = BeamSearch(params.num_beams, self.config.eos_id, params.length_penalty,
                                          params.min_new_tokens, frozenset(params.stop_token_ids),
                                          params.return_alignments)
                request.sequences = [_Sequence()]
            else:
                request.sequences = [_Sequence() for _ in range(params.rows)]
            if params.strategy is Strategy.SAMPLE:
                request.rng = np.random.default_rng(params.seed)
            request.fast = (params.strategy is Strategy.GREEDY and request.on_token is None
                            and not params.return_log_probs and not params.return_alignments
                            and not params.stop_token_ids)
            self._active.append(request)
        self._row_count += int(repeats.sum())
        self._min_new = np.concatenate([self._min_new, np.repeat([r.params.min_new_tokens for r in admitted], repeats)])
        if self._batch is None:
            self._batch = new
        else:
            self._batch.concatenate(new)
        return seconds

    def _step(self) -> float:
        """One decoder step for all rows, then each row's choice of token; returns seconds in the engine."""
        assert self._batch is not None
        try:
            logits, alignment, run_seconds = self._batch.step(self.engine)
        except Exception:
            log.exception("decoder step failed for a batch of %d rows; retrying request by request", len(self._batch))
            if not self._isolate_failed_step():
                raise
            assert self._batch is not None
            logits, alignment, run_seconds = self._batch.step(self.engine)
        self._batch.tokens = self._choose(logits, alignment)
        return run_seconds

    def _isolate_failed_step(self) -> bool:
        """After a failed decoder step: run each request's rows alone (on copies) to find the ones
        that fail by themselves; fail those requests alone and drop their rows, so the rest of the
        batch can step again with the results it would have had anyway (a row's results do not
        depend on its batch company). False when no request fails alone.

        A step does not change the batch when it raises, so the batch is as it was before it.
        """
        assert self._batch is not None
        culprits: list[_Request] = []
        row = 0
        for request in self._active:
            rows = np.arange(row, row + request.params.rows)
            row += request.params.rows
            try:
                self._batch.subset(rows).step(self.engine)
            except Exception:
                log.exception("decoder step failed for one request alone (%d source tokens)", len(request.source_ids))
                culprits.append(request)
        if not culprits or len(culprits) == len(self._active):
            return False
        for request in culprits:
            self._fail(request, errors.ServingError("decoding failed for this request alone (see the server log); "
                                                    "the other requests in its batch went on"))
        self._remove_done()
        return True

    def _choose(self, logits: np.ndarray, alignment: np.ndarray) -> np.ndarray:
        """Pick every row's next token and record it; returns the decoder's next inputs (R,)."""
        assert self._batch is not None
        eos = self.config.eos_id
        generated = self._batch.positions - 1  # tokens each row had before this step
        under_min = generated < self._min_new
        if under_min.any():  # EOS is forbidden to rows still under their min_new_tokens
            logits = logits.copy()
            logits[under_min, eos] = -np.inf
        next_tokens = logits.argmax(axis=-1)  # greedy for everyone; other strategies overwrite theirs
        chosen = next_tokens.tolist()
        now = time.monotonic()
        reorder: np.ndarray | None = None
        row = 0
        for request in self._active:
            params = request.params
            if request.done:  # failed earlier in this step (a callback): its rows leave after it
                row += params.rows
                continue
            if request.fast:  # the common case, kept cheap: Python time per step counts
                token = chosen[row]
                seq = request.sequences[0]
                if request.first_token == 0.0:
                    request.first_token = now
                if token == eos:
                    seq.finish = FinishReason.EOS
                else:
                    seq.tokens.append(token)
                    if len(seq.tokens) >= params.max_new_tokens:
                        seq.finish = FinishReason.LENGTH
                if seq.finish is not None:
                    self._succeed(request, [self._sequence_result(request, seq)])
                row += 1
                continue
            n = params.rows
            try:  # one request's own arithmetic (its options at their extremes) fails it alone
                sources = self._choose_for(request, row, logits, alignment, next_tokens, now)
            except Exception:
                log.exception("choosing tokens failed for one request (%s)", params.strategy.name)
                self._fail(request, errors.ServingError("choosing the next token failed for this request "
                                                        "(see the server log); the rest of its batch went on"))
                sources = None
            if sources is not None and not np.array_equal(sources, np.arange(n)):
                if reorder is None:
                    reorder = np.arange(len(next_tokens))
                reorder[row:row + n] = row + sources
            row += n
        if reorder is not None:
            self._batch.reorder(reorder)
        return next_tokens.astype(np.int64)

    def _choose_for(self, request: _Request, row: int, logits: np.ndarray, alignment: np.ndarray,
                    next_tokens: np.ndarray, now: float) -> np.ndarray | None:
        """Sampling, beam search, or greedy with extras for one request's rows (starting at `row`):
        writes their next tokens into `next_tokens`; returns a beam's source rows, else None."""
        params = request.params
        n = params.rows
        span = slice(row, row + n)
        if params.strategy is Strategy.SAMPLE:
            assert request.rng is not None
            next_tokens[span] = sample(logits[span], request.rng, temperature=params.temperature,
                                       top_k=params.top_k, top_p=params.top_p)
        if request.beam is not None:
            sources, tokens = request.beam.step(log_softmax(logits[span]),
                                                alignment[span] if params.return_alignments else None)
            next_tokens[span] = tokens
            if request.first_token == 0.0:
                request.first_token = now
            if request.beam.done() or len(request.beam.tokens[0]) >= params.max_new_tokens:
                self._finish_beam(request)
            return sources
        log_probs = log_softmax(logits[span]) if params.return_log_probs else None
        for i in range(n):
            self._emit(request, i, int(next_tokens[row + i]),
                       None if log_probs is None else float(log_probs[i, next_tokens[row + i]]),
                       alignment[row + i] if params.return_alignments else None, now)
        return None

    def _emit(self, request: _Request, index: int, token: int, log_prob: float | None,
              alignment: np.ndarray | None, now: float) -> None:
        """Record one row's token; mark the sequence finished on EOS, a stop token or the length cap."""
        seq = request.sequences[index]
        if seq.finish is not None:  # a finished sample whose row waits for its siblings
            return
        params = request.params
        if request.first_token == 0.0:
            request.first_token = now
        if token == self.config.eos_id:
            seq.finish = FinishReason.EOS
        else:
            seq.tokens.append(token)
            if log_prob is not None:
                seq.log_probs.append(log_prob)
            source_len = len(request.source_ids)
            if alignment is not None:
                seq.alignments.append(alignment[:source_len])
            if request.on_token is not None:
                self._notify(request, TokenEvent(index, len(seq.tokens) - 1, token, log_prob,
                                                 None if alignment is None else alignment[:source_len]))
                if request.done:
                    return
            if token in params.stop_token_ids:
                seq.finish = FinishReason.STOP
            elif len(seq.tokens) >= params.max_new_tokens:
                seq.finish = FinishReason.LENGTH
        if all(s.finish is not None for s in request.sequences):
            self._succeed(request, [self._sequence_result(request, s) for s in request.sequences])

    def _sequence_result(self, request: _Request, seq: _Sequence) -> SequenceResult:
        params = request.params
        assert seq.finish is not None
        return SequenceResult(
            token_ids=seq.tokens, finish_reason=seq.finish,
            log_probs=seq.log_probs if params.return_log_probs else None,
            score=float(sum(seq.log_probs)) if params.return_log_probs else None,
            alignments=np.stack(seq.alignments) if params.return_alignments and seq.alignments else None)

    def _finish_beam(self, request: _Request) -> None:
        assert request.beam is not None
        params = request.params
        results = []
        for hyp in request.beam.best(params.num_return_sequences):
            if hyp.finished_by_eos:
                reason = FinishReason.EOS
            elif hyp.tokens and hyp.tokens[-1] in params.stop_token_ids:
                reason = FinishReason.STOP
            else:
                reason = FinishReason.LENGTH
            results.append(SequenceResult(
                token_ids=hyp.tokens, finish_reason=reason,
                log_probs=hyp.log_probs if params.return_log_probs else None, score=hyp.score,
                alignments=np.stack([a[:len(request.source_ids)] for a in hyp.alignments])
                if params.return_alignments and hyp.alignments else None))
        if request.on_token is not None:  # beams are only final at the end: stream the best one then
            best = results[0]
            for index, token in enumerate(best.token_ids):
                self._notify(request, TokenEvent(0, index, token, best.log_probs[index] if best.log_probs else None,
                                                 best.alignments[index] if best.alignments is not None else None))
        self._succeed(request, results)

    def _notify(self, request: _Request, event: TokenEvent) -> None:
        """Hand a token to the request's callback; a callback that raises fails its own request only."""
        assert request.on_token is not None
        try:
            request.on_token(event)
        except Exception as exc:
            log.exception("on_token callback failed")
            self._fail(request, errors.ServingError(f"token callback failed: {type(exc).__name__}: {exc}"))

    def _timings(self, request: _Request) -> Timings:
        end = time.monotonic()
        return Timings(queue=request.admitted - request.submitted if request.admitted else end - request.submitted,
                       encoder=request.encoder_seconds,
                       decode=end - request.admitted if request.admitted else 0.0,
                       first_token=request.first_token - request.submitted if request.first_token else 0.0,
                       total=end - request.submitted)

    def _succeed(self, request: _Request, sequences: list[SequenceResult]) -> None:
        request.done = True
        if not request.handle.future.done():
            request.handle.future.set_result(RequestResult(sequences, len(request.source_ids), self._timings(request)))

    def _fail(self, request: _Request, error: Exception) -> None:
        request.done = True
        if not request.handle.future.done():
            request.handle.future.set_exception(error)

    def _drop_finished(self) -> None:
        """Remove the rows of finished, cancelled and expired requests from the batch."""
        if not self._active:
            return
        now = time.monotonic()
        for request in self._active:
            if not request.done:
                error = self._expired(request, now)
                if error is not None:
                    self._fail(request, error)
        self._remove_done()

    def _remove_done(self) -> None:
        """Drop the rows of requests that are done from the batch."""
        if not any(r.done for r in self._active):
            return
        keep = np.repeat([not r.done for r in self._active], [r.params.rows for r in self._active])
        self._active = [r for r in self._active if not r.done]
        if not self._active:
            self._clear_batch()
            return
        assert self._batch is not None
        self._batch.filter(keep)
        self._min_new = self._min_new[keep]
        self._row_count = len(self._min_new)
