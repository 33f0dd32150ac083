"""The gRPC servicer of `seqserve.v1.SeqServe` (grpc.aio): protobuf in and out, validation, nothing else.

Requests are checked (`validation`; the request id here, since it is echoed in the `x-request-id`
trailer and every log line), handed to the scheduler, and their results turned back into
protobuf. Domain errors (`errors.ServingError`) become their status codes; a bug becomes INTERNAL
with the request id, never a user's fault. A client's deadline becomes the scheduler's deadline,
and a client that cancels (or disconnects) has its rows dropped from the batch at the next step.

The scheduler's worker thread talks to the event loop only through `loop.call_soon_threadsafe`.

A RESOURCE_EXHAUSTED answer carries a `grpc-retry-pushback-ms` trailer (gRPC's retry design A6),
which gRPC clients with RESOURCE_EXHAUSTED in their retry policy (ours by default) obey instead of
their backoff. Its rule (`SeqServeService.pushback_ms`): the refusal's own `retry_after_s` (the
scheduler's estimate of the queue's wait: the requests ahead over the recent completion rate) when
it has one; else the recent wait for a row (a moving average of the queue time of finished inputs),
100 ms before any input finished; clamped to 10 ms .. 10 s and spread by a random factor of
0.5-1.5 so refused callers do not all come back at once. When the call's deadline leaves less than
twice that (the wait, then about as long again in the queue), or `retry_after_s` is negative, the
trailer says -1: do not retry, a retry could not finish in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import tokenizers
from google.protobuf.message import DecodeError

from seqserve.runtime.model_dir import ModelDir
from seqserve.runtime.tokenizer import decode
from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.runtime import errors
from seqserve.server.config import ServerConfig
from seqserve.runtime.generation import FinishReason, RequestResult, Strategy, TokenEvent
from seqserve.server.metrics import Metrics
from seqserve.server.scheduler import RequestHandle, RequestScheduler
from seqserve.server.validation import ValidInput, Validator

if TYPE_CHECKING:  # tracing is optional: its module, and OpenTelemetry, are loaded only with a tracer
    from seqserve.server.tracing import RequestTracer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SeqServe"].full_name  # "seqserve.v1.SeqServe"
MAX_REQUEST_ID = 128  # characters; the id goes into every log line of the request
# Printable ASCII without the space: the id is echoed in the `x-request-id` trailer, where gRPC
# refuses anything else (the client would see INTERNAL "Invalid metadata" instead of our status)
# and HTTP/2 peers may trim spaces; and it cannot break or forge a log line.
_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID}}}")
REQUEST_ID_RULE = (f"must be 1 to {MAX_REQUEST_ID} printable ASCII characters without spaces "
                   "(or empty: the server makes one)")

STREAMS_PER_TOKEN, MAX_AUTO_INTERVAL = 16, 4  # --stream-interval 0 (auto): `stream_interval`
PUSHBACK_KEY = "grpc-retry-pushback-ms"  # trailing metadata of RESOURCE_EXHAUSTED: when to retry, or -1: don't
PUSHBACK_DEFAULT_S = 0.1  # before any input finished: no measured queue wait yet
PUSHBACK_MIN_S, PUSHBACK_MAX_S = 0.01, 10.0  # never 0 after the spread: gRPC never sends a retry due at 0 ms
QUEUE_WAIT_WEIGHT = 0.1  # moving average of the queue wait: the weight of each finished input

log = logging.getLogger(__name__)
request_log = logging.getLogger("seqserve.requests")

_FINISH_REASONS = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


@dataclass
class Backend:
    """The loaded model, as the service uses it."""

    scheduler: RequestScheduler
    tokenizer: tokenizers.Tokenizer
    validator: Validator
    model_dir: ModelDir
    providers: list[str]


@dataclass
class _Call:
    """One RPC's record for the request log and the metrics."""

    method: str
    id: str
    peer: str
    start: float = field(default_factory=time.monotonic)
    code: grpc.StatusCode = grpc.StatusCode.CANCELLED  # until it ends otherwise
    error: str = ""
    inputs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    results: list[RequestResult] = field(default_factory=list)
    results_at: float = 0.0  # time.monotonic() when the results came (anchors the trace's child spans)

    def log_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": "request", "request_id": self.id, "method": self.method,
                               "status": self.code.name, "peer": self.peer, "inputs": self.inputs,
                               "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                               "total_ms": round((time.monotonic() - self.start) * 1e3, 3)}
        if self.results:  # the slowest input's queue and decode time, the first token of any input
            timings = [r.timings for r in self.results]
            out["queue_ms"] = round(max(t.queue for t in timings) * 1e3, 3)
            out["encoder_ms"] = round(max(t.encoder for t in timings) * 1e3, 3)
            out["decode_ms"] = round(max(t.decode for t in timings) * 1e3, 3)
            out["first_token_ms"] = round(min(t.first_token for t in timings) * 1e3, 3)
        if self.error:
            out["error"] = self.error
        return out


