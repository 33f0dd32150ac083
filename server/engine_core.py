"""The engine core: one process that runs the `DecodeLoop` as fast as it can, for every front-end.

Why a process: in one process the decoding loop and the gRPC event loop (grpc.aio's per-message
and per-call work, tokenizing, text pieces) take turns on one GIL, and under load each makes the
other wait. The engine core has its own interpreter and GIL; front-ends (gRPC, validation, the
tokenizer and the text) live in other processes, one or several (`seqserve serve --frontends`).

Three pieces:
- `run_engine_core`, the process itself (`python -m seqserve.server.engine_core`): it loads the
  engine, tells its owner `Ready` on the status connection, then accepts front-ends on a Unix
  socket. One thread drives the loop: between two step boundaries it takes every command that
  has arrived from any front-end (without waiting), and it blocks only when nothing is left to
  decode. After each step every front-end with news gets one `Report` with all of its tokens,
  results and failures; the step's figures go to one front-end only (the lowest-numbered, the
  metrics' primary), so that they are counted once. A front-end that disconnects has its requests
  cancelled; the others never notice. It ignores SIGINT and SIGTERM (its owner decides when it
  stops, after the front-ends drained) and exits on `Stop` or when its owner is gone.
- `EngineCoreProcess`, the owner's handle: it starts the process, waits for `Ready`, and restarts
  it on the same socket when it dies (killed, out of memory); a process that cannot be restarted
  is reported through `on_lost`.
- `EngineCoreClient`, a front-end's side: the `RequestScheduler` the gRPC service uses. Its events
  are read on the event loop itself (`loop.add_reader`), not on a thread of their own: a reader
  thread would take the GIL from the event loop at every step. When the engine core goes away,
  the requests this front-end had in it fail with UNAVAILABLE, and the client reconnects as soon
  as the engine core is back.

Messages are the typed ones of `server/messages.py`, one per `multiprocessing.connection` frame.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from seqserve.runtime import errors
from seqserve.runtime.config import ModelConfig
from seqserve.runtime.decode_loop import StepEvents, check_request
from seqserve.runtime.errors import SeqserveError
from seqserve.runtime.generation import GenerationParams, RequestResult
from seqserve.runtime.model_dir import open_model_dir
from seqserve.server import messages
from seqserve.server.scheduler import RequestHandle, SchedulerObserver, TokenCallback, admit, queue_full

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # loading a large model on a busy machine can take a while
STOP_TIMEOUT_S = 10.0  # after `Stop`: the engine core fails what it still holds and exits
RECONNECT_INTERVAL_S = 0.05  # a front-end's retries while the engine core restarts
DEFAULT_ENGINE = "seqserve.runtime.engine:OnnxSeq2Seq"
_ID_BITS = 32  # a request's id in the loop: front-end number << _ID_BITS | the front-end's own id
_ID_MASK = (1 << _ID_BITS) - 1


@dataclass(frozen=True)
class EngineCoreOptions:
    """What the engine core needs to build its engine and loop (sent as JSON on its command line)."""

    model_dir: str
    engine: dict[str, Any] = field(default_factory=dict)  # the engine's keyword arguments (ServerConfig.engine_options)
    max_batch_size: int = 32
    max_queue: int = 128
    deadline_admission: bool = True  # refuse at once what the queue ahead would make miss its deadline
    log_format: str = "json"
    log_level: str = "info"
    # "module:callable" building the engine from (ModelDir, **engine): ONNX Runtime's, or a test's
    # wrapper around it (`seqserve.server.testing.DelayedEngine`).
    engine_factory: str = DEFAULT_ENGINE


def _hello(conn: Connection, what: str) -> messages.Ready:
    """Read a peer's first message, which must be `Ready` of this protocol; else a SeqserveError."""
    try:
        if not conn.poll(START_TIMEOUT_S):
            raise SeqserveError(f"{what} did not answer within {START_TIMEOUT_S:.0f} s")
        hello = messages.decode_report(conn.recv_bytes())
    except (EOFError, OSError):
        raise SeqserveError(f"{what} closed the connection before it was ready") from None
    except ValueError as exc:  # msgspec's DecodeError: not an engine core of this protocol at all
        raise SeqserveError(f"{what} sent an unreadable first message: {exc}") from None
    if isinstance(hello, messages.Failed):  # its reason says more (it names both versions if that was it)
        raise SeqserveError(hello.reason)
    if hello.version != messages.PROTOCOL_VERSION:
        raise SeqserveError(f"{what} speaks protocol version {hello.version}, this server "
                            f"{messages.PROTOCOL_VERSION}: install one version of seqserve for both")
    if not isinstance(hello, messages.Ready):
        raise SeqserveError(f"{what} did not say it was ready")
    return hello


