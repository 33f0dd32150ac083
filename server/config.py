"""The server's configuration: one frozen dataclass, built from command-line flags with `SEQSERVE_*`
environment variables as their defaults (a flag beats its variable, which beats the built-in default).

Every setting has one row in `SETTINGS` (flag, variable, type, help); `parse_args` builds the
argparse parser from it, so a flag, its variable and its documentation cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from seqserve.runtime.cores import available_cores
from seqserve.runtime.errors import SeqserveError

DEVICES = ("auto", "cpu", "cuda")
ON_OFF = ("on", "off")
ENGINE_CORES = ("process", "thread")
SPINNING = ("on", "run", "off")  # runtime.engine.SPINNING
IO_BINDINGS = ("auto", "on", "off")  # runtime.engine.IO_BINDINGS
OPTIMIZATIONS = ("disable", "basic", "extended", "all")  # runtime.engine.OPTIMIZATION_LEVELS
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Calls beyond what the scheduler can hold that the concurrent call limit still lets in: health
# watches (one per client connection), probes, model info and reflection, so that those go on
# being answered while SeqServe calls beyond the queue are refused by admission.
RPC_HEADROOM = 64
RPC_HEADROOM_DOC = f"{RPC_HEADROOM} (room for health checks and watches)"
ENV_PREFIX = "SEQSERVE_"


class ConfigError(SeqserveError):
    """A setting with a value the server cannot use; the message names the flag and the variable."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything `seqserve serve` can be told (see `SETTINGS` for the flags and variables)."""

    model_dir: Path  # exported model directory (config.json, tokenizer.json, encoder.onnx, decoder.onnx)
    host: str = "[::]"  # interface to listen on ("[::]": all, IPv4 and IPv6; "127.0.0.1": this machine only)
    port: int = 50051  # gRPC port; 0 picks a free one (logged at start)
    metrics_port: int = 0  # Prometheus /metrics HTTP port; 0 turns metrics serving off
    metrics_host: str = ""  # interface of the /metrics listener; "" = the gRPC host (e.g. "127.0.0.1": local only)
    device: str = "auto"  # auto (CUDA when ONNX Runtime offers it) | cpu | cuda (fails loudly without CUDA)
    intra_op_threads: int = 0  # ONNX Runtime threads inside one operator; 0 = chosen from the cores (`layout`)
    inter_op_threads: int = 1  # ONNX Runtime threads across operators
    optimization: str = "all"  # ONNX Runtime graph optimization level
    intra_op_spinning: str = "on"  # on | run (spin only within a decoder step) | off: idle intra-op threads spin-wait
    # process: the decode loop runs in an engine core process of its own (own GIL, restarted if it
    # dies) that front-end processes feed; thread: in a thread of the one server process
    engine_core: str = "process"
    frontends: str = "auto"  # gRPC front-end processes on the one port: a number, or auto (from the cores)
    io_binding: str = "auto"  # KV cache kept on the device between steps: auto (on CUDA only) | on | off
    max_batch_size: int = 32  # most rows (inputs, beams, samples) decoded together in one step
    max_queue: int = 128  # most requests waiting for a batch row; beyond it RESOURCE_EXHAUSTED
    # on: a call whose deadline the queue ahead is likely to outlast is refused at once
    # (RESOURCE_EXHAUSTED with a retry hint); off: it queues and ends with DEADLINE_EXCEEDED.
    deadline_admission: str = "on"
    # Most calls the whole server runs at once, every service counted (health checks and watches,
    # reflection); beyond it gRPC answers RESOURCE_EXHAUSTED before any handler runs or the request
    # is read. 0: max_queue + max_batch_size + RPC_HEADROOM (`rpc_limit`).
    max_concurrent_rpcs: int = 0
    max_inputs_per_request: int = 32  # most inputs in one Generate call
    max_new_tokens_limit: int = 256  # largest max_new_tokens accepted (the model's max_target_len caps it too)
    max_beams: int = 0  # largest num_beams; 0 = min(8, max_batch_size) (a beam search takes num_beams rows)
    max_return_sequences: int = 0  # largest num_return_sequences for sampling; 0 = min(8, max_batch_size)
    max_message_bytes: int = 1 << 20  # largest request message (after decompression); beyond it RESOURCE_EXHAUSTED
    # Per connection: most calls at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; a client's further
    # calls wait on its side). Above what one server admits by default (batch + queue = 160), so a
    # single busy client is refused by the queue, as others are, rather than held back here.
    max_concurrent_streams: int = 256
    max_metadata_bytes: int = 8 << 10  # largest request metadata (all headers of one call); beyond it refused
    # GenerateStream: tokens per message after the first (1: every token at once; 0: auto, more per
    # message as more streams share the front-end: `service.stream_interval`)
    stream_interval: int = 0
    grace_period_s: float = 20.0  # on SIGTERM/SIGINT, how long in-flight calls get to finish
    log_format: str = "json"  # json (one object per line) | text
    log_level: str = "info"
    tls_cert: str = ""  # PEM server certificate (chain); with tls_key, the server listens with TLS only
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)
    auth_token_file: str = ""  # bearer tokens, one per line (# comments); every call must send one; "" = no auth
    auth_health: str = "off"  # on: health checks need a token too; off: health stays open for probes
    # OpenTelemetry traces sent over OTLP/gRPC to this collector (http:// plaintext, https:// TLS;
    # needs the `tracing` extra); "" = tracing off (server.tracing)
    otlp_endpoint: str = ""
    # Set by the supervisor for the front-ends it starts, not a flag: the engine core's Unix socket
    # (""): this process owns its engine core), and the cores the layout was chosen for.
    engine_address: str = ""
    cores: int = 0

    def __post_init__(self) -> None:
        """Reject values the server cannot use, naming the flag and the variable."""
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        for name in ("max_beams", "max_return_sequences"):  # 0: as many as fit, up to 8
            if getattr(self, name) == 0:
                object.__setattr__(self, name, min(8, max(1, self.max_batch_size)))
        checks: list[tuple[str, bool, str]] = [
            ("port", 0 <= self.port <= 65535, "must be in 0..65535"),
            ("metrics_port", 0 <= self.metrics_port <= 65535, "must be in 0..65535 (0 = off)"),
            ("device", self.device in DEVICES, f"must be one of {', '.join(DEVICES)}"),
            ("intra_op_threads", self.intra_op_threads >= 0, "must be >= 0 (0 = one per core)"),
            ("inter_op_threads", self.inter_op_threads >= 0, "must be >= 0"),
            ("optimization", self.optimization in OPTIMIZATIONS, f"must be one of {', '.join(OPTIMIZATIONS)}"),
            ("intra_op_spinning", self.intra_op_spinning in SPINNING, f"must be one of {', '.join(SPINNING)}"),
            ("engine_core", self.engine_core in ENGINE_CORES, f"must be one of {', '.join(ENGINE_CORES)}"),
            ("frontends", self.frontends == "auto" or (self.frontends.isdigit() and 1 <= int(self.frontends) <= 64),
             "must be auto or a number in 1..64"),
            ("frontends", self.frontends in ("auto", "1") or self.engine_core == "process",
             "above 1 needs --engine-core process (front-ends feed one engine core process)"),
            ("deadline_admission", self.deadline_admission in ON_OFF, "must be on or off"),
            ("io_binding", self.io_binding in IO_BINDINGS, f"must be one of {', '.join(IO_BINDINGS)}"),
            ("max_batch_size", self.max_batch_size >= 1, "must be >= 1"),
            ("max_queue", self.max_queue >= 1, "must be >= 1"),
            ("max_concurrent_rpcs", 0 <= self.max_concurrent_rpcs < 2**31, "must be >= 0 (0 = derived)"),
            ("max_inputs_per_request", self.max_inputs_per_request >= 1, "must be >= 1"),
            ("max_new_tokens_limit", self.max_new_tokens_limit >= 1, "must be >= 1"),
            ("max_beams", 1 <= self.max_beams <= self.max_batch_size,
             f"must be in 1..max_batch_size ({self.max_batch_size}): a beam search takes num_beams rows"),
            ("max_return_sequences", 1 <= self.max_return_sequences <= self.max_batch_size,
             f"must be in 1..max_batch_size ({self.max_batch_size}): each sample takes a row"),
            ("max_message_bytes", 1024 <= self.max_message_bytes < 2**31, "must be in 1024..2147483647"),
            ("max_concurrent_streams", 1 <= self.max_concurrent_streams < 2**31, "must be in 1..2147483647"),
            ("max_metadata_bytes", 1024 <= self.max_metadata_bytes < 2**31, "must be in 1024..2147483647"),
            ("stream_interval", 0 <= self.stream_interval <= 1024, "must be in 0..1024 (0 = auto)"),
            ("grace_period_s", math.isfinite(self.grace_period_s) and self.grace_period_s >= 0, "must be >= 0"),
            ("log_format", self.log_format in LOG_FORMATS, f"must be one of {', '.join(LOG_FORMATS)}"),
            ("log_level", self.log_level in LOG_LEVELS, f"must be one of {', '.join(LOG_LEVELS)}"),
        ]
        checks += [
            ("tls_key", bool(self.tls_cert) == bool(self.tls_key), "and tls_cert go together"),
            ("tls_client_ca", not self.tls_client_ca or bool(self.tls_cert), "needs tls_cert and tls_key"),
            ("auth_health", self.auth_health in ON_OFF, "must be on or off"),
            ("auth_health", self.auth_health == "off" or bool(self.auth_token_file), "on needs auth_token_file"),
            ("otlp_endpoint", not self.otlp_endpoint or self.otlp_endpoint.startswith(("http://", "https://")),
             "must be an http:// (plaintext) or https:// (TLS) URL, or empty (tracing off)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{name} ({setting_names(name)}) {rule}, got {getattr(self, name)!r}")

    @property
    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments of `runtime.engine.OnnxSeq2Seq` (in this process or the engine core's)."""
        return {"device": self.device, "intra_op_threads": self.intra_op_threads,
                "inter_op_threads": self.inter_op_threads, "optimization": self.optimization,
                "spinning": self.intra_op_spinning, "io_binding": self.io_binding}

    @property
    def metrics_address_host(self) -> str:
        """The interface the /metrics listener binds: metrics_host, else the gRPC host."""
        return self.metrics_host or self.host

    @property
    def rpc_limit(self) -> int:
        """The server's concurrent call limit: max_concurrent_rpcs, or derived from the queue and batch."""
        return self.max_concurrent_rpcs or self.max_queue + self.max_batch_size + RPC_HEADROOM

    @property
    def address(self) -> str:
        """host:port as gRPC wants it (an IPv6 host in brackets)."""
        host = self.host if ":" not in self.host or self.host.startswith("[") else f"[{self.host}]"
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Setting:
    """One configurable field: its flag, environment variable, parser and help."""

    field: str
    type: Callable[[str], Any]
    help: str
    choices: Sequence[str] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-").removesuffix("-s")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper().removesuffix("_S")


SETTINGS: tuple[Setting, ...] = (
    Setting("host", str, "interface to listen on ('[::]' all, '127.0.0.1' this machine only)"),
    Setting("port", int, "gRPC port; 0 picks a free one"),
    Setting("metrics_port", int, "Prometheus /metrics HTTP port; 0 = off"),
    Setting("metrics_host", str, "interface of the /metrics listener; empty: the same as --host"),
    Setting("device", str, "execution device (auto: CUDA when available)", DEVICES),
    Setting("intra_op_threads", int, "ONNX Runtime intra-op threads; 0 = one per core"),
    Setting("inter_op_threads", int, "ONNX Runtime inter-op threads"),
    Setting("optimization", str, "ONNX Runtime graph optimization level", OPTIMIZATIONS),
    Setting("intra_op_spinning", str, "idle intra-op threads spin-wait for the next kernel: 'on' also between "
            "decoder steps (the lowest step latency; it keeps the cores busy), 'run' only within a step (they park "
            "when it ends, leaving the cores to gRPC), 'off' never", SPINNING),
    Setting("engine_core", str, "where the decode loop runs: an engine core process of its own (its own GIL, "
            "restarted if it dies) fed by the front-end processes, or a thread of the one server process",
            ENGINE_CORES),
    Setting("frontends", str, "gRPC front-end processes sharing the port (SO_REUSEPORT), each with its own "
            "event loop, tokenizer and detokenizer, all feeding one engine core; auto: from the cores this "
            "process may use (printed at start and in GetModelInfo)"),
    Setting("io_binding", str, "keep the KV cache on the device between decoder steps (ONNX Runtime I/O "
            "binding); auto: on with CUDA, off on CPU where numpy is zero-copy; 'on' forces it (tests)", IO_BINDINGS),
    Setting("max_batch_size", int, "most rows (inputs, beams, samples) decoded together"),
    Setting("max_queue", int, "most requests waiting for a row; beyond it RESOURCE_EXHAUSTED"),
    Setting("deadline_admission", str, "refuse at once (RESOURCE_EXHAUSTED, with a retry hint) a call whose "
            "deadline the queue ahead is likely to outlast, instead of queueing work that would be thrown "
            "away (on), or let it queue (off)", ON_OFF),
    Setting("max_concurrent_rpcs", int, "most calls a front-end process runs at once, health and reflection "
            "counted; "
            "beyond it gRPC answers RESOURCE_EXHAUSTED before any handler runs; 0 = max queue + max batch "
            f"size + {RPC_HEADROOM_DOC}"),
    Setting("max_inputs_per_request", int, "most inputs in one Generate call"),
    Setting("max_new_tokens_limit", int, "largest max_new_tokens a request may ask for"),
    Setting("max_beams", int, "largest num_beams; 0 = min(8, max batch size)"),
    Setting("max_return_sequences", int, "largest num_return_sequences for sampling; 0 = min(8, max batch size)"),
    Setting("max_message_bytes", int, "largest request message in bytes"),
    Setting("max_concurrent_streams", int, "most calls at once on one client connection (further ones wait "
            "on the client's side)"),
    Setting("max_metadata_bytes", int, "largest metadata (headers) of one call in bytes; beyond it the call "
            "is refused"),
    Setting("stream_interval", int, "GenerateStream sends the first token at once, then a message per this "
            "many tokens (the last ones ride on the final message); 0 = auto: 1 while few streams are open, "
            "one more per 16 open streams on a front-end, up to 4 (fewer messages per token under load)"),
    Setting("grace_period_s", float, "seconds in-flight calls get to finish on SIGTERM/SIGINT"),
    Setting("log_format", str, "log lines as JSON objects or plain text", LOG_FORMATS),
    Setting("log_level", str, "least severe level logged", LOG_LEVELS),
    Setting("tls_cert", str, "PEM server certificate; with --tls-key the server listens with TLS only"),
    Setting("tls_key", str, "PEM private key of --tls-cert"),
    Setting("tls_client_ca", str, "PEM CA bundle; clients must then present a certificate it signed (mutual TLS)"),
    Setting("auth_token_file", str, "file of bearer tokens, one per line (blank lines and # comments ignored), "
            "reread on SIGHUP; every call must then send 'authorization: Bearer TOKEN'"),
    Setting("auth_health", str, "on: grpc.health.v1 needs a token too; off: it stays open for probes", ON_OFF),
    Setting("otlp_endpoint", str, "send OpenTelemetry traces (a span per call, with queue, encode and decode "
            "children) over OTLP/gRPC to this collector, e.g. http://localhost:4317 (https:// for TLS; the "
            "standard OTEL_* variables apply); needs the `tracing` extra; empty: tracing off"),
)
_BY_FIELD = {s.field: s for s in SETTINGS}
MODEL_DIR_ENV = ENV_PREFIX + "MODEL_DIR"


def setting_names(name: str) -> str:
    """'--flag, SEQSERVE_VAR' for a field, for error messages."""
    if name == "model_dir":
        return f"MODEL_DIR, {MODEL_DIR_ENV}"
    setting = _BY_FIELD[name]
    return f"{setting.flag}, {setting.env}"


def _env_value(setting: Setting, environ: Mapping[str, str]) -> Any:
    """The setting's value from its environment variable, or None when unset or empty."""
    raw = environ.get(setting.env, "").strip()
    if not raw:
        return None
    try:
        value = setting.type(raw)
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(setting.type, "a value")
        raise ConfigError(f"{setting.env}={raw!r}: expected {kind}") from None
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"{setting.env}={raw!r}: expected one of {', '.join(setting.choices)}")
    return value


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The `seqserve serve` parser; defaults come from `environ` (os.environ) and then ServerConfig."""
    environ = os.environ if environ is None else environ
    defaults = {f.name: f.default for f in fields(ServerConfig)}
    p = argparse.ArgumentParser(
        prog="seqserve serve",
        description="Serve an exported model directory over gRPC (service seqserve.v1.SeqServe, "
                    "grpc.health.v1, reflection). Every flag also reads the environment variable shown; "
                    "a flag beats its variable.")
    model_dir = environ.get(MODEL_DIR_ENV) or None
    p.add_argument("model_dir", nargs="?" if model_dir else None, default=model_dir, metavar="MODEL_DIR",
                   help=f"model directory written by `seqserve export` (env {MODEL_DIR_ENV})")
    for s in SETTINGS:
        env_value = _env_value(s, environ)
        default = defaults[s.field] if env_value is None else env_value
        p.add_argument(s.flag, dest=s.field, type=s.type, choices=s.choices, default=default,
                       metavar=None if s.choices else s.type.__name__.upper(),
                       help=f"{s.help} (env {s.env}; default {default})")
    return p


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Flags > SEQSERVE_* variables > defaults; a bad variable or value is a one-line ConfigError."""
    args = build_parser(environ).parse_args(argv)
    return ServerConfig(**vars(args))


# -- the processes and threads, from the cores ------------------------------------------------

def resolve_layout(config: ServerConfig, cores: int | None = None, *, gpu: bool = False) -> ServerConfig:
    """`config` with `--frontends auto` and `--intra-op-threads 0` decided from the cores (what
    the user set stays as set):
    - front-ends: 1 up to 3 cores (one front-end keeps up with one engine core there), else a
      quarter of the cores on CPU, where the engine's matrix work needs the rest, and all cores
      but two on a GPU, where a decoder step is short and the front-ends' per-token Python is the
      bottleneck; at most 8;
    - the engine core's ONNX Runtime threads: the cores the front-ends leave (at least 1), so that
      spinning threads never wait on a front-end's core; a thread driver has every core.
    """
    cores = cores or config.cores or available_cores()
    if config.engine_core == "thread":
        frontends = 1
    elif config.frontends != "auto":
        frontends = int(config.frontends)
    elif cores <= 3:
        frontends = 1
    else:
        frontends = min(8, max(1, cores - 2 if gpu else cores // 4))
    threads = config.intra_op_threads
    if threads == 0:
        threads = cores if config.engine_core == "thread" else max(1, cores - frontends)
    return dataclasses.replace(config, frontends=str(frontends), intra_op_threads=threads, cores=cores)


def describe_layout(config: ServerConfig) -> str:
    """One line of the choices `resolve_layout` made, for the start-up log."""
    return (f"{config.cores} cores: engine core in a {config.engine_core}, {config.intra_op_threads} ONNX Runtime "
            f"thread(s) (spinning {config.intra_op_spinning}), {config.frontends} gRPC front-end(s), "
            f"stream messages every {config.stream_interval or 'auto (1-4)'} token(s), more when the client lags")
