"""The decode loop: one synchronous object that owns the running batch and every row's request.

`add(requests)` queues requests, `cancel(ids)` marks them, and `step()` does one step boundary:
rows of finished, cancelled and expired requests leave, waiting requests are admitted while rows
are free (one encoder pass for all of them, their rows merged into the batch), one decoder step
runs for every row, each row gets its token, and `StepEvents` come back: tokens of streaming
requests, finished results, failures, and the step's own figures. A short request that arrives
while long ones decode joins at the next step instead of waiting for them (TGI's
`generate_token(batch)` contract, continuous batching).

No threads and no clocks of its own: time is read only from the `clock` it is given (deadlines and
timings are on that clock). Whatever decodes drives it: the server's thread (`scheduler.Scheduler`),
the engine core process (`engine_core.run_engine_core`), `translate` and `bench` through the
scheduler; its tests call `step()` directly with a fake engine and a fake clock.

A failure caused by one request fails that request alone: its token choice is guarded per
request, and a decoder step that raises is retried request by request to find the one that fails
alone; the other rows step again with the results they would have had anyway.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from seqserve.runtime.config import ModelConfig
from seqserve.runtime import errors
from seqserve.runtime.batch import DecodeBatch, StepEngine
from seqserve.runtime.engine import pad_batch
from seqserve.runtime.generation import (FinishReason, GenerationParams, RequestResult, SequenceResult, Strategy,
                                        Timings, TokenEvent)
from seqserve.runtime.strategies import BeamSearch, log_softmax, sample

log = logging.getLogger(__name__)

COMPLETION_WINDOW = 64  # requests: the recent completion rate is measured over this many
STEP_AVERAGE = 0.1  # weight of the newest step in the moving average of step time


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


def expiry(cancelled: bool, deadline: float | None, now: float) -> errors.ServingError | None:
    """Why a request must end before it finishes (cancelled, or past its deadline at `now`), or None."""
    if cancelled:
        return errors.Cancelled("request cancelled by the caller")
    if deadline is not None and now > deadline:
        return errors.DeadlineExceeded("deadline passed before the request finished")
    return None


@dataclass
class LoopRequest:
    """A request for the loop: its caller's id, token ids and options."""

    id: int
    source_ids: list[int]
    params: GenerationParams
    deadline: float | None = None  # on the loop's clock; None: none
    stream: bool = False  # report every token as it is chosen (StepEvents.tokens)
    submitted: float | None = None  # on the loop's clock: when the caller received it (default: when added)


@dataclass
class StepEvents:
    """What one `step()` did."""

    tokens: list[tuple[int, TokenEvent]] = field(default_factory=list)  # (request id, token) of streams
    finished: list[tuple[int, RequestResult]] = field(default_factory=list)
    failed: list[tuple[int, errors.ServingError]] = field(default_factory=list)
    admitted: int = 0  # requests admitted (one encoder pass for all), and its seconds
    encoder_seconds: float = 0.0
    rows: int = 0  # rows in the decoder step (0: no step ran)
    step_seconds: float = 0.0  # the whole boundary minus the encoder pass, so Python's share is honest
    run_seconds: float = 0.0  # of which inside the engine's decoder run

    @property
    def ended(self) -> list[int]:
        """Ids of the requests that finished or failed at this step."""
        return [i for i, _ in self.finished] + [i for i, _ in self.failed]


@dataclass
class _Sequence:
    """One output sequence being built (one row, except for beam search)."""

    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    alignments: list[np.ndarray] = field(default_factory=list)
    finish: FinishReason | None = None


@dataclass
class _Request:
    """A request and its progress."""

    request: LoopRequest
    submitted: float
    cancelled: bool = False
    admitted: float = 0.0
    encoder_seconds: float = 0.0
    first_token: float = 0.0
    sequences: list[_Sequence] = field(default_factory=list)
    beam: BeamSearch | None = None
    rng: np.random.Generator | None = None
    fast: bool = False  # plain greedy with nothing extra to record: the step's fast path
    done: bool = False

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def params(self) -> GenerationParams:
        return self.request.params