# -- the owner's side ---------------------------------------------------------------------------

class EngineCoreProcess:
    """Starts the engine core, and restarts it when it dies. `address` is the Unix socket its
    front-ends connect to (in a private directory of its own, removed by `stop`)."""

    def __init__(self, options: EngineCoreOptions, *, on_lost: Callable[[str], None] | None = None) -> None:
        """`on_lost(reason)` is called (on the watcher thread) when the engine core died and could
        not be started again; nothing decodes any more."""
        self.options = options
        self.on_lost = on_lost
        self.restarts = 0
        self.ready: messages.Ready | None = None
        self._dir = tempfile.mkdtemp(prefix="seqserve-engine-")  # mode 0700: only this user connects
        self.address = os.path.join(self._dir, "engine.sock")
        self._process: subprocess.Popen[bytes] | None = None
        self._status: Connection | None = None
        self._stopping = False
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the engine core and wait until its model is loaded (blocking); a SeqserveError
        when it cannot start."""
        self._process, self._status = self._spawn()
        threading.Thread(target=self._watch, name="seqserve-engine-watch", daemon=True).start()

    def _spawn(self) -> tuple[subprocess.Popen[bytes], Connection]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)  # a dead engine core's socket
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.address)
        listener.listen(128)
        status, child_status = socket.socketpair()
        fds = (listener.fileno(), child_status.fileno())
        for fd in fds:
            os.set_inheritable(fd, True)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "seqserve.server.engine_core", "--listen-fd", str(fds[0]),
                 "--status-fd", str(fds[1]), "--options", json.dumps(asdict(self.options))],
                pass_fds=fds, stdin=subprocess.DEVNULL)
        finally:
            listener.close()  # the engine core holds it now; front-ends may already connect (backlog)
            child_status.close()
        conn = Connection(status.detach())
        try:
            self.ready = _hello(conn, "the engine core")
        except SeqserveError as exc:
            with contextlib.suppress(OSError):
                conn.send_bytes(messages.encode(messages.Stop()))
            conn.close()
            try:
                code = process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            raise SeqserveError(f"{exc} (engine core exit code {code})") from None
        log.info("engine core %d ready on %s", process.pid, ", ".join(self.ready.providers))
        return process, conn

    def _watch(self) -> None:
        """Wait for the engine core to exit; unless stopped on purpose, start a new one."""
        while True:
            process = self._process
            assert process is not None
            code = process.wait()
            with self._lock:
                if self._stopping:
                    return
            reason = f"engine core exited unexpectedly (exit code {code})"
            log.error("%s; starting a new one", reason)
            if self._status is not None:
                self._status.close()
            try:
                self._process, self._status = self._spawn()
            except Exception as exc:  # the model cannot be loaded again: nothing decodes any more
                log.exception("engine core could not be restarted")
                if self.on_lost is not None:
                    self.on_lost(f"{reason}; restart failed: {exc}")
                return
            self.restarts += 1

    def stop(self) -> None:
        """Stop the engine core (blocking): the requests it still holds end with UNAVAILABLE."""
        with self._lock:
            self._stopping = True
        process, status = self._process, self._status
        if status is not None:
            with contextlib.suppress(OSError):
                status.send_bytes(messages.encode(messages.Stop()))
        if process is not None:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("engine core %d did not stop within %.0f s; killing it", process.pid, STOP_TIMEOUT_S)
                process.kill()
                process.wait()
        if status is not None:
            status.close()
        shutil.rmtree(self._dir, ignore_errors=True)


# -- a front-end's side ---------------------------------------------------------------------------

@dataclass
class _Pending:
    """A request the engine core holds, as the front-end sees it."""

    handle: RequestHandle
    on_token: TokenCallback | None


class EngineCoreClient:
    """The engine core, as one front-end's event loop drives it (a `RequestScheduler`)."""

    def __init__(self, address: str, config: ModelConfig, max_batch_size: int, loop: asyncio.AbstractEventLoop, *,
                 observer: SchedulerObserver | None = None, max_queue: int | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        """`on_lost(reason)` is called on the event loop when the engine core went away and did
        not come back within START_TIMEOUT_S; the server then reports NOT_SERVING.

        `max_queue`, when given, is the engine core's: while its last report says the wait queue
        is full, a request is refused here at once, without the round trip to the engine core
        (which would refuse it too, unless a place freed in the meantime)."""
        self.address = address
        self.config = config
        self.max_batch_size = max_batch_size
        self.loop = loop
        self.observer = observer
        self.on_lost = on_lost
        self.max_queue = max_queue
        self.providers: list[str] = []
        self.kv_cache_on_device = False
        self.pid: int | None = None  # the engine core's process id
        self.restarts = 0  # reconnections to a new engine core
        self._ids = itertools.count()
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()  # _pending, _conn and sends (stop() runs off the loop)
        self._conn: Connection | None = None
        self._closed = False
        self._stopping = False
        self._idle = threading.Event()
        self._idle.set()
        self._queue_depth = 0
        self._active_rows = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def connect(self, timeout: float = START_TIMEOUT_S) -> None:
        """Connect to the engine core and wait until it is ready (blocking: call it off the event
        loop). Retries while the socket is not there yet or refuses (an engine core starting or
        restarting), for up to `timeout` seconds; then a SeqserveError."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.address)
                break
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED) or time.monotonic() > deadline or self._stopping:
                    raise SeqserveError(f"cannot reach the engine core at {self.address}: {exc.strerror}") from None
            time.sleep(RECONNECT_INTERVAL_S)
        conn = Connection(sock.detach())
        try:
            conn.send_bytes(messages.encode(messages.Hello(messages.PROTOCOL_VERSION)))
            ready = _hello(conn, "the engine core")
        except (SeqserveError, OSError):
            conn.close()
            raise
        self.providers = list(ready.providers)
        self.kv_cache_on_device = ready.kv_cache_on_device
        self.pid = ready.pid
        self.loop.call_soon_threadsafe(self._attach, conn)

    def _attach(self, conn: Connection) -> None:
        """Take the engine core's events on the event loop from now on (loop thread)."""
        if self._stopping:
            conn.close()
            return
        with self._lock:
            self._conn = conn
        self.loop.add_reader(conn.fileno(), self._on_readable, conn)
        if self._closed:
            self._send(messages.Close())

    def close(self) -> None:
        """Refuse new requests; queued and running ones still finish."""
        self._closed = True
        self._send(messages.Close())

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once the engine core holds no request of this front-end."""
        return self._idle.wait(timeout)

    def stop(self) -> None:
        """Disconnect (the engine core drops this front-end's requests); the requests still held
        end with Unavailable."""
        self._closed = self._stopping = True
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # on the loop's thread or not: the reader goes with the fd
                self.loop.call_soon_threadsafe(self.loop.remove_reader, conn.fileno())
            conn.close()
        self._fail_all(errors.Unavailable("server stopped before the request finished"))

    @property
    def queue_depth(self) -> int:
        return self._queue_depth

    @property
    def active_rows(self) -> int:
        return self._active_rows

    # -- requests -------------------------------------------------------------------------------

    def submit(self, source_ids: list[int], params: GenerationParams, *, deadline: float | None = None,
               on_token: TokenCallback | None = None) -> RequestHandle:
        """Hand a request to the engine core. Invalid requests fail here, and so does a request
        the engine core's last report leaves no queue place for (Overloaded, without asking it);
        otherwise a full queue fails its future with Overloaded as soon as the engine core answers
        (before the decoder step it may be about to run)."""
        check_request(self.config, self.max_batch_size, source_ids, params)
        if self._closed:
            raise errors.Unavailable("server is shutting down")
        if self.max_queue is not None and self._queue_depth >= self.max_queue:
            raise queue_full(self.max_queue)
        request_id = next(self._ids)
        handle = RequestHandle(lambda: self._send(messages.Cancel(request_id)))
        with self._lock:
            if self._conn is None:
                raise errors.Unavailable("the engine core is restarting; retry")
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
            with contextlib.suppress(OSError):  # the engine core is gone; the reader fails the requests
                self._conn.send_bytes(frame)

    # -- events, on the event loop ----------------------------------------------------------------

    def _on_readable(self, conn: Connection) -> None:
        try:
            while conn.poll():
                report = messages.decode_report(conn.recv_bytes())
                if isinstance(report, messages.Report):
                    self._dispatch(report)
        except (EOFError, OSError):
            self._disconnected(conn)

    def _disconnected(self, conn: Connection) -> None:
        """The engine core went away: fail this front-end's requests, and reconnect."""
        self.loop.remove_reader(conn.fileno())
        with self._lock:
            if self._conn is conn:
                self._conn = None
        conn.close()
        if self._stopping:
            return
        reason = "the engine core exited unexpectedly"
        log.error("%s; failing the requests it held and reconnecting", reason)
        self._fail_all(errors.Unavailable(f"{reason}; retry"))
        self._active_rows = self._queue_depth = 0
        if self.observer:
            self.observer.on_queue_depth(0)
            self.observer.on_active_rows(0)
        threading.Thread(target=self._reconnect, args=(reason,), name="seqserve-engine-reconnect",
                         daemon=True).start()

    def _reconnect(self, reason: str) -> None:
        try:
            self.connect()
        except Exception as exc:
            if self._stopping:
                return
            log.error("the engine core did not come back: %s", exc)
            if self.on_lost is not None:
                self.loop.call_soon_threadsafe(self.on_lost, f"{reason}; it did not come back: {exc}")
            return
        self.restarts += 1
        log.info("reconnected to the engine core %s", self.pid)

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
            self.observer.on_active_rows(report.rows)

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


# -- the engine core process ----------------------------------------------------------------------

class _FrontEnd:
    """One connected front-end, as the engine core sees it: its connection, its requests in the
    loop, and what it has to be told, sent as one `Report` per step boundary."""

    def __init__(self, number: int, conn: Connection) -> None:
        self.number = number
        self.conn = conn
        self.greeted = False  # said Hello with our protocol version
        self.closed = False  # sent Close: its new requests are refused
        self.ids: set[int] = set()  # loop ids of its requests not yet ended
        self.report = messages.Report()
        self.broken = False  # its connection failed

    def loop_id(self, request_id: int) -> int:
        return self.number << _ID_BITS | request_id

    def fail(self, request_id: int, error: errors.ServingError) -> None:
        self.report.errors.append(messages.Error.of(request_id, error))

    def flush(self, rows: int, depth: int, *, force: bool = False) -> None:
        """Send what has gathered since the last flush (with the batch's rows and queue depth now)."""
        report = self.report
        if self.broken or not self.greeted or not (force or not report.empty or rows != report.rows
                                                   or depth != report.depth):
            return  # (nothing goes before `Ready`, which answers its Hello)
        report.rows, report.depth = rows, depth
        self.report = messages.Report(rows=rows, depth=depth)
        try:
            self.conn.send_bytes(messages.encode(report))
        except OSError:
            self.broken = True


def _owner(frontends: dict[int, _FrontEnd], loop_id: int) -> tuple[_FrontEnd | None, int]:
    """The front-end a loop id belongs to (None: it is gone), and the front-end's own id for it."""
    return frontends.get(loop_id >> _ID_BITS), loop_id & _ID_MASK


def _route(events: StepEvents, frontends: dict[int, _FrontEnd]) -> None:
    """One step's events into the reports of the front-ends whose requests they are."""
    for loop_id, event in events.tokens:
        fe, request_id = _owner(frontends, loop_id)
        if fe is not None:
            fe.report.tokens.add(request_id, event)
    for loop_id, result in events.finished:
        fe, request_id = _owner(frontends, loop_id)
        if fe is not None:
            fe.report.done.append(messages.Done(request_id, result))
            fe.ids.discard(loop_id)
    for loop_id, error in events.failed:
        fe, request_id = _owner(frontends, loop_id)
        if fe is not None:
            fe.fail(request_id, error)
            fe.ids.discard(loop_id)
    greeted = [number for number, fe in frontends.items() if fe.greeted]
    if greeted:
        report = frontends[min(greeted)].report  # the figures once, to the metrics' primary
        report.encoded, report.encoder_seconds = events.admitted, events.encoder_seconds
        report.step_rows, report.step_seconds, report.run_seconds = events.rows, events.step_seconds, events.run_seconds


def _load_engine(options: EngineCoreOptions) -> Any:
    module, _, name = options.engine_factory.partition(":")
    factory = getattr(importlib.import_module(module), name)
    # The owner has checked the files' sha256 already; hashing them again would only slow the start.
    return factory(open_model_dir(options.model_dir, check_hashes=False), **options.engine)


def run_engine_core(listener: socket.socket, status: Connection, options: EngineCoreOptions) -> int:
    """The engine core process: load the engine, then decode for every front-end until told to
    stop or orphaned (the status connection closes)."""
    from seqserve.runtime.decode_loop import DecodeLoop, LoopRequest

    try:
        engine = _load_engine(options)
    except Exception as exc:
        status.send_bytes(messages.encode(messages.Failed(messages.PROTOCOL_VERSION,
                                                          f"the engine core could not load the model: {exc}")))
        return 1
    ready = messages.Ready(messages.PROTOCOL_VERSION, list(engine.providers), engine.device_cache is not None,
                           os.getpid())
    loop = DecodeLoop(engine, max_batch_size=options.max_batch_size, clock=time.monotonic)
    status.send_bytes(messages.encode(ready))
    listener.setblocking(False)
    numbers = itertools.count()
    frontends: dict[int, _FrontEnd] = {}  # by number
    by_conn: dict[Connection, _FrontEnd] = {}

    def accept() -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(True)
        fe = _FrontEnd(next(numbers), Connection(sock.detach()))
        frontends[fe.number] = by_conn[fe.conn] = fe

    def drop(fe: _FrontEnd) -> None:
        """A front-end is gone: its requests leave the loop at the next step, nobody to tell."""
        loop.cancel(fe.ids)
        del frontends[fe.number], by_conn[fe.conn]
        fe.conn.close()

    def command(fe: _FrontEnd, message: messages.Command) -> None:
        if isinstance(message, messages.Hello):
            if message.version != messages.PROTOCOL_VERSION:
                fe.conn.send_bytes(messages.encode(messages.Failed(
                    messages.PROTOCOL_VERSION, f"the front-end speaks protocol version {message.version}, the "
                    f"engine core {messages.PROTOCOL_VERSION}: install one version of seqserve for both")))
                fe.broken = True
                return
            fe.greeted = True
            fe.conn.send_bytes(messages.encode(ready))
        elif not fe.greeted:
            fe.broken = True  # not a front-end of ours
        elif isinstance(message, messages.Submit):
            if fe.closed:
                fe.fail(message.id, errors.Unavailable("server is shutting down"))
                return
            try:
                admit(loop, lambda: loop.queued, loop.purge, options.max_queue, message.params, message.deadline,
                      time.monotonic(), deadline_admission=options.deadline_admission)
            except errors.Overloaded as exc:
                fe.fail(message.id, exc)
                return
            loop_id = fe.loop_id(message.id)
            fe.ids.add(loop_id)
            loop.add([LoopRequest(loop_id, message.source_ids, message.params, message.deadline, message.stream,
                                  message.submitted)])
        elif isinstance(message, messages.Cancel):
            loop.cancel([fe.loop_id(message.id)])
        elif isinstance(message, messages.Close):
            fe.closed = True

    running = True
    while running:
        ready_now = wait([listener, status, *by_conn], 0.0 if loop.has_work else None)
        for source in ready_now:
            if source is listener:
                accept()
            elif source is status:
                try:  # Stop, or the owner is gone: either way, nobody wants more results
                    running = not isinstance(messages.decode_command(status.recv_bytes()), messages.Stop)
                except (EOFError, OSError):
                    running = False
            else:
                fe = by_conn[source]  # type: ignore[index]
                try:
                    while not fe.broken and fe.conn.poll():
                        command(fe, messages.decode_command(fe.conn.recv_bytes()))
                except (EOFError, OSError, ValueError):  # gone, or not speaking our messages
                    fe.broken = True
        for fe in frontends.values():
            if fe.report.errors:  # refusals go back now, not after the step about to run
                fe.flush(loop.active_rows, loop.queued)
        if running and loop.has_work:
            _route(loop.step(), frontends)
        for fe in list(frontends.values()):
            fe.flush(loop.active_rows, loop.queued)
            if fe.broken:
                drop(fe)
    stopped = errors.Unavailable("server stopped before the request finished")
    for loop_id in loop.fail_all():
        fe, request_id = _owner(frontends, loop_id)
        if fe is not None:
            fe.fail(request_id, stopped)
    for fe in frontends.values():
        fe.flush(0, 0, force=True)
        fe.conn.close()
    listener.close()
    status.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m seqserve.server.engine_core --listen-fd N --status-fd M --options JSON` (started by
    EngineCoreProcess only)."""
    from seqserve.server.logs import configure_logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-fd", type=int, required=True, help="inherited listening Unix socket")
    parser.add_argument("--status-fd", type=int, required=True, help="inherited socket to the owner")
    parser.add_argument("--options", type=json.loads, required=True, help="EngineCoreOptions as JSON")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    options = EngineCoreOptions(**args.options)
    configure_logging(options.log_format, options.log_level)
    listener = socket.socket(fileno=args.listen_fd)
    return run_engine_core(listener, Connection(args.status_fd), options)


if __name__ == "__main__":
    sys.exit(main())
