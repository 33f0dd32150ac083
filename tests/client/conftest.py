"""Fixtures for the client tests: real seqserve servers on free loopback ports (in this process, on an
event-loop thread of their own; or as real processes that a test can kill), with the tiny trained
model, and a scripted fake servicer for the behaviours a real model cannot be made to show on cue."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.server.config import ServerConfig
from seqserve.server.testing import InProcessServer, loopback_config

TIMEOUT = 30.0  # seconds: the bound on any one wait in these tests


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "wheel: builds the wheel and installs it into a new virtual environment "
                                       "(needs the package index; deselect with -m 'not wheel')")


def server_config(model_dir: Path, **overrides: Any) -> ServerConfig:
    """The loopback test config (one ORT thread, quiet text logs), with overrides."""
    return loopback_config(model_dir, **overrides)


@pytest.fixture(scope="session")
def served(model_dir: Path) -> Iterator[InProcessServer]:
    """The default real server (batch 32, queue 128, 32 inputs per call)."""
    server = InProcessServer(server_config(model_dir))
    yield server
    server.close()


@pytest.fixture
def start_server(model_dir: Path) -> Iterator[Callable[..., InProcessServer]]:
    """Starts real in-process servers with config overrides; closes them at the end of the test."""
    started: list[InProcessServer] = []

    def start(**overrides: Any) -> InProcessServer:
        started.append(InProcessServer(server_config(model_dir, **overrides)))
        return started[-1]

    yield start
    for server in started:
        server.close()


class ServerProcess:
    """`seqserve serve` in a subprocess (a real replica to kill); logs go to a file."""

    def __init__(self, model_dir: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "seqserve.server.cli", "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0",
             "--intra-op-threads", "1", "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=self._log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.port = 0

    def wait_serving(self, timeout: float = TIMEOUT) -> int:
        """The port from the 'serving' log line (it is written once health is SERVING)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if record.get("event") == "serving":
                        self.port = int(record["port"])
                        return self.port
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        pytest.fail(f"server not serving within {timeout} s:\n{self.log_path.read_text()}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def server_process(model_dir: Path, tmp_path: Path) -> Iterator[Callable[[], ServerProcess]]:
    """Starts server processes; kills whichever still run at the end of the test."""
    started: list[ServerProcess] = []

    def start() -> ServerProcess:
        started.append(ServerProcess(model_dir, tmp_path / f"server{len(started)}.log"))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()


class FakeServicer(pb_grpc.SeqServeServicer):
    """A scripted SeqServe: slow answers, slow streams and chosen failures, recording cancellations."""

    def __init__(self) -> None:
        self.delay = 0.0  # Generate sleeps this long before answering
        self.piece_delay = 0.0  # GenerateStream sleeps this long before each piece
        self.pieces = 5
        self.abort: tuple[grpc.StatusCode, str] | None = None  # fail every call with this status
        self.cancelled = threading.Event()  # set when a call ended without completing
        self.metadata: list[tuple[str, str]] = []  # the last call's invocation metadata
        self.started = threading.Event()  # set when a call reaches the servicer
        # RESOURCE_EXHAUSTED for the next calls, one entry each: the grpc-retry-pushback-ms trailer
        # it carries (None: none); calls once the list is empty are answered normally.
        self.refusals: list[str | None] = []
        self.arrivals: list[float] = []  # time.monotonic() of every call reaching the servicer

    def _start(self, context: grpc.ServicerContext) -> dict[str, bool]:
        """Record the call; its returned state's "done" must be set once it completed normally."""
        self.arrivals.append(time.monotonic())
        self.metadata = [(m.key, m.value) for m in context.invocation_metadata()]
        self.started.set()
        state = {"done": False}
        context.add_callback(lambda: None if state["done"] else self.cancelled.set())  # runs when the RPC ends
        if self.refusals:
            state["done"] = True
            pushback = self.refusals.pop(0)
            if pushback is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", pushback),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "wait queue is full (fake)")
        if self.abort:
            state["done"] = True
            context.abort(*self.abort)
        return state

    def _sleep(self, seconds: float, context: grpc.ServicerContext) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and context.is_active():
            time.sleep(0.005)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        state = self._start(context)
        self._sleep(self.delay, context)
        state["done"] = context.is_active()
        return pb.GenerateResponse(
            results=[pb.InputResult(sequences=[pb.Sequence(text=text.upper(), finish_reason=pb.FINISH_REASON_EOS)])
                     for text in request.inputs],
            request_id=request.request_id or "fake", model_version="fake")

    def GenerateStream(self, request: pb.GenerateStreamRequest, context: grpc.ServicerContext
                       ) -> Iterator[pb.GenerateStreamResponse]:
        state = self._start(context)
        for i in range(self.pieces):
            self._sleep(self.piece_delay, context)
            yield pb.GenerateStreamResponse(tokens=[pb.TokenPiece(index=i, token_id=10 + i, text=str(i))])
        state["done"] = context.is_active()
        yield pb.GenerateStreamResponse(result=pb.InputResult(sequences=[pb.Sequence(text="".join(
            str(i) for i in range(self.pieces)), finish_reason=pb.FINISH_REASON_EOS)]), request_id="fake")


@pytest.fixture
def fake_server() -> Iterator[tuple[FakeServicer, str]]:
    """(the scripted servicer, its address) on a blocking grpc server with no health service."""
    servicer = FakeServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_SeqServeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)

