"""The decoding loop in a process of its own: `ProcessScheduler` runs a `DecodeLoop` in a child
process and offers the server the same calls as `Scheduler` (submit, cancel through the handle,
close, stop).

Why a process: in one process the decoding worker thread and the gRPC event loop (grpc.aio's
per-message and per-call work, tokenizing, text pieces) take turns on one GIL, and under load
each makes the other wait: a decoder step's Python took about 10x longer inside the server than
in a process of its own (README, served benchmark). The child has its own interpreter and GIL;
the server process keeps gRPC, the tokenizer and the text.

The two talk over one socket (`multiprocessing.connection` frames) in the typed messages of
`server/messages.py`: a command per frame one way; `Ready` (or `Failed`) and then one `Report` per
step boundary the other way, with every token of the step, finished results, failures and the
step's figures. Both sides check the protocol version at start.

The worker ignores SIGINT and SIGTERM: the server process decides when it stops (after draining),
and a Ctrl-C that reaches the whole process group must not cut decoding short. It exits when the
server says so or when the pipe closes (the server process died). A worker that dies on its own
(killed, out of memory) fails the requests it held with UNAVAILABLE, and a new one is started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from seqserve.export.model_dir import ModelDir, open_model_dir
from seqserve.model.errors import SeqserveError
from seqserve.server import errors, messages
from seqserve.server.decode_loop import StepEvents, check_request
from seqserve.server.generation import GenerationParams, RequestResult
from seqserve.server.scheduler import RequestHandle, SchedulerObserver, TokenCallback, admit_deadline

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # loading a large model on a busy machine can take a while
STOP_TIMEOUT_S = 10.0  # after "stop": the worker fails what it still holds and exits


@dataclass(frozen=True)
class WorkerOptions:
    """What the worker process needs to build its engine and scheduler (sent as JSON on its command line)."""

    model_dir: str
    engine: dict[str, Any] = field(default_factory=dict)  # OnnxSeq2Seq's keyword arguments (ServerConfig.engine_options)
    max_batch_size: int = 32
    max_queue: int = 128
    deadline_admission: bool = True  # refuse at once what the queue ahead would make miss its deadline
    log_format: str = "json"
    log_level: str = "info"
    step_delay_s: float = 0.0  # tests only: sleep this long before each decoder step, to hold requests in the batch


# -- the server's side ------------------------------------------------------------------------

@dataclass
class _Pending:
    """A request the worker holds, as the server process sees it."""

    handle: RequestHandle
    on_token: TokenCallback | None


class ProcessScheduler:
    """A `Scheduler` in a child process, driven from the server process's event loop.

    The worker's events are read on the event loop itself (`loop.add_reader`), not on a thread of
    their own: a reader thread would take the GIL from the event loop for every step, and the
    two then wait on each other (measured: 12-row batches and 40 ms to first token at 32 streams).
    """

    def __init__(self, model_dir: ModelDir, options: WorkerOptions, loop: asyncio.AbstractEventLoop, *,
                 observer: SchedulerObserver | None = None,
                 on_worker_lost: Callable[[str], None] | None = None) -> None:
        """`on_worker_lost(reason)` is called on the event loop when the worker died and could not
        be replaced; the server then reports NOT_SERVING."""
        self.config = model_dir.config
        self.options = options
        self.loop = loop
        self.max_batch_size = options.max_batch_size
        self.observer = observer
        self.on_worker_lost = on_worker_lost
        self.providers: list[str] = []
        self.kv_cache_on_device = False  # the worker's engine keeps K/V as OrtValues (I/O binding)
        self.restarts = 0
        self._ids = itertools.count()
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()  # _pending, _conn and sends (stop() runs off the loop)
        self._conn: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._stopping = False
        self._idle = threading.Event()
        self._idle.set()
        self._queue_depth = 0
        self._active_rows = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and wait until its model is loaded (blocking: call it off the event
        loop); a worker that fails to start is a SeqserveError."""
        conn, process = self._spawn()
        self._process = process
        self.loop.call_soon_threadsafe(self._attach, conn)

    def _attach(self, conn: Connection) -> None:
        """Take the worker's events on the event loop from now on (loop thread)."""
        with self._lock:
            self._conn = conn
        self.loop.add_reader(conn.fileno(), self._on_readable, conn)
        if self._closed:
            self._send(messages.Close())

    def _spawn(self) -> tuple[Connection, subprocess.Popen[bytes]]:
        parent_sock, child_sock = socket.socketpair()
        child_sock.set_inheritable(True)
        process = subprocess.Popen(
            [sys.executable, "-m", "seqserve.server.worker", "--fd", str(child_sock.fileno()),
             "--options", json.dumps(self.options.__dict__)],
            pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL)
        child_sock.close()
        conn = Connection(parent_sock.detach())
        try:
            if not conn.poll(START_TIMEOUT_S):
                process.kill()
                raise SeqserveError(f"decoding worker did not start within {START_TIMEOUT_S:.0f} s")
            hello = messages.decode_report(conn.recv_bytes())
        except (EOFError, OSError):
            hello = messages.Failed(messages.PROTOCOL_VERSION,
                                    f"decoding worker exited during start (exit code {process.wait()})")
        except SeqserveError:
            process.wait()
            conn.close()
            raise
        except ValueError as exc:  # msgspec's DecodeError: not a worker of this protocol at all
            hello = messages.Failed(-1, f"decoding worker sent an unreadable first message: {exc}")
        problem = None
        if hello.version != messages.PROTOCOL_VERSION:
            problem = (f"decoding worker speaks protocol version {hello.version}, this server "
                       f"{messages.PROTOCOL_VERSION}: install one version of seqserve for both")
        elif isinstance(hello, messages.Failed):
            problem = hello.reason
        elif not isinstance(hello, messages.Ready):
            problem = "decoding worker did not say it was ready"
        if problem is not None:
            with contextlib.suppress(OSError):
                conn.send_bytes(messages.encode(messages.Stop()))
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            conn.close()
            raise SeqserveError(problem)
        assert isinstance(hello, messages.Ready)
        self.providers = list(hello.providers)
        self.kv_cache_on_device = hello.kv_cache_on_device
        log.info("decoding worker %d ready on %s", process.pid, ", ".join(self.providers))
        return conn, process

    def close(self) -> None:
        """Refuse new requests; queued and running ones still finish."""
        self._closed = True
        self._send(messages.Close())

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once the worker holds no request."""
        return self._idle.wait(timeout)

    def stop(self) -> None:
        """Stop the worker (blocking: call it off the event loop); requests it still holds end with
        Unavailable."""
        self._closed = self._stopping = True
        self._send(messages.Stop())
        process = self._process
        if process is not None:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("decoding worker %d did not stop within %.0f s; killing it", process.pid, STOP_TIMEOUT_S)
                process.kill()
                process.wait()
        self._fail_all(errors.Unavailable("server stopped before the request finished"))

    @property
    def pid(self) -> int | None:
        """The worker process's id (None before start)."""
        return None if self._process is None else self._process.pid

    @property
    def queue_depth(self) -> int:
        return self._queue_depth

    @property
    def active_rows(self) -> int:
        return self._active_rows

    # -- requests -------------------------------------------------------------------------------

    def submit(self, source_ids: list[int], params: GenerationParams, *, deadline: float | None = None,
               on_token: TokenCallback | None = None) -> RequestHandle:
        """Hand a request to the worker. Invalid requests fail here; a full queue fails its future
        with Overloaded as soon as the worker answers (well under a millisecond)."""
        check_request(self.config, self.max_batch_size, source_ids, params)
        if self._closed:
            raise errors.Unavailable("server is shutting down")
        request_id = next(self._ids)
        handle = RequestHandle(lambda: self._send(messages.Cancel(request_id)))
        with self._lock:
            if self._conn is None:
                raise errors.Unavailable("decoding worker is restarting; retry")
            self._pending[request_id] = _Pending(handle, on_token)
            self._idle.clear()
            self._conn.send_bytes(messages.encode(messages.Submit(
                request_id, list(source_ids), params, deadline, time.monotonic(), on_token is not None)))
        return handle

    def _send(self, message: messages.Command) -> None:
        frame = messages.encode(message)
        with self._lock:
            if self._conn is None:
                return
            with contextlib.suppress(OSError):  # the worker is gone; the reader fails its requests
                self._conn.send_bytes(frame)

    # -- events, on the event loop ----------------------------------------------------------------

    def _on_readable(self, conn: Connection) -> None:
        try:
            while conn.poll():
                report = messages.decode_report(conn.recv_bytes())
                if isinstance(report, messages.Report):
                    self._dispatch(report)
        except (EOFError, OSError):
            self._worker_exited(conn)

    def _worker_exited(self, conn: Connection) -> None:
        """The pipe closed: stopped on purpose, or died (then its requests fail and a new one starts)."""
        self.loop.remove_reader(conn.fileno())
        with self._lock:
            self._conn = None
        conn.close()
        if self._stopping:
            return
        process = self._process
        code = process.wait() if process is not None else None
        reason = f"decoding worker exited unexpectedly (exit code {code})"
        log.error("%s; failing the requests it held and starting a new one", reason)
        self._fail_all(errors.Unavailable(f"{reason}; retry"))
        threading.Thread(target=self._restart, args=(reason,), name="seqserve-worker-restart", daemon=True).start()

    def _restart(self, reason: str) -> None:
        try:
            conn, process = self._spawn()
        except Exception as exc:  # the model cannot be loaded again: stop serving
            log.exception("decoding worker could not be restarted")
            if self.on_worker_lost is not None:
                self.loop.call_soon_threadsafe(self.on_worker_lost, f"{reason}; restart failed: {exc}")
            return
        self._process = process
        self.restarts += 1
        self.loop.call_soon_threadsafe(self._attach, conn)

    def _dispatch(self, report: messages.Report) -> None:
        pending = self._pending
        for request_id, event in report.tokens.events():
            entry = pending.get(request_id)
            if entry is not None and entry.on_token is not None:
                entry.on_token(event)
        if report.done or report.errors:
            with self._lock:
                ended = [(pending.pop(d.id, None), d.result) for d in report.done]
                ended += [(pending.pop(e.id, None), e.error()) for e in report.errors]
                if not pending:
                    self._idle.set()
            for entry, value in ended:
                if entry is not None:
                    _settle(entry.handle.future, value, failed=isinstance(value, BaseException))
        self._active_rows = report.rows
        self._queue_depth = report.depth
        if self.observer:
            if report.encoded:
                self.observer.on_encode(report.encoded, report.encoder_seconds)
            if report.step_rows:
                self.observer.on_step(report.step_rows, report.step_seconds, report.run_seconds)
            self.observer.on_queue_depth(report.depth)

    def _fail_all(self, error: errors.ServingError) -> None:
        with self._lock:
            entries, self._pending = list(self._pending.values()), {}
            self._idle.set()
        for entry in entries:
            _settle(entry.handle.future, error, failed=True)


