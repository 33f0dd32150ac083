"""Bad input, fuzzed: property-based tests (hypothesis) against the real server, over every field of
Generate, GenerateStream and GetModelInfo, the request id, metadata, compression, deadlines and
cancellation, on conftest's three servers (the default one, one with a single batch row and queue
place, one decoding in a worker process), one request at a time and several at once.

Requests are put on the wire by hand (`Wire`), so they can carry what protobuf's own serializer
refuses: invalid UTF-8 and lone surrogates in strings, unknown and out-of-range enum numbers,
overlong varints, fields of unknown numbers or of the wrong wire type. Numbers are drawn around
the server's limits (`Near`, shown as `max_beams+1`) and resolved against GetModelInfo when the
test runs, so a failing example names the bound it broke, and the same strategies fit any server.
Most fields stay within their bounds in a given example (`mostly`), so that most requests get
as far as decoding with one or two fields out of bounds.

The property, for every call:
- it ends with OK or a client error (INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED, ...);
  never INTERNAL, UNKNOWN or UNAVAILABLE, and never no answer within `TIMEOUT` (a hang);
  DEADLINE_EXCEEDED and CANCELLED only when the test set a short deadline or cancelled;
- a request that breaks a bound this file knows of (`broken_bounds`) is never OK, one that does not
  parse is INVALID_ARGUMENT, one over max_message_bytes is RESOURCE_EXHAUSTED;
- an OK answer keeps its invariants (`check_result`, `check_stream`): one result per input,
  num_return_sequences honoured, at most max_new_tokens tokens, valid finish reasons, text that is
  the decoding of the token ids, log-probs and alignments only and always when asked;
- afterwards the server has no call in flight and its scheduler no rows (nothing leaked); a normal
  request decoded beside fuzzed ones, and one sent once a test is over, get the same answer as
  before the fuzzing.

Default suite: a fixed set of examples (`derandomize`) and `EDGE_REQUESTS`, in well under a minute.
Long run (random, new examples each time; failures are kept in .hypothesis/ and replayed first):
    SEQSERVE_FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/server/test_fuzz.py -p no:cacheprovider
prints the calls made per test, by status code and by the field INVALID_ARGUMENT named.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from seqserve.model.data import dates_pairs
from seqserve.runtime.tokenizer import decode, encode_source, load_tokenizer
from seqserve.proto import seqserve_pb2 as pb
from seqserve.server.service import SERVICE_NAME
from seqserve.server.validation import MAX_STOP_TOKENS

# Seconds: a call still unanswered by then is a hang, and fails the test. The largest request drawn
# (max_inputs_per_request inputs, max_beams beams, max_new_tokens forced by min_new_tokens) takes
# under a second here; the margin is for a machine busy with other work (at nice 10 beside other
# test suites on 2 cores, five large calls at once once took over 30 s).
TIMEOUT = 60.0
SAFE_ID = re.compile(r"[\x21-\x7e]{1,128}")  # what the server accepts and echoes as a request id
SOURCES = [p.source for p in dates_pairs(8, seed=4321)]

# -- settings: a short, reproducible run by default; a long random one on demand ---------------

LONG_RUN = int(os.environ.get("SEQSERVE_FUZZ_EXAMPLES") or 0)
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
          HealthCheck.function_scoped_fixture]  # the fixtures are session-wide servers, on purpose
settings.register_profile("seqserve-fuzz", max_examples=20, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("seqserve-fuzz-long", max_examples=max(LONG_RUN, 1), deadline=None,
                          suppress_health_check=_QUIET, print_blob=True)
PROFILE = settings.get_profile("seqserve-fuzz-long" if LONG_RUN else "seqserve-fuzz")


def examples(short: int) -> settings:
    """This file's profile with `short` examples in the default suite (LONG_RUN in the long one)."""
    return settings(PROFILE, max_examples=LONG_RUN or short)


# -- numbers around the server's limits ---------------------------------------------------------


@dataclass(frozen=True)
class Near:
    """A number relative to one of the server's limits (`Limits`), resolved when the test runs."""

    bound: str
    offset: int = 0
    times: int = 1

    def __repr__(self) -> str:
        scaled = self.bound if self.times == 1 else f"{self.times}*{self.bound}"
        return scaled if not self.offset else f"{scaled}{self.offset:+d}"


@dataclass(frozen=True)
class Limits:
    """The bounds requests are drawn around, read from GetModelInfo."""

    info: pb.GetModelInfoResponse

    def __getitem__(self, bound: str) -> int:
        i, lim = self.info, self.info.limits
        return {"max_new_tokens": min(i.max_target_len, lim.max_new_tokens_limit),
                "max_source_len": i.max_source_len, "vocab_size": i.vocab_size, "inputs": lim.max_inputs_per_request,
                "max_beams": lim.max_beams, "max_return_sequences": lim.max_return_sequences,
                "max_batch_size": lim.max_batch_size, "max_queue": lim.max_queue, "stop_token_ids": MAX_STOP_TOKENS,
                "max_message_bytes": lim.max_message_bytes}[bound]

    def resolve(self, value: Any, top: int = 2**32 - 1) -> Any:
        """Near values (also inside lists) as plain numbers, clamped to [0, top] like the field's type."""
        if isinstance(value, Near):
            return min(max(value.times * self[value.bound] + value.offset, 0), top)
        if isinstance(value, list):
            return [self.resolve(v, top) for v in value]
        return value


rarely = st.sampled_from([False] * 5 + [True])  # about one in six; shrinks to False
seldom = st.sampled_from([False] * 11 + [True])  # one in twelve


@st.composite
def mostly(draw: Any, inside: st.SearchStrategy[Any], outside: st.SearchStrategy[Any]) -> Any:
    """A value within the bounds five times in six, so that most requests get far enough to be decoded
    and each one breaks a bound or two; shrinking goes towards the value within."""
    return draw(outside if draw(rarely) else inside)


