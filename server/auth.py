"""Bearer-token authentication of the gRPC server: the token file and a grpc.aio server interceptor.

`--auth-token-file PATH` names a file of tokens, one per line (blank lines and `#` comments are
ignored). Any of them is accepted, so a token is rotated without refusing anyone: add the new one,
move the clients to it, remove the old one, with a SIGHUP after each edit (`TokenAuth.reload`; a
file that cannot be used then keeps the tokens in use and logs an error).

Every call must carry `authorization: Bearer TOKEN`. The token is compared with every accepted
token, all of them each time, by `hmac.compare_digest` over SHA-256 digests (equal lengths), so the
time a check takes says nothing about how much of a guess was right, which token matched or how
long the tokens are. A missing or wrong token is `UNAUTHENTICATED` before the service runs; the
request message is not even parsed.

What stays open: `grpc.health.v1.Health`, unless `--auth-health on`, because Kubernetes' native
gRPC probes and gRPC's client-side health checking (the client library's channels use it) cannot
send a token. Reflection is guarded like SeqServe: it describes the API, and grpcurl sends its
`-H 'authorization: Bearer TOKEN'` header to reflection too.

A token never leaves this module: not in a log line, an error message, a metric, or a repr. Only
their SHA-256 digests are kept after reading the file.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from seqserve.runtime.errors import SeqserveError

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
SCHEME = "bearer"  # compared case-insensitively (RFC 7235)
SHORT_TOKEN = 16  # characters: a shorter token is accepted with a warning (easier to guess)
MISSING = "missing bearer token: send the metadata 'authorization: Bearer TOKEN'"
LOG_INTERVAL_S = 1.0  # at most one warning about refused calls per interval (a flood of them is counted)
REJECTED = "bearer token not accepted"


class TokenFileError(SeqserveError):
    """A token file the server cannot use; the message names the file and the line, never a token."""


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def read_tokens(path: str | Path) -> tuple[bytes, ...]:
    """The SHA-256 digests of the tokens in a token file (one per line; blank lines and lines
    starting with `#` ignored). A token is printable ASCII without spaces, as an HTTP/2 header
    value can carry it; anything else, an unreadable file or one without tokens is a TokenFileError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TokenFileError(f"--auth-token-file {path}: {exc.strerror or exc}") from None
    digests: list[bytes] = []
    for number, line in enumerate(data.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith(b"#"):
            continue
        if not all(0x21 <= c <= 0x7E for c in token):  # the message never quotes the line
            raise TokenFileError(f"--auth-token-file {path}, line {number}: a token must be printable ASCII "
                                 "without spaces (one token per line, comments on lines of their own)")
        if len(token) < SHORT_TOKEN:
            log.warning("--auth-token-file %s, line %d: a token of %d characters is easy to guess; use %d or more "
                        "(e.g. `openssl rand -hex 32`)", path, number, len(token), SHORT_TOKEN * 2)
        digests.append(_digest(token))
    if not digests:
        raise TokenFileError(f"--auth-token-file {path}: no tokens in it (one per line; blank lines and "
                             "lines starting with # are ignored)")
    return tuple(dict.fromkeys(digests))  # each token once, in file order


class TokenAuth:
    """The accepted tokens (as digests), reread from their file on `reload()`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._digests = read_tokens(self.path)  # a TokenFileError here stops the server from starting
        log.info("authentication on: %d bearer token(s) from %s", len(self._digests), self.path,
                 extra={"fields": {"event": "auth_tokens_loaded", "tokens": len(self._digests), "path": str(self.path)}})

    @property
    def count(self) -> int:
        """How many distinct tokens are accepted now."""
        return len(self._digests)

    def reload(self) -> bool:
        """Reread the token file (what SIGHUP does); on any error keep the tokens in use, log the
        error and return False."""
        try:
            digests = read_tokens(self.path)
        except TokenFileError as exc:
            log.error("token file not reloaded, the %d token(s) in use stay: %s", len(self._digests), exc,
                      extra={"fields": {"event": "auth_tokens_reload_failed", "tokens": len(self._digests)}})
            return False
        self._digests = digests  # one assignment: a check sees the old set or the new one, never a mix
        log.info("token file reloaded: %d bearer token(s) from %s", len(digests), self.path,
                 extra={"fields": {"event": "auth_tokens_reloaded", "tokens": len(digests), "path": str(self.path)}})
        return True

    def check(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """None when the call's metadata carries an accepted bearer token, else the reason to refuse
        it (a message for the caller that never contains what it sent)."""
        values = [value for key, value in metadata or () if key == AUTHORIZATION]
        if not values:
            return MISSING
        if len(values) > 1:  # one guess per call, and no doubt about which header counts
            return REJECTED
        value = values[0]
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
        scheme, _, token = raw.strip().partition(b" ")
        if scheme.lower() != SCHEME.encode() or not token.strip():
            return MISSING
        presented = _digest(token.strip())
        accepted = False
        for digest in self._digests:  # every one, without stopping at a match: the time is the same
            accepted |= hmac.compare_digest(presented, digest)
        return None if accepted else REJECTED

    def __repr__(self) -> str:
        return f"TokenAuth({str(self.path)!r}, {self.count} tokens)"


class ReloadOnSignal:
    """What SIGHUP does: `auth.reload()`; one that arrives while the server is still starting (the
    file has been read already) is replayed once `attach` hands over the server's TokenAuth."""

    def __init__(self) -> None:
        self.auth: TokenAuth | None = None
        self.pending = False

    def __call__(self) -> None:
        if self.auth is None:
            self.pending = True
        else:
            self.auth.reload()

    def attach(self, auth: TokenAuth | None) -> None:
        self.auth = auth
        if auth is not None and self.pending:
            self.pending = False
            auth.reload()


OnRefused = Callable[[str, str], None]  # (method name, status code name): the metrics' on_rpc


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without an accepted bearer token with UNAUTHENTICATED, except the
    methods under `open_prefixes` (health, by default). Each refusal is counted (`on_refused`);
    a warning names the method and the peer, at most one per LOG_INTERVAL_S with the number of
    refusals it stands for."""

    def __init__(self, auth: TokenAuth, *, open_prefixes: Sequence[str] = (HEALTH_PREFIX,),
                 on_refused: OnRefused | None = None) -> None:
        self.auth = auth
        self.open_prefixes = tuple(open_prefixes)
        self.on_refused = on_refused
        self._logged_at = -float("inf")  # time.monotonic() of the last warning
        self._unlogged = 0  # refusals since then

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        method = method.decode("utf-8", "replace") if isinstance(method, bytes) else method
        if method.startswith(self.open_prefixes):
            return await continuation(handler_call_details)
        reason = self.auth.check(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if reason is None:
            return handler
        # Unknown methods are refused the same way, so that a caller without a token learns nothing.
        name = method.rsplit("/", 1)[-1] if handler is not None else "unknown"
        return _refusal(handler, self._refuse(name, reason))

    def _refuse(self, name: str, reason: str) -> Callable[[grpc.aio.ServicerContext], Awaitable[None]]:
        async def refuse(context: grpc.aio.ServicerContext) -> None:
            if self.on_refused is not None:  # every refusal is counted ...
                self.on_refused(name, grpc.StatusCode.UNAUTHENTICATED.name)
            self._unlogged += 1
            now = time.monotonic()
            if now - self._logged_at >= LOG_INTERVAL_S:  # ... but a flood of them cannot flood the log
                log.warning("%s refused: %s (%d refused call(s) since the last such line)", name,
                            "no token" if reason == MISSING else "token not accepted", self._unlogged,
                            extra={"fields": {"event": "unauthenticated", "method": name,
                                              "peer": context.peer() or "", "refused": self._unlogged,
                                              "reason": "missing" if reason == MISSING else "rejected"}})
                self._logged_at, self._unlogged = now, 0
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        return refuse


def _refusal(handler: grpc.RpcMethodHandler | None,
             refuse: Callable[[grpc.aio.ServicerContext], Awaitable[None]]) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only refuses; no deserializer, so the request
    (raw bytes, bounded by the message size limit) is never parsed."""
    request_streaming = handler is not None and handler.request_streaming
    response_streaming = handler is not None and handler.response_streaming
    if response_streaming:
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await refuse(context)
            yield b""  # never reached: makes this an async generator, as a streaming handler must be

        make = grpc.stream_stream_rpc_method_handler if request_streaming else grpc.unary_stream_rpc_method_handler
        return make(streaming)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse(context)

    make = grpc.stream_unary_rpc_method_handler if request_streaming else grpc.unary_unary_rpc_method_handler
    return make(unary)


def interceptors(auth: TokenAuth | None, *, auth_health: bool = False,
                 on_refused: OnRefused | None = None) -> list[grpc.aio.ServerInterceptor]:
    """The server's interceptors: none without a token file, else the AuthInterceptor (health open
    unless `auth_health`)."""
    if auth is None:
        return []
    return [AuthInterceptor(auth, open_prefixes=() if auth_health else (HEALTH_PREFIX,), on_refused=on_refused)]
