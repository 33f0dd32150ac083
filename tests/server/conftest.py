"""Fixtures for the gRPC server tests: real servers on free loopback ports, in this process (their
event loop on a thread of its own) so tests can look at the scheduler, with the real tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.server.config import ServerConfig
from seqserve.server.engine import OnnxSeq2Seq
from seqserve.server.main import create_server
from seqserve.server.scheduler import Scheduler

T = TypeVar("T")
TIMEOUT = 30.0  # seconds: the bound on any one wait in these tests


class RunningServer:
    """A server started by `create_server` on its own event-loop thread, with a blocking client channel."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        try:
            self.server, self.port = self.run(create_server(config))
        except BaseException:
            self._stop_loop()
            raise
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.SeqServeStub(self.channel)

    @property
    def scheduler(self) -> Scheduler:
        assert self.server.scheduler is not None
        return self.server.scheduler

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> float:
        """Poll until predicate() holds; returns the seconds it took (fails the test on timeout)."""
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout:
                pytest.fail(f"condition not met within {timeout} s")
            time.sleep(0.005)
        return time.monotonic() - start

    @contextlib.contextmanager
    def slow_decode(self, seconds: float) -> Iterator[None]:
        """Make every decoder step take at least `seconds`, so requests stay in the batch a while."""
        engine = self.scheduler.engine
        original = engine.decode

        def decode(*args: Any) -> Any:
            time.sleep(seconds)
            return original(*args)

        engine.decode = decode  # type: ignore[method-assign]
        try:
            yield
        finally:
            del engine.decode  # back to the class's method
            assert self.scheduler.wait_idle(TIMEOUT), "scheduler still busy after the test"

    def close(self) -> None:
        self.channel.close()
        with contextlib.suppress(Exception):
            self.run(self.server.stop(0))
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def server_config(model_dir: Path, **overrides: Any) -> ServerConfig:
    """Loopback, a free port, two ORT threads (the test machine has 2 cores), text logs."""
    return ServerConfig(**{"model_dir": model_dir, "host": "127.0.0.1", "port": 0, "intra_op_threads": 1,
                           "log_format": "text", **overrides})


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