def uints(bound: str) -> st.SearchStrategy[Any]:
    """Unsigned 32-bit values: up to the bound; or just past it, far past it, the type's extremes, anything."""
    inside = st.one_of(st.integers(0, 3), st.builds(Near, st.just(bound), st.integers(-2, 0)))
    outside = st.one_of(st.builds(Near, st.just(bound), st.integers(1, 2)),
                        st.builds(Near, st.just(bound), st.integers(0, 10**6), st.integers(2, 1000)),
                        st.sampled_from([2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
    return mostly(inside, outside)


F32_MAX = 3.4028234663852886e38
F32_TINY = 1.401298464324817e-45  # the smallest positive (subnormal) float32
F32_NORMAL = 1.1754943508222875e-38  # the smallest positive normal float32
BAD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf])
length_penalties = mostly(  # any finite value is allowed: 400 and -1100 once overflowed the whole batch
    st.one_of(st.floats(-3, 3, width=32), st.sampled_from([0.0, -0.0, 400.0, -1100.0, F32_TINY, F32_MAX, -F32_MAX])),
    st.one_of(BAD_FLOATS, st.floats(width=32)))
temperatures = mostly(
    st.one_of(st.floats(0, 3, width=32), st.sampled_from([0.0, -0.0, F32_TINY, F32_NORMAL, 1e-7, 1e4, F32_MAX])),
    st.one_of(BAD_FLOATS, st.sampled_from([-F32_TINY, -1.0, -F32_MAX]), st.floats(width=32)))
top_ps = mostly(
    st.one_of(st.floats(0, 1, exclude_min=True, width=32), st.sampled_from([F32_TINY, 0.9999999403953552, 1.0])),
    st.one_of(BAD_FLOATS, st.sampled_from([0.0, -0.0, 1.0000001192092896, 2.0, -F32_TINY]), st.floats(width=32)))
seeds = st.one_of(st.integers(0, 3), st.sampled_from([2**32, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
token_ids = mostly(st.integers(0, 40),  # the special ids (pad, bos, eos, unk) and ordinary ones
                   st.builds(Near, st.just("vocab_size"), st.integers(-1, 2)) | st.integers(0, 2**32 - 1))
stop_token_ids = mostly(
    st.lists(token_ids, max_size=4),
    st.one_of(st.integers(MAX_STOP_TOKENS - 1, MAX_STOP_TOKENS + 1).flatmap(
        lambda n: st.lists(st.integers(0, 40), min_size=n, max_size=n)), st.just(list(range(4 * MAX_STOP_TOKENS)))))
# -- strings, as the bytes that go on the wire ---------------------------------------------------


@dataclass(frozen=True)
class Text:
    """A string field's bytes on the wire (possibly not UTF-8), with a short label for long ones."""

    raw: bytes
    label: str = ""

    @property
    def valid(self) -> bool:
        try:
            self.raw.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    def __repr__(self) -> str:
        return f"Text({self.label})" if self.label else f"Text({self.raw!r})"


def text(value: str) -> Text:
    return Text(value.encode("utf-8"))


def long_text(pattern: str, length: int) -> Text:
    return Text((pattern * (length // len(pattern) + 1))[:length].encode("utf-8"), f"{pattern!r} to {length} chars")


EDGE_STRINGS = ["", " ", "\t\n\r\x0b\x0c", "\u3000\u00a0\u2028", "\x1c\x1d\x1e\x1f", "\x00", "\x7f", "\u200b",
                "\ufeff", "\ufffd", "\U0010ffff", "\u202e1 May 2000", "1 May 2000\x00", "\n1 May 2000\n", "é",
                "\U0001d7d9 May 2000", "<pad>", "</s>", "<unk> <s>"]
# Bytes no UTF-8 decoder accepts: lone surrogates (high, low, a CESU-8 pair), overlong forms,
# stray continuation bytes, bytes never used, a truncated sequence, code points past U+10FFFF.
BAD_UTF8 = [b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xed\xa0\xbd\xed\xb8\x80", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80",
            b"\x80", b"\xbf", b"\xff", b"\xfe", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80"]
invalid_utf8 = st.one_of(
    st.sampled_from(BAD_UTF8),
    st.characters(categories=["Cs"]).map(lambda c: c.encode("utf-8", "surrogatepass")),  # a lone surrogate
    st.binary(min_size=1, max_size=16))
controls = st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn"]), max_size=12)
# "5" * n is n + 2 tokens with EOS for the test model's tokenizer (digits one by one): n around 46
# gives inputs at, just under and just over its max_source_len (48), with or without truncate_input.
digits = st.integers(40, 52).map(lambda n: Text(b"5" * n, f"'5' * {n}"))
texts = mostly(
    st.one_of(st.sampled_from(SOURCES).map(text), digits),
    st.one_of(
        st.sampled_from(EDGE_STRINGS).map(text),
        st.text(max_size=40).map(text),
        st.tuples(st.sampled_from(SOURCES), controls, st.text(max_size=8)).map(lambda t: text("".join(t))),
        st.tuples(st.sampled_from(SOURCES), invalid_utf8).map(lambda t: Text(t[0].encode() + t[1])),
        st.builds(long_text, st.sampled_from(["1 May 2000 ", "\u00e9", "\x00", " ", "\U0001f600"]),
                  st.sampled_from([200, 1000, 20_000, 70_000]))))
request_ids = mostly(
    st.one_of(st.just(text("")), st.from_regex(SAFE_ID, fullmatch=True).map(text)),
    st.one_of(
        st.sampled_from(["x" * 128, "x" * 129, "é", "a\nb", "a b", " ", "\x00", "id\r\nx-forged: 1", "\u202e",
                         "a\x7f", "x\n2026-01-01 00:00:00,000 INFO seqserve.requests: Generate admin OK"]).map(text),
        st.text(max_size=20).map(text),
        invalid_utf8.map(Text)))

# -- metadata a grpc client will send -----------------------------------------------------------

# Keys gRPC or HTTP/2 give a meaning; the client sends them, so a hostile one may.
RESERVED_KEYS = ["x-request-id", "authorization", "user-agent", "grpc-encoding", "grpc-accept-encoding",
                 "content-type", "te", "host"]
RESERVED_BINARY_KEYS = ["grpc-tags-bin", "grpc-trace-bin", "x-request-id-bin"]
metadata_keys = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,15}", fullmatch=True).filter(
    lambda k: not k.startswith("grpc-") and not k.endswith("-bin"))
metadata_values = mostly(st.from_regex(r"[\x20-\x7e]{0,40}", fullmatch=True),
                         st.sampled_from([1000, 7000, 20_000]).map(lambda n: "v" * n))
metadata = st.lists(mostly(
    st.one_of(st.tuples(metadata_keys, metadata_values),
              st.tuples(metadata_keys.map(lambda k: k + "-bin"), st.binary(max_size=40))),
    st.one_of(st.tuples(st.sampled_from(RESERVED_KEYS), metadata_values),
              st.tuples(st.sampled_from(RESERVED_BINARY_KEYS), st.binary(max_size=40)))), max_size=3)
# gRPC refuses headers past 8 KiB by default (RESOURCE_EXHAUSTED), counting 32 bytes an entry beside
# key and value, and the client's own headers; past half of it, that answer is allowed.
METADATA_LIMIT = 4 * 1024
deadlines = mostly(st.none(), st.floats(0.001, 0.3))  # None: TIMEOUT, and answering within it is the test
# A compressed request is read after inflating it: 70 kB of zeros fit in a few hundred bytes.
compressions = mostly(st.none(), st.sampled_from([grpc.Compression.Gzip, grpc.Compression.Deflate]))


@dataclass(frozen=True)
class Send:
    """How a request is sent: its metadata, deadline and compression, and when its stream is cancelled."""

    metadata: tuple[tuple[str, Any], ...] = ()
    deadline: float | None = None  # seconds; None: TIMEOUT, and answering within it is the test
    compression: grpc.Compression | None = None
    cancel_after: int | None = None  # GenerateStream: cancel once this many messages came

    @property
    def big_metadata(self) -> bool:
        return sum(len(k) + len(v) + 32 for k, v in self.metadata) > METADATA_LIMIT


sends = st.builds(Send, metadata.map(tuple), deadlines, compressions)
stream_sends = st.builds(Send, metadata.map(tuple), deadlines, compressions, mostly(st.none(), st.integers(1, 3)))

# -- requests on the wire -----------------------------------------------------------------------


class Wire:
    """Protocol-buffer encoding by hand, so that a request can carry what protobuf would not write."""

    @staticmethod
    def varint(n: int) -> bytes:
        n &= (1 << 64) - 1  # a negative int32 goes as its 64-bit two's complement (10 bytes)
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    @classmethod
    def field(cls, number: int, wire_type: int, payload: bytes) -> bytes:
        key = cls.varint(number << 3 | wire_type)
        return key + (cls.varint(len(payload)) if wire_type == 2 else b"") + payload


# A field of any number and wire type, as an old or a hostile client may send: unknown numbers
# (kept aside by the parser), known ones of the wrong type, groups and wire types that do not exist.
extra_fields = mostly(st.just([]), st.lists(st.tuples(
    st.one_of(st.integers(1, 20), st.sampled_from([100, 2047, 2**29 - 1])),
    st.integers(0, 7),
    st.binary(max_size=12)), min_size=1, max_size=2))


def encode_extras(extras: list[tuple[int, int, bytes]]) -> bytes:
    out = b""
    for number, wire_type, data in extras:
        payload = {0: Wire.varint(int.from_bytes(data[:9] or b"\0", "little")), 1: data[:8].ljust(8, b"\0"),
                   5: data[:4].ljust(4, b"\0")}.get(wire_type, data)
        out += Wire.field(number, wire_type, payload)
    return out


OPTION_FIELDS = pb.GenerationOptions.DESCRIPTOR.fields_by_name
STRATEGY_NUMBERS = mostly(st.sampled_from([0, 1, 2, 3]),  # unspecified, greedy, beam, sampling
                          st.sampled_from([4, 5, 99, 2**31 - 1, -1, -(2**31), 2**32 + 2, 2**63]))


@st.composite
def generation_options(draw: Any) -> dict[str, Any]:
    """Options as field name -> value: those of the chosen strategy often, the others now and then."""
    strategy = draw(STRATEGY_NUMBERS)
    beam, sampling = strategy == pb.STRATEGY_BEAM, strategy == pb.STRATEGY_SAMPLING
    out: dict[str, Any] = {}
    if strategy or draw(st.booleans()):
        out["strategy"] = strategy

    def maybe(name: str, values: st.SearchStrategy[Any], likely: bool = True) -> None:
        if draw(st.booleans() if likely else seldom):
            out[name] = draw(values)

    maybe("max_new_tokens", uints("max_new_tokens"))
    maybe("min_new_tokens", mostly(st.integers(0, 2), uints("max_new_tokens")))
    maybe("num_beams", uints("max_beams"), beam)
    maybe("length_penalty", length_penalties, beam)
    maybe("num_return_sequences", uints("max_return_sequences" if sampling else "max_beams"), beam or sampling)
    maybe("temperature", temperatures, sampling)
    maybe("top_k", uints("vocab_size"), sampling)
    maybe("top_p", top_ps, sampling)
    maybe("seed", seeds, sampling)
    maybe("stop_token_ids", stop_token_ids)
    for flag in ("return_log_probs", "return_alignments", "truncate_input"):
        maybe(flag, st.booleans())
    if "stop_token_ids" in out:
        out["packed"] = draw(st.booleans())  # repeated scalars: packed (what proto3 writes) or one by one
    return out


def encode_options(options: dict[str, Any], limits: Limits) -> bytes:
    out = b""
    for name, value in options.items():
        if name == "packed":
            continue
        number = OPTION_FIELDS[name].number
        if name == "stop_token_ids":
            ids = limits.resolve(value)
            if options.get("packed"):
                out += Wire.field(number, 2, b"".join(Wire.varint(i) for i in ids))
            else:
                out += b"".join(Wire.field(number, 0, Wire.varint(i)) for i in ids)
        elif OPTION_FIELDS[name].type == OPTION_FIELDS[name].TYPE_FLOAT:
            out += Wire.field(number, 5, struct.pack("<f", value))
        else:
            out += Wire.field(number, 0, Wire.varint(limits.resolve(value, 2**64 - 1 if name == "seed" else 2**32 - 1)))
    return out


@dataclass
class Request:
    """One drawn request of any method; `payload` puts it on the wire."""

    method: str
    inputs: list[Text] = field(default_factory=list)  # Generate: cycled to `count`; GenerateStream: each one sent
    count: Any = 1
    options: dict[str, Any] = field(default_factory=dict)
    options_extra: list[tuple[int, int, bytes]] = field(default_factory=list)
    request_id: Text = field(default_factory=lambda: text(""))
    extra: list[tuple[int, int, bytes]] = field(default_factory=list)

    def payload(self, limits: Limits) -> bytes:
        if self.method == "GetModelInfo":
            return encode_extras(self.extra)
        if self.method == "Generate":
            count = limits.resolve(self.count, 100_000)
            inputs = list(itertools.islice(itertools.cycle(self.inputs), count))
        else:
            inputs = self.inputs  # a singular field sent twice: the last one counts
        out = b"".join(Wire.field(1, 2, t.raw) for t in inputs)
        if self.options or self.options_extra:
            out += Wire.field(2, 2, encode_options(self.options, limits) + encode_extras(self.options_extra))
        if self.request_id.raw:
            out += Wire.field(3, 2, self.request_id.raw)
        return out + encode_extras(self.extra)


input_counts = mostly(st.integers(1, 3), st.one_of(
    st.sampled_from([0, Near("inputs", -1), Near("inputs"), Near("inputs", 1),
                     Near("max_queue"), Near("max_queue", 1)]),
    st.builds(Near, st.just("inputs"), st.integers(0, 100), st.integers(2, 1000))))
generate_requests = st.builds(Request, st.just("Generate"), st.lists(texts, min_size=1, max_size=3), input_counts,
                              generation_options(), extra_fields, request_ids, extra_fields)
# Several at once: a few inputs each (the bound on inputs is test_generate's), so that their work
# together stays far under TIMEOUT.
few_inputs = st.builds(Request, st.just("Generate"), st.lists(texts, min_size=1, max_size=3), st.integers(1, 3),
                       generation_options(), extra_fields, request_ids, extra_fields)
stream_requests = st.builds(
    Request, st.just("GenerateStream"),
    mostly(st.lists(texts, min_size=1, max_size=1), st.lists(texts, max_size=2)),  # the field 0, 1 or 2 times
    st.just(1),
    generation_options(), extra_fields, request_ids, extra_fields)
model_info_requests = st.builds(Request, st.just("GetModelInfo"), extra=extra_fields)


@dataclass(frozen=True)
class RawRequest:
    """A request given as its bytes, whatever they are."""

    method: str
    data: bytes

    def payload(self, limits: Limits) -> bytes:
        return self.data


# -- calling ------------------------------------------------------------------------------------

RESPONSE_TYPES = {"Generate": pb.GenerateResponse, "GenerateStream": pb.GenerateStreamResponse,
                  "GetModelInfo": pb.GetModelInfoResponse}
REQUEST_TYPES = {"Generate": pb.GenerateRequest, "GenerateStream": pb.GenerateStreamRequest,
                 "GetModelInfo": pb.GetModelInfoRequest}
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
                 grpc.StatusCode.FAILED_PRECONDITION}
# An error message starts with the field it is about: "options.top_p: ...", "inputs[3]: ...".
FIELD_MESSAGE = re.compile(r"[a-z_]+(\.[a-z_]+)*(\[\d+\])?: \S")
OUTCOMES: Counter[tuple[str, str]] = Counter()  # (test, status code) -> calls, for the long run's report
CALLS: Counter[str] = Counter()  # test -> calls
REFUSED: Counter[tuple[str, str]] = Counter()  # (test, field named by INVALID_ARGUMENT) -> calls
COUNTING = threading.Lock()  # calls run on several threads at once in one test
GOAWAY_RETRIES: Counter[str] = Counter()  # UNAVAILABLE details -> calls sent again (see `call`)


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    trailers: dict[str, Any] = field(default_factory=dict)
    response: Any = None  # the response, or GenerateStream's list of messages


def call(channel: grpc.Channel, method: str, payload: bytes, *, timeout: float | None,
         metadata: list[tuple[str, Any]], cancel_after: int | None = None,
         compression: grpc.Compression | None = None) -> Outcome:
    """One call with hand-made request bytes; its status, whatever it is (`timeout` None: TIMEOUT).

    The server recycles connections (`grpc.max_connection_age_ms`): a call that meets the GOAWAY
    may end UNAVAILABLE before the server read it, which is what UNAVAILABLE is for, so it is sent
    again once, as a client's retry policy would; it is counted (`GOAWAY_RETRIES`), not hidden.
    """
    def once() -> Outcome:
        return _call_once(channel, method, payload, timeout=timeout, metadata=metadata, cancel_after=cancel_after,
                          compression=compression)

    outcome = once()
    if outcome.code is grpc.StatusCode.UNAVAILABLE and "GOAWAY" in outcome.details:
        with COUNTING:
            GOAWAY_RETRIES[outcome.details] += 1
        outcome = once()
    return outcome


def _call_once(channel: grpc.Channel, method: str, payload: bytes, *, timeout: float | None,
               metadata: list[tuple[str, Any]], cancel_after: int | None,
               compression: grpc.Compression | None) -> Outcome:
    path, parse = f"/{SERVICE_NAME}/{method}", RESPONSE_TYPES[method].FromString
    timeout = TIMEOUT if timeout is None else timeout
    try:
        if method != "GenerateStream":
            response, rpc = channel.unary_unary(path, response_deserializer=parse).with_call(
                payload, timeout=timeout, metadata=metadata, compression=compression)
            return Outcome(grpc.StatusCode.OK, trailers=dict(rpc.trailing_metadata() or ()), response=response)
        stream = channel.unary_stream(path, response_deserializer=parse)(payload, timeout=timeout, metadata=metadata,
                                                                         compression=compression)
        messages = []
        for message in stream:
            messages.append(message)
            if cancel_after is not None and len(messages) >= cancel_after:
                stream.cancel()
        return Outcome(grpc.StatusCode.OK, trailers=dict(stream.trailing_metadata() or ()), response=messages)
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "", dict(error.trailing_metadata() or ()))


def settle(server: Any) -> None:
    """Nothing may be left running once a call has been answered: no call in flight, no rows."""
    service = server.server.service
    deadline = time.monotonic() + TIMEOUT
    while service.in_flight and time.monotonic() < deadline:
        time.sleep(0.002)
    assert service.in_flight == 0, f"{service.in_flight} calls still in flight after their answer"
    scheduler = server.server.scheduler
    assert scheduler.wait_idle(TIMEOUT), "the scheduler still has rows or queued requests after every answer"


# -- the property -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What a request's outcome must be, from what this file knows of it."""

    parsed: Any  # the request as the server parses it; None: the bytes do not parse
    oversize: bool  # over max_message_bytes
    broken: list[str]  # bounds it breaks (the fields)


def expectation(request: Request, payload: bytes, limits: Limits) -> Expect:
    try:
        parsed = REQUEST_TYPES[request.method].FromString(payload)
    except DecodeError:
        parsed = None
    oversize = len(payload) > limits["max_message_bytes"]
    return Expect(parsed, oversize, broken_bounds(parsed, limits) if parsed is not None else [])


def effective(options: pb.GenerationOptions, limits: Limits) -> dict[str, Any]:
    """Options with the defaults the proto documents filled in."""
    beam, sampling = options.strategy == pb.STRATEGY_BEAM, options.strategy == pb.STRATEGY_SAMPLING
    num_beams = (options.num_beams or min(4, limits["max_beams"])) if beam else 1
    return {"max_new": options.max_new_tokens or limits["max_new_tokens"], "beam": beam, "sampling": sampling,
            "num_beams": num_beams, "num_return": options.num_return_sequences or 1}


def broken_bounds(request: Any, limits: Limits) -> list[str]:
    """The fields of a parsed request that break a documented bound (empty: none this file knows)."""
    broken = []
    if request.DESCRIPTOR.name == "GetModelInfoRequest":
        return broken
    if request.request_id and not SAFE_ID.fullmatch(request.request_id):
        broken.append("request_id")
    inputs = list(request.inputs) if hasattr(request, "inputs") else [request.input]
    if not 1 <= len(inputs) <= min(limits["inputs"], limits["max_queue"]):  # each input waits in the queue
        broken.append("inputs")
    broken += [f"inputs[{i}]" for i, t in enumerate(inputs) if not t.strip()]
    o = request.options
    if o.strategy not in (0, 1, 2, 3):
        return broken + ["options.strategy"]
    e = effective(o, limits)
    checks = {
        "max_new_tokens": o.max_new_tokens > limits["max_new_tokens"],
        "min_new_tokens": o.min_new_tokens > e["max_new"],
        "num_beams": (o.num_beams > limits["max_beams"]) if e["beam"] else o.num_beams > 1,
        "num_return_sequences": (e["num_return"] > e["num_beams"] if e["beam"] else
                                 e["num_return"] > limits["max_return_sequences"] if e["sampling"] else
                                 e["num_return"] > 1),
        "length_penalty": o.HasField("length_penalty") and (not e["beam"] or not math.isfinite(o.length_penalty)),
        "temperature": o.HasField("temperature") and (not e["sampling"] or not (o.temperature >= 0 and
                                                                               math.isfinite(o.temperature))),
        "top_p": o.HasField("top_p") and (not e["sampling"] or not 0 < o.top_p <= 1),
        "seed": o.HasField("seed") and not e["sampling"],
        "top_k": o.top_k > limits["vocab_size"] or (o.top_k > 0 and not e["sampling"]),
        "stop_token_ids": len(o.stop_token_ids) > MAX_STOP_TOKENS or any(i >= limits["vocab_size"]
                                                                         for i in o.stop_token_ids),
    }
    return broken + [f"options.{name}" for name, bad in checks.items() if bad]


def check_outcome(outcome: Outcome, expect: Expect, *, short_deadline: bool, cancelled: bool,
                  big_metadata: bool) -> None:
    """The status: allowed, and the one the request calls for when this file can tell."""
    code = outcome.code
    allowed = CLIENT_ERRORS | {grpc.StatusCode.OK}
    if short_deadline:
        allowed.add(grpc.StatusCode.DEADLINE_EXCEEDED)
    if cancelled:
        allowed.add(grpc.StatusCode.CANCELLED)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and not short_deadline:
        pytest.fail(f"no answer within {TIMEOUT} s (a hang)")
    assert code in allowed, f"{code.name}: {outcome.details!r}"
    assert not any(c < " " or c == "\x7f" for c in outcome.details), f"control characters in {outcome.details!r}"
    assert not re.search(r"\b[A-Z]\w*(Error|Exception)\b|Traceback", outcome.details), outcome.details
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return
    if big_metadata and code is grpc.StatusCode.RESOURCE_EXHAUSTED:  # headers over gRPC's limit: refused first
        return
    if expect.oversize:
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, f"{code.name} for a message over max_message_bytes"
        return
    if expect.parsed is None:
        assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{code.name} for bytes that do not parse"
    if expect.broken:
        assert code is not grpc.StatusCode.OK, f"OK although {expect.broken} break their bounds"
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        assert FIELD_MESSAGE.match(outcome.details), f"the message does not name the field: {outcome.details!r}"
        request_id = outcome.trailers.get("x-request-id", "")
        assert SAFE_ID.fullmatch(request_id), f"x-request-id trailer {request_id!r}"
        if expect.parsed is not None and expect.parsed.request_id and "request_id" not in expect.broken:
            assert request_id == expect.parsed.request_id


@dataclass
class Model:
    """What the checks of OK answers need to know of the served model."""

    limits: Limits
    tokenizer: Any

    def __repr__(self) -> str:  # shown in every failing example: short
        return f"Model(version {self.limits.info.model_version})"

    @property
    def eos_id(self) -> int:
        return self.limits.info.special_tokens.eos_id


def check_result(result: pb.InputResult, source: str, options: pb.GenerationOptions, model: Model) -> None:
    """One input's result against its request's options."""
    limits, e = model.limits, effective(options, model.limits)
    source_ids = encode_source(model.tokenizer, source)
    truncated = options.truncate_input and len(source_ids) > limits["max_source_len"]
    assert result.truncated == truncated
    assert result.usage.input_tokens == (limits["max_source_len"] if truncated else len(source_ids))
    expected_sequences = e["num_return"] if e["beam"] or e["sampling"] else 1
    assert len(result.sequences) == expected_sequences, "num_return_sequences not honoured"
    stops = set(options.stop_token_ids)
    total = 0
    for seq in result.sequences:
        tokens = list(seq.token_ids)
        total += len(tokens)
        assert len(tokens) <= e["max_new"], f"{len(tokens)} tokens; max_new_tokens {e['max_new']}"
        assert all(t < limits["vocab_size"] for t in tokens) and model.eos_id not in tokens
        assert seq.finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
        if seq.finish_reason == pb.FINISH_REASON_EOS:
            assert len(tokens) >= options.min_new_tokens, "EOS before min_new_tokens"
        if seq.finish_reason == pb.FINISH_REASON_LENGTH and not e["beam"]:
            assert len(tokens) == e["max_new"]
        # A stop token ends its sequence: it can only be the last token, and then the reason is STOP.
        assert not stops.intersection(tokens[:-1])
        assert (seq.finish_reason == pb.FINISH_REASON_STOP) == bool(tokens and tokens[-1] in stops)
        assert seq.text == decode(model.tokenizer, tokens)
        if options.return_log_probs:
            assert len(seq.log_probs) == len(tokens) and seq.HasField("score")
            assert all(lp <= 1e-3 for lp in seq.log_probs), list(seq.log_probs)  # NaN fails too
            if not e["beam"]:
                assert seq.score == pytest.approx(sum(seq.log_probs), rel=1e-4, abs=1e-3)
        else:
            assert not seq.log_probs and seq.HasField("score") == e["beam"]
        if options.return_alignments:
            assert len(seq.alignments) == len(tokens)
            for row in seq.alignments:
                assert len(row.weights) == len(result.source_tokens)
                assert sum(row.weights) == pytest.approx(1.0, abs=1e-2)
        else:
            assert not seq.alignments
    if e["beam"]:
        scores = [s.score for s in result.sequences]
        assert scores == sorted(scores, reverse=True), f"beams not best first: {scores}"
    if options.return_alignments:
        assert len(result.source_tokens) == result.usage.input_tokens
    assert result.usage.output_tokens == total
    t = result.timings
    assert all(math.isfinite(v) and v >= 0 for v in (t.queue_ms, t.encoder_ms, t.decode_ms, t.first_token_ms,
                                                     t.total_ms))


def check_id(echoed: str, sent: str) -> None:
    assert echoed == sent if sent else SAFE_ID.fullmatch(echoed), f"request id {echoed!r} for {sent!r}"


def check_generate(response: pb.GenerateResponse, request: pb.GenerateRequest, model: Model) -> None:
    assert len(response.results) == len(request.inputs)
    check_id(response.request_id, request.request_id)
    assert response.model_version == model.limits.info.model_version
    for result, source in zip(response.results, request.inputs):
        check_result(result, source, request.options, model)


def check_stream(messages: list[pb.GenerateStreamResponse], request: pb.GenerateStreamRequest, model: Model) -> None:
    assert messages, "a stream without its final message"
    *tokens_only, last = messages
    assert all(not m.HasField("result") and not m.request_id for m in tokens_only)
    assert last.HasField("result") and last.model_version == model.limits.info.model_version
    check_id(last.request_id, request.request_id)
    check_result(last.result, request.input, request.options, model)
    pieces = [p for m in messages for p in m.tokens]
    for index, seq in enumerate(last.result.sequences):
        mine = [p for p in pieces if p.sequence == index]
        if request.options.strategy == pb.STRATEGY_BEAM and index > 0:
            assert not mine, "only the best beam is streamed"
            continue
        assert [p.index for p in mine] == list(range(len(mine)))
        assert [p.token_id for p in mine] == list(seq.token_ids)
        assert "".join(p.text for p in mine) == seq.text, "the pieces do not concatenate to the text"
        assert all(p.HasField("log_prob") == request.options.return_log_probs for p in mine)
        assert all(bool(p.alignment) == request.options.return_alignments for p in mine)
    assert all(p.sequence < len(last.result.sequences) for p in pieces)


def run_one(target: Target, request: Request | RawRequest, test: str, send: Send = Send(), *,
            then_settle: bool = True) -> Outcome:
    """Send one drawn request and check everything the property says of its outcome."""
    server, model = target.server, target.model
    if target.name != "server":
        test = f"{test} ({target.name})"
    payload = request.payload(model.limits)
    expect = expectation(request, payload, model.limits)
    outcome = call(server.channel, request.method, payload, timeout=send.deadline, metadata=list(send.metadata),
                   cancel_after=send.cancel_after, compression=send.compression)
    with COUNTING:
        OUTCOMES[test, outcome.code.name] += 1
        CALLS[test] += 1
        if outcome.code is grpc.StatusCode.INVALID_ARGUMENT:
            REFUSED[test, re.sub(r"\[\d+\]", "[i]", outcome.details.split(":")[0])] += 1
    check_outcome(outcome, expect, short_deadline=send.deadline is not None, cancelled=send.cancel_after is not None,
                  big_metadata=send.big_metadata)
    if outcome.code is grpc.StatusCode.OK and expect.parsed is not None:
        if request.method == "Generate":
            check_generate(outcome.response, expect.parsed, model)
        elif request.method == "GenerateStream":
            if send.cancel_after is None or len(outcome.response) < send.cancel_after:
                check_stream(outcome.response, expect.parsed, model)
        else:
            assert outcome.response == model.limits.info
    if then_settle:
        settle(server)
    return outcome


# -- a normal request, before and after ---------------------------------------------------------


def normal_requests(limits: Limits) -> dict[str, Request]:
    """Requests every strategy answers the same way each time (greedy, beam, seeded sampling, a
    stream that runs to max_new_tokens), sized to fit any server's limits."""
    longest, beams = limits["max_new_tokens"], min(4, limits["max_beams"])
    samples = min(2, limits["max_return_sequences"])
    at_once = min(3, limits["inputs"], limits.info.limits.max_queue)  # all of them are queued at once
    return {
        "greedy": Request("Generate", [text(s) for s in SOURCES[:at_once]], at_once),
        "beam": Request("Generate", [text(SOURCES[3])], 1, {"strategy": pb.STRATEGY_BEAM, "num_beams": beams,
                                                            "num_return_sequences": beams // 2 or 1,
                                                            "return_log_probs": True}),
        "sampling": Request("Generate", [text(SOURCES[4])], 1, {"strategy": pb.STRATEGY_SAMPLING, "seed": 7,
                                                                "num_return_sequences": samples, "temperature": 0.8,
                                                                "top_k": 20, "top_p": 0.9}),
        "stream": Request("GenerateStream", [text(SOURCES[5])], 1, {"max_new_tokens": longest,
                                                                    "min_new_tokens": longest}),
    }


def answers(server: Any, limits: Limits) -> dict[str, list[tuple[list[int], str, int]]]:
    """The normal requests' sequences (token ids, text, finish reason), each checked to be OK."""
    out = {}
    for name, request in normal_requests(limits).items():
        outcome = call(server.channel, request.method, request.payload(limits), timeout=None, metadata=[])
        assert outcome.code is grpc.StatusCode.OK, f"normal {name} request: {outcome.code.name} {outcome.details}"
        response = outcome.response[-1] if request.method == "GenerateStream" else outcome.response
        results = [response.result] if request.method == "GenerateStream" else response.results
        out[name] = [(list(s.token_ids), s.text, s.finish_reason) for r in results for s in r.sequences]
    return out


@dataclass
class Target:
    """A server under fuzzing, what it serves, and its answers to the normal requests before."""

    name: str
    server: Any
    model: Model
    before: dict[str, Any]

    def __repr__(self) -> str:  # shown in every failing example: short
        return f"Target({self.name})"


SERVERS = ["server", "tiny_server", "worker_server"]  # conftest's: the default, batch 1 queue 1, a worker process
_targets: dict[str, Target] = {}


@pytest.fixture
def target(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[Target]:
    """A server of conftest's (`server` unless parametrized), its normal answers taken before its
    first fuzzed call; once the test is over, nothing is left running and they are the same."""
    name = getattr(request, "param", "server")
    if name not in _targets:
        running = request.getfixturevalue(name)
        limits = Limits(running.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT))
        model = Model(limits, load_tokenizer(Path(model_dir) / "tokenizer.json"))
        _targets[name] = Target(name, running, model, answers(running, limits))
    fuzzed = _targets[name]
    yield fuzzed
    settle(fuzzed.server)
    assert answers(fuzzed.server, fuzzed.model.limits) == fuzzed.before, \
        "a normal request is answered differently after fuzzing"


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    """Calls per test, by status code and by the field refused, shown in the long run (or with -v)."""
    yield
    if not (LONG_RUN or request.config.getoption("verbose") > 0):
        return
    lines = [f"fuzz: {sum(CALLS.values())} calls ({'long run' if LONG_RUN else 'default suite'})"]
    for test in sorted(CALLS):
        codes = ", ".join(f"{code} {n}" for (t, code), n in OUTCOMES.most_common() if t == test)
        lines.append(f"  {test}: {CALLS[test]} calls: {codes}")
        fields = ", ".join(f"{name} {n}" for (t, name), n in REFUSED.most_common() if t == test)
        if fields:
            lines.append(f"    INVALID_ARGUMENT by field: {fields}")
    for details, n in GOAWAY_RETRIES.items():
        lines.append(f"  sent again after UNAVAILABLE {details!r}: {n}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(lines))


# -- the tests ----------------------------------------------------------------------------------

every_server = pytest.mark.parametrize("target", SERVERS, indirect=True)
BEAM, SAMPLING = pb.STRATEGY_BEAM, pb.STRATEGY_SAMPLING
DATE = text("nov 25 2026")
# Every bound at least once in the default suite, whatever the random examples reach: the options
# (one per bound, and the values that once failed a whole batch), the inputs, the request id.
EDGE_OPTIONS = [
    {"strategy": BEAM, "num_beams": 2, "length_penalty": 400.0},
    {"strategy": BEAM, "num_beams": 2, "length_penalty": -1100.0},
    {"strategy": BEAM, "length_penalty": math.nan}, {"strategy": BEAM, "length_penalty": -math.inf},
    {"strategy": BEAM, "num_beams": Near("max_beams", 1)},
    {"strategy": BEAM, "num_beams": 2, "num_return_sequences": 3},
    {"strategy": BEAM, "num_beams": Near("max_beams"), "num_return_sequences": Near("max_beams"),
     "min_new_tokens": Near("max_new_tokens"), "return_log_probs": True, "return_alignments": True},
    {"strategy": SAMPLING, "temperature": math.inf}, {"strategy": SAMPLING, "temperature": math.nan},
    {"strategy": SAMPLING, "temperature": -F32_TINY},
    {"strategy": SAMPLING, "temperature": F32_TINY, "seed": 2**64 - 1},
    {"strategy": SAMPLING, "temperature": F32_MAX, "top_k": Near("vocab_size"), "top_p": F32_TINY},
    {"strategy": SAMPLING, "top_p": math.nan}, {"strategy": SAMPLING, "top_p": 0.0},
    {"strategy": SAMPLING, "top_p": 1.0000001192092896}, {"strategy": SAMPLING, "top_k": Near("vocab_size", 1)},
    {"strategy": SAMPLING, "num_return_sequences": Near("max_return_sequences", 1)},
    {"strategy": SAMPLING, "num_return_sequences": Near("max_return_sequences"), "stop_token_ids": [0, 1, 2, 3],
     "return_log_probs": True, "return_alignments": True},
    {"max_new_tokens": Near("max_new_tokens", 1)}, {"max_new_tokens": 2**32 - 1},
    {"max_new_tokens": 3, "min_new_tokens": 4}, {"num_return_sequences": 2}, {"temperature": 0.5}, {"top_k": 1},
    {"num_beams": 2}, {"seed": 0}, {"strategy": 99}, {"strategy": -1}, {"strategy": 2**32 + 2},
    {"stop_token_ids": list(range(MAX_STOP_TOKENS + 1))}, {"stop_token_ids": [Near("vocab_size")]},
]
EDGE_REQUESTS = [Request("Generate", [DATE], 1, options) for options in EDGE_OPTIONS] + [
    Request("Generate", [DATE], 0), Request("Generate", [DATE], Near("inputs", 1)),
    Request("Generate", [DATE], Near("inputs")),
    Request("Generate", [text(""), text(" \t\n"), text("\x1c\u3000")], 3),
    Request("Generate", [Text(b"\xed\xa0\x80")]), Request("Generate", [Text(b"1 May 2000\xc0\x80")]),
    Request("Generate", [Text(b"5" * 47)]), Request("Generate", [Text(b"5" * 47)], 1, {"truncate_input": True}),
    Request("Generate", [long_text("1 May 2000 ", 70_000)]),
    Request("Generate", [DATE], request_id=Text(b"\xff")), Request("Generate", [DATE], request_id=text("x" * 129)),
]


def with_edge_cases(test: Callable[..., None]) -> Callable[..., None]:
    for request in EDGE_REQUESTS:
        test = example(request=request, send=Send())(test)
    return test


@every_server
@examples(60)
@given(request=generate_requests, send=sends)
@with_edge_cases
def test_generate(target: Target, request: Request, send: Send) -> None:
    run_one(target, request, "Generate", send)


@every_server
@examples(60)
@given(request=stream_requests, send=stream_sends)
@example(request=Request("GenerateStream", [DATE], request_id=text("é")), send=Send())
@example(request=Request("GenerateStream", [text("")], request_id=text("a\nb")), send=Send())
@example(request=Request("GenerateStream", [DATE, text("")]), send=Send())
@example(request=Request("GenerateStream", [long_text("\x00", 70_000)], 1, {"truncate_input": True}),
         send=Send(compression=grpc.Compression.Gzip))
@example(request=Request("GenerateStream", [DATE], options={"strategy": BEAM, "num_beams": 3, "num_return_sequences": 3,
                                                            "return_alignments": True}),
         send=Send((("x-request-id", "a b"), ("te", "trailers"), ("x-bin", b"\xff")), cancel_after=1))
def test_generate_stream(target: Target, request: Request, send: Send) -> None:
    run_one(target, request, "GenerateStream", send)


@examples(20)
@given(request=model_info_requests, send=sends)
def test_get_model_info(target: Target, request: Request, send: Send) -> None:
    run_one(target, request, "GetModelInfo", send)


@examples(25)
@given(method=st.sampled_from(sorted(RESPONSE_TYPES)), payload=st.binary(max_size=300))
def test_arbitrary_bytes(target: Target, method: str, payload: bytes) -> None:
    """Any bytes at all as a request: what parses is checked as above, the rest is INVALID_ARGUMENT."""
    run_one(target, RawRequest(method, payload), "arbitrary bytes")


@every_server
@examples(20)
@given(requests=st.lists(st.tuples(st.one_of(few_inputs, stream_requests), sends), min_size=1, max_size=5))
def test_fuzzed_requests_at_once_beside_a_normal_one(target: Target, requests: list[tuple[Request, Send]]) -> None:
    """Whatever requests share the batch, each ends as above, and a normal one gets its usual answer."""
    limits = target.model.limits
    normal = target.server.channel.unary_stream(f"/{SERVICE_NAME}/GenerateStream",
                                                response_deserializer=pb.GenerateStreamResponse.FromString)(
        normal_requests(limits)["stream"].payload(limits), timeout=TIMEOUT)
    first = next(normal)  # its first token: it is in the batch, and no queue can refuse it any more
    with ThreadPoolExecutor(len(requests) + 1) as pool:
        rest = pool.submit(list, normal)  # read as it comes, like the fuzzed calls
        calls = [pool.submit(run_one, target, request, "at once beside a normal one", send, then_settle=False)
                 for request, send in requests]
        for done in calls:
            done.result()
        last = [first, *rest.result()][-1].result
    assert [(list(s.token_ids), s.text, s.finish_reason) for s in last.sequences] == target.before["stream"]
    settle(target.server)
