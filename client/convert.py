"""Between the caller's keyword options and the wire: builds protobuf requests from plain values and
turns protobuf responses into the records of `seqserve.client.results` (nothing protobuf leaks out).

`OPTION_DOCS` is the one description of every generation option; the client methods' docstrings
and the command-line help are made from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from seqserve.client.errors import InvalidArgument
from seqserve.client.results import (FinishReason, GeneratedSequence, GenerationResult, ModelDims, ModelInfo,
                                     ServerLimits, SpecialTokens, Timings, TokenPiece, Usage)
from seqserve.proto import seqserve_pb2 as pb

try:  # numpy is a base dependency, but the records work without it
    import numpy as np
except ImportError:  # pragma: no cover - exercised only where numpy is missing
    np = None  # type: ignore[assignment]

# name -> one line: the docstring of every generation option, in signature order.
OPTION_DOCS: dict[str, str] = {
    "max_new_tokens": "most tokens to generate per sequence, EOS excluded (None: the server's largest).",
    "min_new_tokens": "end-of-sequence is forbidden until this many tokens exist.",
    "strategy": "'greedy', 'beam' or 'sample' (None: beam when num_beams/length_penalty is given, "
                "sample when temperature/top_k/top_p/seed is, else greedy).",
    "num_beams": "beam search: hypotheses kept at every step (None: the server's default, 4).",
    "length_penalty": "beam search: score = log-prob sum / length ** length_penalty (None: 1.0).",
    "num_return_sequences": "beam: how many best hypotheses to return; sampling: how many samples (None: 1).",
    "temperature": "sampling: divide the logits by this (None: 1.0; 0: always the most likely token).",
    "top_k": "sampling: keep only the k most likely tokens (None: all).",
    "top_p": "sampling: keep the smallest set of tokens whose probability reaches p, in (0, 1] (None: 1.0).",
    "seed": "sampling: random seed; the same seed and request give the same output (None: random).",
    "stop_token_ids": "token ids that end a sequence when produced (kept in the output).",
    "return_log_probs": "return each token's log-probability and each sequence's score.",
    "return_alignments": "return each output token's attention over the source tokens.",
    "truncate_input": "cut inputs longer than the model's max_source_len instead of failing with InvalidArgument.",
    "request_id": "an id for the call, echoed in the result and the server's logs (None: the server makes one).",
    "timeout": "seconds before the call fails with DeadlineExceeded (None: the client's default timeout).",
    "metadata": "extra gRPC metadata for this call, added to the client's (e.g. {'x-tenant': 'a'}).",
}

_STRATEGIES = {
    None: pb.STRATEGY_UNSPECIFIED,
    "greedy": pb.STRATEGY_GREEDY,
    "beam": pb.STRATEGY_BEAM,
    "sample": pb.STRATEGY_SAMPLING,
    "sampling": pb.STRATEGY_SAMPLING,
}
_BEAM_OPTIONS = ("num_beams", "length_penalty")
_SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "seed")
_UINT32_MAX = 2**32 - 1

_FINISH = {
    pb.FINISH_REASON_EOS: FinishReason.EOS,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
}


def with_option_docs(func: Any) -> Any:
    """Fill the `{options}` slot of a method's docstring with one line per option it takes."""
    names = [n for n in func.__code__.co_varnames[:func.__code__.co_argcount + func.__code__.co_kwonlyargcount]
             if n in OPTION_DOCS]
    lines = "\n".join(f"            {name}: {OPTION_DOCS[name]}" for name in names)
    func.__doc__ = (func.__doc__ or "").replace("{options}", lines.lstrip())
    return func