def _settle(future: Future[RequestResult], value: Any, *, failed: bool) -> None:
    if future.done():
        return
    if failed:
        future.set_exception(value)
    else:
        future.set_result(value)


# -- the worker's side ------------------------------------------------------------------------

class _Outbox:
    """What the worker has to tell the server process, sent as one `Report` per step boundary."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.report = messages.Report()
        self.broken = False  # the server process is gone

    def fail(self, request_id: int, error: errors.ServingError) -> None:
        self.report.errors.append(messages.Error.of(request_id, error))

    def step(self, events: StepEvents) -> None:
        """One step's events and figures."""
        report = self.report
        for request_id, event in events.tokens:
            report.tokens.add(request_id, event)
        report.done += [messages.Done(i, result) for i, result in events.finished]
        report.errors += [messages.Error.of(i, error) for i, error in events.failed]
        report.encoded, report.encoder_seconds = events.admitted, events.encoder_seconds
        report.step_rows, report.step_seconds, report.run_seconds = events.rows, events.step_seconds, events.run_seconds

    def flush(self, rows: int, depth: int, *, force: bool = False) -> None:
        """Send what has gathered since the last flush (with the batch's rows and queue depth now)."""
        report = self.report
        if self.broken or not (force or not report.empty or rows != report.rows or depth != report.depth):
            return
        report.rows, report.depth = rows, depth
        self.report = messages.Report(rows=rows, depth=depth)
        try:
            self.conn.send_bytes(messages.encode(report))
        except OSError:
            self.broken = True