class _TextStream:
    """Turns one sequence's tokens into text pieces that concatenate to its decoded text.

    Incremental, as TGI and vLLM do it: each push decodes only a short window, the tokens since
    the last piece plus the tokens of that piece as context (a token's leading space depends on
    what precedes it), and emits what the new tokens added. Cost per token stays constant instead
    of growing with the sequence. Text that a later token may still change (a trailing
    replacement character of an incomplete byte sequence) is held back.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: the tokens of the last piece, as context
        self.read = 0  # tokens up to here have been turned into pieces
        self.last_time: float | None = None

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = decode(self.tokenizer, self.ids[self.prefix:self.read])
        text = decode(self.tokenizer, self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd") or not text.startswith(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


class LoopMailbox:
    """Hands calls from the worker thread to the event loop with at most one wake-up pending.

    `loop.call_soon_threadsafe` per token writes to the loop's self-pipe every time: with 32
    streams that is 32 wake-ups per decoder step. Posting here queues the call and wakes the loop
    only when no drain is already pending, so one step's tokens cost one wake-up. Posts made on
    the loop's own thread (the engine core's events are read there) run at once, unless calls
    from another thread are still queued: they keep their order.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._calls: deque[tuple[Callable[[Any], Any], Any]] = deque()
        self._lock = threading.Lock()
        self._pending = False
        self._loop_thread: int | None = None
        loop.call_soon_threadsafe(self._note_thread)

    def _note_thread(self) -> None:
        self._loop_thread = threading.get_ident()

    def post(self, fn: Callable[[Any], Any], arg: Any) -> None:
        """Call fn(arg) on the event loop soon (from any thread; at once on the loop's thread)."""
        with self._lock:
            if not self._pending and threading.get_ident() == self._loop_thread:
                direct = True
            else:
                direct = False
                self._calls.append((fn, arg))
                if self._pending:
                    return
                self._pending = True
        if direct:
            fn(arg)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            calls, self._calls, self._pending = self._calls, deque(), False
        for fn, arg in calls:
            fn(arg)


