"""What one generation request asks for and what it gets back: plain records shared by the
scheduler (which knows nothing of gRPC) and the gRPC service (which converts them to protobuf)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np


class Strategy(str, Enum):
    """How the next token is chosen."""

    GREEDY = "greedy"
    BEAM = "beam"
    SAMPLE = "sample"


class FinishReason(str, Enum):
    """Why a sequence ended."""

    EOS = "eos"  # the model produced end-of-sequence
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # one of the request's stop tokens was produced (it is included in the output)
    CANCELLED = "cancelled"  # the caller cancelled, or its deadline passed


@dataclass(frozen=True)
class GenerationParams:
    """Validated decoding options of one input (the service checks ranges before building this)."""

    max_new_tokens: int
    min_new_tokens: int = 0  # EOS is forbidden until this many tokens exist
    strategy: Strategy = Strategy.GREEDY
    num_beams: int = 1  # beam: rows this request occupies in the batch
    length_penalty: float = 1.0  # beam: score = log-prob sum / length ** length_penalty
    num_return_sequences: int = 1  # beam: best N hypotheses; sample: N independent samples
    temperature: float = 1.0  # sample: logits / temperature
    top_k: int = 0  # sample: keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # sample: keep the smallest set of tokens whose probability reaches p
    seed: int | None = None  # sample: same seed, same output
    stop_token_ids: tuple[int, ...] = ()
    return_log_probs: bool = False
    return_alignments: bool = False

    @property
    def rows(self) -> int:
        """Rows this request occupies in the running batch."""
        if self.strategy is Strategy.BEAM:
            return self.num_beams
        if self.strategy is Strategy.SAMPLE:
            return self.num_return_sequences
        return 1


@dataclass(frozen=True)
class TokenEvent:
    """One token of one sequence, handed out as soon as it is chosen (streaming)."""

    sequence: int  # which of the request's sequences (0 for greedy)
    index: int  # position in the output, from 0
    token_id: int
    log_prob: float | None = None
    alignment: np.ndarray | None = None  # (S,) weights over the source tokens


@dataclass
class SequenceResult:
    """One finished output sequence."""

    token_ids: list[int]
    finish_reason: FinishReason
    log_probs: list[float] | None = None  # per token, when asked
    score: float | None = None  # beam score / sum of log-probs
    alignments: np.ndarray | None = None  # (T, S), when asked


@dataclass
class Timings:
    """Seconds spent by a request in each phase."""

    queue: float = 0.0  # submitted -> admitted into the batch
    encoder: float = 0.0  # its encoder pass
    decode: float = 0.0  # admitted -> finished
    first_token: float = 0.0  # submitted -> first token
    total: float = 0.0  # submitted -> finished


@dataclass
class RequestResult:
    """Everything a finished request produced."""

    sequences: list[SequenceResult]
    input_tokens: int
    timings: Timings = field(default_factory=Timings)

    @property
    def output_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)
