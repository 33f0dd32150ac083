"""Fixtures for the gRPC server tests: real servers on free loopback ports, in this process (their
event loop on a thread of its own) so tests can look at the scheduler, with the real tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.server.config import ServerConfig
from seqserve.runtime.engine import OnnxSeq2Seq
from seqserve.server.testing import InProcessServer, loopback_config

TIMEOUT = 30.0  # seconds: the bound on any one wait in these tests


class StepCounter:
    """Decoder steps run while `RunningServer.slow_decode` is on."""

    steps = 0


class RunningServer(InProcessServer):
    """An in-process server with a blocking client channel and helpers to steer its decoding."""

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config, timeout=TIMEOUT)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.SeqServeStub(self.channel)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> float:
        """Poll until predicate() holds; returns the seconds it took (fails the test on timeout)."""
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout:
                pytest.fail(f"condition not met within {timeout} s")
            time.sleep(0.005)
        return time.monotonic() - start

    @contextlib.contextmanager
    def slow_decode(self, seconds: float) -> Iterator[StepCounter]:
        """Make every decoder step take at least `seconds`, so requests stay in the batch a while.

        Yields the count of decoder steps run meanwhile: tests that a row left the batch early
        compare steps, which do not depend on how fast the machine is.
        """
        engine = self.scheduler.engine
        original = engine.decode
        counter = StepCounter()

        def decode(*args: Any) -> Any:
            time.sleep(seconds)
            counter.steps += 1
            return original(*args)

        engine.decode = decode  # type: ignore[method-assign]
        try:
            yield counter
        finally:
            del engine.decode  # back to the class's method
            assert self.scheduler.wait_idle(TIMEOUT), "scheduler still busy after the test"

    def close(self) -> None:
        self.channel.close()
        super().close()


def server_config(model_dir: Path, **overrides: Any) -> ServerConfig:
    """The loopback test config, with info-level text logs (some tests read the request log lines)."""
    return loopback_config(model_dir, **{"log_level": "info", **overrides})


@pytest.fixture(scope="session")
def make_config(model_dir: Path) -> Callable[..., ServerConfig]:
    """`server_config` for the test model, taking overrides."""
    return lambda **overrides: server_config(model_dir, **overrides)


@pytest.fixture(scope="session")
def server(model_dir: Path) -> Iterator[RunningServer]:
    """The default server: batch 32, queue 128, 64 inputs per call, 64 KiB messages."""
    running = RunningServer(server_config(model_dir, max_inputs_per_request=64, max_message_bytes=64 * 1024))
    yield running
    running.close()


@pytest.fixture(scope="session")
def tiny_server(model_dir: Path) -> Iterator[RunningServer]:
    """A server with one batch row and one queue slot, to fill up on purpose."""
    running = RunningServer(server_config(model_dir, max_batch_size=1, max_queue=1))
    yield running
    running.close()


@pytest.fixture(scope="session")
def offline_engine(model_dir: Path) -> OnnxSeq2Seq:
    """An engine of its own, for offline reference outputs."""
    return OnnxSeq2Seq(model_dir, device="cpu", intra_op_threads=1)


@pytest.fixture(scope="session")
def grouping_server(model_dir: Path) -> Iterator[RunningServer]:
    """A server that streams the first token at once, then three tokens per message."""
    running = RunningServer(server_config(model_dir, stream_interval=3))
    yield running
    running.close()


@pytest.fixture(scope="session")
def worker_server(model_dir: Path) -> Iterator[RunningServer]:
    """A server decoding in an engine core process of its own (`--engine-core process`)."""
    running = RunningServer(server_config(model_dir, engine_core="process"))
    yield running
    running.close()


@pytest.fixture
def start_server(model_dir: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start servers with config overrides; each is closed when the test ends."""
    started: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        started.append(RunningServer(server_config(model_dir, **overrides)))
        return started[-1]

    yield start
    for running in started:
        running.close()


# -- `seqserve serve` as a real process (signals, exit codes, its log) ----------------------------

SEQSERVE = [sys.executable, "-m", "seqserve.server.cli"]


class ServeProcess:
    """`seqserve serve` in a subprocess; its stderr (JSON log lines) is read on a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*SEQSERVE, "serve", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)

    def wait_for_event(self, event: str, timeout: float = TIMEOUT) -> dict:
        """The first JSON log record with this `event` field."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    pytest.fail(f"server exited with {self.proc.returncode}:\n{''.join(self.log)}")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == event:
                return record
        pytest.fail(f"no {event!r} log line within {timeout} s:\n{''.join(self.log)}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def serve_process() -> Iterator[Callable[..., Any]]:
    """Starts `seqserve serve` processes; kills whichever are still running at the end."""
    started: list[Any] = []

    def start(*args: str, cls: type = ServeProcess) -> Any:
        """`seqserve serve ARGS` as `cls` (ServeProcess, or a test's own kind with `kill()`)."""
        started.append(cls(*args))
        return started[-1]

    yield start
    for process in started:
        process.kill()