def _uint(name: str, value: int | None, *, limit: int = _UINT32_MAX) -> int:
    """A non-negative integer field (None -> 0, the proto's 'unset')."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name}: must be an integer, got {value!r}")
    if not 0 <= value <= limit:
        raise InvalidArgument(f"{name}: must be in 0..{limit}, got {value}")
    return value


def _float(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{name}: must be a finite number, got {value!r}")
    return float(value)


def build_options(*, max_new_tokens: int | None = None, min_new_tokens: int = 0, strategy: str | None = None,
                  num_beams: int | None = None, length_penalty: float | None = None,
                  num_return_sequences: int | None = None, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  stop_token_ids: Iterable[int] = (), return_log_probs: bool = False,
                  return_alignments: bool = False, truncate_input: bool = False) -> pb.GenerationOptions:
    """The protobuf options for keyword values; values protobuf cannot carry are InvalidArgument here
    (ranges that depend on the model or the server are checked by the server)."""
    given = {k for k, v in (("num_beams", num_beams), ("length_penalty", length_penalty),
                            ("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                            ("seed", seed)) if v is not None}
    key = strategy.lower() if isinstance(strategy, str) else strategy
    if key not in _STRATEGIES:
        raise InvalidArgument(f"strategy: must be one of greedy, beam, sample; got {strategy!r}")
    if key is None:
        beam = [k for k in _BEAM_OPTIONS if k in given]
        sampling = [k for k in _SAMPLING_OPTIONS if k in given]
        if beam and sampling:
            raise InvalidArgument(f"strategy: {beam[0]} is for beam search and {sampling[0]} for sampling; "
                                  "pass strategy='beam' or strategy='sample'")
        key = "beam" if beam else "sample" if sampling else None
    options = pb.GenerationOptions(
        max_new_tokens=_uint("max_new_tokens", max_new_tokens),
        min_new_tokens=_uint("min_new_tokens", min_new_tokens),
        strategy=_STRATEGIES[key],
        num_beams=_uint("num_beams", num_beams),
        num_return_sequences=_uint("num_return_sequences", num_return_sequences),
        top_k=_uint("top_k", top_k),
        stop_token_ids=[_uint("stop_token_ids", t) for t in stop_token_ids],
        return_log_probs=bool(return_log_probs),
        return_alignments=bool(return_alignments),
        truncate_input=bool(truncate_input),
    )
    for name, value in (("length_penalty", length_penalty), ("temperature", temperature), ("top_p", top_p)):
        number = _float(name, value)
        if number is not None:
            setattr(options, name, number)
    if seed is not None:
        options.seed = _uint("seed", seed, limit=2**64 - 1)
    return options


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """The inputs of a call as a list (a lone string is one input)."""
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise InvalidArgument("inputs: at least one input is needed")
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidArgument(f"inputs[{i}]: must be a string, got {type(text).__name__}")
    return items


def merge_metadata(base: Sequence[tuple[str, str]],
                   extra: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> tuple[tuple[str, str], ...]:
    """The client's metadata plus a call's (keys lowercased, as HTTP/2 requires)."""
    pairs = list(base)
    if extra:
        items = extra.items() if isinstance(extra, Mapping) else extra
        pairs += [(str(k).lower(), str(v)) for k, v in items]
    return tuple(pairs)


def _array(rows: list[list[float]], width: int) -> Any:
    """A read-only (T, S) float32 array, or tuples without numpy."""
    if np is None:
        return tuple(tuple(r) for r in rows)
    out = np.array(rows, dtype=np.float32).reshape(len(rows), width)  # (T, S)
    out.flags.writeable = False
    return out


def _vector(values: Sequence[float]) -> Any:
    if np is None:
        return tuple(values)
    out = np.asarray(values, dtype=np.float32)  # (S,)
    out.flags.writeable = False
    return out


def sequence_from_proto(msg: pb.Sequence, width: int, *, log_probs: bool = False) -> GeneratedSequence:
    """One sequence; `log_probs` says whether they were asked for (so an empty sequence gets `()`)."""
    rows = [list(row.weights) for row in msg.alignments]
    return GeneratedSequence(
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=_FINISH.get(msg.finish_reason, FinishReason.UNSPECIFIED),
        log_probs=tuple(msg.log_probs) if log_probs or msg.log_probs else None,
        score=msg.score if msg.HasField("score") else None,
        alignment_tokens=tuple(row.token for row in msg.alignments) if msg.alignments else None,
        alignments=_array(rows, width) if msg.alignments else None,
    )


def result_from_proto(msg: pb.InputResult, *, request_id: str = "", model_version: str = "",
                      log_probs: bool = False) -> GenerationResult:
    width = len(msg.source_tokens)
    t = msg.timings
    return GenerationResult(
        sequences=tuple(sequence_from_proto(s, width, log_probs=log_probs) for s in msg.sequences),
        usage=Usage(input_tokens=msg.usage.input_tokens, output_tokens=msg.usage.output_tokens),
        timings=Timings(queue_ms=t.queue_ms, encoder_ms=t.encoder_ms, decode_ms=t.decode_ms,
                        first_token_ms=t.first_token_ms, total_ms=t.total_ms),
        truncated=msg.truncated,
        source_tokens=tuple(msg.source_tokens) if msg.source_tokens else None,
        request_id=request_id,
        model_version=model_version,
    )


def results_from_response(msg: pb.GenerateResponse, *, log_probs: bool = False) -> list[GenerationResult]:
    return [result_from_proto(r, request_id=msg.request_id, model_version=msg.model_version, log_probs=log_probs)
            for r in msg.results]


def piece_from_proto(msg: pb.TokenPiece) -> TokenPiece:
    return TokenPiece(sequence=msg.sequence, index=msg.index, token_id=msg.token_id, text=msg.text,
                      log_prob=msg.log_prob if msg.HasField("log_prob") else None,
                      alignment=_vector(msg.alignment) if msg.alignment else None)


def stream_events(msg: pb.GenerateStreamResponse, *, log_probs: bool = False) -> list[TokenPiece | GenerationResult]:
    """A stream message's pieces, in order, then the final result if this is the last message."""
    events: list[TokenPiece | GenerationResult] = [piece_from_proto(t) for t in msg.tokens]
    if msg.HasField("result"):
        events.append(result_from_proto(msg.result, request_id=msg.request_id, model_version=msg.model_version,
                                        log_probs=log_probs))
    return events


