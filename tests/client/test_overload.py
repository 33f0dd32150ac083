"""Overload, end to end: gRPC's concurrent call limit refuses calls beyond it before any handler runs
and the server goes on serving; a full queue's RESOURCE_EXHAUSTED carries a `grpc-retry-pushback-ms`
trailer; the client library waits as long as a pushback says before it retries, and does not retry
when the pushback is negative or malformed.

Timing is only ever asserted as a lower bound (a retry came at least the pushback after the refusal),
which a slow machine cannot break; everything else waits on events, each wait bounded."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqserve.client import AsyncClient, Client, GenerationResult, Overloaded, RetryPolicy
from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.runtime import errors
from seqserve.server.service import PUSHBACK_KEY, SeqServeService

TIMEOUT = 30.0  # seconds: the bound on any one wait
QUICK_BACKOFF = RetryPolicy(initial_backoff_s=0.005, max_backoff_s=0.005)  # without a pushback: ~5 ms between tries
SOURCE = "nov 5 1999"


def status_of(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"not within {TIMEOUT} s: {what}"
        time.sleep(0.005)


# -- the client honours the pushback (a scripted server) -----------------------------------------

def test_a_pushback_overrides_the_backoff(fake_server) -> None:
    servicer, address = fake_server
    servicer.refusals = ["400", "250"]  # 80 and 50 times the backoff
    with Client(address, timeout=TIMEOUT, retry=QUICK_BACKOFF) as client:
        assert client.generate("abc").text == "ABC"  # the third try is answered
    first, second, third = servicer.arrivals
    assert second - first >= 0.4 and third - second >= 0.25  # each retry waited what its refusal said


def test_a_stream_refused_before_its_first_message_is_retried_after_the_pushback(fake_server) -> None:
    servicer, address = fake_server
    servicer.refusals = ["300"]

    async def go() -> list[Any]:
        async with AsyncClient(address, timeout=TIMEOUT, retry=QUICK_BACKOFF) as client:
            return [item async for item in client.generate_stream("abc")]

    items = asyncio.run(go())
    assert isinstance(items[-1], GenerationResult) and items[-1].text == "01234"
    first, second = servicer.arrivals
    assert second - first >= 0.3


def test_without_a_pushback_a_refusal_is_retried_with_the_backoff(fake_server) -> None:
    servicer, address = fake_server
    servicer.refusals = [None, None]  # no trailer: RESOURCE_EXHAUSTED is still retryable
    with Client(address, timeout=TIMEOUT, retry=QUICK_BACKOFF) as client:
        assert client.generate("abc").text == "ABC"
    assert len(servicer.arrivals) == 3


@pytest.mark.parametrize("pushback", ["-1", "-250", "soon", "1.5", ""])
def test_a_negative_or_malformed_pushback_means_do_not_retry(fake_server, pushback: str) -> None:
    servicer, address = fake_server
    servicer.refusals = [pushback] * 5
    with Client(address, timeout=TIMEOUT, retry=QUICK_BACKOFF) as client, \
            pytest.raises(Overloaded, match="queue is full"):
        client.generate("abc")
    assert len(servicer.arrivals) == 1  # refused once, never sent again


def test_overloaded_calls_are_not_retried_when_the_policy_says_so(fake_server) -> None:
    servicer, address = fake_server
    servicer.refusals = ["1"] * 5
    with Client(address, timeout=TIMEOUT, retry=RetryPolicy(retry_overloaded=False)) as client, \
            pytest.raises(Overloaded):
        client.generate("abc")
    assert len(servicer.arrivals) == 1


# -- the server: pushback and the concurrent call limit ------------------------------------------

@pytest.fixture
def raw_channel() -> Iterator[Callable[[str], grpc.Channel]]:
    """Plain channels (no service config: no retries, no health watch of their own)."""
    opened: list[grpc.Channel] = []

    def open_channel(address: str) -> grpc.Channel:
        opened.append(grpc.insecure_channel(address))
        return opened[-1]

    yield open_channel
    for channel in opened:
        channel.close()


def test_a_full_queue_answers_with_a_pushback_that_the_client_waits_for(start_server, raw_channel) -> None:
    server = start_server(max_batch_size=1, max_queue=1)
    service: SeqServeService = server.server.service
    refusals: list[tuple[float, int]] = []  # (when, the pushback it carried)
    pushback_ms = service.pushback_ms

    def recorded(error: errors.ServingError, remaining_s: float | None) -> int:
        value = pushback_ms(error, remaining_s)
        refusals.append((time.monotonic(), value))
        return value

    service.pushback_ms = recorded  # type: ignore[method-assign]
    engine = server.scheduler.engine
    gate = threading.Event()  # closed: the one row stays in its first decoder step
    decode = engine.decode

    def gated(*args: Any) -> Any:
        gate.wait(TIMEOUT)
        return decode(*args)

    engine.decode = gated
    stub = pb_grpc.SeqServeStub(raw_channel(server.address))
    request = pb.GenerateRequest(inputs=[SOURCE])
    try:
        running = stub.Generate.future(request, timeout=TIMEOUT)
        wait_until(lambda: server.scheduler.active_rows == 1, "the first call in the batch")
        queued = stub.Generate.future(request, timeout=TIMEOUT)
        wait_until(lambda: server.scheduler.queue_depth == 1, "the second call queued")

        error = status_of(lambda: stub.Generate(request, timeout=TIMEOUT))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in error.details()
        trailers = dict(error.trailing_metadata())
        assert int(trailers[PUSHBACK_KEY]) > 0 and trailers["x-request-id"]
        assert [value for _, value in refusals] == [int(trailers[PUSHBACK_KEY])]

        refusals.clear()
        with Client(server.address, timeout=TIMEOUT) as client, pytest.raises(Overloaded, match="queue is full"):
            client.generate(SOURCE)  # the queue stays full: every try is refused, then the last refusal raised
        assert len(refusals) == 5  # the policy's attempts
        for (refused, pushback), (retried, _) in zip(refusals, refusals[1:]):
            assert pushback > 0 and retried - refused >= pushback / 1e3  # each retry waited its pushback
    finally:
        gate.set()
        del engine.decode
    assert running.result(TIMEOUT).results and queued.result(TIMEOUT).results  # held calls finish normally
    with Client(server.address, timeout=TIMEOUT) as client:
        assert client.generate(SOURCE).text


def test_pushback_rule() -> None:
    service = SeqServeService.__new__(SeqServeService)  # the rule needs only the measured queue wait
    service.queue_wait_s = None
    overloaded = errors.Overloaded("wait queue is full")
    assert all(50 <= service.pushback_ms(overloaded, None) <= 150 for _ in range(50))  # 100 ms before any measure
    service.queue_wait_s = 0.4
    values = [service.pushback_ms(overloaded, 30.0) for _ in range(200)]
    assert all(200 <= v <= 600 for v in values) and max(values) - min(values) > 100  # spread, not all at once
    assert service.pushback_ms(overloaded, 0.7) == -1  # the wait and a queue turn do not fit in the deadline
    service.queue_wait_s = 0.0
    assert 5 <= service.pushback_ms(overloaded, None) <= 15  # at least 10 ms
    service.queue_wait_s = 3600.0
    assert service.pushback_ms(overloaded, None) <= 15_000  # at most 10 s
    estimated = errors.Overloaded("the queue ahead is too long", 1.0)  # the scheduler's estimate of the wait
    assert all(500 <= service.pushback_ms(estimated, 30.0) <= 1500 for _ in range(50))
    assert service.pushback_ms(estimated, 1.5) == -1  # refused for its deadline: a retry could not make it
    assert 5000 <= service.pushback_ms(errors.Overloaded("full", 0.0), None) <= 15_000  # 0: no estimate: the average
    assert service.pushback_ms(errors.Overloaded("full", -1.0), None) == -1  # retrying cannot help


def test_the_concurrent_call_limit_refuses_beyond_it_and_the_server_goes_on(start_server, raw_channel) -> None:
    server = start_server(max_concurrent_rpcs=2)
    channel = raw_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    stub = pb_grpc.SeqServeStub(channel)
    request = pb.GenerateRequest(inputs=[SOURCE])
    watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT) for _ in range(2)]
    for watch in watches:  # both running on the server: the limit is reached
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

    error = status_of(lambda: stub.Generate(request, timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Concurrent RPC limit" in error.details()
    assert PUSHBACK_KEY not in dict(error.trailing_metadata() or ())  # gRPC's answer: no handler ran
    error = status_of(lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # health calls count, and are refused too

    watches[0].cancel()  # a place comes free once the server has seen the cancellation
    outcome: list[Any] = []

    def try_generate() -> bool:
        try:
            outcome.append(stub.Generate(request, timeout=TIMEOUT))
            return True
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            return False

    wait_until(try_generate, "a call answered once a place came free")
    watches[1].cancel()
    for _ in range(3):  # and it goes on serving (a call can still meet the place of the last one not yet freed)
        wait_until(try_generate, "the next call answered")
    assert len(outcome) == 4 and all(r.results[0].sequences[0].text for r in outcome)
