"""Typed messages between the engine core process and its front-ends (and its owner).

msgspec structs, framed as MessagePack (one frame per `multiprocessing.connection` message):
- front-end -> engine core: `Hello` with the protocol version, then one `Command` per frame
  (`Submit`, `Cancel`, `Close`);
- engine core -> front-end: first `Ready` (or `Failed`), each with the protocol version, then one
  `Report` per step boundary (and per command that produced an answer) with every token of that
  front-end's requests in columns, their finished results and failures, and the step's figures;
- owner -> engine core, on the status connection: `Stop`; engine core -> owner: `Ready` or `Failed`
  once the model is loaded.

Peers of different `PROTOCOL_VERSION`s refuse each other at the first message with a message that
names both versions; nothing is pickled, so neither side runs code the other sends.
"""

from __future__ import annotations

import msgspec
import numpy as np

from seqserve.runtime import errors
from seqserve.runtime.generation import GenerationParams, RequestResult, TokenEvent

PROTOCOL_VERSION = 2
_NDARRAY = 1  # MessagePack extension code of a float32 array: ndim (1 byte), shape (int32 each), data


def _enc_hook(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj, dtype=np.float32)
        return msgspec.msgpack.Ext(_NDARRAY, bytes([a.ndim]) + np.asarray(a.shape, dtype=np.int32).tobytes()
                                   + a.tobytes())
    raise NotImplementedError(f"cannot send a {type(obj).__name__} to or from the engine core")


def _ext_hook(code: int, data: memoryview) -> object:
    if code != _NDARRAY:
        raise ValueError(f"unknown MessagePack extension {code}")
    raw = bytes(data)
    ndim = raw[0]
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=np.int32, count=ndim, offset=1))
    return np.frombuffer(raw, dtype=np.float32, offset=1 + 4 * ndim).reshape(shape)


def _dec_hook(kind: type, obj: object) -> object:
    if kind is np.ndarray and isinstance(obj, np.ndarray):
        return obj
    raise NotImplementedError(f"cannot read a {kind} from the engine core")


# -- front-end (or owner) -> engine core ------------------------------------------------------------

class Hello(msgspec.Struct, tag=True, array_like=True):
    """A front-end's first message: the protocol it speaks."""

    version: int


class Submit(msgspec.Struct, tag=True, array_like=True):
    """A request to decode; `deadline` and `submitted` are time.monotonic() values (one machine)."""

    id: int
    source_ids: list[int]
    params: GenerationParams
    deadline: float | None
    submitted: float
    stream: bool


class Cancel(msgspec.Struct, tag=True, array_like=True):
    id: int


class Close(msgspec.Struct, tag=True, array_like=True):
    """Refuse this front-end's new requests from now on; the ones held still finish."""


class Stop(msgspec.Struct, tag=True, array_like=True):
    """(From the owner.) Fail what is left and exit."""


Command = Hello | Submit | Cancel | Close | Stop


# -- engine core -> front-end (or owner) ------------------------------------------------------------

class Ready(msgspec.Struct, tag=True, array_like=True):
    version: int
    providers: list[str]
    kv_cache_on_device: bool
    pid: int  # the engine core's process id


class Failed(msgspec.Struct, tag=True, array_like=True):
    version: int
    reason: str


class Tokens(msgspec.Struct, array_like=True):
    """One step's tokens of streaming requests, in columns (one entry per token)."""

    ids: list[int] = []
    sequences: list[int] = []
    indexes: list[int] = []
    token_ids: list[int] = []
    log_probs: list[float | None] = []
    alignments: list[np.ndarray | None] = []

    def add(self, request_id: int, event: TokenEvent) -> None:
        self.ids.append(request_id)
        self.sequences.append(event.sequence)
        self.indexes.append(event.index)
        self.token_ids.append(event.token_id)
        self.log_probs.append(event.log_prob)
        self.alignments.append(event.alignment)

    def events(self) -> list[tuple[int, TokenEvent]]:
        return [(i, TokenEvent(s, x, t, lp, a)) for i, s, x, t, lp, a in
                zip(self.ids, self.sequences, self.indexes, self.token_ids, self.log_probs, self.alignments)]


class Done(msgspec.Struct, array_like=True):
    id: int
    result: RequestResult


class Error(msgspec.Struct, array_like=True):
    """A request's failure: the `errors` class by name, its message, and what that class carries."""

    id: int
    kind: str
    message: str
    field: str | None = None
    retry_after_s: float | None = None

    @classmethod
    def of(cls, request_id: int, error: errors.ServingError) -> Error:
        if isinstance(error, errors.InvalidRequest):
            return cls(request_id, "InvalidRequest", error.reason, field=error.field)
        if isinstance(error, errors.Overloaded):
            return cls(request_id, "Overloaded", str(error), retry_after_s=error.retry_after_s)
        return cls(request_id, type(error).__name__, str(error))

    def error(self) -> errors.ServingError:
        if self.kind == "InvalidRequest":
            return errors.InvalidRequest(self.field or "request", self.message)
        if self.kind == "Overloaded":
            return errors.Overloaded(self.message, self.retry_after_s)
        kind = _ERRORS.get(self.kind, errors.ServingError)
        return kind(self.message)


_ERRORS: dict[str, type[errors.ServingError]] = {
    cls.__name__: cls for cls in (errors.ServingError, errors.DeadlineExceeded, errors.Cancelled, errors.Unavailable)
}


class Report(msgspec.Struct, tag=True, array_like=True):
    """What the engine core has to say to one front-end after a step boundary (or a command): one frame.
    The step's figures go to one front-end only (the metrics' primary), so they are counted once."""

    tokens: Tokens = msgspec.field(default_factory=Tokens)
    done: list[Done] = []
    errors: list[Error] = []
    rows: int = 0  # rows in the batch now
    depth: int = 0  # requests waiting for rows now
    encoded: int = 0  # requests admitted at this boundary (one encoder pass), and its seconds
    encoder_seconds: float = 0.0
    step_rows: int = 0  # rows of the decoder step run at this boundary (0: none), and its times
    step_seconds: float = 0.0
    run_seconds: float = 0.0

    @property
    def empty(self) -> bool:
        return not (self.tokens.ids or self.done or self.errors or self.encoded or self.step_rows)


# -- framing ----------------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_commands = msgspec.msgpack.Decoder(Command, ext_hook=_ext_hook, dec_hook=_dec_hook)
_reports = msgspec.msgpack.Decoder(Ready | Failed | Report, ext_hook=_ext_hook, dec_hook=_dec_hook)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_command(frame: bytes) -> Hello | Submit | Cancel | Close | Stop:
    return _commands.decode(frame)


def decode_report(frame: bytes) -> Ready | Failed | Report:
    return _reports.decode(frame)
