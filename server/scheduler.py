"""The decode loop on a thread of the server process: `Scheduler` drives a `DecodeLoop`.

Callers (the gRPC service, `translate`, `bench`) submit token ids with `GenerationParams` from any
thread and get a `RequestHandle`: a `concurrent.futures.Future` of the result plus, optionally, a
callback per token. The scheduler's thread hands what was submitted and cancelled to the loop at
each step boundary, runs `step()`, and settles futures and callbacks from its events. The wait
queue's limit is enforced here, at once, so a full queue is refused without waiting for a step.

Nothing here knows about gRPC, and nothing of the decoding itself lives here: that is the loop's.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from seqserve.runtime import errors
from seqserve.runtime.batch import StepEngine
from seqserve.runtime.decode_loop import DecodeLoop, LoopRequest, StepEvents, check_request, expiry
from seqserve.runtime.generation import GenerationParams, RequestResult, TokenEvent

log = logging.getLogger(__name__)

TokenCallback = Callable[[TokenEvent], None]

__all__ = ["RequestHandle", "RequestScheduler", "Scheduler", "SchedulerObserver", "TokenCallback", "admit",
           "admit_deadline", "observe"]


class SchedulerObserver(Protocol):
    """Receives step-level measurements (the metrics module implements it)."""

    def on_encode(self, requests: int, seconds: float) -> None: ...

    def on_step(self, rows: int, seconds: float, run_seconds: float) -> None: ...

    def on_queue_depth(self, depth: int) -> None: ...

    def on_active_rows(self, rows: int) -> None: ...


def observe(observer: SchedulerObserver | None, events: StepEvents, queue_depth: int) -> None:
    """Hand one step's figures to an observer (the thread driver's)."""
    if observer is None:
        return
    if events.admitted:
        observer.on_encode(events.admitted, events.encoder_seconds)
    if events.rows:
        observer.on_step(events.rows, events.step_seconds, events.run_seconds)
    observer.on_queue_depth(queue_depth)


def queue_full(max_queue: int, retry_after_s: float | None = None) -> errors.Overloaded:
    """The refusal of a request the wait queue has no place for (the engine core's front-ends make
    it too, from the queue depth the engine core last reported)."""
    return errors.Overloaded(f"wait queue is full ({max_queue} requests); retry later", retry_after_s)


def admit(loop: DecodeLoop, queued: Callable[[], int], purge: Callable[[], None], max_queue: int,
          params: GenerationParams, deadline: float | None, now: float, *, deadline_admission: bool) -> None:
    """Admission of one request by a driver of the loop: Overloaded when the wait queue is full
    (once cancelled and expired requests have left it: `purge`) or, with `deadline_admission`,
    when the queue ahead would make it miss its deadline. `queued()` is the driver's queue depth."""
    if queued() >= max_queue:
        purge()  # cancelled or expired requests hold no place
    ahead = queued()
    if ahead >= max_queue:
        raise queue_full(max_queue, loop.estimate_wait(ahead, params.rows))
    if deadline is not None and deadline_admission:
        admit_deadline(loop, ahead, params, deadline, now)


def admit_deadline(loop: DecodeLoop, ahead: int, params: GenerationParams, deadline: float, now: float) -> None:
    """Deadline-aware admission: Overloaded (with the expected wait as a retry hint) when the queue
    ahead is likely to outlast the request's deadline, instead of queueing work that would be
    thrown away. Only the queue's wait and one decoder step count, not the request's own length:
    a request refused here is one that the load, not its own size, keeps from finishing in time."""
    wait = loop.estimate_wait(ahead, params.rows)
    if wait > 0 and now + wait + loop.step_seconds > deadline:
        raise errors.Overloaded(f"the queue ahead (about {wait * 1e3:.0f} ms) is longer than the request's "
                                f"deadline allows; retry later or elsewhere", wait)


class RequestScheduler(Protocol):
    """What the service needs of a scheduler: `Scheduler` (a thread of the server process) or
    `engine_core.EngineCoreClient` (the engine core process)."""

    def submit(self, source_ids: list[int], params: GenerationParams, *, deadline: float | None = None,
               on_token: TokenCallback | None = None) -> RequestHandle: ...

    def close(self) -> None: ...

    def wait_idle(self, timeout: float | None = None) -> bool: ...

    def stop(self) -> None: ...