class DecodeLoop:
    """The running batch and its requests, advanced one step boundary per `step()` call."""

    def __init__(self, engine: StepEngine, *, max_batch_size: int = 32,
                 clock: Callable[[], float] = time.monotonic,
                 on_admit: Callable[[list[int]], None] | None = None) -> None:
        """`on_admit(ids)` is called when requests leave the queue for the batch, before their
        encoder pass (a driver that counts its queue frees their places there)."""
        self.engine = engine
        self.on_admit = on_admit
        self.config = engine.config
        self.max_batch_size = max_batch_size
        self.clock = clock
        self._waiting: deque[_Request] = deque()
        self._by_id: dict[int, _Request] = {}
        # The running batch. Each active request owns params.rows consecutive rows, in the order
        # of self._active; self._min_new holds every row's min_new_tokens.
        self._batch: DecodeBatch | None = None
        self._active: list[_Request] = []
        self._row_count = 0
        self._min_new = np.zeros(0, dtype=np.int64)
        self._events = StepEvents()  # what the next step() returns, gathered since the last one
        # Recent completions (clock values), for the admission estimate: how fast places free up.
        self._completions: deque[float] = deque(maxlen=COMPLETION_WINDOW)
        self.step_seconds = 0.0  # moving average of a decoder step's time (boundary included)

    # -- the caller's side ---------------------------------------------------------------------

    def add(self, requests: Iterable[LoopRequest]) -> None:
        """Queue requests for admission at the next step. One the loop cannot take, or whose id
        is already in use, fails alone (reported by the next step)."""
        now = self.clock()
        for request in requests:
            try:
                if request.id in self._by_id:
                    raise errors.InvalidRequest("id", f"request {request.id} is already in the loop")
                check_request(self.config, self.max_batch_size, request.source_ids, request.params)
            except errors.ServingError as exc:
                self._events.failed.append((request.id, exc))
                continue
            state = _Request(request, now if request.submitted is None else request.submitted)
            self._waiting.append(state)
            self._by_id[request.id] = state

    def cancel(self, ids: Iterable[int]) -> None:
        """Cancel requests: queued ones leave at the next step, running ones at the next boundary
        (each reported as failed with Cancelled). Unknown or finished ids are ignored."""
        for request_id in ids:
            state = self._by_id.get(request_id)
            if state is not None:
                state.cancelled = True

    def fail_all(self) -> list[int]:
        """Forget every request (the driver is stopping); returns the ids of those not yet ended."""
        ids = [r.id for r in [*self._waiting, *self._active] if not r.done] + self._events.ended
        self._waiting.clear()
        self._by_id.clear()
        self._clear_batch()
        self._events = StepEvents()
        return ids

    @property
    def queued(self) -> int:
        """Requests waiting for rows."""
        return len(self._waiting)

    @property
    def active_rows(self) -> int:
        return self._row_count

    def estimate_wait(self, ahead: int, rows: int = 1) -> float:
        """Seconds until a request needing `rows` rows, queued behind `ahead` others, is likely
        admitted: 0 when it would fit at the next boundary, else the requests that must finish
        first over the recent completion rate (0 while there is no rate yet: no estimate, no
        refusal). The driver's deadline-aware admission uses it; it reads only this loop's state."""
        if ahead == 0 and self.max_batch_size - self._row_count >= rows:
            return 0.0
        if len(self._completions) < 2:
            return 0.0
        span = self._completions[-1] - self._completions[0]
        if span <= 0:
            return 0.0
        rate = (len(self._completions) - 1) / span  # requests finished per second, recently
        return (ahead + 1) / rate

    @property
    def has_work(self) -> bool:
        """Requests are queued or decoding, or events wait to be collected."""
        return bool(self._waiting or self._active or self._events.failed)

    # -- one step boundary ---------------------------------------------------------------------

    def step(self) -> StepEvents:
        """Drop finished rows, admit waiting requests, one decoder step for every row."""
        events, self._events = self._events, StepEvents()
        start = self.clock()
        try:
            self._drop_finished(start, events)
            self._admit(events)
            if self._active:
                events.rows = self._row_count
                events.run_seconds = self._step(events)
                end = self.clock()
                self._drop_finished(end, events)
                events.step_seconds = end - start - events.encoder_seconds
                self.step_seconds += STEP_AVERAGE * (events.step_seconds - self.step_seconds)
                self._completions.extend([end] * len(events.finished))
        except Exception:  # a bug outside any one request's work: fail the batch, keep serving
            log.exception("decoding step failed")
            for state in self._active:
                self._fail(state, errors.ServingError("decoding failed (see the server log)"), events)
            self._clear_batch()
        for request_id in events.ended:
            self._by_id.pop(request_id, None)
        return events

    def _clear_batch(self) -> None:
        self._active, self._batch, self._row_count = [], None, 0
        self._min_new = np.zeros(0, dtype=np.int64)

    @staticmethod
    def _expired(state: _Request, now: float) -> errors.ServingError | None:
        return expiry(state.cancelled, state.request.deadline, now)

    def purge(self) -> None:
        """End queued requests that were cancelled or passed their deadline now, so they hold no
        place in the queue (reported by the next step)."""
        now = self.clock()
        if any(self._expired(r, now) for r in self._waiting):  # cancelled or expired: no place, no encoding
            keep: deque[_Request] = deque()
            for state in self._waiting:
                error = self._expired(state, now)
                if error is None:
                    keep.append(state)
                else:
                    self._fail(state, error, self._events)
            self._waiting = keep

    def _admit(self, events: StepEvents) -> None:
        """Move waiting requests into the batch while rows are free: one encoder pass for all."""
        self.purge()
        events.failed += self._events.failed
        self._events.failed = []
        free = self.max_batch_size - self._row_count
        admitted: list[_Request] = []
        while self._waiting and self._waiting[0].params.rows <= free:
            state = self._waiting.popleft()
            admitted.append(state)
            free -= state.params.rows
        if not admitted:
            return
        if self.on_admit is not None:
            self.on_admit([state.id for state in admitted])
        start = self.clock()
        ids, mask = pad_batch([r.request.source_ids for r in admitted], self.config.pad_id)
        cross_key, cross_value = self.engine.encode(ids, mask)
        admitted_at = self.clock()
        seconds = admitted_at - start
        events.admitted, events.encoder_seconds = len(admitted), seconds
        # Each request takes params.rows identical rows (beams, or independent samples).
        repeats = np.array([r.params.rows for r in admitted])
        new = DecodeBatch(np.repeat(cross_key, repeats, axis=1), np.repeat(cross_value, repeats, axis=1),
                          np.repeat(mask, repeats, axis=0), self.config.bos_id)
        for state in admitted:
            state.admitted = admitted_at
            state.encoder_seconds = seconds
            params = state.params
            if params.strategy is Strategy.BEAM:
                state.beam = BeamSearch(params.num_beams, self.config.eos_id, params.length_penalty,
                                        params.min_new_tokens, frozenset(params.stop_token_ids),
                                        params.return_alignments)
                state.sequences = [_Sequence()]
            else:
                state.sequences = [_Sequence() for _ in range(params.rows)]
            if params.strategy is Strategy.SAMPLE:
                state.rng = np.random.default_rng(params.seed)
            state.fast = (params.strategy is Strategy.GREEDY and not state.request.stream
                          and not params.return_log_probs and not params.return_alignments
                          and not params.stop_token_ids)
            self._active.append(state)
        self._row_count += int(repeats.sum())
        self._min_new = np.concatenate([self._min_new, np.repeat([r.params.min_new_tokens for r in admitted], repeats)])
        if self._batch is None:
            self._batch = new
        else:
            self._batch.concatenate(new)

    def _step(self, events: StepEvents) -> float:
        """One decoder step for all rows, then each row's choice of token; returns seconds in the engine."""
        assert self._batch is not None
        try:
            logits, alignment, run_seconds = self._batch.step(self.engine, self.clock)
        except Exception:
            log.exception("decoder step failed for a batch of %d rows; retrying request by request", len(self._batch))
            if not self._isolate_failed_step(events):
                raise
            assert self._batch is not None
            logits, alignment, run_seconds = self._batch.step(self.engine, self.clock)
        self._batch.tokens = self._choose(logits, alignment, events)
        return run_seconds

    def _isolate_failed_step(self, events: StepEvents) -> bool:
        """After a failed decoder step: run each request's rows alone (on copies) to find the ones
        that fail by themselves; fail those requests alone and drop their rows, so the rest of the
        batch can step again with the results it would have had anyway (a row's results do not
        depend on its batch company). False when no request, or every request, fails alone.

        A step does not change the batch when it raises, so the batch is as it was before it.
        """
        assert self._batch is not None
        culprits: list[_Request] = []
        row = 0
        for state in self._active:
            rows = np.arange(row, row + state.params.rows)
            row += state.params.rows
            try:
                self._batch.subset(rows).step(self.engine, self.clock)
            except Exception:
                log.exception("decoder step failed for one request alone (%d source tokens)",
                              len(state.request.source_ids))
                culprits.append(state)
        if not culprits or len(culprits) == len(self._active):
            return False
        for state in culprits:
            self._fail(state, errors.ServingError("decoding failed for this request alone (see the server log); "
                                                  "the other requests in its batch went on"), events)
        self._remove_done()
        return True

    def _choose(self, logits: np.ndarray, alignment: np.ndarray, events: StepEvents) -> np.ndarray:
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
        now = self.clock()
        reorder: np.ndarray | None = None
        row = 0
        for state in self._active:
            params = state.params
            if state.fast:  # the common case, kept cheap: Python time per step counts
                token = chosen[row]
                seq = state.sequences[0]
                if state.first_token == 0.0:
                    state.first_token = now
                if token == eos:
                    seq.finish = FinishReason.EOS
                else:
                    seq.tokens.append(token)
                    if len(seq.tokens) >= params.max_new_tokens:
                        seq.finish = FinishReason.LENGTH
                if seq.finish is not None:
                    self._succeed(state, [self._sequence_result(state, seq)], now, events)
                row += 1
                continue
            n = params.rows
            try:  # one request's own arithmetic (its options at their extremes) fails it alone
                sources = self._choose_for(state, row, logits, alignment, next_tokens, now, events)
            except Exception:
                log.exception("choosing tokens failed for one request (%s)", params.strategy.name)
                self._fail(state, errors.ServingError("choosing the next token failed for this request "
                                                      "(see the server log); the rest of its batch went on"), events)
                sources = None
            if sources is not None and not np.array_equal(sources, np.arange(n)):
                if reorder is None:
                    reorder = np.arange(len(next_tokens))
                reorder[row:row + n] = row + sources
            row += n
        if reorder is not None:
            self._batch.reorder(reorder)
        return next_tokens.astype(np.int64)

    def _choose_for(self, state: _Request, row: int, logits: np.ndarray, alignment: np.ndarray,
                    next_tokens: np.ndarray, now: float, events: StepEvents) -> np.ndarray | None:
        """Sampling, beam search, or greedy with extras for one request's rows (starting at `row`):
        writes their next tokens into `next_tokens`; returns a beam's source rows, else None."""
        params = state.params
        n = params.rows
        span = slice(row, row + n)
        if params.strategy is Strategy.SAMPLE:
            assert state.rng is not None
            next_tokens[span] = sample(logits[span], state.rng, temperature=params.temperature,
                                       top_k=params.top_k, top_p=params.top_p)
        if state.beam is not None:
            sources, tokens = state.beam.step(log_softmax(logits[span]),
                                              alignment[span] if params.return_alignments else None)
            next_tokens[span] = tokens
            if state.first_token == 0.0:
                state.first_token = now
            if state.beam.done() or len(state.beam.tokens[0]) >= params.max_new_tokens:
                self._finish_beam(state, now, events)
            return sources
        log_probs = log_softmax(logits[span]) if params.return_log_probs else None
        for i in range(n):
            self._emit(state, i, int(next_tokens[row + i]),
                       None if log_probs is None else float(log_probs[i, next_tokens[row + i]]),
                       alignment[row + i] if params.return_alignments else None, now, events)
        return None

    def _emit(self, state: _Request, index: int, token: int, log_prob: float | None,
              alignment: np.ndarray | None, now: float, events: StepEvents) -> None:
        """Record one row's token; mark the sequence finished on EOS, a stop token or the length cap."""
        seq = state.sequences[index]
        if seq.finish is not None:  # a finished sample whose row waits for its siblings
            return
        params = state.params
        if state.first_token == 0.0:
            state.first_token = now
        if token == self.config.eos_id:
            seq.finish = FinishReason.EOS
        else:
            seq.tokens.append(token)
            if log_prob is not None:
                seq.log_probs.append(log_prob)
            source_len = len(state.request.source_ids)
            if alignment is not None:
                seq.alignments.append(alignment[:source_len])
            if state.request.stream:
                events.tokens.append((state.id, TokenEvent(index, len(seq.tokens) - 1, token, log_prob,
                                                           None if alignment is None else alignment[:source_len])))
            if token in params.stop_token_ids:
                seq.finish = FinishReason.STOP
            elif len(seq.tokens) >= params.max_new_tokens:
                seq.finish = FinishReason.LENGTH
        if all(s.finish is not None for s in state.sequences):
            self._succeed(state, [self._sequence_result(state, s) for s in state.sequences], now, events)

    @staticmethod
    def _sequence_result(state: _Request, seq: _Sequence) -> SequenceResult:
        params = state.params
        assert seq.finish is not None
        return SequenceResult(
            token_ids=seq.tokens, finish_reason=seq.finish,
            log_probs=seq.log_probs if params.return_log_probs else None,
            score=float(sum(seq.log_probs)) if params.return_log_probs else None,
            alignments=np.stack(seq.alignments) if params.return_alignments and seq.alignments else None)

    def _finish_beam(self, state: _Request, now: float, events: StepEvents) -> None:
        assert state.beam is not None
        params = state.params
        source_len = len(state.request.source_ids)
        results = []
        for hyp in state.beam.best(params.num_return_sequences):
            if hyp.finished_by_eos:
                reason = FinishReason.EOS
            elif hyp.tokens and hyp.tokens[-1] in params.stop_token_ids:
                reason = FinishReason.STOP
            else:
                reason = FinishReason.LENGTH
            results.append(SequenceResult(
                token_ids=hyp.tokens, finish_reason=reason,
                log_probs=hyp.log_probs if params.return_log_probs else None, score=hyp.score,
                alignments=np.stack([a[:source_len] for a in hyp.alignments])
                if params.return_alignments and hyp.alignments else None))
        if state.request.stream:  # beams are only final at the end: stream the best one then
            best = results[0]
            for index, token in enumerate(best.token_ids):
                events.tokens.append((state.id, TokenEvent(
                    0, index, token, best.log_probs[index] if best.log_probs else None,
                    best.alignments[index] if best.alignments is not None else None)))
        self._succeed(state, results, now, events)

    @staticmethod
    def _timings(state: _Request, end: float) -> Timings:
        return Timings(queue=state.admitted - state.submitted if state.admitted else end - state.submitted,
                       encoder=state.encoder_seconds,
                       decode=end - state.admitted if state.admitted else 0.0,
                       first_token=state.first_token - state.submitted if state.first_token else 0.0,
                       total=end - state.submitted)

    def _succeed(self, state: _Request, sequences: list[SequenceResult], now: float, events: StepEvents) -> None:
        state.done = True
        events.finished.append((state.id, RequestResult(sequences, len(state.request.source_ids),
                                                         self._timings(state, now))))

    @staticmethod
    def _fail(state: _Request, error: errors.ServingError, events: StepEvents) -> None:
        if not state.done:
            state.done = True
            events.failed.append((state.id, error))

    def _drop_finished(self, now: float, events: StepEvents) -> None:
        """Remove the rows of finished, cancelled and expired requests from the batch."""
        if not self._active:
            return
        for state in self._active:
            if not state.done:
                error = self._expired(state, now)
                if error is not None:
                    self._fail(state, error, events)
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
