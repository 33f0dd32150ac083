"""The client's pieces without a server: options to protobuf, protobuf to records, status codes to
exceptions, addresses to a gRPC target with round-robin and retries."""

from __future__ import annotations

import dataclasses
import json

import grpc
import numpy as np
import pytest

from seqserve.client import (Cancelled, Client, DeadlineExceeded, FinishReason, GenerationResult, InvalidArgument,
                             Overloaded, RetryPolicy, SeqserveClientError, ServerError, Unavailable)
from seqserve.client import channel, convert, errors
from seqserve.runtime.errors import SeqserveError
from seqserve.proto import seqserve_pb2 as pb


# -- options -------------------------------------------------------------------------------

def test_default_options_are_the_proto_defaults() -> None:
    assert convert.build_options() == pb.GenerationOptions()


def test_strategy_is_inferred_from_the_options_given() -> None:
    assert convert.build_options(num_beams=3).strategy == pb.STRATEGY_BEAM
    assert convert.build_options(length_penalty=0.5).strategy == pb.STRATEGY_BEAM
    assert convert.build_options(temperature=0.7).strategy == pb.STRATEGY_SAMPLING
    assert convert.build_options(seed=1).strategy == pb.STRATEGY_SAMPLING
    assert convert.build_options(num_return_sequences=2).strategy == pb.STRATEGY_UNSPECIFIED
    assert convert.build_options(strategy="greedy", temperature=0.5).strategy == pb.STRATEGY_GREEDY  # explicit wins
    assert convert.build_options(strategy="SAMPLE").strategy == pb.STRATEGY_SAMPLING
    with pytest.raises(InvalidArgument, match="num_beams is for beam search and temperature for sampling"):
        convert.build_options(num_beams=2, temperature=0.5)
    with pytest.raises(InvalidArgument, match="strategy: must be one of"):
        convert.build_options(strategy="nucleus")


def test_optional_fields_are_set_only_when_given() -> None:
    options = convert.build_options(temperature=0.0, top_p=1.0, seed=2**64 - 1, stop_token_ids=[5, 6],
                                    return_log_probs=True, truncate_input=True, max_new_tokens=7)
    assert options.HasField("temperature") and options.temperature == 0.0
    assert options.HasField("seed") and options.seed == 2**64 - 1
    assert not options.HasField("length_penalty")
    assert list(options.stop_token_ids) == [5, 6] and options.max_new_tokens == 7
    assert options.return_log_probs and options.truncate_input and not options.return_alignments


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"top_k": 2**32}, "top_k"), ({"seed": -1}, "seed"),
    ({"num_beams": 2.5}, "num_beams"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": "high"}, "top_p"), ({"stop_token_ids": [1, -2]}, "stop_token_ids"),
])
def test_values_protobuf_cannot_carry_are_invalid_argument_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^INVALID_ARGUMENT: {field}") as info:
        convert.build_options(**kwargs)
    assert isinstance(info.value, ValueError)  # so a plain `except ValueError` works too


def test_texts_are_checked() -> None:
    assert convert.check_texts("a") == ["a"]
    assert convert.check_texts(("a", "b")) == ["a", "b"]
    with pytest.raises(InvalidArgument, match="at least one"):
        convert.check_texts([])
    with pytest.raises(InvalidArgument, match=r"inputs\[1\]: must be a string"):
        convert.check_texts(["a", 3])  # type: ignore[list-item]


def test_long_input_lists_are_chunked_with_derived_request_ids() -> None:
    assert convert.chunk(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert convert.chunk_request_id("job", 1, 3) == "job.1"
    assert convert.chunk_request_id("job", 0, 1) == "job"
    assert convert.chunk_request_id(None, 0, 3) == ""
    # A caller's id of the longest length the server takes stays within it once ".N" is added.
    longest = "x" * convert.MAX_REQUEST_ID
    assert convert.chunk_request_id(longest, 12, 20) == "x" * (convert.MAX_REQUEST_ID - 3) + ".12"
    assert convert.chunk_request_id(longest, 0, 1) == longest


def test_option_docs_cover_every_keyword_option_of_every_method() -> None:
    from seqserve.client import AsyncClient

    for method in (Client.generate, Client.generate_stream, AsyncClient.generate, AsyncClient.generate_stream):
        code = method.__code__
        keyword_only = code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]
        assert set(keyword_only) <= set(convert.OPTION_DOCS), method
        for name in keyword_only:
            assert f"{name}: {convert.OPTION_DOCS[name]}" in method.__doc__, (method, name)


