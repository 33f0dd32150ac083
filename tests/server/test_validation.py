"""Request validation without a server: each bad field is an InvalidRequest naming the field and the
limit; good requests become the GenerationParams the scheduler expects."""

from __future__ import annotations

from typing import Any

import pytest

from seqserve.runtime.config import ModelConfig
from seqserve.model.data import dates_pairs, train_tokenizer
from seqserve.runtime.tokenizer import EOS_ID, encode_source
from seqserve.proto import seqserve_pb2 as pb
from seqserve.server.config import ServerConfig
from seqserve.runtime.errors import InvalidRequest
from seqserve.runtime.generation import GenerationParams, Strategy
from seqserve.server.validation import MAX_STOP_TOKENS, Validator


@pytest.fixture(scope="module")
def validator() -> Validator:
    tokenizer = train_tokenizer((p.source for p in dates_pairs(300, seed=0)), vocab_size=200)
    model = ModelConfig(vocab_size=tokenizer.get_vocab_size(), d_model=8, n_heads=2, max_source_len=16,
                        max_target_len=20)
    return Validator(tokenizer, model, ServerConfig(model_dir="unused", max_inputs_per_request=4, max_beams=4,
                                                    max_return_sequences=3, max_new_tokens_limit=100))


def options(validator: Validator, **fields: Any) -> GenerationParams:
    return validator.options(pb.GenerationOptions(**fields))


