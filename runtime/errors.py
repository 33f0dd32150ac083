"""User-facing errors shared by training, export and serving.

Every error a user can cause by what they pass in (a bad file, a wrong name, a corrupt
checkpoint) derives from `SeqserveError`. The command line prints such an error's message on
one line and exits non-zero, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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