# -- results -------------------------------------------------------------------------------

def _input_result() -> pb.InputResult:
    seq = pb.Sequence(text="2026-11-25", token_ids=[5, 6], finish_reason=pb.FINISH_REASON_LENGTH,
                      log_probs=[-0.5, -0.25], score=-0.75)
    seq.alignments.add(token="▁2026", weights=[0.9, 0.1, 0.0])
    seq.alignments.add(token="-", weights=[0.2, 0.7, 0.1])
    return pb.InputResult(sequences=[seq], usage=pb.Usage(input_tokens=3, output_tokens=2),
                          timings=pb.Timings(queue_ms=1, encoder_ms=2, decode_ms=3, first_token_ms=4, total_ms=5),
                          source_tokens=["▁25", "▁Nov", "</s>"], truncated=True)


def test_results_are_plain_frozen_records_with_numpy_alignments() -> None:
    response = pb.GenerateResponse(results=[_input_result()], request_id="r1", model_version="abc")
    (result,) = convert.results_from_response(response, log_probs=True)
    assert isinstance(result, GenerationResult) and result.text == "2026-11-25"
    assert result.finish_reason is FinishReason.LENGTH
    assert result.request_id == "r1" and result.model_version == "abc" and result.truncated
    seq = result.sequences[0]
    assert seq.token_ids == (5, 6) and seq.log_probs == (-0.5, -0.25) and seq.score == pytest.approx(-0.75)
    assert seq.alignment_tokens == ("▁2026", "-")
    assert isinstance(seq.alignments, np.ndarray) and seq.alignments.shape == (2, 3)  # (T, S)
    assert seq.alignments.dtype == np.float32 and not seq.alignments.flags.writeable
    assert result.source_tokens == ("▁25", "▁Nov", "</s>")
    assert result.usage.output_tokens == 2 and result.timings.total_ms == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.truncated = False  # type: ignore[misc]
    # Nothing protobuf inside: every field is a plain value, tuple, enum or array.
    for value in dataclasses.astuple(result):
        assert not type(value).__module__.startswith("google"), value
    assert result == convert.results_from_response(response, log_probs=True)[0]  # arrays do not break equality
    hash(result)


def test_log_probs_are_none_unless_asked() -> None:
    msg = pb.InputResult(sequences=[pb.Sequence(text="x", finish_reason=pb.FINISH_REASON_EOS)])
    assert convert.result_from_proto(msg).sequences[0].log_probs is None
    assert convert.result_from_proto(msg, log_probs=True).sequences[0].log_probs == ()
    assert convert.result_from_proto(msg).sequences[0].alignments is None


def test_stream_events_become_pieces_and_the_result() -> None:
    pieces = convert.stream_events(pb.GenerateStreamResponse(tokens=[
        pb.TokenPiece(index=2, token_id=9, text="9", log_prob=-0.1, alignment=[0.5, 0.5]),
        pb.TokenPiece(index=3, token_id=8, text="8")]))
    assert [p.index for p in pieces] == [2, 3]  # a message may carry several tokens, in order
    piece = pieces[0]
    assert piece.text == "9" and piece.index == 2 and piece.log_prob == pytest.approx(-0.1)
    assert piece.alignment.tolist() == [0.5, 0.5] and pieces[1].log_prob is None
    (final,) = convert.stream_events(pb.GenerateStreamResponse(result=_input_result(), request_id="r"))
    assert isinstance(final, GenerationResult) and final.request_id == "r"
    assert convert.stream_events(pb.GenerateStreamResponse()) == []


# -- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument), (grpc.StatusCode.RESOURCE_EXHAUSTED, Overloaded),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded), (grpc.StatusCode.UNAVAILABLE, Unavailable),
    (grpc.StatusCode.CANCELLED, Cancelled), (grpc.StatusCode.INTERNAL, ServerError),
    (grpc.StatusCode.UNIMPLEMENTED, ServerError),
])
def test_every_status_maps_to_a_typed_exception_carrying_the_message(code: grpc.StatusCode, cls: type) -> None:
    exc = errors.error_for(code, "the server's words", request_id="r9")
    assert type(exc) is cls and exc.code == code and exc.details == "the server's words" and exc.request_id == "r9"
    assert str(exc) == f"{code.name}: the server's words"
    assert isinstance(exc, SeqserveClientError) and isinstance(exc, SeqserveError)


def test_the_server_status_lists_match_the_client_exceptions() -> None:
    from seqserve.runtime.errors import STATUS_CODES

    for code in STATUS_CODES.values():
        assert type(errors.error_for(code, "")) is not ServerError, code