def model_info_from_proto(msg: pb.GetModelInfoResponse) -> ModelInfo:
    d, s, lim = msg.dims, msg.special_tokens, msg.limits
    return ModelInfo(
        model_version=msg.model_version,
        dims=ModelDims(d_model=d.d_model, encoder_layers=d.encoder_layers, decoder_layers=d.decoder_layers,
                       n_heads=d.n_heads, d_ff=d.d_ff),
        vocab_size=msg.vocab_size,
        max_source_len=msg.max_source_len,
        max_target_len=msg.max_target_len,
        special_tokens=SpecialTokens(pad_id=s.pad_id, bos_id=s.bos_id, eos_id=s.eos_id, unk_id=s.unk_id),
        providers=tuple(msg.providers),
        encoder_sha256=msg.encoder_sha256,
        decoder_sha256=msg.decoder_sha256,
        limits=ServerLimits(max_batch_size=lim.max_batch_size, max_queue=lim.max_queue,
                            max_inputs_per_request=lim.max_inputs_per_request,
                            max_new_tokens_limit=lim.max_new_tokens_limit, max_beams=lim.max_beams,
                            max_return_sequences=lim.max_return_sequences,
                            max_message_bytes=lim.max_message_bytes),
        quantization=msg.quantization,
    )


def chunk(items: list[str], size: int) -> list[list[str]]:
    """items cut into consecutive lists of at most size (size >= 1)."""
    return [items[i:i + size] for i in range(0, len(items), max(1, size))]


MAX_REQUEST_ID = 128  # characters: the server refuses longer ids (proto/seqserve.proto)


def chunk_request_id(request_id: str | None, index: int, count: int) -> str:
    """The id of one chunk of a split call: the caller's id with '.N' when there are several chunks
    (the id shortened as needed so that the whole stays within MAX_REQUEST_ID characters)."""
    if not request_id:
        return ""
    if count == 1:
        return request_id
    suffix = f".{index}"
    return request_id[: MAX_REQUEST_ID - len(suffix)] + suffix
