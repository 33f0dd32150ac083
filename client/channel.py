"""How a client reaches the servers: the gRPC target, the service config (round-robin balancing and a
retry policy for UNAVAILABLE and RESOURCE_EXHAUSTED that honours the server's pushback), keepalive and
message-size options, TLS credentials and call metadata.

Both `Client` and `AsyncClient` build their channel from one `ChannelSettings`, so the blocking and
the asyncio client behave the same way on the wire.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from seqserve.client.errors import InvalidArgument
from seqserve.proto import seqserve_pb2 as pb

ADDRESS_ENV = "SEQSERVE_ADDRESS"  # comma-separated host:port list, when no address is passed
DEFAULT_ADDRESS = "localhost:50051"  # the server's default port on this machine
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SeqServe"].full_name  # "seqserve.v1.SeqServe"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
USER_AGENT = "seqserve-client/0.1"

PathOrPem = str | bytes | os.PathLike[str]


PUSHBACK_KEY = "grpc-retry-pushback-ms"  # trailing metadata: when to retry (gRPC retry design A6)
MIN_BACKOFF_S = 0.002


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's transparent retries of calls that end UNAVAILABLE (a replica down or draining) and,
    unless `retry_overloaded` is off, RESOURCE_EXHAUSTED (a full server).

    A retried call is one the server never answered, so nothing is generated twice for the caller; a
    stream is retried only until its first message arrived. Retries stay within the call's deadline.
    A server's `grpc-retry-pushback-ms` trailer overrides the backoff (gRPC's retry design A6, which
    gRPC itself implements): a value of N waits N ms before the next attempt, a negative or
    malformed one means do not retry, and the call fails at once with the server's status.
    """

    max_attempts: int = 5  # the first try included (gRPC caps it at 5)
    initial_backoff_s: float = 0.05  # the n-th retry waits about min(initial * multiplier**(n-1), max), jittered
    max_backoff_s: float = 1.0
    backoff_multiplier: float = 2.0
    # RESOURCE_EXHAUSTED too: seqserve answers a full queue with a pushback saying when a place is
    # likely free (or not to retry). Other servers' RESOURCE_EXHAUSTED without a pushback (gRPC's
    # own concurrency limit; a request over the server's message size) are retried with the backoff.
    retry_overloaded: bool = True

    def __post_init__(self) -> None:
        # gRPC (1.85) never sends a retry whose delay rounds to 0 ms: the call then hangs until its
        # deadline (measured; the backoff is jittered by 20%, so 1 ms can round to 0).
        if not MIN_BACKOFF_S <= self.initial_backoff_s <= self.max_backoff_s:
            raise InvalidArgument(f"retry: backoffs must be at least {MIN_BACKOFF_S * 1e3:g} ms, initial <= max "
                                  f"(got {self.initial_backoff_s:g} s and {self.max_backoff_s:g} s)")

    def as_json(self) -> dict[str, Any]:
        # CANCELLED too: a call that reaches a replica while its gRPC server is stopping is
        # cancelled by gRPC before any handler ran (no response headers), so it is safe to
        # send elsewhere; gRPC never retries once a response has started.
        codes = ["UNAVAILABLE", "CANCELLED"] + (["RESOURCE_EXHAUSTED"] if self.retry_overloaded else [])
        return {"maxAttempts": self.max_attempts, "initialBackoff": f"{self.initial_backoff_s:g}s",
                "maxBackoff": f"{self.max_backoff_s:g}s", "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": codes}


