"""The client against a real server on loopback (the tiny trained model, real ONNX Runtime): unary,
many inputs, streaming, both clients, every exception type, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import grpc
import numpy as np
import pytest

from seqserve.client import (AsyncClient, Cancelled, Client, DeadlineExceeded, FinishReason, GenerationResult,
                             HealthStatus, InvalidArgument, ModelInfo, Overloaded, RetryPolicy, ServerError,
                             TokenPiece, Unavailable)
from seqserve.model.data import dates_pairs

INPUTS = [p.source for p in dates_pairs(40, seed=7)]
FAST_RETRY = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.02)  # still 5 attempts, less waiting
TIMEOUT = 30.0  # seconds: the bound on any one wait


@pytest.fixture(scope="module")
def client(served) -> Client:
    with Client(served.address, timeout=30) as c:
        yield c


def test_unary_one_input_returns_one_result(client: Client) -> None:
    result = client.generate("25 November 2026")
    assert isinstance(result, GenerationResult)
    assert result.text and result.finish_reason in (FinishReason.EOS, FinishReason.LENGTH)
    assert result.usage.input_tokens > 0 and result.usage.output_tokens == len(result.sequences[0].token_ids)
    assert result.timings.total_ms > 0 and result.request_id and len(result.model_version) == 12


def test_many_inputs_keep_their_order_and_match_one_by_one(client: Client) -> None:
    batch = client.generate(INPUTS[:5])
    assert [r.text for r in batch] == [client.generate(t).text for t in INPUTS[:5]]


def test_more_inputs_than_the_server_allows_are_split_across_calls(client: Client) -> None:
    info = client.model_info()
    texts = INPUTS[:info.limits.max_inputs_per_request + 8]  # 40 > 32
    results = client.generate(texts, request_id="bulk")
    assert len(results) == len(texts)
    assert {r.request_id for r in results} == {"bulk.0", "bulk.1"}
    assert [r.text for r in results[-3:]] == [r.text for r in client.generate(texts[-3:])]


def test_options_reach_the_server(client: Client) -> None:
    result = client.generate("nov 5 1999", max_new_tokens=3, return_log_probs=True, return_alignments=True)
    seq = result.sequences[0]
    assert seq.finish_reason is FinishReason.LENGTH and len(seq.token_ids) == 3
    assert len(seq.log_probs) == 3 and all(lp <= 0 for lp in seq.log_probs) and seq.score is not None
    assert isinstance(seq.alignments, np.ndarray) and seq.alignments.shape == (3, len(result.source_tokens))
    np.testing.assert_allclose(seq.alignments.sum(axis=1), 1.0, atol=1e-3)
    beams = client.generate("nov 5 1999", num_beams=3, num_return_sequences=2)
    assert len(beams.sequences) == 2 and beams.sequences[0].score >= beams.sequences[1].score
    a = client.generate("nov 5 1999", temperature=1.5, seed=3, num_return_sequences=2)
    b = client.generate("nov 5 1999", temperature=1.5, seed=3, num_return_sequences=2)
    assert [s.token_ids for s in a.sequences] == [s.token_ids for s in b.sequences]


def test_stream_yields_pieces_then_the_result_equal_to_unary(client: Client) -> None:
    text = INPUTS[0]
    items = list(client.generate_stream(text, return_log_probs=True))
    pieces, final = items[:-1], items[-1]
    assert pieces and all(isinstance(p, TokenPiece) for p in pieces) and isinstance(final, GenerationResult)
    assert [p.index for p in pieces] == list(range(len(pieces)))
    assert "".join(p.text for p in pieces) == final.text == client.generate(text).text
    assert [p.token_id for p in pieces] == list(final.sequences[0].token_ids)
    assert [p.log_prob for p in pieces] == pytest.approx(final.sequences[0].log_probs)


def test_model_info_and_health(client: Client) -> None:
    info = client.model_info()
    assert isinstance(info, ModelInfo) and info.vocab_size > 0 and info.max_source_len > 0
    assert "CPUExecutionProvider" in info.providers and info.decoder_sha256.startswith(info.model_version)
    assert client.health() is HealthStatus.SERVING
    assert client.health("") is HealthStatus.SERVING
    assert client.health("no.such.Service") is HealthStatus.SERVICE_UNKNOWN
    client.wait_ready(timeout=5)


def test_async_client_does_the_same(served) -> None:
    built_outside_the_loop = AsyncClient(served.address)  # its channel is made by the first call

    async def main() -> None:
        async with built_outside_the_loop as client:
            assert await client.health() is HealthStatus.SERVING
            results = await client.generate(INPUTS[:36])  # split in two calls, sent together
            assert len(results) == 36
            single = await client.generate(INPUTS[3])
            assert single.text == results[3].text
            items = [item async for item in client.generate_stream(INPUTS[3])]
            assert "".join(i.text for i in items[:-1]) == items[-1].text == single.text
            concurrent = await asyncio.gather(*(client.generate(t) for t in INPUTS[:16]))
            assert [r.text for r in concurrent] == [r.text for r in results[:16]]
            assert (await client.model_info()).vocab_size > 0
            with pytest.raises(InvalidArgument, match="empty"):
                await client.generate("")
            with pytest.raises(InvalidArgument):
                async for _ in client.generate_stream("x", max_new_tokens=10_000):
                    pass

    asyncio.run(main())


# -- errors --------------------------------------------------------------------------------

def test_invalid_argument_carries_the_servers_message_and_request_id(client: Client) -> None:
    with pytest.raises(InvalidArgument, match=r"max_new_tokens: 10000 is over the limit") as info:
        client.generate("nov 5 1999", max_new_tokens=10_000, request_id="bad-1")
    assert info.value.request_id == "bad-1"
    with pytest.raises(InvalidArgument, match="inputs"):
        client.generate(["ok", ""])
    with pytest.raises(InvalidArgument, match="top_p"):
        client.generate("x", top_p=1.5)
    with pytest.raises(InvalidArgument):  # in a stream, raised while iterating
        list(client.generate_stream("x" * 500))


def test_overloaded_when_the_queue_is_full(start_server) -> None:
    server = start_server(max_batch_size=1, max_queue=1)

    async def flood() -> list:  # refusals reported at once, not retried after the server's pushback
        async with AsyncClient(server.address, retry=RetryPolicy(retry_overloaded=False)) as client:
            return await asyncio.gather(*(client.generate(t, timeout=30) for t in INPUTS[:24]),
                                        return_exceptions=True)

    outcomes = asyncio.run(flood())
    overloaded = [o for o in outcomes if isinstance(o, Overloaded)]
    assert overloaded, outcomes
    assert "queue is full" in overloaded[0].details
    assert all(isinstance(o, (GenerationResult, Overloaded)) for o in outcomes), outcomes


def test_deadline_exceeded_per_call_and_by_default(served, fake_server) -> None:
    servicer, address = fake_server
    servicer.delay = 2 * TIMEOUT  # the fake answers only once the call is over
    with Client(address, timeout=0.1) as slow:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            slow.generate("x")  # the client's default timeout
        with pytest.raises(DeadlineExceeded):
            slow.generate("x", timeout=0.05)
        assert time.monotonic() - start < servicer.delay  # both gave up instead of waiting for an answer
        servicer.delay = 0.5  # beyond the default timeout of 0.1 s, on any machine
        assert slow.generate("x", timeout=TIMEOUT, max_new_tokens=1).text == "X"  # a longer per-call timeout wins
    servicer.delay, servicer.piece_delay = 0.0, 0.5
    with Client(address) as slow, pytest.raises(DeadlineExceeded):
        list(slow.generate_stream("x", timeout=0.2))
    with Client(served.address) as client, pytest.raises(DeadlineExceeded):
        client.generate(INPUTS[0], timeout=1e-6)  # the real server: expired before it could answer


def test_unavailable_when_nothing_listens_and_when_draining(start_server) -> None:
    with Client("127.0.0.1:1", timeout=10, retry=FAST_RETRY) as nowhere:
        with pytest.raises(Unavailable):
            nowhere.generate("x")
        with pytest.raises(Unavailable):
            nowhere.health()
        with pytest.raises(DeadlineExceeded, match="not SERVING"):
            nowhere.wait_ready(timeout=0.3)
    server = start_server()
    server.server.service.start_draining()  # what SIGTERM does first: new calls get UNAVAILABLE
    with Client(server.address, retry=FAST_RETRY) as client, pytest.raises(Unavailable, match="shutting down"):
        client.generate("x")


def test_cancelled_when_the_channel_closes_under_a_call(fake_server) -> None:
    servicer, address = fake_server
    servicer.delay = 5.0
    client = Client(address)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.generate("x")
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert servicer.started.wait(TIMEOUT)  # the call is in flight
    client.close()
    thread.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled), outcome
    assert servicer.cancelled.wait(3)  # the server saw the call go


def test_other_statuses_are_server_errors(fake_server) -> None:
    servicer, address = fake_server
    with Client(address) as client:
        with pytest.raises(ServerError) as info:
            client.health()  # the fake server has no health service
        assert info.value.code == grpc.StatusCode.UNIMPLEMENTED
        servicer.abort = (grpc.StatusCode.INTERNAL, "internal error (request id r1)")
        with pytest.raises(ServerError, match="internal error") as info:
            client.generate("x")
        assert info.value.code == grpc.StatusCode.INTERNAL


def test_leaving_a_stream_early_cancels_the_call(fake_server) -> None:
    servicer, address = fake_server
    servicer.pieces, servicer.piece_delay = 50, 0.05
    with Client(address) as client:
        stream = client.generate_stream("x")
        first = next(stream)
        assert isinstance(first, TokenPiece) and first.text == "0"
        stream.close()  # what leaving a for loop does once the generator is dropped
        assert servicer.cancelled.wait(3)


def test_async_stream_left_early_is_cancelled(fake_server) -> None:
    servicer, address = fake_server
    servicer.pieces, servicer.piece_delay = 50, 0.05

    async def main() -> None:
        async with AsyncClient(address) as client:
            async with contextlib.aclosing(client.generate_stream("x")) as stream:
                async for item in stream:
                    assert isinstance(item, TokenPiece)
                    break

    asyncio.run(main())
    assert servicer.cancelled.wait(3)


def test_metadata_and_token_are_sent(fake_server) -> None:
    servicer, address = fake_server
    with Client(address, auth_token="t0k", metadata={"X-Team": "dates"}) as client:
        client.generate("x", metadata=[("x-call", "1")])
    assert ("authorization", "Bearer t0k") in servicer.metadata
    assert ("x-team", "dates") in servicer.metadata and ("x-call", "1") in servicer.metadata