def run_worker(conn: Connection, options: WorkerOptions) -> int:
    """The worker process: load the engine, then decode and serve commands until told to stop or orphaned.

    One thread drives the `DecodeLoop`: between two step boundaries it takes every command that
    has arrived (without waiting), and it waits for the next command only when nothing is left to
    decode. A second thread reading commands would take the GIL from the decoding loop at every
    request, the contention this process exists to avoid.
    """
    from seqserve.server.decode_loop import DecodeLoop, LoopRequest
    from seqserve.server.engine import OnnxSeq2Seq

    try:
        # The server process has checked the files' sha256 already; hashing them again would only
        # slow the start.
        model_dir = open_model_dir(options.model_dir, check_hashes=False)
        engine = OnnxSeq2Seq(model_dir, **options.engine)
    except Exception as exc:
        conn.send_bytes(messages.encode(messages.Failed(messages.PROTOCOL_VERSION,
                                                        f"decoding worker could not load the model: {exc}")))
        return 1
    if options.step_delay_s > 0:
        run_step = engine.decode

        def slow_decode(*args: Any) -> Any:
            time.sleep(options.step_delay_s)
            return run_step(*args)

        engine.decode = slow_decode  # type: ignore[method-assign]
    outbox = _Outbox(conn)
    loop = DecodeLoop(engine, max_batch_size=options.max_batch_size, clock=time.monotonic)
    conn.send_bytes(messages.encode(messages.Ready(messages.PROTOCOL_VERSION, list(engine.providers),
                                                   engine.device_cache is not None)))
    closed = False

    def command(message: messages.Command) -> bool:
        """Carry out one command; False for stop."""
        nonlocal closed
        if isinstance(message, messages.Submit):
            params = message.params
            if closed:
                outbox.fail(message.id, errors.Unavailable("server is shutting down"))
                return True
            try:
                if loop.queued >= options.max_queue:
                    loop.purge()  # cancelled or expired requests hold no place
                if loop.queued >= options.max_queue:
                    raise errors.Overloaded(f"wait queue is full ({options.max_queue} requests); retry later",
                                            loop.estimate_wait(loop.queued, params.rows))
                if message.deadline is not None and options.deadline_admission:
                    admit_deadline(loop, loop.queued, params, message.deadline, time.monotonic())
            except errors.Overloaded as exc:
                outbox.fail(message.id, exc)
            else:
                loop.add([LoopRequest(message.id, message.source_ids, params, message.deadline, message.stream,
                                      message.submitted)])
        elif isinstance(message, messages.Cancel):
            loop.cancel([message.id])
        elif isinstance(message, messages.Close):
            closed = True
        elif isinstance(message, messages.Stop):
            return False
        return True

    running = True
    while running and not outbox.broken:
        try:
            wait: float | None = 0.0 if loop.has_work else None  # block only when idle
            while running and conn.poll(wait):
                running = command(messages.decode_command(conn.recv_bytes()))
                wait = 0.0
        except (EOFError, OSError):  # the server process is gone: nobody wants the results
            break
        if running and loop.has_work:
            outbox.step(loop.step())
        outbox.flush(loop.active_rows, loop.queued)
    for request_id in loop.fail_all():
        outbox.fail(request_id, errors.Unavailable("server stopped before the request finished"))
    outbox.flush(0, 0, force=True)
    conn.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m seqserve.server.worker --fd N --options JSON` (started by ProcessScheduler only)."""
    from seqserve.server.logs import configure_logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the server process")
    parser.add_argument("--options", type=json.loads, required=True, help="WorkerOptions as JSON")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    options = WorkerOptions(**args.options)
    configure_logging(options.log_format, options.log_level)
    return run_worker(Connection(args.fd), options)


if __name__ == "__main__":
    sys.exit(main())
