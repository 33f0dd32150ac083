"""What the client hands back: plain frozen records, never protobuf objects.

Alignment matrices are numpy arrays (read-only) when numpy is importable, else tuples of tuples;
they take no part in equality or hashing, so records stay comparable either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

Alignment = Any  # numpy.ndarray (T, S) / (S,) float32, or tuples of floats without numpy


class FinishReason(str, Enum):
    """Why a sequence ended (the values match `seqserve.runtime.generation.FinishReason`)."""

    EOS = "eos"  # the model produced end-of-sequence (not included in the output)
    LENGTH = "length"  # max_new_tokens was reached
    STOP = "stop"  # one of stop_token_ids was produced (it is included in the output)
    CANCELLED = "cancelled"  # the request was cancelled, or its deadline passed
    UNSPECIFIED = "unspecified"  # the server did not say (a server newer or older than this client)


class HealthStatus(str, Enum):
    """A `grpc.health.v1` serving status."""

    UNKNOWN = "UNKNOWN"
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"  # the server does not know the service name asked about


@dataclass(frozen=True)
class GeneratedSequence:
    """One generated sequence."""

    text: str  # the decoded text (special tokens left out)
    token_ids: tuple[int, ...]  # generated token ids, EOS excluded
    finish_reason: FinishReason
    log_probs: tuple[float, ...] | None = None  # per token (only with return_log_probs)
    score: float | None = None  # beam score, or the sum of log_probs (with return_log_probs; always for beam)
    alignment_tokens: tuple[str, ...] | None = None  # output tokens as strings: the rows of `alignments`
    alignments: Alignment | None = field(default=None, compare=False)  # (T, S) attention over source_tokens


@dataclass(frozen=True)
class Usage:
    """Token counts of one input."""

    input_tokens: int  # source tokens fed to the encoder, EOS included (after truncation)
    output_tokens: int  # tokens generated over all returned sequences, EOS excluded


@dataclass(frozen=True)
class Timings:
    """Milliseconds one input spent in each phase, measured on the server."""

    queue_ms: float  # submitted -> admitted into the running batch
    encoder_ms: float  # the encoder pass that admitted it
    decode_ms: float  # admitted -> finished
    first_token_ms: float  # submitted -> first token chosen
    total_ms: float  # submitted -> finished


@dataclass(frozen=True)
class GenerationResult:
    """Everything generated for one input."""

    sequences: tuple[GeneratedSequence, ...]  # best first: one for greedy, num_return_sequences otherwise
    usage: Usage
    timings: Timings
    truncated: bool = False  # the input was cut to max_source_len (only with truncate_input)
    source_tokens: tuple[str, ...] | None = None  # columns of every alignment row (only with return_alignments)
    request_id: str = ""  # the request's id (the caller's or one the server made)
    model_version: str = ""  # first 12 hex digits of the answering model's decoder sha256

    @property
    def text(self) -> str:
        """The best sequence's text."""
        return self.sequences[0].text if self.sequences else ""

    @property
    def finish_reason(self) -> FinishReason:
        """Why the best sequence ended."""
        return self.sequences[0].finish_reason if self.sequences else FinishReason.UNSPECIFIED


@dataclass(frozen=True)
class TokenPiece:
    """One generated token, streamed as soon as the server chose it."""

    sequence: int  # which sequence it extends (0 unless sampling several)
    index: int  # its position in that sequence, from 0
    token_id: int
    text: str  # text it adds to its sequence (may be empty); a sequence's pieces concatenate to its text
    log_prob: float | None = None  # only with return_log_probs
    alignment: Alignment | None = field(default=None, compare=False)  # (S,) weights, only with return_alignments


@dataclass(frozen=True)
class ModelDims:
    """Dimensions of the served Transformer."""

    d_model: int
    encoder_layers: int
    decoder_layers: int
    n_heads: int
    d_ff: int


@dataclass(frozen=True)
class SpecialTokens:
    """Special token ids of the served model."""

    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int


@dataclass(frozen=True)
class ServerLimits:
    """Limits the server enforces on every request."""

    max_batch_size: int  # rows decoded together in one step
    max_queue: int  # requests waiting for a row; beyond it Overloaded
    max_inputs_per_request: int  # inputs in one call (the client splits longer lists)
    max_new_tokens_limit: int  # largest max_new_tokens
    max_beams: int  # largest num_beams
    max_return_sequences: int  # largest num_return_sequences for sampling
    max_message_bytes: int  # largest request message


@dataclass(frozen=True)
class ModelInfo:
    """The served model and the server's limits."""

    model_version: str  # first 12 hex digits of decoder_sha256
    dims: ModelDims
    vocab_size: int  # valid token ids are 0..vocab_size-1
    max_source_len: int  # longest input in tokens, EOS included
    max_target_len: int  # longest output in tokens the model was built for
    special_tokens: SpecialTokens
    providers: tuple[str, ...]  # ONNX Runtime execution providers in use, in priority order
    encoder_sha256: str  # digest of encoder.onnx and its weights file (see the proto)
    decoder_sha256: str  # the same for the decoder
    limits: ServerLimits
    quantization: str = ""  # "" (none) or "int8"
