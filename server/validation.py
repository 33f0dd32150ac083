"""Request validation: protobuf requests in, token ids and `GenerationParams` out.

Every check names the request field it concerns and the limit it broke (`errors.InvalidRequest`,
INVALID_ARGUMENT), so a client can fix its request from the message alone. Nothing past this module
sees a protobuf options message or an unchecked value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import tokenizers

from seqserve.runtime.config import ModelConfig
from seqserve.runtime.tokenizer import encode_source
from seqserve.proto import seqserve_pb2 as pb
from seqserve.server.config import ServerConfig
from seqserve.runtime.errors import InvalidRequest
from seqserve.runtime.generation import GenerationParams, Strategy

MAX_STOP_TOKENS = 32  # a stop-token check runs for every row at every step
DEFAULT_NUM_BEAMS = 4

_STRATEGIES = {
    pb.STRATEGY_UNSPECIFIED: Strategy.GREEDY,
    pb.STRATEGY_GREEDY: Strategy.GREEDY,
    pb.STRATEGY_BEAM: Strategy.BEAM,
    pb.STRATEGY_SAMPLING: Strategy.SAMPLE,
}


@dataclass(frozen=True)
class ValidInput:
    """One input ready for the scheduler."""

    source_ids: list[int]  # encoder input, EOS included, at most max_source_len
    params: GenerationParams
    truncated: bool = False  # cut to max_source_len (only when the request allowed it)


class Validator:
    """Checks requests against the model's and the server's limits."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, model: ModelConfig, config: ServerConfig) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.config = config
        # max_new_tokens counts positions of the decoder, which the model was built for up to max_target_len.
        self.max_new_tokens = min(model.max_target_len, config.max_new_tokens_limit)

    def generate_request(self, request: pb.GenerateRequest) -> list[ValidInput]:
        """A Generate request: every input, with the shared options."""
        limit = self.config.max_inputs_per_request
        if not request.inputs:
            raise InvalidRequest("inputs", f"no inputs; send 1 to {min(limit, self.config.max_queue)}")
        if len(request.inputs) > limit:
            raise InvalidRequest("inputs", f"{len(request.inputs)} inputs; max_inputs_per_request is {limit}")
        # Every input takes a place in the wait queue, all at once: more than it holds would be
        # RESOURCE_EXHAUSTED even on an idle server, an overload that no retry can cure.
        if len(request.inputs) > self.config.max_queue:
            raise InvalidRequest("inputs", f"{len(request.inputs)} inputs; each waits in the queue, which holds "
                                           f"max_queue {self.config.max_queue}: send at most that many per call")
        params = self.options(request.options)
        return [self.input(text, f"inputs[{i}]", params, request.options.truncate_input)
                for i, text in enumerate(request.inputs)]

    def stream_request(self, request: pb.GenerateStreamRequest) -> ValidInput:
        """A GenerateStream request's one input."""
        params = self.options(request.options)
        return self.input(request.input, "input", params, request.options.truncate_input)

    def input(self, text: str, field: str, params: GenerationParams, truncate: bool) -> ValidInput:
        """Tokenize one input text, enforcing max_source_len (or truncating, when asked)."""
        if not text.strip():
            raise InvalidRequest(field, "empty input")
        ids = encode_source(self.tokenizer, text)
        limit = self.model.max_source_len
        if len(ids) <= limit:
            return ValidInput(ids, params)
        if not truncate:
            raise InvalidRequest(field, f"{len(ids)} tokens (EOS included); the model's max_source_len is {limit} "
                                        "(set options.truncate_input to cut it)")
        # Keep the start and the EOS that ends every source the model saw in training.
        return ValidInput(ids[: limit - 1] + [ids[-1]], params, truncated=True)

    def options(self, options: pb.GenerationOptions) -> GenerationParams:
        """The decoding options shared by a request's inputs."""
        if options.strategy not in _STRATEGIES:
            raise InvalidRequest("options.strategy", f"unknown value {options.strategy}")
        strategy = _STRATEGIES[options.strategy]

        max_new = options.max_new_tokens or self.max_new_tokens
        if max_new > self.max_new_tokens:
            raise InvalidRequest("options.max_new_tokens",
                                 f"{max_new} is over the limit {self.max_new_tokens} (the model's max_target_len "
                                 f"{self.model.max_target_len}, the server's max_new_tokens_limit "
                                 f"{self.config.max_new_tokens_limit})")
        if options.min_new_tokens > max_new:
            raise InvalidRequest("options.min_new_tokens",
                                 f"{options.min_new_tokens} is over max_new_tokens {max_new}")

        self._only_for(options, strategy)
        num_beams, num_return = 1, options.num_return_sequences or 1
        if strategy is Strategy.BEAM:
            num_beams = options.num_beams or min(DEFAULT_NUM_BEAMS, self.config.max_beams)
            if num_beams > self.config.max_beams:
                raise InvalidRequest("options.num_beams",
                                     f"{num_beams} is over the server's max_beams {self.config.max_beams}")
            if num_return > num_beams:
                raise InvalidRequest("options.num_return_sequences",
                                     f"{num_return} is over num_beams {num_beams} (beam search returns at most "
                                     "one sequence per beam)")
        elif strategy is Strategy.SAMPLE:
            if num_return > self.config.max_return_sequences:
                raise InvalidRequest("options.num_return_sequences",
                                     f"{num_return} is over the server's max_return_sequences "
                                     f"{self.config.max_return_sequences}")
        elif num_return > 1:
            raise InvalidRequest("options.num_return_sequences",
                                 f"{num_return} with greedy decoding, which returns 1 sequence "
                                 "(use STRATEGY_BEAM or STRATEGY_SAMPLING for more)")

        length_penalty = options.length_penalty if options.HasField("length_penalty") else 1.0
        if not math.isfinite(length_penalty):
            raise InvalidRequest("options.length_penalty", f"must be a finite number, got {length_penalty}")
        temperature = options.temperature if options.HasField("temperature") else 1.0
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InvalidRequest("options.temperature",
                                 f"must be >= 0 (0 = always the most likely token), got {temperature}")
        top_p = options.top_p if options.HasField("top_p") else 1.0
        if not 0 < top_p <= 1:
            raise InvalidRequest("options.top_p", f"must be in (0, 1], got {top_p}")
        if options.top_k > self.model.vocab_size:
            raise InvalidRequest("options.top_k",
                                 f"{options.top_k} is over the vocabulary size {self.model.vocab_size} (0 = all)")

        return GenerationParams(
            max_new_tokens=max_new,
            min_new_tokens=options.min_new_tokens,
            strategy=strategy,
            num_beams=num_beams,
            length_penalty=length_penalty,
            num_return_sequences=num_return,
            temperature=temperature,
            top_k=options.top_k,
            top_p=top_p,
            seed=options.seed if options.HasField("seed") else None,
            stop_token_ids=self.stop_token_ids(options.stop_token_ids),
            return_log_probs=options.return_log_probs,
            return_alignments=options.return_alignments,
        )

    def stop_token_ids(self, ids: Sequence[int]) -> tuple[int, ...]:
        """Known token ids, at most MAX_STOP_TOKENS, duplicates dropped."""
        if len(ids) > MAX_STOP_TOKENS:
            raise InvalidRequest("options.stop_token_ids", f"{len(ids)} ids; at most {MAX_STOP_TOKENS}")
        for i, token in enumerate(ids):
            if token >= self.model.vocab_size:
                raise InvalidRequest(f"options.stop_token_ids[{i}]",
                                     f"{token} is not a token id (vocab_size {self.model.vocab_size})")
        return tuple(dict.fromkeys(ids))

    @staticmethod
    def _only_for(options: pb.GenerationOptions, strategy: Strategy) -> None:
        """Options of another strategy are a mistake worth reporting, not something to ignore silently."""
        if strategy is not Strategy.BEAM:
            if options.num_beams > 1:
                raise InvalidRequest("options.num_beams", "only used with STRATEGY_BEAM")
            if options.HasField("length_penalty"):
                raise InvalidRequest("options.length_penalty", "only used with STRATEGY_BEAM")
        if strategy is not Strategy.SAMPLE:
            for name in ("temperature", "top_p", "seed"):
                if options.HasField(name):
                    raise InvalidRequest(f"options.{name}", "only used with STRATEGY_SAMPLING")
            if options.top_k:
                raise InvalidRequest("options.top_k", "only used with STRATEGY_SAMPLING")
