"""The gRPC service end to end: a real server on a loopback port, the real tiny model, real ONNX
Runtime; blocking grpc clients with a timeout on every call."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from seqserve.model.data import dates_pairs
from seqserve.runtime.tokenizer import decode, encode_source, load_tokenizer
from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.server import main as server_main
from seqserve.runtime.engine import OnnxSeq2Seq, greedy_generate


TIMEOUT = 30.0  # seconds, on every call
SOURCES = [p.source for p in dates_pairs(64, seed=1234)]


@pytest.fixture(scope="module")
def reference(model_dir: Path, offline_engine: OnnxSeq2Seq) -> Callable[[list[str], int], list[list[int]]]:
    """Offline greedy token ids (ONNX Runtime, no server) of texts, for a max_new_tokens."""
    tokenizer = load_tokenizer(Path(model_dir) / "tokenizer.json")

    def run(texts: list[str], max_new_tokens: int = 24) -> list[list[int]]:
        return greedy_generate(offline_engine, [encode_source(tokenizer, t) for t in texts],
                               max_new_tokens=max_new_tokens)

    return run


def generate(stub: pb_grpc.SeqServeStub, inputs: list[str], **options: Any) -> pb.GenerateResponse:
    return stub.Generate(pb.GenerateRequest(inputs=inputs, options=pb.GenerationOptions(**options)), timeout=TIMEOUT)


def stream(stub: pb_grpc.SeqServeStub, text: str, **options: Any) -> list[pb.GenerateStreamResponse]:
    return list(stub.GenerateStream(pb.GenerateStreamRequest(input=text, options=pb.GenerationOptions(**options)),
                                    timeout=TIMEOUT))


def status_of(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- results ---------------------------------------------------------------------------------


def test_served_greedy_equals_offline_greedy(server: Any, reference: Any, model_dir: Path) -> None:
    tokenizer = load_tokenizer(Path(model_dir) / "tokenizer.json")
    texts = SOURCES[:16]
    response = generate(server.stub, texts)
    expected = reference(texts)
    assert [list(r.sequences[0].token_ids) for r in response.results] == expected
    assert [r.sequences[0].text for r in response.results] == [decode(tokenizer, e) for e in expected]
    for result, text in zip(response.results, texts):
        assert len(result.sequences) == 1
        assert result.sequences[0].finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH)
        assert result.usage.input_tokens == len(encode_source(tokenizer, text))
        assert result.usage.output_tokens == len(result.sequences[0].token_ids)
        t = result.timings
        assert 0 <= t.queue_ms <= t.total_ms and 0 < t.first_token_ms <= t.total_ms and t.decode_ms <= t.total_ms
    assert response.model_version and response.request_id


def test_max_new_tokens_cuts_with_finish_reason_length(server: Any, reference: Any) -> None:
    response = generate(server.stub, SOURCES[:4], max_new_tokens=3)
    for result, expected in zip(response.results, reference(SOURCES[:4], 3)):
        seq = result.sequences[0]
        assert list(seq.token_ids) == expected
        assert seq.finish_reason == (pb.FINISH_REASON_LENGTH if len(expected) == 3 else pb.FINISH_REASON_EOS)


def test_stream_pieces_concatenate_to_the_unary_result(server: Any) -> None:
    for text in SOURCES[:4]:
        unary = generate(server.stub, [text], return_log_probs=True).results[0]
        messages = stream(server.stub, text, return_log_probs=True)
        *token_messages, last = messages
        assert all(m.tokens and not m.HasField("result") for m in token_messages)
        assert last.HasField("result")  # with the tokens not sent yet, if any
        tokens = [t for m in messages for t in m.tokens]
        assert "".join(t.text for t in tokens) == unary.sequences[0].text
        assert [t.token_id for t in tokens] == list(unary.sequences[0].token_ids)
        assert [t.index for t in tokens] == list(range(len(tokens)))
        assert [t.log_prob for t in tokens] == pytest.approx(list(unary.sequences[0].log_probs))
        assert last.result.sequences[0] == unary.sequences[0]
        assert last.request_id and last.model_version


def test_stream_interval_sends_the_first_token_then_groups(grouping_server: Any) -> None:
    server = grouping_server
    with server.slow_decode(0.002):
        for text in SOURCES[:4]:
            unary = generate(server.stub, [text], min_new_tokens=10).results[0].sequences[0]
            first, *middle, last = stream(server.stub, text, min_new_tokens=10)
            assert [t.index for t in first.tokens] == [0]  # the first token goes at once
            assert all(len(m.tokens) >= 3 and not m.HasField("result") for m in middle)
            assert last.HasField("result") and last.result.sequences[0] == unary
            tokens = [t for m in (first, *middle, last) for t in m.tokens]
            assert [t.token_id for t in tokens] == list(unary.token_ids)
            assert "".join(t.text for t in tokens) == unary.text
            assert len(middle) <= (len(tokens) - 1) // 3


def test_stream_first_piece_arrives_before_the_last_token_is_decoded(server: Any) -> None:
    # The second decoder step waits until the client holds the first piece: if pieces were only
    # sent at the end, it would wait out its timeout and record False.
    engine = server.scheduler.engine
    original, gate, steps, waited = engine.decode, threading.Event(), [], []

    def decode(*args: Any) -> Any:
        steps.append(1)
        if len(steps) == 2:
            waited.append(gate.wait(10))
        return original(*args)

    engine.decode = decode
    try:
        call = server.stub.GenerateStream(pb.GenerateStreamRequest(
            input=SOURCES[0], options=pb.GenerationOptions(min_new_tokens=4)), timeout=TIMEOUT)
        first = next(call)
        gate.set()
        rest = list(call)
    finally:
        del engine.decode
    assert first.tokens and first.tokens[0].index == 0
    assert waited == [True]
    assert rest[-1].HasField("result") and len(rest[-1].result.sequences[0].token_ids) >= 4


def test_64_concurrent_requests_of_mixed_lengths(server: Any, reference: Any) -> None:
    # Inputs of many lengths, with different caps, unary and streamed, all at once.
    caps = [24, 5, 12, 2]
    expected = {cap: reference(SOURCES, cap) for cap in caps}
    rows_before = server.server.metrics.batch_rows.collect()[0].samples

    def one(i: int) -> list[int]:
        cap = caps[i % len(caps)]
        if i % 3 == 0:
            return list(stream(server.stub, SOURCES[i], max_new_tokens=cap)[-1].result.sequences[0].token_ids)
        return list(generate(server.stub, [SOURCES[i]], max_new_tokens=cap).results[0].sequences[0].token_ids)

    with ThreadPoolExecutor(64) as pool:
        got = list(pool.map(one, range(64), timeout=TIMEOUT))
    assert got == [expected[caps[i % len(caps)]][i] for i in range(64)]
    # They were decoded together: some step ran more than one row.
    buckets = {s.labels["le"]: s.value for s in server.server.metrics.batch_rows.collect()[0].samples
               if s.name.endswith("_bucket")}
    before = {s.labels["le"]: s.value for s in rows_before if s.name.endswith("_bucket")}
    assert buckets["+Inf"] - before["+Inf"] > buckets["1.0"] - before["1.0"]


def test_beam_search_and_seeded_sampling(server: Any, reference: Any) -> None:
    beam = generate(server.stub, SOURCES[:2], strategy=pb.STRATEGY_BEAM, num_beams=4, num_return_sequences=3)
    for result in beam.results:
        scores = [s.score for s in result.sequences]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    options = dict(strategy=pb.STRATEGY_SAMPLING, num_return_sequences=3, seed=7, temperature=1.5, top_k=20)
    first, second = generate(server.stub, SOURCES[:2], **options), generate(server.stub, SOURCES[:2], **options)
    assert [r.sequences for r in first.results] == [r.sequences for r in second.results]
    greedy = generate(server.stub, SOURCES[:1], strategy=pb.STRATEGY_SAMPLING, temperature=0.0)
    assert list(greedy.results[0].sequences[0].token_ids) == reference(SOURCES[:1])[0]


def test_alignments_and_log_probs_when_asked(server: Any, model_dir: Path) -> None:
    tokenizer = load_tokenizer(Path(model_dir) / "tokenizer.json")
    result = generate(server.stub, [SOURCES[0]], return_alignments=True, return_log_probs=True).results[0]
    seq = result.sequences[0]
    source_ids = encode_source(tokenizer, SOURCES[0])
    assert list(result.source_tokens) == [tokenizer.id_to_token(i) for i in source_ids]
    assert len(seq.alignments) == len(seq.token_ids) == len(seq.log_probs)
    assert [a.token for a in seq.alignments] == [tokenizer.id_to_token(i) for i in seq.token_ids]
    for row in seq.alignments:
        assert len(row.weights) == len(source_ids) and sum(row.weights) == pytest.approx(1.0, abs=1e-3)
    assert seq.score == pytest.approx(sum(seq.log_probs), rel=1e-4)
    plain = generate(server.stub, [SOURCES[0]]).results[0]
    assert not plain.source_tokens and not plain.sequences[0].alignments and not plain.sequences[0].log_probs
    assert not plain.sequences[0].HasField("score")


def test_truncate_input_instead_of_rejecting(server: Any) -> None:
    long_text = " ".join(SOURCES[:10])
    result = generate(server.stub, [long_text], truncate_input=True).results[0]
    assert result.truncated and result.usage.input_tokens == 48  # the tiny model's max_source_len
    assert not generate(server.stub, [SOURCES[0]], truncate_input=True).results[0].truncated


def test_model_info(server: Any, model_dir: Path) -> None:
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
    assert info.vocab_size == server.scheduler.config.vocab_size and info.max_source_len == 48
    assert info.max_target_len == 24 and info.special_tokens.eos_id == 2 and info.dims.d_model > 0
    assert list(info.providers) == ["CPUExecutionProvider"]
    assert len(info.encoder_sha256) == 64 and info.decoder_sha256.startswith(info.model_version)
    assert info.limits.max_batch_size == 32 and info.limits.max_inputs_per_request == 64
    assert (info.layout.engine_core, info.layout.frontends, info.layout.intra_op_threads) == ("thread", 1, 1)
    assert info.layout.cores >= 1 and info.layout.stream_interval == 0 and info.layout.intra_op_spinning == "on"


def test_model_info_advertises_no_more_inputs_per_call_than_the_queue_takes(tiny_server: Any) -> None:
    # max_inputs_per_request 32 but max_queue 1: a call of 2 inputs could never be admitted, so a
    # client that splits its calls by the advertised limit must be told 1.
    info = tiny_server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
    assert info.limits.max_queue == 1 and info.limits.max_inputs_per_request == 1


# -- deadlines, cancellation, backpressure ---------------------------------------------------

LONG = pb.GenerationOptions(min_new_tokens=24, max_new_tokens=24)  # 24 steps: > 1 s at 50 ms a step


def test_deadline_frees_the_batch_slot(server: Any) -> None:
    with server.slow_decode(0.05) as counter:  # 24 steps take at least 1.2 s: far past the deadline
        error = status_of(lambda: server.stub.Generate(pb.GenerateRequest(inputs=[SOURCES[0]], options=LONG),
                                                       timeout=0.3))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        server.wait_until(lambda: server.scheduler.active_rows == 0, timeout=TIMEOUT)
        assert counter.steps < 24  # the row left the batch before its 24 steps were done


def test_cancel_frees_the_batch_slot(server: Any) -> None:
    with server.slow_decode(0.05) as counter:
        call = server.stub.GenerateStream(pb.GenerateStreamRequest(input=SOURCES[0], options=LONG), timeout=TIMEOUT)
        assert next(call).tokens
        assert server.scheduler.active_rows == 1
        call.cancel()
        server.wait_until(lambda: server.scheduler.active_rows == 0, timeout=TIMEOUT)
        assert counter.steps < 24
    assert call.code() == grpc.StatusCode.CANCELLED


def test_full_queue_is_resource_exhausted_at_once(tiny_server: Any) -> None:
    s = tiny_server
    request = pb.GenerateRequest(inputs=[SOURCES[0]], options=LONG)
    with s.slow_decode(0.05):
        running = s.stub.Generate.future(request, timeout=TIMEOUT)
        s.wait_until(lambda: s.scheduler.active_rows == 1)
        queued = s.stub.Generate.future(request, timeout=TIMEOUT)
        s.wait_until(lambda: s.scheduler.queue_depth == 1)
        error = status_of(lambda: s.stub.Generate(request, timeout=TIMEOUT))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in error.details()
        assert not running.done() and not queued.done()  # refused at once, not once a place came free
        running.cancel()
        queued.cancel()


# -- health, reflection ----------------------------------------------------------------------


def test_health_serving_for_the_server_and_the_service(server: Any) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", "seqserve.v1.SeqServe"):
        response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    error = status_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(server: Any) -> None:
    database = ProtoReflectionDescriptorDatabase(server.channel)
    services = database.get_services()
    assert "seqserve.v1.SeqServe" in services and "grpc.health.v1.Health" in services
    service = DescriptorPool(database).FindServiceByName("seqserve.v1.SeqServe")
    assert {m.name for m in service.methods} == {"Generate", "GenerateStream", "GetModelInfo"}
    assert service.methods_by_name["GenerateStream"].output_type.full_name == "seqserve.v1.GenerateStreamResponse"


def test_not_serving_and_unavailable_until_the_model_is_loaded(make_config: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_engine = server_main.OnnxSeq2Seq

    def held_engine(*args: Any, **kwargs: Any) -> Any:
        assert release.wait(TIMEOUT)
        return real_engine(*args, **kwargs)

    monkeypatch.setattr(server_main, "OnnxSeq2Seq", held_engine)
    with socket.socket() as s:  # a free port, known before create_server returns
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    created = asyncio.run_coroutine_threadsafe(server_main.create_server(make_config(port=port)), loop)
    try:
        # Retry the connection quickly: the port opens only once create_server gets that far.
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.initial_reconnect_backoff_ms", 50),
                                                                   ("grpc.max_reconnect_backoff_ms", 100)]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="seqserve.v1.SeqServe")
            assert health.Check(check, timeout=TIMEOUT, wait_for_ready=True).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            error = status_of(lambda: pb_grpc.SeqServeStub(channel).Generate(
                pb.GenerateRequest(inputs=["1 May 2000"]), timeout=TIMEOUT))
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "starting" in error.details()
            release.set()
            started, _ = created.result(TIMEOUT)
            assert health.Check(check, timeout=TIMEOUT).status == health_pb2.HealthCheckResponse.SERVING
            asyncio.run_coroutine_threadsafe(started.stop(0), loop).result(TIMEOUT)
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


# -- bad input -------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    # (what, GenerateRequest fields, text the message must contain: the field and its limit)
    ("no inputs", dict(inputs=[]), "inputs"),
    ("empty input", dict(inputs=["ok 1 May 2000", "  "]), "inputs[1]: empty input"),
    ("too many inputs", dict(inputs=["1 May 2000"] * 65), "max_inputs_per_request is 64"),
    ("input too long", dict(inputs=[" ".join(SOURCES[:10])]), "max_source_len is 48"),
    ("max_new_tokens over", dict(options=dict(max_new_tokens=25)), "options.max_new_tokens: 25 is over the limit 24"),
    ("min over max", dict(options=dict(max_new_tokens=5, min_new_tokens=6)), "options.min_new_tokens"),
    ("num_beams over", dict(options=dict(strategy=pb.STRATEGY_BEAM, num_beams=9)), "max_beams 8"),
    ("returns over beams", dict(options=dict(strategy=pb.STRATEGY_BEAM, num_beams=2, num_return_sequences=3)),
     "options.num_return_sequences: 3 is over num_beams 2"),
    ("samples over", dict(options=dict(strategy=pb.STRATEGY_SAMPLING, num_return_sequences=9)),
     "max_return_sequences 8"),
    ("greedy returns 1", dict(options=dict(num_return_sequences=2)), "options.num_return_sequences"),
    ("top_p zero", dict(options=dict(strategy=pb.STRATEGY_SAMPLING, top_p=0.0)), "options.top_p: must be in (0, 1]"),
    ("top_p over 1", dict(options=dict(strategy=pb.STRATEGY_SAMPLING, top_p=1.5)), "options.top_p"),
    ("negative temperature", dict(options=dict(strategy=pb.STRATEGY_SAMPLING, temperature=-1.0)),
     "options.temperature: must be >= 0"),
    ("nan temperature", dict(options=dict(strategy=pb.STRATEGY_SAMPLING, temperature=float("nan"))),
     "options.temperature"),
    ("unknown stop token", dict(options=dict(stop_token_ids=[5, 100000])), "options.stop_token_ids[1]: 100000"),
    ("sampling option with greedy", dict(options=dict(top_k=5)), "options.top_k: only used with STRATEGY_SAMPLING"),
    ("unknown strategy", dict(options=dict(strategy=42)), "options.strategy: unknown value 42"),
    ("request id too long", dict(request_id="x" * 200), "request_id"),
]


@pytest.mark.parametrize("fields, expected", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_invalid_argument_naming_the_field(server: Any, fields: dict[str, Any],
                                                          expected: str) -> None:
    fields = {"inputs": ["1 May 2000"], **fields}
    options = pb.GenerationOptions(**fields.pop("options", {}))
    request = pb.GenerateRequest(options=options, **fields)
    error = status_of(lambda: server.stub.Generate(request, timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert expected in error.details()
    if len(request.inputs) == 1:  # the same checks guard the stream
        stream_request = pb.GenerateStreamRequest(input=request.inputs[0], options=options,
                                                  request_id=request.request_id)
        error = status_of(lambda: list(server.stub.GenerateStream(stream_request, timeout=TIMEOUT)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in error.details()


def test_oversized_message_is_resource_exhausted_and_the_server_goes_on(server: Any) -> None:
    error = status_of(lambda: generate(server.stub, ["x" * (65 * 1024)]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert generate(server.stub, [SOURCES[0]]).results[0].sequences[0].token_ids


def test_one_log_line_per_request_with_its_fields(server: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="seqserve.requests"):
        server.stub.Generate(pb.GenerateRequest(inputs=SOURCES[:2], request_id="test-id-1"), timeout=TIMEOUT)
        status_of(lambda: server.stub.Generate(pb.GenerateRequest(inputs=[""], request_id="test-id-2"),
                                               timeout=TIMEOUT))
    records = {r.fields["request_id"]: r.fields for r in caplog.records if hasattr(r, "fields")}
    ok, bad = records["test-id-1"], records["test-id-2"]
    assert ok["method"] == "Generate" and ok["status"] == "OK" and ok["inputs"] == 2
    assert ok["output_tokens"] > 0 and ok["input_tokens"] > 0 and ok["total_ms"] > 0 and "first_token_ms" in ok
    assert bad["status"] == "INVALID_ARGUMENT" and "empty input" in bad["error"]
    counted = server.server.metrics.registry.get_sample_value("seqserve_requests_total",
                                                               {"method": "Generate", "code": "INVALID_ARGUMENT"})
    assert counted is not None and counted >= 1


def test_request_that_does_not_parse_is_invalid_argument(server: Any) -> None:
    generate_raw = server.channel.unary_unary("/seqserve.v1.SeqServe/Generate",
                                              request_serializer=lambda data: data,
                                              response_deserializer=pb.GenerateResponse.FromString)
    error = status_of(lambda: generate_raw(b"\x0a\x03\xff\xfe\xfd", timeout=TIMEOUT))  # inputs[0]: bad UTF-8
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid seqserve.v1.GenerateRequest" in error.details()
