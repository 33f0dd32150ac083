from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    STRATEGY_GREEDY: _ClassVar[Strategy]
    STRATEGY_BEAM: _ClassVar[Strategy]
    STRATEGY_SAMPLING: _ClassVar[Strategy]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
STRATEGY_UNSPECIFIED: Strategy
STRATEGY_GREEDY: Strategy
STRATEGY_BEAM: Strategy
STRATEGY_SAMPLING: Strategy
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class GenerationOptions(_message.Message):
    __slots__ = ("max_new_tokens", "min_new_tokens", "strategy", "num_beams", "length_penalty", "num_return_sequences", "temperature", "top_k", "top_p", "seed", "stop_token_ids", "return_log_probs", "return_alignments", "truncate_input")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    NUM_BEAMS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    NUM_RETURN_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    RETURN_ALIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_INPUT_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    min_new_tokens: int
    strategy: Strategy
    num_beams: int
    length_penalty: float
    num_return_sequences: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    return_log_probs: bool
    return_alignments: bool
    truncate_input: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., min_new_tokens: _Optional[int] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., num_beams: _Optional[int] = ..., length_penalty: _Optional[float] = ..., num_return_sequences: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., return_log_probs: _Optional[bool] = ..., return_alignments: _Optional[bool] = ..., truncate_input: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("inputs", "options", "request_id")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    options: GenerationOptions
    request_id: str
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("results", "request_id", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[InputResult]
    request_id: str
    model_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[InputResult, _Mapping]]] = ..., request_id: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("input", "options", "request_id")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    input: str
    options: GenerationOptions
    request_id: str
    def __init__(self, input: _Optional[str] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("tokens", "result", "request_id", "model_version")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenPiece]
    result: InputResult
    request_id: str
    model_version: str
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenPiece, _Mapping]]] = ..., result: _Optional[_Union[InputResult, _Mapping]] = ..., request_id: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class TokenPiece(_message.Message):
    __slots__ = ("sequence", "index", "token_id", "text", "log_prob", "alignment")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    index: int
    token_id: int
    text: str
    log_prob: float
    alignment: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, sequence: _Optional[int] = ..., index: _Optional[int] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., log_prob: _Optional[float] = ..., alignment: _Optional[_Iterable[float]] = ...) -> None: ...

class InputResult(_message.Message):
    __slots__ = ("sequences", "usage", "timings", "truncated", "source_tokens")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[Sequence]
    usage: Usage
    timings: Timings
    truncated: bool
    source_tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sequences: _Optional[_Iterable[_Union[Sequence, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., truncated: _Optional[bool] = ..., source_tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class Sequence(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "log_probs", "score", "alignments")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    log_probs: _containers.RepeatedScalarFieldContainer[float]
    score: float
    alignments: _containers.RepeatedCompositeFieldContainer[AlignmentRow]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., log_probs: _Optional[_Iterable[float]] = ..., score: _Optional[float] = ..., alignments: _Optional[_Iterable[_Union[AlignmentRow, _Mapping]]] = ...) -> None: ...

class AlignmentRow(_message.Message):
    __slots__ = ("token", "weights")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    token: str
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token: _Optional[str] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "encoder_ms", "decode_ms", "first_token_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    encoder_ms: float
    decode_ms: float
    first_token_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., encoder_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_version", "dims", "vocab_size", "max_source_len", "max_target_len", "special_tokens", "providers", "encoder_sha256", "decoder_sha256", "limits", "quantization", "layout")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SOURCE_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_TARGET_LEN_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_SHA256_FIELD_NUMBER: _ClassVar[int]
    DECODER_SHA256_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    dims: ModelDims
    vocab_size: int
    max_source_len: int
    max_target_len: int
    special_tokens: SpecialTokens
    providers: _containers.RepeatedScalarFieldContainer[str]
    encoder_sha256: str
    decoder_sha256: str
    limits: ServerLimits
    quantization: str
    layout: ServingLayout
    def __init__(self, model_version: _Optional[str] = ..., dims: _Optional[_Union[ModelDims, _Mapping]] = ..., vocab_size: _Optional[int] = ..., max_source_len: _Optional[int] = ..., max_target_len: _Optional[int] = ..., special_tokens: _Optional[_Union[SpecialTokens, _Mapping]] = ..., providers: _Optional[_Iterable[str]] = ..., encoder_sha256: _Optional[str] = ..., decoder_sha256: _Optional[str] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., quantization: _Optional[str] = ..., layout: _Optional[_Union[ServingLayout, _Mapping]] = ...) -> None: ...

class ServingLayout(_message.Message):
    __slots__ = ("engine_core", "frontends", "intra_op_threads", "intra_op_spinning", "stream_interval", "cores")
    ENGINE_CORE_FIELD_NUMBER: _ClassVar[int]
    FRONTENDS_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_SPINNING_FIELD_NUMBER: _ClassVar[int]
    STREAM_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    engine_core: str
    frontends: int
    intra_op_threads: int
    intra_op_spinning: str
    stream_interval: int
    cores: int
    def __init__(self, engine_core: _Optional[str] = ..., frontends: _Optional[int] = ..., intra_op_threads: _Optional[int] = ..., intra_op_spinning: _Optional[str] = ..., stream_interval: _Optional[int] = ..., cores: _Optional[int] = ...) -> None: ...

class ModelDims(_message.Message):
    __slots__ = ("d_model", "encoder_layers", "decoder_layers", "n_heads", "d_ff")
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    ENCODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DECODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_HEADS_FIELD_NUMBER: _ClassVar[int]
    D_FF_FIELD_NUMBER: _ClassVar[int]
    d_model: int
    encoder_layers: int
    decoder_layers: int
    n_heads: int
    d_ff: int
    def __init__(self, d_model: _Optional[int] = ..., encoder_layers: _Optional[int] = ..., decoder_layers: _Optional[int] = ..., n_heads: _Optional[int] = ..., d_ff: _Optional[int] = ...) -> None: ...

class SpecialTokens(_message.Message):
    __slots__ = ("pad_id", "bos_id", "eos_id", "unk_id")
    PAD_ID_FIELD_NUMBER: _ClassVar[int]
    BOS_ID_FIELD_NUMBER: _ClassVar[int]
    EOS_ID_FIELD_NUMBER: _ClassVar[int]
    UNK_ID_FIELD_NUMBER: _ClassVar[int]
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int
    def __init__(self, pad_id: _Optional[int] = ..., bos_id: _Optional[int] = ..., eos_id: _Optional[int] = ..., unk_id: _Optional[int] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_batch_size", "max_queue", "max_inputs_per_request", "max_new_tokens_limit", "max_beams", "max_return_sequences", "max_message_bytes")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_BEAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_RETURN_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue: int
    max_inputs_per_request: int
    max_new_tokens_limit: int
    max_beams: int
    max_return_sequences: int
    max_message_bytes: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_inputs_per_request: _Optional[int] = ..., max_new_tokens_limit: _Optional[int] = ..., max_beams: _Optional[int] = ..., max_return_sequences: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
