"""Per-connection limits a hostile client cannot push past, against real servers on loopback: calls at
once on one connection (`--max-concurrent-streams`: a gRPC client's further calls wait their turn,
a raw HTTP/2 client that ignores the limit has the extra streams refused), the size of one call's
metadata (`--max-metadata-bytes`) and of a request message, compressed or not
(`--max-message-bytes`); after each, the server goes on serving."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.server.config import ConfigError, ServerConfig, parse_args

TIMEOUT = 30.0
FORCED = pb.GenerationOptions(min_new_tokens=8, max_new_tokens=8)  # 8 decoder steps per call


def answered(address: str) -> bool:
    """A normal call on a connection of its own is answered."""
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.SeqServeStub(channel).Generate(pb.GenerateRequest(inputs=["1 May 2000"]), timeout=TIMEOUT)
    return bool(response.results[0].sequences[0].token_ids)


class PeakInFlight:
    """The most calls the service had in flight at once, sampled on a thread while the block runs."""

    def __init__(self, running: Any) -> None:
        self.running = running
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.running.server.service.in_flight)
            time.sleep(0.0005)

    def __enter__(self) -> PeakInFlight:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)


def test_limit_settings_defaults_and_bounds() -> None:
    config = parse_args(["/model"], environ={})
    assert config.max_concurrent_streams == 256 and config.max_metadata_bytes == 8192
    # Above what a server admits by default (batch 32 + queue 128), so one client alone is refused by
    # the queue with RESOURCE_EXHAUSTED, not held back by its connection.
    assert config.max_concurrent_streams > config.max_batch_size + config.max_queue
    config = parse_args(["/model", "--max-concurrent-streams", "8"], environ={"SEQSERVE_MAX_METADATA_BYTES": "4096"})
    assert (config.max_concurrent_streams, config.max_metadata_bytes) == (8, 4096)
    for field, value in (("max_concurrent_streams", 0), ("max_metadata_bytes", 100)):
        with pytest.raises(ConfigError, match=field):
            ServerConfig("/model", **{field: value})


# A stream the client opens just as another one closes can still count against the server's limit
# and be refused (HTTP/2 REFUSED_STREAM, which gRPC reports as UNAVAILABLE): such a call never
# reached the server, and clients retry it (the client library does; so does this channel).
RETRY_REFUSED = json.dumps({"methodConfig": [{"name": [{"service": "seqserve.v1.SeqServe"}], "retryPolicy": {
    "maxAttempts": 5, "initialBackoff": "0.01s", "maxBackoff": "0.1s", "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"]}}]})


def test_more_calls_than_the_stream_limit_on_one_connection_wait_their_turn(start_server: Callable[..., Any]) -> None:
    running = start_server(max_concurrent_streams=2)
    channel = grpc.insecure_channel(running.address, options=[("grpc.service_config", RETRY_REFUSED)])
    stub = pb_grpc.SeqServeStub(channel)
    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)  # the connection's settings are agreed first
    request = pb.GenerateRequest(inputs=["1 May 2000"], options=FORCED)
    with channel, running.slow_decode(0.05), PeakInFlight(running) as peak:
        calls = [stub.Generate.future(request, timeout=TIMEOUT) for _ in range(6)]
        running.wait_until(lambda: running.server.service.in_flight == 2, TIMEOUT)
        # Another connection is not held back by this one's limit (a call without decoding, so it
        # is answered while the first connection's calls still wait their turn).
        with grpc.insecure_channel(running.address) as other:
            assert pb_grpc.SeqServeStub(other).GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT).HasField("limits")
        assert sum(c.done() for c in calls) < 6
        results = [c.result(TIMEOUT) for c in calls]
    assert all(len(r.results[0].sequences[0].token_ids) == 8 for r in results)
    # The one connection's 2, and at most the other connection's call beside them.
    assert 2 <= peak.peak <= 3, f"{peak.peak} calls in flight at once: the limit did not hold"


# -- a raw HTTP/2 client that ignores the server's SETTINGS ---------------------------------------

def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman (short strings only)."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def _read_frame(sock: socket.socket) -> tuple[int, int, int, bytes]:
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    head = exactly(9)
    length = int.from_bytes(head[:3], "big")
    return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, exactly(length)


SETTINGS, HEADERS, DATA, RST_STREAM, GOAWAY = 0x4, 0x1, 0x0, 0x3, 0x7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def test_a_client_ignoring_the_stream_limit_gets_no_more_calls_in(start_server: Callable[..., Any]) -> None:
    running = start_server(max_concurrent_streams=2)
    message = pb.GenerateRequest(inputs=["1 May 2000"], options=FORCED).SerializeToString()
    body = b"\x00" + struct.pack(">I", len(message)) + message
    headers = b"".join(_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", "/seqserve.v1.SeqServe/Generate"),
        (":authority", running.address), ("content-type", "application/grpc"), ("te", "trailers")))
    with running.slow_decode(0.05), PeakInFlight(running) as peak, \
            socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(SETTINGS, 0, 0))
        while True:  # the server's SETTINGS (with its limit): acknowledged, so it applies, then ignored
            kind, flags, _, _ = _read_frame(sock)
            if kind == SETTINGS and not flags & ACK:
                sock.sendall(_frame(SETTINGS, ACK, 0))
                break
        sock.sendall(b"".join(_frame(HEADERS, END_HEADERS, stream, headers) + _frame(DATA, END_STREAM, stream, body)
                              for stream in range(1, 2 * 8, 2)))  # 8 streams at once
        refused, goaway = set(), False
        try:
            while len(refused) < 6 and not goaway:
                kind, _, stream, _ = _read_frame(sock)
                refused |= {stream} if kind == RST_STREAM else set()
                goaway = kind == GOAWAY
        except (ConnectionError, TimeoutError):
            goaway = True  # the connection was closed on it: as good
    # The first two streams are taken; the other six are refused (RST_STREAM), or, should gRPC ever
    # choose so, the connection is closed.
    assert refused == set(range(5, 2 * 8, 2)) or goaway, f"refused {sorted(refused)}: the limit did not hold"
    assert peak.peak <= 2, "a client that ignores the limit got more calls in flight than it"
    assert answered(running.address)


# -- metadata and message sizes -----------------------------------------------------------------

def test_metadata_over_the_limit_is_refused_and_the_server_goes_on(start_server: Callable[..., Any]) -> None:
    running = start_server(max_metadata_bytes=4096)
    request = pb.GenerateRequest(inputs=["1 May 2000"])
    stub = running.stub
    assert stub.Generate(request, metadata=(("x-pad", "a" * 3000),), timeout=TIMEOUT).results  # under it: fine
    for metadata in ((("x-pad", "a" * 6000),), tuple((f"x-pad-{i}", "a" * 100) for i in range(60))):
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request, metadata=metadata, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
        assert "metadata size exceeds" in info.value.details() and "aaaa" not in info.value.details()
        assert running.server.service.in_flight == 0
        assert stub.Generate(request, timeout=TIMEOUT).results  # the same connection goes on
    assert answered(running.address)


@pytest.mark.parametrize("compression", [grpc.Compression.NoCompression, grpc.Compression.Gzip],
                         ids=["plain", "gzip"])
def test_request_over_the_message_limit_is_refused_even_compressed(start_server: Callable[..., Any],
                                                                   compression: grpc.Compression) -> None:
    # 64 KiB: a 1 MB request is refused, and so is the same request gzipped to about 1 KB (the limit
    # applies to the message as decompressed, so a small compressed bomb cannot get past it).
    running = start_server(max_message_bytes=64 * 1024)
    big = pb.GenerateRequest(inputs=["1 May 2000 " * 10] * 10_000)
    assert big.ByteSize() > 1_000_000
    with pytest.raises(grpc.RpcError) as info:
        running.stub.Generate(big, compression=compression, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    assert running.stub.Generate(pb.GenerateRequest(inputs=["1 May 2000"]), compression=compression,
                                 timeout=TIMEOUT).results
    assert answered(running.address)
