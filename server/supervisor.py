"""`seqserve serve --frontends N` with N > 1: the supervisor process.

It holds no gRPC and decodes nothing. It checks the model directory once, starts the engine core
(`EngineCoreProcess`) and N front-end processes (`python -m seqserve.server.supervisor
--frontend`), each a whole gRPC server (`serve`) on the same port (SO_REUSEPORT: the kernel spreads
new connections between them) that feeds the one engine core over its Unix socket. Then:

- start: the front-ends warm up, NOT_SERVING, and turn SERVING together once all of them are ready;
- a front-end that dies is started again (the calls it held fail with UNAVAILABLE: their
  connections break; the engine core drops its rows); the engine core is restarted by its handle
  the same way, and every front-end reconnects to it;
- SIGTERM or SIGINT: every front-end drains (health NOT_SERVING, calls in flight finish within the
  grace period), then the engine core stops; the exit status is 0, or 3 when a front-end had to
  cut calls (`EXIT_DRAIN_CUT_SHORT`); SIGHUP goes on to the front-ends (token rotation);
- metrics: the front-ends write theirs with prometheus-client's multiprocess mode into a private
  directory, and the supervisor serves their sum on `--metrics-port` (the engine core's step
  figures arrive through one front-end, so they are counted once).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from seqserve.runtime.errors import SeqserveError
from seqserve.runtime.model_dir import open_model_dir
from seqserve.server.config import ServerConfig, describe_layout
from seqserve.server.engine_core import EngineCoreProcess
from seqserve.server.main import EXIT_DRAIN_CUT_SHORT, FRONTEND_WARM, SUPERVISOR_SERVE, engine_core_options, serve

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # a front-end from spawn to warm
STOP_MARGIN_S = 15.0  # after the grace period: the front-ends' own flush and exit, then they are killed
MAX_QUICK_DEATHS = 3  # a front-end that dies this many times in a row before it is warm: give up


@dataclasses.dataclass
class _FrontEnd:
    index: int
    process: subprocess.Popen[bytes]
    status: Connection
    started: float
    warm: bool = False
    serving: bool = False
    exit_code: int | None = None


class Supervisor:
    """The engine core and the front-ends of one server, and what happens to them."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.count = int(config.frontends)
        self.frontends: list[_FrontEnd] = []
        self.engine = EngineCoreProcess(engine_core_options(config), on_lost=self._engine_lost)
        self.metrics_dir = tempfile.mkdtemp(prefix="seqserve-metrics-")
        self.port = config.port
        self._reserved: socket.socket | None = None
        self._lost: str | None = None
        self._signals: list[int] = []
        self._quick_deaths = 0
        self._metrics_http: Any = None

    # -- start ----------------------------------------------------------------------------------

    def reserve_port(self) -> None:
        """With --port 0, pick the free port every front-end then binds (a socket kept open on it,
        never listening, so nothing else takes it meanwhile)."""
        if self.port:
            return
        host = self.config.host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
        self._reserved, self.port = sock, sock.getsockname()[1]

    def spawn(self, index: int) -> _FrontEnd:
        config = dataclasses.replace(self.config, port=self.port, metrics_port=0, engine_address=self.engine.address)
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        fields["model_dir"] = str(fields["model_dir"])
        ours, theirs = socket.socketpair()
        os.set_inheritable(theirs.fileno(), True)
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "seqserve.server.supervisor", "--frontend", "--status-fd", str(theirs.fileno()),
                 "--config", json.dumps(fields)], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        return _FrontEnd(index, process, Connection(ours.detach()), time.monotonic())

    def serve_metrics(self) -> int:
        if not self.config.metrics_port:
            return 0
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.metrics_dir)
        try:
            self._metrics_http, _ = start_http_server(self.config.metrics_port,
                                                      addr=self.config.metrics_address_host.strip("[]"),
                                                      registry=registry)
        except OSError as exc:
            raise SeqserveError(f"cannot serve metrics on {self.config.metrics_address_host} port "
                                f"{self.config.metrics_port}: {exc.strerror or exc}") from None
        return int(self._metrics_http.server_port)

    # -- events ---------------------------------------------------------------------------------

    def _engine_lost(self, reason: str) -> None:  # the engine core's watcher thread
        self._lost = reason
        with contextlib.suppress(OSError):
            os.kill(os.getpid(), signal.SIGTERM)  # wakes the main loop, which stops everything

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _exited(self, fe: _FrontEnd, draining: bool) -> _FrontEnd | None:
        """A front-end's status connection closed: it exited. Returns its replacement, if any."""
        fe.exit_code = fe.process.wait()
        fe.status.close()
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(fe.process.pid, self.metrics_dir)  # its live gauges go
        if draining:
            return None
        if not fe.warm:
            self._quick_deaths += 1
            if not any(f.serving for f in self.frontends) or self._quick_deaths >= MAX_QUICK_DEATHS:
                raise SeqserveError(f"front-end {fe.index} exited with code {fe.exit_code} before it was ready")
        log.error("front-end %d (pid %d) exited unexpectedly (exit code %s); starting a new one", fe.index,
                  fe.process.pid, fe.exit_code, extra={"fields": {"event": "frontend_restart", "frontend": fe.index,
                                                                  "exit_code": fe.exit_code}})
        return self.spawn(fe.index)

    # -- the whole life -------------------------------------------------------------------------

    def run(self) -> int:
        started = time.monotonic()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        code = 0
        try:
            open_model_dir(self.config.model_dir)  # sha256 of both graphs, once, before anything starts
            self.reserve_port()
            log.info("%s", describe_layout(self.config), extra={"fields": {
                "event": "layout", "cores": self.config.cores, "frontends": self.count,
                "intra_op_threads": self.config.intra_op_threads, "spinning": self.config.intra_op_spinning}})
            self.engine.start()
            self.frontends = [self.spawn(i) for i in range(self.count)]
            code = self._loop(started, wake_r)
        finally:
            signal.set_wakeup_fd(-1)
            self._stop_all()
            wake_r.close()
            wake_w.close()
        return code

    def _loop(self, started: float, wake: socket.socket) -> int:
        draining_since: float | None = None
        serving = False
        while True:
            live = [fe for fe in self.frontends if fe.exit_code is None]
            if draining_since is not None and not live:
                break
            ready = wait([wake, *(fe.status for fe in live)], 0.5)
            if wake in ready:
                with contextlib.suppress(BlockingIOError):
                    wake.recv(4096)
            signals, self._signals = self._signals, []
            for signum in signals:
                if signum == signal.SIGHUP:
                    for fe in live:
                        fe.process.send_signal(signal.SIGHUP)
                elif draining_since is None:
                    draining_since = time.monotonic()
                    log.info("draining %d front-ends, grace period %.1f s", len(live), self.config.grace_period_s,
                             extra={"fields": {"event": "draining", "reason": self._lost or "signal"}})
                    for fe in live:
                        fe.process.send_signal(signal.SIGTERM)
            for fe in live:
                if fe.status not in ready:
                    continue
                try:
                    if fe.status.recv_bytes() == FRONTEND_WARM:
                        fe.warm = True
                        self._quick_deaths = 0
                except (EOFError, OSError):
                    replacement = self._exited(fe, draining_since is not None)
                    if replacement is not None:
                        self.frontends[self.frontends.index(fe)] = replacement
            if draining_since is None:
                waiting = [fe for fe in self.frontends if fe.warm and not fe.serving]
                if not serving and all(fe.warm for fe in self.frontends):  # all at once, the first time
                    serving = True
                    metrics_port = self.serve_metrics()
                    log.info("serving on %s:%d with %d front-ends", self.config.host, self.port, self.count,
                             extra={"fields": {"event": "serving", "host": self.config.host, "port": self.port,
                                               "metrics_port": metrics_port, "frontends": self.count,
                                               "pids": [fe.process.pid for fe in self.frontends],
                                               "engine_core_pid": self.engine.pid,
                                               "startup_s": round(time.monotonic() - started, 3)}})
                for fe in waiting if serving else []:
                    fe.status.send_bytes(SUPERVISOR_SERVE)
                    fe.serving = True
                slow = [fe for fe in self.frontends if not fe.warm and time.monotonic() - fe.started > START_TIMEOUT_S]
                if slow:
                    raise SeqserveError(f"front-end {slow[0].index} did not get ready within {START_TIMEOUT_S:.0f} s")
            elif time.monotonic() - draining_since > self.config.grace_period_s + STOP_MARGIN_S:
                for fe in live:
                    log.warning("front-end %d did not stop after the grace period; killing it", fe.index)
                    fe.process.kill()
        codes = [fe.exit_code for fe in self.frontends]
        # A front-end that never served (one being replaced when the drain began) held no calls.
        cut = any(fe.exit_code != 0 for fe in self.frontends if fe.serving)
        if self._lost is not None:
            log.error("not serving any more: %s", self._lost)
            return 1
        status = EXIT_DRAIN_CUT_SHORT if cut else 0
        log.info("stopped", extra={"fields": {"event": "stopped", "drained": not cut, "exit_status": status,
                                              "frontend_exit_codes": codes}})
        return status

    def _stop_all(self) -> None:
        """Whatever is still running goes (front-ends first: they hold the calls), then the engine core."""
        for fe in self.frontends:
            if fe.process.poll() is None:
                fe.process.send_signal(signal.SIGTERM)
        for fe in self.frontends:
            try:
                fe.process.wait(self.config.grace_period_s + STOP_MARGIN_S)
            except subprocess.TimeoutExpired:
                fe.process.kill()
                fe.process.wait()
            fe.status.close()
        self.engine.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self._reserved is not None:
            self._reserved.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


def supervise(config: ServerConfig) -> int:
    """Run the server as a supervisor of `config.frontends` front-ends and one engine core."""
    return Supervisor(config).run()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m seqserve.server.supervisor --frontend --status-fd N --config JSON`: one front-end
    (started by the supervisor only)."""
    import asyncio

    from seqserve.server.logs import configure_logging

    parser = argparse.ArgumentParser(description="a seqserve front-end process (started by the supervisor)")
    parser.add_argument("--frontend", action="store_true", required=True)
    parser.add_argument("--status-fd", type=int, required=True, help="inherited socket to the supervisor")
    parser.add_argument("--config", type=json.loads, required=True, help="ServerConfig as JSON")
    args = parser.parse_args(argv)
    config = ServerConfig(**args.config)
    configure_logging(config.log_format, config.log_level)
    return asyncio.run(serve(config, Connection(args.status_fd)))


if __name__ == "__main__":
    sys.exit(main())
