"""Domain errors of the serving side, in one place; the gRPC layer maps each to one status code
(`STATUS_CODES`), and the client maps codes back to the same kinds of exceptions."""

from __future__ import annotations

import grpc

from seqserve.model.errors import SeqserveError


class ServingError(SeqserveError):
    """Base of the errors a request can end with."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(ServingError):
    """A request field out of range or malformed; the message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class Overloaded(ServingError):
    """The wait queue is full, or too long to finish before the request's deadline: retry later
    or elsewhere. `retry_after_s`, when known, is the expected wait until a place is free."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServingError):
    """The request's deadline passed before it finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServingError):
    """The caller cancelled the request."""

    code = grpc.StatusCode.CANCELLED


class Unavailable(ServingError):
    """The server is starting, draining or stopped."""

    code = grpc.StatusCode.UNAVAILABLE


STATUS_CODES: dict[type[ServingError], grpc.StatusCode] = {
    cls: cls.code for cls in (InvalidRequest, Overloaded, DeadlineExceeded, Cancelled, Unavailable)
}
