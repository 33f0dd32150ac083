"""OpenTelemetry traces against a real server: one server span per call with queue, encode and decode
children built from the measured timings, the request id and counts (never text or tokens), ERROR
for a failed call, a caller's `traceparent` joined; exported over OTLP and flushed when the server
stops; with tracing off, no tracer and no OpenTelemetry import at all."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from seqserve.proto import seqserve_pb2 as pb
from seqserve.server.config import ConfigError, ServerConfig, parse_args
from seqserve.server.tracing import MemoryTracing, memory_tracer

TIMEOUT = 30.0
REPO = Path(__file__).resolve().parents[2]
TEXTS = ["1 May 2000", "nov 25 2026"]


@pytest.fixture
def traced(start_server: Callable[..., Any]) -> Iterator[tuple[Any, MemoryTracing]]:
    """A server whose spans stay in memory (the tracer `--otlp-endpoint` would set, with another exporter)."""
    running = start_server()
    tracing = memory_tracer()
    running.server.service.tracer = tracing.tracer
    yield running, tracing


def server_span(spans: tuple[ReadableSpan, ...], method: str) -> ReadableSpan:
    [span] = [s for s in spans if s.kind == SpanKind.SERVER and s.name == f"seqserve.v1.SeqServe/{method}"]
    return span


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> dict[tuple[str, int], ReadableSpan]:
    """The parent's child spans by (name, input index)."""
    out = {}
    for span in spans:
        if span.parent is not None and span.parent.span_id == parent.context.span_id:
            assert span.context.trace_id == parent.context.trace_id
            out[span.name, span.attributes["seqserve.input_index"]] = span
    return out


def check_children(parent: ReadableSpan, kids: dict[tuple[str, int], ReadableSpan], result: pb.InputResult,
                   index: int) -> None:
    """Queue, encode, decode one after the other inside the call, as long as the server measured."""
    queue, encode, decode = (kids[name, index] for name in ("queue", "encode", "decode"))
    assert parent.start_time <= queue.start_time <= queue.end_time == encode.start_time
    assert encode.start_time <= encode.end_time == decode.start_time <= decode.end_time <= parent.end_time
    t = result.timings  # queue_ms runs until admission, after the encoder pass that admits it
    assert (encode.end_time - queue.start_time) / 1e6 == pytest.approx(t.queue_ms, abs=0.01)
    assert (encode.end_time - encode.start_time) / 1e6 == pytest.approx(t.encoder_ms, abs=0.01)
    assert (decode.end_time - decode.start_time) / 1e6 == pytest.approx(t.decode_ms, abs=0.01)
    assert decode.attributes["seqserve.output_tokens"] == result.usage.output_tokens
    assert decode.attributes["seqserve.input_tokens"] == result.usage.input_tokens
    [first] = decode.events
    assert first.name == "first_token" and decode.start_time <= first.timestamp <= decode.end_time
    assert (first.timestamp - queue.start_time) / 1e6 == pytest.approx(t.first_token_ms, abs=0.01)


def assert_no_text_or_tokens(spans: tuple[ReadableSpan, ...], texts: list[str]) -> None:
    """Attributes are ids, counts and status: no request or output text, no token (lists)."""
    texts = [text for text in texts if text]
    for span in spans:
        for key, value in (span.attributes or {}).items():
            assert isinstance(value, (str, int, float, bool)), (span.name, key, value)
            assert not (isinstance(value, str) and any(text in value for text in texts)), (span.name, key, value)


def test_generate_has_one_server_span_with_a_child_set_per_input(traced: tuple[Any, MemoryTracing]) -> None:
    running, tracing = traced
    response = running.stub.Generate(pb.GenerateRequest(inputs=TEXTS, request_id="trace-gen-1"), timeout=TIMEOUT)
    spans = tracing.exporter.get_finished_spans()
    span = server_span(spans, "Generate")
    assert span.parent is None and span.status.status_code == StatusCode.UNSET
    assert dict(span.attributes) == {
        "rpc.system": "grpc", "rpc.service": "seqserve.v1.SeqServe", "rpc.method": "Generate",
        "seqserve.request_id": "trace-gen-1", "rpc.grpc.status_code": 0, "seqserve.status": "OK",
        "seqserve.inputs": 2, "seqserve.input_tokens": sum(r.usage.input_tokens for r in response.results),
        "seqserve.output_tokens": sum(r.usage.output_tokens for r in response.results)}
    kids = children(spans, span)
    assert sorted(kids) == sorted((name, i) for name in ("queue", "encode", "decode") for i in (0, 1))
    assert len(spans) == 7  # nothing else
    for index, result in enumerate(response.results):
        check_children(span, kids, result, index)
    assert span.resource.attributes["service.name"] == "seqserve"
    outputs = [seq.text for r in response.results for seq in r.sequences]
    assert_no_text_or_tokens(spans, TEXTS + outputs)


def test_generate_stream_has_one_server_span_with_children(traced: tuple[Any, MemoryTracing]) -> None:
    running, tracing = traced
    messages = list(running.stub.GenerateStream(pb.GenerateStreamRequest(input=TEXTS[0], request_id="trace-stream-1"),
                                                timeout=TIMEOUT))
    final = messages[-1]
    spans = tracing.exporter.get_finished_spans()
    span = server_span(spans, "GenerateStream")
    assert span.status.status_code == StatusCode.UNSET
    assert span.attributes["seqserve.request_id"] == "trace-stream-1" and span.attributes["seqserve.status"] == "OK"
    assert span.attributes["seqserve.output_tokens"] == final.result.usage.output_tokens > 0
    kids = children(spans, span)
    assert sorted(kids) == [("decode", 0), ("encode", 0), ("queue", 0)]
    check_children(span, kids, final.result, 0)
    assert_no_text_or_tokens(spans, [TEXTS[0], final.result.sequences[0].text])


