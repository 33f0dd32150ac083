"""User-facing errors shared by training, export and serving, and the errors a served request ends with.

Every error a user can cause by what they pass in (a bad file, a wrong name, a corrupt
checkpoint) derives from `SeqserveError`. The command line prints such an error's message on
one line and exits non-zero, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import grpc


class SeqserveError(Exception):
    """A mistake in what the user supplied; the message says what and where."""


class DataError(SeqserveError):
    """A corpus, task name or tokenizer input that cannot be used."""


class CheckpointError(SeqserveError):
    """A checkpoint that is missing, corrupt, or does not match its own config."""


class ModelDirError(SeqserveError):
    """A model directory that is missing a file, is corrupt, or fails its sha256 check."""


class ExportError(SeqserveError):
    """An export that could not be written."""


class ParityError(ExportError):
    """The exported graphs disagree with PyTorch beyond the tolerance."""

    def __init__(self, message: str, *, max_diff: float, tolerance: float) -> None:
        super().__init__(message)
        self.max_diff = max_diff  # largest difference seen (for token outputs: number of differing inputs)
        self.tolerance = tolerance


# -- the errors a served request can end with ---------------------------------------------------
# The gRPC layer maps each to one status code (`STATUS_CODES`), and the client maps codes back to
# the same kinds of exceptions.
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
