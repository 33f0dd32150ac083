"""`seqserve serve MODEL_DIR`: the gRPC server's lifecycle.

`create_server(config)` checks the model directory, starts the gRPC server (health NOT_SERVING),
loads the engine and tokenizer, warms up with one real generation, then turns health to SERVING.
`serve(config)` runs it until SIGTERM/SIGINT, then drains: health goes NOT_SERVING, new calls get
UNAVAILABLE, calls in flight get `grace_period_s` to finish, and the process exits 0, or
`EXIT_DRAIN_CUT_SHORT` (3) when calls were still running at the end of the grace period and were
cut, so that an orchestrator can tell a clean drain from one that failed requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from seqserve.runtime.model_dir import ModelDir, open_model_dir
from seqserve.runtime.tokenizer import encode_source, load_tokenizer
from seqserve.runtime.errors import SeqserveError
from seqserve.server.auth import ReloadOnSignal, TokenAuth, interceptors
from seqserve.server.config import ServerConfig, describe_layout, parse_args, resolve_layout
from seqserve.runtime.engine import OnnxSeq2Seq
from seqserve.runtime.generation import GenerationParams
from seqserve.server.logs import configure_logging
from seqserve.server.metrics import Metrics
from seqserve.server.scheduler import Scheduler
from seqserve.server.service import SERVICE_NAME, Backend, LoopMailbox, SeqServeService, add_to_server, watch
from seqserve.server.tracing import tracer_from_config
from seqserve.server.validation import Validator
from seqserve.server.engine_core import EngineCoreClient, EngineCoreOptions, EngineCoreProcess

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE_NAME)  # "" is the whole server
WARMUP_TEXT = "warm up"
HEALTH_SETTLE_S = 1.0  # at least this long between NOT_SERVING and closing the listener
FLUSH_S = 1.0  # after draining: time for the last responses to go out before the server stops
EXIT_DRAIN_CUT_SHORT = 3  # exit status when the grace period ran out with calls in flight (1: bad setup)
FRONTEND_WARM, SUPERVISOR_SERVE = b"warm", b"serve"  # a supervised front-end's start-up handshake


class SeqServeServer:
    """A started server: gRPC (SeqServe, health, reflection), the scheduler, metrics."""

    def __init__(self, config: ServerConfig, grpc_server: grpc.aio.Server, service: SeqServeService,
                 health: health_aio.HealthServicer, metrics: Metrics, port: int) -> None:
        self.config = config
        self.grpc_server = grpc_server
        self.service = service
        self.health = health
        self.metrics = metrics
        self.port = port
        self.metrics_port = 0
        self.auth: TokenAuth | None = None  # the accepted tokens, with --auth-token-file; reload() on SIGHUP
        self.scheduler: Scheduler | EngineCoreClient | None = None
        self.engine_core: EngineCoreProcess | None = None  # the engine core this process owns (none: a supervisor's)
        self._loop = asyncio.get_running_loop()

    async def load(self, model_dir: ModelDir, hold: Callable[[], Awaitable[None]] | None = None) -> None:
        """Engine and tokenizer (off the event loop), the scheduler, a warm-up generation, then
        SERVING (once `hold()` returns, when given: a supervisor's other front-ends are ready too)."""
        config = self.config
        tokenizer = await asyncio.to_thread(load_tokenizer, model_dir.tokenizer_path)
        scheduler: Scheduler | EngineCoreClient
        if config.engine_core == "process":
            address = config.engine_address
            if not address:  # no supervisor: this process starts (and restarts) its own engine core
                self.engine_core = EngineCoreProcess(
                    engine_core_options(config), on_lost=lambda reason: self._loop.call_soon_threadsafe(
                        self._engine_lost, reason))
                await asyncio.to_thread(self.engine_core.start)
                address = self.engine_core.address
            scheduler = EngineCoreClient(address, model_dir.config, config.max_batch_size, self._loop,
                                         observer=self.metrics, max_queue=config.max_queue,
                                         on_lost=self._engine_lost)
            self.scheduler = scheduler
            await asyncio.to_thread(scheduler.connect)
            providers = scheduler.providers
        else:
            engine = await asyncio.to_thread(OnnxSeq2Seq, model_dir, **config.engine_options)
            scheduler = self.scheduler = Scheduler(engine, max_batch_size=config.max_batch_size,
                                                   max_queue=config.max_queue, observer=self.metrics,
                                                   deadline_admission=config.deadline_admission == "on")
            scheduler.start()
            providers = list(engine.providers)
        self.metrics.watch(scheduler)
        # One real generation: ONNX Runtime allocates and picks kernels on its first runs.
        handle = scheduler.submit(encode_source(tokenizer, WARMUP_TEXT)[: model_dir.config.max_source_len],
                                  GenerationParams(max_new_tokens=min(4, model_dir.config.max_target_len)))
        await watch(handle, LoopMailbox(asyncio.get_running_loop()))
        self.service.set_backend(Backend(scheduler, tokenizer, Validator(tokenizer, model_dir.config, config),
                                         model_dir, providers))
        if hold is not None:
            await hold()
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("model %s (version %s) on %s; %s", model_dir.path, model_dir.version, ", ".join(providers),
                 describe_layout(config))

    def _engine_lost(self, reason: str) -> None:
        """The engine core died and could not be replaced: report NOT_SERVING, refuse calls."""
        self.service.start_draining()
        for name in HEALTH_SERVICES:
            self._loop.create_task(self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING))
        log.error("not serving any more: %s", reason)

    async def drain(self, grace: float) -> int:
        """Graceful shutdown; returns how many calls were still in flight when `grace` seconds ran out
        and were cut (0: every call finished)."""
        started = time.monotonic()
        await self.health.enter_graceful_shutdown()  # NOT_SERVING for every service, for good
        self.service.start_draining()
        if self.scheduler is not None:
            self.scheduler.close()
        finished = await self.service.wait_idle(grace)
        # Give clients that watch health (the client library does) a moment to see NOT_SERVING
        # and route elsewhere before the listener closes; calls arriving meanwhile get UNAVAILABLE,
        # which they retry on another replica.
        await asyncio.sleep(max(0.0, min(HEALTH_SETTLE_S - (time.monotonic() - started),
                                         grace - (time.monotonic() - started))))
        cut = 0 if finished else self.service.in_flight  # the grace period is over: stop() cancels them
        # What is left are the last responses on their way out and long-lived calls such as health
        # watchers (which have seen NOT_SERVING): a short flush, not the rest of the grace period.
        await self.stop(min(FLUSH_S, max(0.0, grace - (time.monotonic() - started))))
        return cut

    async def stop(self, grace: float | None = None) -> None:
        """Stop now (calls still running after `grace` seconds are cancelled), then the engine core,
        traces, metrics."""
        self.service.start_stopping()
        await self.grpc_server.stop(grace)
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop)
        if self.engine_core is not None:
            await asyncio.to_thread(self.engine_core.stop)
        tracer, self.service.tracer = self.service.tracer, None
        if tracer is not None:  # every call has ended: flush their spans to the collector
            await asyncio.to_thread(tracer.shutdown)
        self.metrics.close()