def watch(handle: RequestHandle, mailbox: LoopMailbox) -> asyncio.Future[RequestResult]:
    """An event-loop future mirroring the scheduler's concurrent future.

    Not `asyncio.wrap_future`: cancelling that one would cancel the scheduler's future from this
    side; here a cancelled waiter only stops listening, and `handle.cancel()` asks the scheduler.
    The result travels through the same mailbox as the request's tokens, so it never overtakes them.
    """
    waiter: asyncio.Future[RequestResult] = mailbox.loop.create_future()

    def settle(source: Any) -> None:
        if waiter.done():
            return
        if source.cancelled():
            waiter.set_exception(errors.Cancelled("request cancelled"))
        elif source.exception() is not None:
            waiter.set_exception(source.exception())
        else:
            waiter.set_result(source.result())

    def relay(source: Any) -> None:  # runs on the worker thread
        mailbox.post(settle, source)

    handle.future.add_done_callback(relay)
    return waiter


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse: the handler answers INVALID_ARGUMENT."""

    message_type: str
    reason: str
    request_id: str = ""


def _lenient_parser(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Malformed(message_class.DESCRIPTOR.full_name, str(exc))

    return parse


def add_to_server(service: SeqServeService, server: grpc.aio.Server) -> None:
    """Register the service as the generated `add_SeqServeServicer_to_server` does, except that a
    request that does not parse (bad UTF-8 in a string, say) gets INVALID_ARGUMENT; gRPC's own
    answer would be UNKNOWN, with a traceback in the server's log."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["SeqServe"].methods:
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(service, method.name),
                                     request_deserializer=_lenient_parser(getattr(pb, method.input_type.name)),
                                     response_serializer=getattr(pb, method.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def stream_interval(configured: int, streams: int) -> int:
    """Tokens per GenerateStream message after the first: `--stream-interval` when set, else (0,
    auto) one more per STREAMS_PER_TOKEN streams open on this front-end, up to MAX_AUTO_INTERVAL:
    every token at once while streams are few, fewer and larger messages (less gRPC work per
    token) when many share the front-end. The first token never waits, and the last rides on the
    final message."""
    if configured:
        return configured
    return min(MAX_AUTO_INTERVAL, 1 + streams // STREAMS_PER_TOKEN)


def valid_request_id(request_id: str) -> bool:
    """Whether a caller's request id may be used as is (in the trailer, the response, the logs)."""
    return _REQUEST_ID.fullmatch(request_id) is not None


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as a time.monotonic() value, or None without one."""
    remaining = context.time_remaining()
    if remaining is None or not math.isfinite(remaining) or remaining > 1e9:
        return None
    return time.monotonic() + max(0.0, remaining)


class SeqServeService(pb_grpc.SeqServeServicer):
    """Generate, GenerateStream and GetModelInfo over a `Backend` (UNAVAILABLE until it is set)."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.backend: Backend | None = None  # set once the model is loaded and warmed up
        self.draining = False
        self.stopping = False
        self._mailboxes: dict[asyncio.AbstractEventLoop, LoopMailbox] = {}
        self._in_flight = 0
        self._streams = 0  # GenerateStream calls open on this front-end, for the auto interval
        self._idle = asyncio.Event()
        self._idle.set()
        self.queue_wait_s: float | None = None  # moving average of finished inputs' queue time (pushback)
        self.tracer: RequestTracer | None = None  # OpenTelemetry spans (--otlp-endpoint); None: tracing off

    # -- lifecycle --------------------------------------------------------------------------

    def set_backend(self, backend: Backend) -> None:
        self.backend = backend

    def start_draining(self) -> None:
        """From now on every new call gets UNAVAILABLE; calls in flight go on."""
        self.draining = True

    def start_stopping(self) -> None:
        """The server is stopping: a call cancelled from now on was cut by it, and its client sees
        UNAVAILABLE (the connection goes away), so that is what the call is logged and counted as."""
        self.stopping = True

    async def wait_idle(self, timeout: float) -> bool:
        """True once no call is in flight (within timeout seconds)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- RPCs -------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async with self._rpc("Generate", request.request_id, context) as call:
            backend = self._ready(request)
            items = backend.validator.generate_request(request)
            call.inputs, call.input_tokens = len(items), sum(len(i.source_ids) for i in items)
            results = await self._run_all(backend, items, _deadline(context))
            self._account(call, results, streamed=False)
            return pb.GenerateResponse(
                results=[self._input_result(backend, item, result) for item, result in zip(items, results)],
                request_id=call.id, model_version=backend.model_dir.version)
        raise AssertionError("unreachable: _rpc aborts on every error")  # for type checkers

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> LoopMailbox:
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = LoopMailbox(loop)
        return mailbox

    async def GenerateStream(self, request: pb.GenerateStreamRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with self._rpc("GenerateStream", request.request_id, context) as call:
            backend = self._ready(request)
            item = backend.validator.stream_request(request)
            call.inputs, call.input_tokens = 1, len(item.source_ids)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[TokenEvent | None] = asyncio.Queue()
            mailbox = self._mailbox(loop)

            def on_token(event: TokenEvent) -> None:  # worker thread: hand over, nothing more
                mailbox.post(events.put_nowait, event)

            handle = backend.scheduler.submit(item.source_ids, item.params, deadline=_deadline(context),
                                              on_token=on_token)
            done = watch(handle, mailbox)
            # Queued behind every token the worker handed over before it finished the request.
            done.add_done_callback(lambda _: events.put_nowait(None))
            try:
                texts: dict[int, _TextStream] = {}
                beam = item.params.strategy is Strategy.BEAM
                pending: list[pb.TokenPiece] = []
                sent_any = finished = False
                self._streams += 1
                while not finished:
                    interval = stream_interval(self.config.stream_interval, self._streams)
                    # Everything waiting is taken at once: one token when the client keeps up,
                    # several when it does not (fewer, larger writes instead of a growing backlog).
                    batch = [await events.get()]
                    while not events.empty():
                        batch.append(events.get_nowait())
                    now = time.monotonic()
                    for event in batch:
                        if event is None:
                            finished = True
                            break
                        text = texts.setdefault(event.sequence, _TextStream(backend.tokenizer))
                        if text.last_time is not None and not beam:  # a beam's tokens all come at its end
                            self.metrics.on_token_gap(now - text.last_time)
                        text.last_time = now
                        piece = pb.TokenPiece(sequence=event.sequence, index=event.index, token_id=event.token_id,
                                              text=text.push(event.token_id))
                        if event.log_prob is not None:
                            piece.log_prob = event.log_prob
                        if event.alignment is not None:
                            piece.alignment.extend(event.alignment.tolist())
                        pending.append(piece)
                    # The first token goes at once; then a message per `interval` tokens;
                    # tokens still pending at the end ride on the final message.
                    if pending and not finished and (not sent_any or len(pending) >= interval):
                        yield pb.GenerateStreamResponse(tokens=pending)
                        pending, sent_any = [], True
                result = done.result()
            finally:
                self._streams -= 1
                if not handle.future.done():
                    handle.cancel()
                if not done.done():
                    done.cancel()
                elif not done.cancelled():
                    # Retrieved: a stream cut by its deadline while the scheduler failed it too
                    # would otherwise log "Future exception was never retrieved", with a traceback,
                    # once per expired stream: under overload, hundreds of error lines a second.
                    done.exception()
            self._account(call, [result], streamed=True)
            yield pb.GenerateStreamResponse(tokens=pending, result=self._input_result(backend, item, result),
                                            request_id=call.id, model_version=backend.model_dir.version)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        async with self._rpc("GetModelInfo", "", context):
            backend = self._ready(request)
            return self._model_info(backend)
        raise AssertionError("unreachable: _rpc aborts on every error")

    # -- helpers ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _rpc(self, method: str, request_id: str, context: grpc.aio.ServicerContext) -> AsyncIterator[_Call]:
        """Track one RPC: in-flight count, status code, request log line, metrics; errors -> abort."""
        # A bad id is refused by `_ready`; the call is logged and answered under one of ours.
        call = _Call(method, request_id if valid_request_id(request_id) else uuid.uuid4().hex[:16],
                     context.peer() or "")
        self._in_flight += 1
        self._idle.clear()
        self.metrics.calls_in_flight.inc()
        tracer = self.tracer
        span = tracer.start(call, context) if tracer is not None else None
        error: errors.ServingError | None = None
        try:
            yield call
            call.code = grpc.StatusCode.OK
        except errors.ServingError as exc:
            error = exc
        except asyncio.CancelledError:  # the client cancelled or went away; the finally below logs it
            if self.stopping:
                call.code, call.error = grpc.StatusCode.UNAVAILABLE, "server stopped before the call finished"
            raise
        except Exception:  # a bug: keep its traceback in the log, tell the caller only the request id
            log.exception("request %s (%s) failed", call.id, method)
            error = errors.ServingError(f"internal error (request id {call.id})")
        finally:
            if error is not None:
                call.code, call.error = error.code, str(error)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            self.metrics.calls_in_flight.dec()
            self.metrics.on_rpc(method, call.code.name)
            if tracer is not None and span is not None:  # children from the measured timings, now it is over
                tracer.finish(span, call)
            if request_log.isEnabledFor(logging.INFO):  # the fields cost a few µs per call: only when logged
                request_log.info("%s %s %s", method, call.id, call.code.name, extra={"fields": call.log_fields()})
        if error is not None:
            trailers: tuple[tuple[str, str], ...] = (("x-request-id", call.id),)
            if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                trailers += ((PUSHBACK_KEY, str(self.pushback_ms(error, context.time_remaining()))),)
            await context.abort(error.code, str(error), trailing_metadata=trailers)

    def pushback_ms(self, error: errors.ServingError, remaining_s: float | None) -> int:
        """How many ms a refused caller should wait before retrying, or -1: do not retry (module doc)."""
        hint = getattr(error, "retry_after_s", None)  # 0 or None: no estimate
        if hint is not None and hint < 0:
            return -1
        wait = hint if hint else self.queue_wait_s if self.queue_wait_s is not None else PUSHBACK_DEFAULT_S
        wait = min(max(wait, PUSHBACK_MIN_S), PUSHBACK_MAX_S)
        if remaining_s is not None and remaining_s < 2 * wait:
            return -1
        return round(wait * random.uniform(0.5, 1.5) * 1e3)

    def _ready(self, request: Any) -> Backend:
        """The backend for a well-formed request; UNAVAILABLE while loading or draining."""
        if self.draining:
            raise errors.Unavailable("server is shutting down; retry on another replica")
        if self.backend is None:
            raise errors.Unavailable("server is starting: the model is not loaded yet")
        if isinstance(request, Malformed):
            raise errors.InvalidRequest("request", f"not a valid {request.message_type}: {request.reason}")
        request_id = getattr(request, "request_id", "")
        if request_id and not valid_request_id(request_id):  # never echoed: the message does not quote it
            raise errors.InvalidRequest("request_id", REQUEST_ID_RULE)
        return self.backend

    async def _run_all(self, backend: Backend, items: list[ValidInput], deadline: float | None) -> list[RequestResult]:
        """Submit every input and wait for all; any failure (or our cancellation) cancels the rest."""
        mailbox = self._mailbox(asyncio.get_running_loop())
        handles: list[RequestHandle] = []
        waiters: list[asyncio.Future[RequestResult]] = []
        try:
            for item in items:
                handle = backend.scheduler.submit(item.source_ids, item.params, deadline=deadline)
                handles.append(handle)
                waiters.append(watch(handle, mailbox))
            return list(await asyncio.gather(*waiters))
        finally:
            for handle in handles:
                if not handle.future.done():
                    handle.cancel()
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()
                elif not waiter.cancelled():
                    waiter.exception()  # retrieved: a second failure is not worth a warning

    def _account(self, call: _Call, results: list[RequestResult], *, streamed: bool) -> None:
        call.results, call.results_at = results, time.monotonic()
        call.output_tokens = sum(r.output_tokens for r in results)
        for result in results:
            self.metrics.on_result(result, streamed=streamed)
            wait = result.timings.queue
            self.queue_wait_s = wait if self.queue_wait_s is None else (
                self.queue_wait_s + QUEUE_WAIT_WEIGHT * (wait - self.queue_wait_s))

    @staticmethod
    def _input_result(backend: Backend, item: ValidInput, result: RequestResult) -> pb.InputResult:
        tokenizer = backend.tokenizer
        t = result.timings
        out = pb.InputResult(
            usage=pb.Usage(input_tokens=result.input_tokens, output_tokens=result.output_tokens),
            timings=pb.Timings(queue_ms=t.queue * 1e3, encoder_ms=t.encoder * 1e3, decode_ms=t.decode * 1e3,
                               first_token_ms=t.first_token * 1e3, total_ms=t.total * 1e3),
            truncated=item.truncated)
        if item.params.return_alignments:
            out.source_tokens.extend(tokenizer.id_to_token(i) or "" for i in item.source_ids)
        for seq in result.sequences:
            s = out.sequences.add(text=decode(tokenizer, seq.token_ids), token_ids=seq.token_ids,
                                  finish_reason=_FINISH_REASONS[seq.finish_reason])
            if seq.log_probs is not None:
                s.log_probs.extend(seq.log_probs)
            if seq.score is not None:
                s.score = seq.score
            if seq.alignments is not None:
                for token, weights in zip(seq.token_ids, seq.alignments):
                    s.alignments.add(token=tokenizer.id_to_token(token) or "", weights=weights.tolist())
        return out

    def _model_info(self, backend: Backend) -> pb.GetModelInfoResponse:
        cfg, meta, limits = backend.model_dir.config, backend.model_dir.meta, self.config
        return pb.GetModelInfoResponse(
            model_version=backend.model_dir.version,
            dims=pb.ModelDims(d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
                              decoder_layers=cfg.decoder_layers, n_heads=cfg.n_heads, d_ff=cfg.d_ff),
            vocab_size=cfg.vocab_size, max_source_len=cfg.max_source_len, max_target_len=cfg.max_target_len,
            special_tokens=pb.SpecialTokens(pad_id=cfg.pad_id, bos_id=cfg.bos_id, eos_id=cfg.eos_id,
                                            unk_id=cfg.unk_id),
            providers=backend.providers,
            encoder_sha256=backend.model_dir.digest("encoder"), decoder_sha256=backend.model_dir.digest("decoder"),
            limits=pb.ServerLimits(max_batch_size=limits.max_batch_size, max_queue=limits.max_queue,
                                   # No more than the queue can take at once: a call of more inputs
                                   # could never be admitted (refused as INVALID_ARGUMENT).
                                   max_inputs_per_request=min(limits.max_inputs_per_request, limits.max_queue),
                                   max_new_tokens_limit=limits.max_new_tokens_limit, max_beams=limits.max_beams,
                                   max_return_sequences=limits.max_return_sequences,
                                   max_message_bytes=limits.max_message_bytes),
            quantization=str(meta.get("quantization") or ""),
            layout=pb.ServingLayout(engine_core=limits.engine_core,
                                    frontends=int(limits.frontends) if limits.frontends.isdigit() else 1,
                                    intra_op_threads=limits.intra_op_threads,
                                    intra_op_spinning=limits.intra_op_spinning,
                                    stream_interval=limits.stream_interval, cores=limits.cores))