def test_invalid_argument_is_an_error_span_without_children(traced: tuple[Any, MemoryTracing]) -> None:
    running, tracing = traced
    with pytest.raises(grpc.RpcError) as info:
        running.stub.Generate(pb.GenerateRequest(inputs=[TEXTS[0], ""], request_id="trace-bad-1"), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    spans = tracing.exporter.get_finished_spans()
    span = server_span(spans, "Generate")
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "INVALID_ARGUMENT"  # the code's name, not the message
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert span.attributes["seqserve.status"] == "INVALID_ARGUMENT"
    assert span.attributes["seqserve.request_id"] == "trace-bad-1"
    assert len(spans) == 1  # no input was decoded: no children
    assert_no_text_or_tokens(spans, [TEXTS[0]])


def test_a_callers_traceparent_makes_the_server_span_its_child(traced: tuple[Any, MemoryTracing]) -> None:
    running, tracing = traced
    trace_id, parent_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    running.stub.Generate(pb.GenerateRequest(inputs=TEXTS[:1]), timeout=TIMEOUT,
                          metadata=(("traceparent", f"00-{trace_id:032x}-{parent_id:016x}-01"),))
    spans = tracing.exporter.get_finished_spans()
    span = server_span(spans, "Generate")
    assert span.context.trace_id == trace_id
    assert span.parent is not None and span.parent.span_id == parent_id and span.parent.is_remote
    assert {s.context.trace_id for s in spans} == {trace_id} and len(children(spans, span)) == 3
    # The caller decided not to sample: nothing is recorded.
    tracing.exporter.clear()
    running.stub.Generate(pb.GenerateRequest(inputs=TEXTS[:1]), timeout=TIMEOUT,
                          metadata=(("traceparent", f"00-{trace_id:032x}-{parent_id:016x}-00"),))
    assert tracing.exporter.get_finished_spans() == ()


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


def test_otlp_endpoint_exports_in_batches_flushed_when_the_server_stops(
        start_server: Callable[..., Any], collector: tuple[Collector, int], monkeypatch: pytest.MonkeyPatch) -> None:
    servicer, port = collector
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # no timed export: only the flush at stop sends
    running = start_server(otlp_endpoint=f"http://127.0.0.1:{port}")
    running.stub.Generate(pb.GenerateRequest(inputs=TEXTS[:1], request_id="trace-otlp-1"), timeout=TIMEOUT)
    assert servicer.requests == []  # batched, not sent per call
    running.close()
    spans = {}
    for request in servicer.requests:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert resource["service.name"] == "seqserve"
            for scope in resource_spans.scope_spans:
                spans.update({s.name: s for s in scope.spans})
    assert sorted(spans) == ["decode", "encode", "queue", "seqserve.v1.SeqServe/Generate"]
    attributes = {a.key: a.value for a in spans["seqserve.v1.SeqServe/Generate"].attributes}
    assert attributes["seqserve.request_id"].string_value == "trace-otlp-1"
    assert spans["decode"].parent_span_id == spans["seqserve.v1.SeqServe/Generate"].span_id


def test_otlp_endpoint_setting() -> None:
    assert parse_args(["m"], environ={}).otlp_endpoint == ""  # off by default
    env = {"SEQSERVE_OTLP_ENDPOINT": "http://collector:4317"}
    assert parse_args(["m"], environ=env).otlp_endpoint == "http://collector:4317"
    assert parse_args(["m", "--otlp-endpoint", "https://other:4317"], environ=env).otlp_endpoint == "https://other:4317"
    with pytest.raises(ConfigError, match=r"otlp_endpoint \(--otlp-endpoint, SEQSERVE_OTLP_ENDPOINT\) must be an "
                                          r"http:// \(plaintext\) or https:// \(TLS\) URL"):
        ServerConfig(model_dir="m", otlp_endpoint="collector:4317")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_tracing_off_has_no_tracer_and_never_imports_opentelemetry(model_dir: Path) -> None:
    done = run_python("""
        import sys
        import grpc
        from seqserve.proto import seqserve_pb2 as pb, seqserve_pb2_grpc as pb_grpc
        from seqserve.server.testing import InProcessServer, loopback_config

        with InProcessServer(loopback_config(sys.argv[1])) as running:
            assert running.server.service.tracer is None
            with grpc.insecure_channel(running.address) as channel:
                stub = pb_grpc.SeqServeStub(channel)
                stub.Generate(pb.GenerateRequest(inputs=["1 May 2000"]), timeout=30)
                list(stub.GenerateStream(pb.GenerateStreamRequest(input="1 May 2000"), timeout=30))
                stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        print(sorted(name for name in sys.modules if name.split(".")[0] == "opentelemetry"))
    """, str(model_dir))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_otlp_endpoint_without_the_extra_is_a_one_line_startup_error(model_dir: Path) -> None:
    done = run_python("""
        import importlib.abc
        import sys

        class NoOpenTelemetry(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "opentelemetry":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, NoOpenTelemetry())
        from seqserve.server.cli import main
        sys.exit(main(["serve", sys.argv[1], "--host", "127.0.0.1", "--port", "0",
                       "--otlp-endpoint", "http://127.0.0.1:4317"]))
    """, str(model_dir))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if "otlp" in line]
    assert line == ("seqserve serve: error: --otlp-endpoint needs the `tracing` extra (opentelemetry is not "
                    "installed): pip install 'seqserve[tracing]'")
