"""OpenTelemetry traces of the SeqServe calls (the optional `tracing` extra), off by default.

With `--otlp-endpoint URL` (`SEQSERVE_OTLP_ENDPOINT`) every call of seqserve.v1.SeqServe gets one
server span, `seqserve.v1.SeqServe/<Method>`, sent over OTLP/gRPC to that collector by a batching
processor (`http://` plaintext, `https://` TLS; the exporter's standard `OTEL_EXPORTER_OTLP_*`
variables, headers, timeout, certificate, compression, and `OTEL_BSP_*`, `OTEL_TRACES_SAMPLER`,
`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_PROPAGATORS` are honoured; the service
is named "seqserve" unless they say otherwise). A caller's W3C trace context (`traceparent` in the
call's metadata) makes the span a child of the caller's trace, sampled as the caller decided.

The span carries the request id, the method, the status (the gRPC code as a number and a name;
any code but OK sets the span's status to ERROR, described by the code's name alone), and the
input and output token counts: ids, counts and status only, never a request's text or its
tokens. Its children are built once the call is over from each input's measured `Timings`, so
nothing is added to the decoding loop: `queue` (submitted until its encoder pass began), `encode`
(the encoder pass it shared with the requests admitted with it) and `decode` (admitted until
finished, with a `first_token` event). A Generate call with several inputs has one such set per
input, told apart by `seqserve.input_index` (the inputs are decoded independently, each waits and
finishes on its own); inputs that never finished (the call failed or was cancelled) have none.

The request path imports nothing from here: with tracing off the service holds no tracer, a single
`is None` test per call, and OpenTelemetry is never imported.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from seqserve.runtime.errors import SeqserveError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Span

    from seqserve.server.config import ServerConfig
    from seqserve.server.service import _Call

SERVICE = "seqserve"  # the resource's service.name unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES set one
INSTRUMENTATION = "seqserve.server"

log = logging.getLogger(__name__)


def tracer_from_config(config: ServerConfig) -> RequestTracer | None:
    """The tracer of a server: None with tracing off (no OTLP endpoint), else one exporting over
    OTLP/gRPC in batches; without the `tracing` extra installed, a one-line SeqserveError."""
    if not config.otlp_endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise SeqserveError(f"--otlp-endpoint needs the `tracing` extra ({exc.name or 'opentelemetry'} is not "
                            "installed): pip install 'seqserve[tracing]'") from None
    provider = new_provider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    return RequestTracer(provider)


def new_provider() -> TracerProvider:
    """A TracerProvider for the resource "seqserve" (the OTEL_* variables may rename or add to it)."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider

    # Resource.create puts our name over the variables' one; merging them again lets them win.
    resource = Resource.create({"service.name": SERVICE}).merge(OTELResourceDetector().detect())
    return TracerProvider(resource=resource)


@dataclass
class MemoryTracing:
    """A tracer whose spans stay in memory (tests: `exporter.get_finished_spans()`)."""

    tracer: RequestTracer
    exporter: InMemorySpanExporter


def memory_tracer() -> MemoryTracing:
    """A tracer exporting each span as it ends to an in-memory exporter (for tests; set it as the
    service's `tracer`)."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = new_provider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return MemoryTracing(RequestTracer(provider), exporter)


class RequestTracer:
    """Starts a call's server span when the call begins and ends it, with its children, when the
    call is over. Never fails a call: a tracing error is logged and the span dropped."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        from seqserve.server.service import SERVICE_NAME

        self.provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION)
        self._extract = propagate.extract  # the global propagators: W3C trace context and baggage by default
        self._in_context = trace.set_span_in_context
        self._server_kind = SpanKind.SERVER
        self._error = lambda name: Status(StatusCode.ERROR, name)
        self._rpc_service = SERVICE_NAME

    def start(self, call: _Call, context: grpc.aio.ServicerContext) -> Span | None:
        """The call's server span, started at `call.start`, a child of the caller's trace context if
        the metadata carries one."""
        try:
            # Text headers only: binary ones (`-bin`) come as bytes and carry no trace context.
            carrier = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
            start_ns = time.time_ns() - int((time.monotonic() - call.start) * 1e9)
            return self._tracer.start_span(
                f"{self._rpc_service}/{call.method}", context=self._extract(carrier), kind=self._server_kind,
                start_time=start_ns, attributes={"rpc.system": "grpc", "rpc.service": self._rpc_service,
                                                 "rpc.method": call.method, "seqserve.request_id": call.id})
        except Exception:
            log.exception("tracing: cannot start the span of request %s", call.id)
            return None

    def finish(self, span: Span, call: _Call) -> None:
        """Record the call's status and counts, add the children of its finished inputs, end the span."""
        try:
            if span.is_recording():  # not sampled: nothing to record
                self._record(span, call)
        except Exception:
            log.exception("tracing: cannot record the span of request %s", call.id)
        finally:
            span.end()

    def _record(self, span: Any, call: _Call) -> None:
        code: grpc.StatusCode = call.code
        span.set_attributes({"rpc.grpc.status_code": code.value[0], "seqserve.status": code.name,
                             "seqserve.inputs": call.inputs, "seqserve.input_tokens": call.input_tokens,
                             "seqserve.output_tokens": call.output_tokens})
        if code != grpc.StatusCode.OK:
            span.set_status(self._error(code.name))  # the name only: an error message may quote the request
        if not call.results:
            return
        start_ns, start = span.start_time, call.start

        def ns(moment: float) -> int:  # a time.monotonic() moment on the span's clock
            return start_ns + max(0, int((moment - start) * 1e9))

        # The inputs were all submitted at once, and the last one finished just before `results_at`.
        submitted = max(start, call.results_at - max(r.timings.total for r in call.results))
        parent = self._in_context(span)
        for index, result in enumerate(call.results):
            t = result.timings
            admitted = submitted + t.queue  # the queue time ends after the encoder pass that admits it
            encoding = max(submitted, admitted - t.encoder)
            ids = {"seqserve.input_index": index}
            self._child("queue", parent, ns(submitted), ns(encoding if t.encoder else admitted), ids)
            if not t.encoder and not t.decode:  # left the queue without being decoded (cancelled, expired)
                continue
            self._child("encode", parent, ns(encoding), ns(admitted), ids)
            decode = self._tracer.start_span("decode", context=parent, start_time=ns(admitted), attributes={
                **ids, "seqserve.input_tokens": result.input_tokens, "seqserve.output_tokens": result.output_tokens})
            if t.first_token:
                decode.add_event("first_token", timestamp=ns(submitted + t.first_token))
            decode.end(end_time=max(ns(admitted), ns(submitted + t.total)))

    def _child(self, name: str, parent: Any, start_ns: int, end_ns: int, attributes: dict[str, Any]) -> None:
        self._tracer.start_span(name, context=parent, start_time=start_ns, attributes=attributes).end(
            end_time=max(start_ns, end_ns))

    def shutdown(self) -> None:
        """Flush the spans not yet exported and stop the processors (blocking: at most the exporter's timeout)."""
        self.provider.shutdown()
