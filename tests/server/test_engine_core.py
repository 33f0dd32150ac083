"""The decode loop in an engine core process (`--engine-core process`, the server's default): the
same results as in-process, deadlines, cancellation and backpressure across the process boundary,
an engine core that dies is replaced, and nothing is left running after the server stops."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from seqserve.model.data import dates_pairs
from seqserve.runtime.tokenizer import decode, encode_source, load_tokenizer
from seqserve.runtime.errors import SeqserveError
from seqserve.proto import seqserve_pb2 as pb
from seqserve.server import main as server_main
from seqserve.runtime.engine import OnnxSeq2Seq, greedy_generate
from seqserve.server.engine_core import EngineCoreClient, EngineCoreOptions

TIMEOUT = 30.0  # seconds, on every call
SOURCES = [p.source for p in dates_pairs(16, seed=99)]
LONG = pb.GenerationOptions(min_new_tokens=24, max_new_tokens=24)  # 24 steps: > 1 s at 50 ms a step


def worker_of(server: Any) -> EngineCoreClient:
    """The server's connection to its engine core (`pid` and `restarts` are the engine core's)."""
    scheduler = server.server.scheduler
    assert isinstance(scheduler, EngineCoreClient)
    return scheduler


def delayed(options: EngineCoreOptions, seconds: float = 0.05) -> EngineCoreOptions:
    """The same engine core with `seconds` of pause before every decoder step."""
    return dataclasses.replace(options, engine_factory="seqserve.server.testing:DelayedEngine",
                               engine={**options.engine, "step_delay_s": seconds})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def server(worker_server: Any) -> Any:
    return worker_server


@pytest.fixture
def slow_server(start_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """One batch row, one queue slot, and 50 ms per decoder step in the worker."""
    options = server_main.engine_core_options
    monkeypatch.setattr(server_main, "engine_core_options", lambda config: delayed(options(config)))
    return start_server(engine_core="process", max_batch_size=1, max_queue=1)


def test_results_equal_offline_greedy_unary_and_streamed(server: Any, model_dir: Path,
                                                          offline_engine: OnnxSeq2Seq) -> None:
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    expected = greedy_generate(offline_engine, [encode_source(tokenizer, t) for t in SOURCES], max_new_tokens=24)
    response = server.stub.Generate(pb.GenerateRequest(inputs=SOURCES), timeout=TIMEOUT)
    assert [list(r.sequences[0].token_ids) for r in response.results] == expected
    for text, ids in zip(SOURCES[:4], expected):
        messages = list(server.stub.GenerateStream(pb.GenerateStreamRequest(input=text), timeout=TIMEOUT))
        pieces = [t for m in messages for t in m.tokens]
        assert [t.token_id for t in pieces] == ids
        assert "".join(t.text for t in pieces) == decode(tokenizer, ids) == messages[-1].result.sequences[0].text
    assert worker_of(server).pid != os.getpid()


def test_beam_sampling_and_scores_cross_the_process_boundary(server: Any) -> None:
    beam = server.stub.Generate(pb.GenerateRequest(inputs=SOURCES[:2], options=pb.GenerationOptions(
        strategy=pb.STRATEGY_BEAM, num_beams=4, num_return_sequences=2, return_log_probs=True,
        return_alignments=True)), timeout=TIMEOUT)
    for result in beam.results:
        assert len(result.sequences) == 2 and result.sequences[0].score >= result.sequences[1].score
        assert len(result.sequences[0].alignments) == len(result.sequences[0].token_ids)
    options = pb.GenerationOptions(strategy=pb.STRATEGY_SAMPLING, num_return_sequences=2, seed=3, temperature=1.3)
    first = server.stub.Generate(pb.GenerateRequest(inputs=SOURCES[:2], options=options), timeout=TIMEOUT)
    second = server.stub.Generate(pb.GenerateRequest(inputs=SOURCES[:2], options=options), timeout=TIMEOUT)
    assert [r.sequences for r in first.results] == [r.sequences for r in second.results]


def test_step_metrics_reach_the_server_process(server: Any) -> None:
    server.stub.Generate(pb.GenerateRequest(inputs=SOURCES[:3]), timeout=TIMEOUT)
    text = server.server.metrics.text()
    steps = [line for line in text.splitlines() if line.startswith("seqserve_step_seconds_count")]
    assert steps and float(steps[0].split()[1]) > 0
    encodes = [line for line in text.splitlines() if line.startswith("seqserve_encoder_seconds_count")]
    assert encodes and float(encodes[0].split()[1]) > 0


def test_invalid_request_fails_in_the_server_process(server: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Generate(pb.GenerateRequest(inputs=[SOURCES[0]], options=pb.GenerationOptions(
            max_new_tokens=10_000)), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in info.value.details()


def test_worker_ignores_sigint_that_reaches_the_process_group(server: Any) -> None:
    worker = worker_of(server)
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.2)
    assert alive(worker.pid)
    assert server.stub.Generate(pb.GenerateRequest(inputs=SOURCES[:1]), timeout=TIMEOUT).results


def decoder_steps(server: Any) -> int:
    """Decoder steps the worker has reported (its step metrics travel to the server process)."""
    return int(server.server.metrics.registry.get_sample_value("seqserve_step_seconds_count") or 0)


def test_deadline_and_cancel_free_the_worker(slow_server: Any) -> None:
    s, worker = slow_server, worker_of(slow_server)
    before = decoder_steps(s)
    with pytest.raises(grpc.RpcError) as info:
        s.stub.Generate(pb.GenerateRequest(inputs=[SOURCES[0]], options=LONG), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert worker.wait_idle(TIMEOUT)
    assert decoder_steps(s) - before < 24  # the row left before its 24 steps of at least 50 ms were done
    before = decoder_steps(s)
    call = s.stub.GenerateStream(pb.GenerateStreamRequest(input=SOURCES[0], options=LONG), timeout=TIMEOUT)
    assert next(call).tokens
    call.cancel()
    assert worker.wait_idle(TIMEOUT)
    s.wait_until(lambda: worker.active_rows == 0, timeout=TIMEOUT)
    assert decoder_steps(s) - before < 24


def fill(server: Any, request: pb.GenerateRequest) -> tuple[Any, Any]:
    """The slow server's one row and one queue place taken: (running call, queued call)."""
    worker = worker_of(server)
    running = server.stub.Generate.future(request, timeout=TIMEOUT)
    server.wait_until(lambda: worker.active_rows == 1)
    queued = server.stub.Generate.future(request, timeout=TIMEOUT)
    server.wait_until(lambda: worker.queue_depth == 1)
    return running, queued