class RequestHandle:
    """The caller's side of a submitted request."""

    def __init__(self, on_cancel: Callable[[], None] | None = None) -> None:
        self.future: Future[RequestResult] = Future()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        """Ask for the request's rows (or its place in the queue) to go at the next step boundary."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self._on_cancel is not None:
                self._on_cancel()

    @property
    def cancel_requested(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Submitted:
    """A request between `submit` and its end, as the scheduler tracks it."""

    request: LoopRequest
    handle: RequestHandle
    on_token: TokenCallback | None


def _settle(future: Future[RequestResult], value: RequestResult | BaseException) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


class Scheduler:
    """Runs requests through one continuously batched `DecodeLoop` on a worker thread."""

    def __init__(self, engine: StepEngine, *, max_batch_size: int = 32, max_queue: int = 128,
                 observer: SchedulerObserver | None = None, deadline_admission: bool = True) -> None:
        self.engine = engine
        self.deadline_admission = deadline_admission
        self.config = engine.config
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.observer = observer
        self.loop = DecodeLoop(engine, max_batch_size=max_batch_size, clock=time.monotonic, on_admit=self._admitted)
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._inbox: deque[_Submitted] = deque()  # submitted, not yet handed to the loop
        self._queued: dict[int, _Submitted] = {}  # submitted, not yet admitted into the batch (the wait queue)
        self._cancels: list[int] = []  # cancelled since the last step boundary
        self._live: dict[int, _Submitted] = {}  # every request not yet settled
        self._closed = False
        self._stopping = False
        self._thread: threading.Thread | None = None
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
        request_id = next(self._ids)
        handle = RequestHandle(lambda: self._cancel(request_id))
        request = LoopRequest(request_id, list(source_ids), params, deadline, on_token is not None,
                              time.monotonic() if submitted is None else submitted)
        with self._lock:
            if self._closed:
                raise errors.Unavailable("server is shutting down")
            admit(self.loop, lambda: self.queue_depth, lambda: self._purge_queued(time.monotonic()), self.max_queue,
                  params, deadline, time.monotonic(), deadline_admission=self.deadline_admission)
            entry = _Submitted(request, handle, on_token)
            self._inbox.append(entry)
            self._queued[request_id] = entry
            self._live[request_id] = entry
            self._idle.clear()
            self._lock.notify()
            depth = self.queue_depth
        if self.observer:
            self.observer.on_queue_depth(depth)
        return handle

    def _admitted(self, ids: list[int]) -> None:
        """The loop took these requests into the batch (its thread, inside a step): places free up."""
        with self._lock:
            for request_id in ids:
                self._queued.pop(request_id, None)

    def _cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancels.append(request_id)
            self._lock.notify()

    def _purge_queued(self, now: float) -> None:
        """Settle queued requests that were cancelled or passed their deadline now, so that they hold
        no place in the queue (lock held); those the loop already holds leave it at its next step."""
        gone: set[int] = set()
        for request_id, entry in self._queued.items():
            error = expiry(entry.handle.cancel_requested, entry.request.deadline, now)
            if error is None:
                continue
            gone.add(request_id)
            self._live.pop(request_id, None)
            _settle(entry.handle.future, error)
        if gone:
            for request_id in gone:
                del self._queued[request_id]
            in_inbox = {entry.request.id for entry in self._inbox}
            self._inbox = deque(entry for entry in self._inbox if entry.request.id not in gone)
            self._cancels += [i for i in gone if i not in in_inbox]
            self._lock.notify()

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
        self.loop.fail_all()
        with self._lock:
            entries, self._live, self._inbox, self._queued = list(self._live.values()), {}, deque(), {}
        for entry in entries:
            _settle(entry.handle.future, errors.Unavailable("server stopped before the request finished"))
        self._idle.set()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for batch rows."""
        return len(self._queued)

    @property
    def active_rows(self) -> int:
        return self.loop.active_rows

    # -- the worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        loop = self.loop
        while True:
            with self._lock:
                while not self._inbox and not self._cancels and not loop.has_work and not self._stopping:
                    self._idle.set()
                    self._lock.wait()
                if self._stopping:
                    return
                if self._cancels:  # cancelled while queued: settled now, not a step later
                    self._purge_queued(time.monotonic())
                # Handed over under the lock, so that the queue's depth never misses requests in transit.
                if self._inbox:
                    loop.add(entry.request for entry in self._inbox)
                    self._inbox = deque()
                if self._cancels:
                    loop.cancel(self._cancels)
                    self._cancels = []
            events = loop.step()
            if events.failed:  # some may have failed while still queued
                with self._lock:
                    for request_id, _ in events.failed:
                        self._queued.pop(request_id, None)
            observe(self.observer, events, self.queue_depth)
            self._deliver(events)

    def _deliver(self, events: StepEvents) -> None:
        """Tokens to their callbacks (before the result, which follows them), then results and failures."""
        live = self._live
        for request_id, event in events.tokens:
            entry = live.get(request_id)
            if entry is None or entry.on_token is None or entry.handle.future.done():
                continue
            try:
                entry.on_token(event)
            except Exception as exc:  # a callback that raises fails its own request only
                log.exception("on_token callback failed")
                _settle(entry.handle.future,
                        errors.ServingError(f"token callback failed: {type(exc).__name__}: {exc}"))
                self.loop.cancel([request_id])
        if events.finished or events.failed:
            with self._lock:
                ended = [(live.pop(i, None), value) for i, value in [*events.finished, *events.failed]]
            for entry, value in ended:
                if entry is not None:
                    _settle(entry.handle.future, value)