def invalid(call: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        call()
    return info.value


def test_defaults_are_greedy_up_to_the_model_limit(validator: Validator) -> None:
    params = options(validator)
    assert params == GenerationParams(max_new_tokens=20)  # min(max_target_len 20, limit 100)


def test_strategies(validator: Validator) -> None:
    beam = options(validator, strategy=pb.STRATEGY_BEAM, num_return_sequences=2, length_penalty=0.0)
    assert (beam.strategy, beam.num_beams, beam.num_return_sequences, beam.length_penalty) == (Strategy.BEAM, 4, 2, 0.0)
    assert beam.rows == 4
    sample = options(validator, strategy=pb.STRATEGY_SAMPLING, num_return_sequences=3, seed=5, temperature=0.5,
                     top_k=10, top_p=0.9, stop_token_ids=[7, 7, 9])
    assert (sample.strategy, sample.rows, sample.seed, sample.temperature, sample.top_k) == (Strategy.SAMPLE, 3, 5, 0.5, 10)
    assert sample.top_p == pytest.approx(0.9) and sample.stop_token_ids == (7, 9)
    assert options(validator, strategy=pb.STRATEGY_SAMPLING).seed is None
    assert options(validator, strategy=pb.STRATEGY_SAMPLING, temperature=0.0).temperature == 0.0  # = greedy


@pytest.mark.parametrize("fields, field, text", [
    (dict(max_new_tokens=21), "options.max_new_tokens", "21 is over the limit 20"),
    (dict(max_new_tokens=5, min_new_tokens=6), "options.min_new_tokens", "6 is over max_new_tokens 5"),
    (dict(strategy=pb.STRATEGY_BEAM, num_beams=5), "options.num_beams", "max_beams 4"),
    (dict(strategy=pb.STRATEGY_BEAM, num_beams=2, num_return_sequences=3), "options.num_return_sequences", "num_beams 2"),
    (dict(strategy=pb.STRATEGY_SAMPLING, num_return_sequences=4), "options.num_return_sequences",
     "max_return_sequences 3"),
    (dict(num_return_sequences=2), "options.num_return_sequences", "greedy"),
    (dict(strategy=pb.STRATEGY_SAMPLING, top_p=0.0), "options.top_p", "(0, 1]"),
    (dict(strategy=pb.STRATEGY_SAMPLING, top_p=1.01), "options.top_p", "(0, 1]"),
    (dict(strategy=pb.STRATEGY_SAMPLING, temperature=-0.1), "options.temperature", ">= 0"),
    (dict(strategy=pb.STRATEGY_SAMPLING, temperature=float("inf")), "options.temperature", ">= 0"),
    (dict(strategy=pb.STRATEGY_SAMPLING, top_k=100000), "options.top_k", "vocabulary size"),
    (dict(strategy=pb.STRATEGY_BEAM, length_penalty=float("nan")), "options.length_penalty", "finite"),
    (dict(stop_token_ids=[1, 5000]), "options.stop_token_ids[1]", "5000 is not a token id"),
    (dict(stop_token_ids=list(range(MAX_STOP_TOKENS + 1))), "options.stop_token_ids", f"at most {MAX_STOP_TOKENS}"),
    (dict(strategy=7), "options.strategy", "unknown value 7"),
    (dict(temperature=0.5), "options.temperature", "only used with STRATEGY_SAMPLING"),
    (dict(seed=1), "options.seed", "only used with STRATEGY_SAMPLING"),
    (dict(strategy=pb.STRATEGY_SAMPLING, num_beams=3), "options.num_beams", "only used with STRATEGY_BEAM"),
    (dict(length_penalty=1.0), "options.length_penalty", "only used with STRATEGY_BEAM"),
])
def test_bad_options(validator: Validator, fields: dict[str, Any], field: str, text: str) -> None:
    error = invalid(lambda: options(validator, **fields))
    assert error.field == field and text in str(error) and str(error).startswith(f"{field}: ")


def test_inputs(validator: Validator) -> None:
    items = validator.generate_request(pb.GenerateRequest(inputs=["1 May 2000", "2 June 1990"]))
    assert [i.source_ids for i in items] == [encode_source(validator.tokenizer, t) for t in ("1 May 2000", "2 June 1990")]
    assert invalid(lambda: validator.generate_request(pb.GenerateRequest())).field == "inputs"
    assert "max_inputs_per_request is 4" in str(invalid(lambda: validator.generate_request(
        pb.GenerateRequest(inputs=["1 May 2000"] * 5))))
    assert invalid(lambda: validator.generate_request(pb.GenerateRequest(inputs=["1 May 2000", " \t"]))).field == "inputs[1]"
    assert invalid(lambda: validator.stream_request(pb.GenerateStreamRequest(input=""))).field == "input"


def test_more_inputs_than_the_queue_holds_are_invalid_not_overloaded(validator: Validator) -> None:
    """Found by tests/server/test_fuzz.py: with max_queue below max_inputs_per_request, a Generate
    of more inputs than the queue holds was RESOURCE_EXHAUSTED even on an idle server (every input
    takes a queue place at once), which a client retries for ever."""
    small = Validator(validator.tokenizer, validator.model,
                      ServerConfig(model_dir="unused", max_inputs_per_request=4, max_batch_size=1, max_queue=2))
    assert len(small.generate_request(pb.GenerateRequest(inputs=["1 May 2000"] * 2))) == 2
    error = invalid(lambda: small.generate_request(pb.GenerateRequest(inputs=["1 May 2000"] * 3)))
    assert error.field == "inputs" and "3 inputs" in str(error) and "max_queue 2" in str(error)
    assert "send 1 to 2" in str(invalid(lambda: small.generate_request(pb.GenerateRequest())))


def test_long_input_is_rejected_or_truncated(validator: Validator) -> None:
    text = "Tuesday, the 5th of November 1985 and the 6th of December 1986"
    assert len(encode_source(validator.tokenizer, text)) > 16
    error = invalid(lambda: validator.stream_request(pb.GenerateStreamRequest(input=text)))
    assert error.field == "input" and "max_source_len is 16" in str(error) and "truncate_input" in str(error)
    item = validator.stream_request(pb.GenerateStreamRequest(input=text, options=pb.GenerationOptions(truncate_input=True)))
    assert item.truncated and len(item.source_ids) == 16 and item.source_ids[-1] == EOS_ID
    assert item.source_ids[:15] == encode_source(validator.tokenizer, text)[:15]
