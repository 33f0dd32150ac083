"""What the blocking and the asyncio client share: connection arguments, per-call timeout and
metadata, request building, and the server's input limit used to split long input lists."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from seqserve.client import convert
from seqserve.client.channel import PathOrPem, RetryPolicy, channel_settings
from seqserve.client.errors import InvalidArgument
from seqserve.proto import seqserve_pb2 as pb

Metadata = Mapping[str, str] | Iterable[tuple[str, str]]


class ClientBase:
    """Connection settings and request building; subclasses own the channel and the calls."""

    def __init__(self, address: str | Sequence[str] | None = None, *, timeout: float | None = 60.0,
                 tls: bool = False, root_certificates: PathOrPem | None = None,
                 client_certificate: PathOrPem | None = None, client_key: PathOrPem | None = None,
                 tls_server_name: str | None = None, auth_token: str | None = None,
                 metadata: Metadata | None = None, retry: RetryPolicy | None = RetryPolicy(),
                 keepalive_time_s: float = 60.0, keepalive_timeout_s: float = 20.0,
                 max_message_bytes: int = 64 << 20, max_inputs_per_call: int | None = None,
                 channel_options: Iterable[tuple[str, Any]] = (), connections: int = 1) -> None:
        """Connect (lazily: the first call opens the connection).

        Args:
            address: "host:port", a list of them (round-robin over all, with retries of UNAVAILABLE
                calls on the others), or a gRPC target URI; None: $SEQSERVE_ADDRESS, else localhost:50051.
            timeout: default seconds a call may take before DeadlineExceeded (None: no deadline).
            tls: use TLS with the system's root certificates (implied by the next four).
            root_certificates: PEM (bytes, text or a file path) of the CA that signed the server's certificate.
            client_certificate: PEM certificate chain of this client, for servers that require one (mutual TLS).
            client_key: PEM private key of client_certificate.
            tls_server_name: the name the server's certificate must carry, when it differs from the address.
            auth_token: sent as "authorization: Bearer TOKEN" with every call.
            metadata: extra gRPC metadata sent with every call.
            retry: the retry policy for UNAVAILABLE and RESOURCE_EXHAUSTED, which waits as long as the
                server's pushback says (None: no retries).
            keepalive_time_s: seconds between keepalive pings while calls are in flight.
            keepalive_timeout_s: seconds to wait for a ping's answer before the connection is closed.
            max_message_bytes: largest message sent or received.
            max_inputs_per_call: most inputs per Generate call before `generate` splits the list
                (None: the server's max_inputs_per_request, asked once).
            channel_options: extra gRPC channel options (they win over the ones above).
            connections: connections to each server address, calls spread over them in turn. A
                server with several front-end processes on one port (`--frontends`) balances
                connections, not calls, between them: one connection reaches one front-end.
        """
        if connections < 1:
            raise InvalidArgument(f"connections: must be >= 1, got {connections}")
        self.connections = connections
        self.settings = channel_settings(
            address, tls=tls, root_certificates=root_certificates, client_certificate=client_certificate,
            client_key=client_key, tls_server_name=tls_server_name, auth_token=auth_token, metadata=metadata,
            retry=retry, keepalive_time_s=keepalive_time_s, keepalive_timeout_s=keepalive_timeout_s,
            max_message_bytes=max_message_bytes, channel_options=channel_options)
        self.timeout = timeout
        self._max_inputs = max_inputs_per_call  # None: asked from the server the first time it matters
        self._open()

    def _open(self) -> None:
        """Create the channel and stubs from `self.settings`."""
        raise NotImplementedError

    def _channel_options(self) -> list[tuple[str, Any]]:
        """The channel options; with several connections, each channel keeps its own (gRPC shares
        one connection between channels to the same address otherwise)."""
        options = list(self.settings.options)
        return options + [("grpc.use_local_subchannel_pool", 1)] if self.connections > 1 else options

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings.target!r})"

    @property
    def target(self) -> str:
        """The gRPC target the channel connects to."""
        return self.settings.target

    def _call_args(self, timeout: float | None, metadata: Metadata | None) -> dict[str, Any]:
        return {"timeout": self.timeout if timeout is None else timeout,
                "metadata": convert.merge_metadata(self.settings.metadata, metadata) or None}

    @staticmethod
    def _generate_requests(texts: list[str], options: pb.GenerationOptions, request_id: str | None,
                           per_call: int) -> list[pb.GenerateRequest]:
        chunks = convert.chunk(texts, per_call)
        return [pb.GenerateRequest(inputs=c, options=options,
                                   request_id=convert.chunk_request_id(request_id, i, len(chunks)))
                for i, c in enumerate(chunks)]
