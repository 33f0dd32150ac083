"""Typed exceptions of the client: every gRPC status a call can end with maps to one class here,
carrying the server's message, so callers write `except Overloaded:` instead of comparing codes.

The kinds mirror the server's domain errors (`seqserve.runtime.errors`): INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, CANCELLED and UNAVAILABLE each have a class; any other
code becomes a `ServerError` that still carries it.
"""

from __future__ import annotations

import grpc

from seqserve.runtime.errors import SeqserveError


REQUEST_ID_KEY = "x-request-id"  # trailing metadata the server sets on a failed call


class SeqserveClientError(SeqserveError):
    """Base of every error a client call raises; `code` is the gRPC status, `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None, request_id: str = "") -> None:
        super().__init__(details)
        self.details = details
        self.request_id = request_id  # the server's id for the failed request, when it sent one
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name


class InvalidArgument(SeqserveClientError, ValueError):
    """A request field out of range or malformed; the message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(SeqserveClientError):
    """The server's wait queue is full (or the message too large): retry later or elsewhere."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(SeqserveClientError, TimeoutError):
    """The call's deadline (`timeout`) passed before the server finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(SeqserveClientError, ConnectionError):
    """No server could take the call (not reachable, starting up or draining), after the retries."""

    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(SeqserveClientError):
    """The call was cancelled (by this client, or by the server on its side)."""

    code = grpc.StatusCode.CANCELLED


class ServerError(SeqserveClientError):
    """Any other status (INTERNAL, UNIMPLEMENTED, UNAUTHENTICATED, ...); `code` says which."""


_BY_CODE: dict[grpc.StatusCode, type[SeqserveClientError]] = {
    cls.code: cls for cls in (InvalidArgument, Overloaded, DeadlineExceeded, Unavailable, Cancelled)
}


def error_for(code: grpc.StatusCode, details: str | None, *, request_id: str = "") -> SeqserveClientError:
    """The typed exception for a status code and the server's message."""
    cls = _BY_CODE.get(code, ServerError)
    return cls(details or "", code=code, request_id=request_id)


def from_rpc_error(exc: grpc.RpcError) -> SeqserveClientError:
    """The typed exception for a failed call (blocking `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    request_id = ""
    trailing = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    for key, value in trailing or ():
        if key == REQUEST_ID_KEY:
            request_id = value if isinstance(value, str) else value.decode("utf-8", "replace")
    return error_for(code or grpc.StatusCode.UNKNOWN, details, request_id=request_id)