def service_config(retry: RetryPolicy | None) -> dict[str, Any]:
    """Round-robin over every resolved address, skipping replicas whose health service says
    NOT_SERVING (starting or draining); retries for the SeqServe and health services."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}],
                              "healthCheckConfig": {"serviceName": SERVICE_NAME}}
    if retry is not None and retry.max_attempts > 1:
        config["methodConfig"] = [{"name": [{"service": SERVICE_NAME}, {"service": HEALTH_SERVICE_NAME}],
                                   "retryPolicy": retry.as_json()}]
    return config


def split_addresses(address: str | Sequence[str] | None) -> list[str]:
    """The addresses to use: the argument (a string may list several, comma-separated), else
    $SEQSERVE_ADDRESS, else localhost:50051."""
    if address is None:
        address = os.environ.get(ADDRESS_ENV, "").strip() or DEFAULT_ADDRESS
    items = address.split(",") if isinstance(address, str) else [a for part in address for a in part.split(",")]
    out = [a.strip() for a in items if a.strip()]
    if not out:
        raise InvalidArgument("address: no server address given")
    return out


def _host_port(address: str) -> tuple[str, int]:
    """('host', port) of 'host:port' or '[v6]:port'."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"address: {address!r} is not host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def build_target(addresses: Sequence[str]) -> tuple[str, str | None]:
    """The gRPC target for the addresses, and the host name TLS should check (None: the target's).

    One address goes to gRPC as it is (a DNS name that resolves to several addresses is balanced
    over all of them; a URI such as `unix:/path` or `dns:///name:port` is kept). Several become one
    static `ipv4:`/`ipv6:` list; host names among them are resolved once, here.
    """
    if len(addresses) == 1:
        return addresses[0], None
    if any("://" in a or a.startswith(("unix:", "ipv4:", "ipv6:", "dns:")) for a in addresses):
        raise InvalidArgument("address: several addresses must each be host:port (no scheme)")
    resolved: list[dict[int, str]] = []  # per address: family -> "ip"
    hosts: list[str] = []
    ports: list[int] = []
    for address in addresses:
        host, port = _host_port(address)
        hosts.append(host)
        ports.append(port)
        if _is_ip(host):
            ip = ipaddress.ip_address(host)
            resolved.append({socket.AF_INET if ip.version == 4 else socket.AF_INET6: str(ip)})
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise InvalidArgument(f"address: cannot resolve {host!r}: {exc}") from None
        families: dict[int, str] = {}
        for family, _, _, _, sockaddr in infos:
            families.setdefault(family, str(sockaddr[0]))
        resolved.append(families)
    for family, scheme in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        if all(family in r for r in resolved):
            fmt = "{}:{}" if family == socket.AF_INET else "[{}]:{}"
            target = f"{scheme}:" + ",".join(fmt.format(r[family], p) for r, p in zip(resolved, ports))
            # A static list has no single authority; TLS checks the first address's host (all
            # replicas are expected to share a certificate, or tls_server_name says the name).
            return target, hosts[0]
    raise InvalidArgument("address: several addresses must all be reachable over IPv4, or all over IPv6")


def _read_pem(value: PathOrPem | None, what: str) -> bytes | None:
    """PEM bytes from bytes, a PEM string, or a file path."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{what}: cannot read {os.fspath(value)!r}: {exc.strerror}") from None


@dataclass(frozen=True)
class ChannelSettings:
    """Everything a channel is built from (shared by the blocking and the asyncio client)."""

    target: str
    options: tuple[tuple[str, Any], ...]
    credentials: grpc.ChannelCredentials | None  # None: plaintext
    metadata: tuple[tuple[str, str], ...]  # sent with every call

    def secure(self) -> bool:
        return self.credentials is not None


def channel_settings(address: str | Sequence[str] | None = None, *, tls: bool = False,
                     root_certificates: PathOrPem | None = None, client_certificate: PathOrPem | None = None,
                     client_key: PathOrPem | None = None, tls_server_name: str | None = None,
                     auth_token: str | None = None,
                     metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                     retry: RetryPolicy | None = RetryPolicy(), keepalive_time_s: float = 60.0,
                     keepalive_timeout_s: float = 20.0, max_message_bytes: int = 64 << 20,
                     channel_options: Iterable[tuple[str, Any]] = ()) -> ChannelSettings:
    """Validate the client's connection arguments into `ChannelSettings` (see `Client` for each)."""
    target, resolved_name = build_target(split_addresses(address))
    if (client_certificate is None) != (client_key is None):
        raise InvalidArgument("client_certificate and client_key: give both or neither")
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config(retry))),
        ("grpc.enable_retries", 1 if retry is not None and retry.max_attempts > 1 else 0),
        # Keepalive pings find a dead connection (a replica gone without a FIN) while a call waits.
        # Only during calls: a server with default settings answers idle pings with GOAWAY.
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.primary_user_agent", USER_AGENT),
    ]
    credentials = None
    use_tls = tls or any(v is not None for v in (root_certificates, client_certificate, tls_server_name))
    if use_tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read_pem(root_certificates, "root_certificates"),
            private_key=_read_pem(client_key, "client_key"),
            certificate_chain=_read_pem(client_certificate, "client_certificate"))
        server_name = tls_server_name or resolved_name
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
            options.append(("grpc.default_authority", server_name))
    extra = list(channel_options)
    names = {name for name, _ in extra}
    options = [o for o in options if o[0] not in names] + extra
    pairs: list[tuple[str, str]] = []
    if auth_token:
        pairs.append(("authorization", f"Bearer {auth_token}"))
    if metadata:
        items = metadata.items() if isinstance(metadata, Mapping) else metadata
        pairs += [(str(k).lower(), str(v)) for k, v in items]
    return ChannelSettings(target, tuple(options), credentials, tuple(pairs))