def engine_core_options(config: ServerConfig) -> EngineCoreOptions:
    """What the engine core process is started with, from the server's configuration."""
    return EngineCoreOptions(str(config.model_dir), config.engine_options, max_batch_size=config.max_batch_size,
                             max_queue=config.max_queue, deadline_admission=config.deadline_admission == "on",
                             log_format=config.log_format, log_level=config.log_level)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files (None: plaintext); unreadable files are one-line errors."""
    if not config.tls_cert:
        return None

    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise SeqserveError(f"cannot read {what} {path}: {exc.strerror or exc}") from None

    client_ca = read(config.tls_client_ca, "--tls-client-ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(read(config.tls_key, "--tls-key"), read(config.tls_cert, "--tls-cert"))],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


async def create_server(config: ServerConfig, *, hold: Callable[[], Awaitable[None]] | None = None,
                        check_hashes: bool = True) -> tuple[SeqServeServer, int]:
    """Check the model directory, start serving (NOT_SERVING), load and warm up (SERVING, once
    `hold()` returns when given).

    Returns the server and its bound port (the free one picked when `config.port` is 0). A model
    directory with a missing or altered file is a ModelDirError before anything listens.
    """
    if not config.cores:  # not laid out by `main` or a supervisor: one front-end, threads from the cores
        config = resolve_layout(dataclasses.replace(config, frontends="1"))
    # sha256 of both graphs (a supervisor's front-ends skip it: the supervisor has checked them)
    model_dir = await asyncio.to_thread(open_model_dir, config.model_dir, check_hashes=check_hashes)
    metrics = Metrics()
    service = SeqServeService(config, metrics)
    service.tracer = tracer_from_config(config)  # None: tracing off; without the `tracing` extra, an error here
    health = health_aio.HealthServicer()
    for name in HEALTH_SERVICES:
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    credentials = server_credentials(config)
    auth = TokenAuth(config.auth_token_file) if config.auth_token_file else None  # no tokens: an error here
    grpc_server = grpc.aio.server(interceptors=interceptors(
        auth, auth_health=config.auth_health == "on", on_refused=metrics.on_rpc), options=[
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Per connection, so that one client cannot push past them: calls at once (more wait on the
        # client's side), and the size of one call's headers (soft and hard limit alike: gRPC
        # refuses calls between the two at random otherwise).
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.max_metadata_size", config.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", config.max_metadata_bytes),
        # A port already in use is an error, not a silently shared port; except between the
        # front-ends of one server, which share it on purpose (the kernel spreads connections).
        ("grpc.so_reuseport", 0 if config.frontends in ("auto", "1") else 1),
        # The client library pings every 60 s during long calls; gRPC's default (one ping per
        # 5 min) would answer that with GOAWAY "too many pings".
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 30_000),
        # Connections are recycled every few minutes so that long-lived clients re-resolve DNS
        # and spread onto replicas added since they connected (headless Service, autoscaling).
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", 60_000),
    ],
        # Calls beyond the limit (every service counted) are answered RESOURCE_EXHAUSTED by gRPC
        # itself, before the request is read or a handler runs (interceptors still do): the
        # cheapest refusal there is, though only once gRPC has accepted the call (docs/overload.md).
        maximum_concurrent_rpcs=config.rpc_limit)
    add_to_server(service, grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        grpc_server)
    try:
        if credentials is None:
            port = grpc_server.add_insecure_port(config.address)
        else:
            port = grpc_server.add_secure_port(config.address, credentials)
    except RuntimeError:
        port = 0
    if not port:
        raise SeqserveError(f"cannot listen on {config.address} (port in use, or not allowed)")
    await grpc_server.start()
    server = SeqServeServer(config, grpc_server, service, health, metrics, port)
    server.auth = auth
    try:
        await server.load(model_dir, hold)
        if config.metrics_port:
            try:
                server.metrics_port = metrics.serve(config.metrics_address_host, config.metrics_port)
            except OSError as exc:
                raise SeqserveError(f"cannot serve metrics on {config.metrics_address_host} port {config.metrics_port}: "
                                    f"{exc.strerror or exc}") from None
    except BaseException:
        await server.stop(0)
        raise
    return server, port


async def serve(config: ServerConfig, supervisor: Connection | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then drain within the grace period; returns the exit status.

    With `supervisor` (a front-end that `seqserve.server.supervisor` started), the process says
    `FRONTEND_WARM` on that connection once warmed up, turns SERVING when told `SUPERVISOR_SERVE`,
    drains when the connection closes (the supervisor is gone), and names its log events
    "frontend_serving", ... so that they are not taken for the whole server's.
    """
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reload_tokens = ReloadOnSignal()  # SIGHUP rereads the token file (one during start-up: once started)
    if config.auth_token_file:
        loop.add_signal_handler(signal.SIGHUP, reload_tokens)
    hold: Callable[[], Awaitable[None]] | None = None
    event = "{}".format
    if supervisor is not None:
        event = "frontend_{}".format

        async def told_to_serve() -> None:
            supervisor.send_bytes(FRONTEND_WARM)
            if await asyncio.to_thread(supervisor.recv_bytes) != SUPERVISOR_SERVE:
                raise SeqserveError("the supervisor said something other than serve")
            def gone() -> None:  # only ever readable again at EOF: the supervisor is gone
                loop.remove_reader(supervisor.fileno())
                stop.set()

            loop.add_reader(supervisor.fileno(), gone)

        hold = told_to_serve

    server, port = await create_server(config, hold=hold, check_hashes=supervisor is None)
    reload_tokens.attach(server.auth)
    log.info("serving on %s:%d", config.host, port, extra={"fields": {
        "event": event("serving"), "host": config.host, "port": port, "metrics_port": server.metrics_port,
        "startup_s": round(time.monotonic() - started, 3)}})
    await stop.wait()
    log.info("draining: %d calls in flight, grace period %.1f s", server.service.in_flight, config.grace_period_s,
             extra={"fields": {"event": event("draining"), "in_flight": server.service.in_flight}})
    cut = await server.drain(config.grace_period_s)
    if cut:
        log.warning("stopped: the grace period of %.1f s ran out, %d calls in flight were cut (exit %d)",
                    config.grace_period_s, cut, EXIT_DRAIN_CUT_SHORT, extra={"fields": {
                        "event": event("stopped"), "drained": False, "calls_cut": cut,
                        "exit_status": EXIT_DRAIN_CUT_SHORT}})
        return EXIT_DRAIN_CUT_SHORT
    log.info("stopped", extra={"fields": {"event": event("stopped"), "drained": True, "calls_cut": 0,
                                          "exit_status": 0}})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`seqserve serve`: configuration errors and bad model directories are one-line SeqserveErrors."""
    config = parse_args(argv)
    configure_logging(config.log_format, config.log_level)
    config = resolve_layout(config)
    if config.frontends != "1":
        from seqserve.server.supervisor import supervise

        return supervise(config)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
