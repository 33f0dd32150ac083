"""One request can never fail another, over the real gRPC server: options at their extremes and a
decoder step that fails for one request's rows leave every other request in the batch untouched;
the batch gauges go back to 0 once the server is idle."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from seqserve.model.data import dates_pairs
from seqserve.runtime.tokenizer import encode_source, load_tokenizer
from seqserve.proto import seqserve_pb2 as pb

TIMEOUT = 30.0  # seconds, on every call
SOURCES = [p.source for p in dates_pairs(16, seed=4321)]
LONG = pb.GenerationOptions(min_new_tokens=24, max_new_tokens=24)


def stream_ids(stub: Any, text: str) -> list[int]:
    """The streamed token ids of one text (raises the call's error)."""
    final = list(stub.GenerateStream(pb.GenerateStreamRequest(input=text, options=LONG), timeout=TIMEOUT))[-1]
    return list(final.result.sequences[0].token_ids)


def alone(server: Any, texts: list[str]) -> list[list[int]]:
    """Each text's tokens streamed alone, one call after another: what they get with no company."""
    return [stream_ids(server.stub, text) for text in texts]


def run_beside_streams(server: Any, wait_rows: Callable[[int], None], odd_one: Callable[[], Any]
                       ) -> tuple[list[Any], Any]:
    """Ten streams decoding, then `odd_one()` sent while they are in the batch: (stream outcomes, its outcome)."""
    with ThreadPoolExecutor(len(SOURCES[:10]) + 1) as pool:
        streams = [pool.submit(stream_ids, server.stub, text) for text in SOURCES[:10]]
        wait_rows(1)
        odd = pool.submit(odd_one)

        def outcome(future: Any) -> Any:
            try:
                return future.result(TIMEOUT)
            except grpc.RpcError as exc:
                return exc

        return [outcome(f) for f in streams], outcome(odd)


@pytest.mark.parametrize("which", ["thread", "worker"])
@pytest.mark.parametrize("length_penalty", [400.0, -1100.0])
def test_beam_options_at_their_extremes_fail_nobody(which: str, length_penalty: float, server: Any,
                                                    worker_server: Any) -> None:
    s = server if which == "thread" else worker_server
    scheduler = s.server.scheduler

    def wait_rows(n: int) -> None:
        s.wait_until(lambda: scheduler.active_rows >= n, timeout=TIMEOUT)

    def beam() -> pb.GenerateResponse:
        return s.stub.Generate(pb.GenerateRequest(inputs=["nov 25 2026"], options=pb.GenerationOptions(
            strategy=pb.STRATEGY_BEAM, num_beams=2, length_penalty=length_penalty)), timeout=TIMEOUT)

    if which == "thread":
        with s.slow_decode(0.01):  # the streams stay in the batch while the beam request joins it
            streams, odd = run_beside_streams(s, wait_rows, beam)
    else:
        streams, odd = run_beside_streams(s, wait_rows, beam)
    assert not isinstance(odd, grpc.RpcError), odd
    assert len(odd.results[0].sequences) == 1
    assert streams == alone(s, SOURCES[:10])


POISON = "9 " * 20  # a source longer than any date: its rows are the only ones of its length


def test_a_decoder_failure_bound_to_one_request_fails_it_alone(server: Any, model_dir: Path) -> None:
    """ONNX Runtime failing on one request's rows (injected here, outside the shipped code):
    that request gets INTERNAL, every other one its normal result."""
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    poison_len = len(encode_source(tokenizer, POISON))
    assert poison_len > max(len(encode_source(tokenizer, t)) for t in SOURCES)
    engine = server.scheduler.engine
    failures = threading.Event()
    with server.slow_decode(0.01):  # the streams stay in the batch while the poisoned request joins it
        slowed = engine.decode

        def decode(*args: Any) -> Any:
            source_mask: np.ndarray = args[7]
            if (source_mask.sum(axis=1) == poison_len).any():
                failures.set()
                raise Fail("injected: [ONNXRuntimeError] : 1 : FAIL : Non-zero status code")
            return slowed(*args)

        engine.decode = decode
        try:
            streams, odd = run_beside_streams(
                server, lambda n: server.wait_until(lambda: server.scheduler.active_rows >= n, timeout=TIMEOUT),
                lambda: server.stub.Generate(pb.GenerateRequest(inputs=[POISON], options=LONG), timeout=TIMEOUT))
        finally:
            engine.decode = slowed
    assert failures.is_set()
    assert isinstance(odd, grpc.RpcError) and odd.code() == grpc.StatusCode.INTERNAL
    assert "Fail" not in odd.details() and "ONNXRuntimeError" not in odd.details()
    assert streams == alone(server, SOURCES[:10])
    # And the server goes on serving.
    assert len(stream_ids(server.stub, SOURCES[11])) == 24


def gauge(server: Any, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", server.server.metrics.text(), re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_batch_gauges_return_to_zero_after_a_cancellation_burst(server: Any) -> None:
    with server.slow_decode(0.02):
        calls = [server.stub.GenerateStream(pb.GenerateStreamRequest(input=text, options=LONG), timeout=TIMEOUT)
                 for text in SOURCES[:11]]
        for call in calls:
            assert next(call).tokens
        assert gauge(server, "seqserve_active_rows") >= 1
        for call in calls:
            call.cancel()
        server.wait_until(lambda: server.scheduler.active_rows == 0, timeout=TIMEOUT)
    assert gauge(server, "seqserve_active_rows") == 0.0
    assert gauge(server, "seqserve_queue_depth") == 0.0