# -- channel -------------------------------------------------------------------------------

def test_one_address_is_passed_through_and_several_become_a_static_list() -> None:
    assert channel.build_target(["localhost:50051"]) == ("localhost:50051", None)
    assert channel.build_target(["127.0.0.1:5001", "127.0.0.1:5002"]) == ("ipv4:127.0.0.1:5001,127.0.0.1:5002",
                                                                         "127.0.0.1")
    assert channel.build_target(["[::1]:5001", "[::1]:5002"]) == ("ipv6:[::1]:5001,[::1]:5002", "::1")
    target, name = channel.build_target(["localhost:5001", "127.0.0.1:5002"])
    assert target == "ipv4:127.0.0.1:5001,127.0.0.1:5002" and name == "localhost"
    with pytest.raises(InvalidArgument, match="not host:port"):
        channel.build_target(["127.0.0.1", "127.0.0.1:5002"])
    with pytest.raises(InvalidArgument, match="IPv4, or all over IPv6"):
        channel.build_target(["127.0.0.1:1", "[::1]:2"])


def test_addresses_come_from_the_argument_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(channel.ADDRESS_ENV, raising=False)
    assert channel.split_addresses(None) == [channel.DEFAULT_ADDRESS]
    monkeypatch.setenv(channel.ADDRESS_ENV, "127.0.0.1:1, 127.0.0.1:2")
    assert channel.split_addresses(None) == ["127.0.0.1:1", "127.0.0.1:2"]
    assert channel.split_addresses(["a:1,b:2", "c:3"]) == ["a:1", "b:2", "c:3"]


def test_service_config_balances_round_robin_and_retries_unavailable_and_overloaded() -> None:
    settings = channel.channel_settings(["127.0.0.1:5001", "127.0.0.1:5002"], auth_token="s3cret",
                                        metadata={"X-Tenant": "a"})
    options = dict(settings.options)
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "seqserve.v1.SeqServe"}  # draining replicas left out
    (method,) = config["methodConfig"]
    assert {"service": "seqserve.v1.SeqServe"} in method["name"]
    retry = method["retryPolicy"]
    assert retry["maxAttempts"] == 5
    assert retry["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED"]  # after the pushback
    assert retry["initialBackoff"].endswith("s") and retry["backoffMultiplier"] > 1
    assert options["grpc.enable_retries"] == 1 and options["grpc.keepalive_time_ms"] > 0
    assert settings.metadata == (("authorization", "Bearer s3cret"), ("x-tenant", "a"))
    assert settings.credentials is None
    no_retry = dict(channel.channel_settings("127.0.0.1:1", retry=None).options)
    assert "methodConfig" not in json.loads(no_retry["grpc.service_config"])
    not_overloaded = dict(channel.channel_settings("127.0.0.1:1", retry=RetryPolicy(retry_overloaded=False)).options)
    (method,) = json.loads(not_overloaded["grpc.service_config"])["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    with pytest.raises(InvalidArgument, match="at least 2 ms"):  # gRPC would never send a retry due at 0 ms
        RetryPolicy(initial_backoff_s=0.001)
    with pytest.raises(InvalidArgument, match="initial <= max"):
        RetryPolicy(initial_backoff_s=2.0, max_backoff_s=1.0)


def test_tls_settings(tmp_path) -> None:
    with pytest.raises(InvalidArgument, match="give both or neither"):
        channel.channel_settings("127.0.0.1:1", client_certificate=b"x")
    with pytest.raises(InvalidArgument, match="root_certificates: cannot read"):
        channel.channel_settings("127.0.0.1:1", root_certificates=tmp_path / "missing.pem")
    settings = channel.channel_settings("127.0.0.1:1", tls=True, tls_server_name="seqserve.test")
    assert settings.credentials is not None
    assert dict(settings.options)["grpc.ssl_target_name_override"] == "seqserve.test"


def test_calls_merge_client_and_call_metadata_and_use_the_default_timeout() -> None:
    with Client("127.0.0.1:1", timeout=7.0, metadata=[("a", "1")]) as client:
        assert client._call_args(None, {"B": "2"}) == {"timeout": 7.0, "metadata": (("a", "1"), ("b", "2"))}
        assert client._call_args(0.5, None)["timeout"] == 0.5


def test_connections_must_be_at_least_one() -> None:
    with pytest.raises(InvalidArgument, match="connections: must be >= 1, got 0"):
        Client("127.0.0.1:1", connections=0)
