"""A real seqserve server inside the calling process, for tests (ours, and those of services that
call seqserve): `create_server` runs on an event loop of its own thread, so blocking test code can
call it over loopback and still look at its scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from seqserve.server.config import ServerConfig
from seqserve.server.main import SeqServeServer, create_server
from seqserve.server.scheduler import Scheduler

T = TypeVar("T")


def loopback_config(model_dir: str | Path, **overrides: Any) -> ServerConfig:
    """127.0.0.1, a free port, one ONNX Runtime thread, quiet text logs; overrides on top."""
    return ServerConfig(**{"model_dir": model_dir, "host": "127.0.0.1", "port": 0, "intra_op_threads": 1,
                           "log_format": "text", "log_level": "warning", **overrides})


class InProcessServer:
    """A started server (health SERVING once the constructor returns); `close()` stops it."""

    def __init__(self, config: ServerConfig, *, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="seqserve-in-process", daemon=True)
        self.thread.start()
        try:
            self.server: SeqServeServer
            self.server, self.port = self.run(create_server(config))
        except BaseException:
            self._stop_loop()
            raise
        self.address = f"127.0.0.1:{self.port}"

    @property
    def scheduler(self) -> Scheduler:
        """The in-process scheduler (with `worker_process="off"`, the default here)."""
        assert isinstance(self.server.scheduler, Scheduler), "worker_process is on: the scheduler is a process"
        return self.server.scheduler

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout or self.timeout)

    def close(self) -> None:
        """Stop the server at once, then its loop (again: nothing)."""
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self.run(self.server.stop(0))
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