def test_full_queue_is_resource_exhausted(slow_server: Any) -> None:
    s, worker = slow_server, worker_of(slow_server)
    request = pb.GenerateRequest(inputs=[SOURCES[0]], options=LONG)
    running, queued = fill(s, request)
    # Once the engine core has reported its queue full, the front-end refuses by itself, without
    # the round trip: at once even while the engine core is stopped and could not answer.
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        with pytest.raises(grpc.RpcError) as info:
            s.stub.Generate(request, timeout=5)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in info.value.details()
    assert not running.done() and not queued.done()  # refused at once, not once a place came free
    running.cancel()
    queued.cancel()


def test_a_cancelled_call_frees_its_queue_place_at_once(slow_server: Any) -> None:
    """The queue depth the front-end refuses on never counts a cancelled request: its place is
    free at the next step (the loop purges its queue at every step), not once a row frees."""
    s, worker = slow_server, worker_of(slow_server)
    request = pb.GenerateRequest(inputs=[SOURCES[0]], options=LONG)
    running, queued = fill(s, request)
    queued.cancel()
    s.wait_until(lambda: worker.queue_depth == 0)
    assert not running.done()  # 24 steps of 50 ms: the place came free long before a row did
    admitted = s.stub.Generate.future(request, timeout=TIMEOUT)
    s.wait_until(lambda: worker.queue_depth == 1)
    assert not admitted.done() and not running.done()
    running.cancel()
    admitted.cancel()


def test_a_worker_that_dies_fails_its_requests_and_is_replaced(slow_server: Any) -> None:
    s, worker = slow_server, worker_of(slow_server)
    old_pid = worker.pid
    assert old_pid is not None
    call = s.stub.Generate.future(pb.GenerateRequest(inputs=[SOURCES[0]], options=LONG), timeout=TIMEOUT)
    s.wait_until(lambda: worker.active_rows == 1)
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as info:
        call.result(TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "exited unexpectedly" in info.value.details()
    s.wait_until(lambda: worker.restarts == 1 and worker.pid != old_pid, timeout=TIMEOUT)
    result = s.stub.Generate(pb.GenerateRequest(inputs=[SOURCES[1]], options=pb.GenerationOptions(max_new_tokens=2)),
                             timeout=TIMEOUT)
    assert len(result.results[0].sequences[0].token_ids) <= 2
    assert not alive(old_pid)


def test_stopping_the_server_stops_the_worker(start_server: Callable[..., Any]) -> None:
    running = start_server(engine_core="process")
    pid = worker_of(running).pid
    assert pid is not None and alive(pid)
    running.close()
    assert not alive(pid)


def test_a_worker_that_cannot_load_the_model_is_a_startup_error(start_server: Callable[..., Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The server process checks the model directory; what only the worker can find out (here: a
    # device this build does not have) must still stop the start with the worker's reason.
    options = server_main.engine_core_options

    def on_cuda(config: Any) -> EngineCoreOptions:
        built = options(config)
        return dataclasses.replace(built, engine={**built.engine, "device": "cuda"})

    monkeypatch.setattr(server_main, "engine_core_options", on_cuda)
    if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
        pytest.skip("this ONNX Runtime build has CUDA")
    with pytest.raises(SeqserveError, match="--device cuda"):
        start_server(engine_core="process")


def test_the_worker_takes_the_engine_settings(start_server: Callable[..., Any], model_dir: Path,
                                              offline_engine: OnnxSeq2Seq) -> None:
    # The device-resident cache (forced on CPU) and spinning within a step only, in the worker.
    server = start_server(engine_core="process", io_binding="on", intra_op_spinning="run")
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    expected = greedy_generate(offline_engine, [encode_source(tokenizer, t) for t in SOURCES[:8]], max_new_tokens=24)
    response = server.stub.Generate(pb.GenerateRequest(inputs=SOURCES[:8]), timeout=TIMEOUT)
    assert [list(r.sequences[0].token_ids) for r in response.results] == expected
    assert worker_of(server).kv_cache_on_device
