"""`Client`: the blocking Python client of a seqserve server (one channel, thread-safe).

    with Client("localhost:50051") as client:
        print(client.generate("25 November 2026").text)
        for item in client.generate_stream("nov 5th 1999"):
            ...  # TokenPiece objects as they are decoded, then the GenerationResult
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqserve.client import convert
from seqserve.client.base import ClientBase, Metadata
from seqserve.client.channel import SERVICE_NAME
from seqserve.client.errors import DeadlineExceeded, Unavailable, from_rpc_error
from seqserve.client.results import GenerationResult, HealthStatus, ModelInfo, TokenPiece
from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc


class Client(ClientBase):
    """A blocking client of a seqserve server; a context manager (or call `close()`). Thread-safe."""

    def _open(self) -> None:
        s = self.settings
        if s.credentials is not None:
            self._channels = [grpc.secure_channel(s.target, s.credentials, options=self._channel_options())
                              for _ in range(self.connections)]
        else:
            self._channels = [grpc.insecure_channel(s.target, options=self._channel_options())
                              for _ in range(self.connections)]
        self._stubs = [pb_grpc.SeqServeStub(c) for c in self._channels]
        self._turn = itertools.count()
        self._health = health_pb2_grpc.HealthStub(self._channels[0])

    @property
    def _stub(self) -> pb_grpc.SeqServeStub:
        """The next connection's stub, in turn."""
        return self._stubs[next(self._turn) % len(self._stubs)]

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channels; calls in flight are cancelled."""
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls --------------------------------------------------------------------------------

    @overload
    def generate(self, texts: str, **options: Any) -> GenerationResult: ...

    @overload
    def generate(self, texts: Sequence[str], **options: Any) -> list[GenerationResult]: ...

    @convert.with_option_docs
    def generate(self, texts: str | Sequence[str], *, max_new_tokens: int | None = None, min_new_tokens: int = 0,
                 strategy: str | None = None, num_beams: int | None = None, length_penalty: float | None = None,
                 num_return_sequences: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_token_ids: Iterable[int] = (), return_log_probs: bool = False,
                 return_alignments: bool = False, truncate_input: bool = False, request_id: str | None = None,
                 timeout: float | None = None,
                 metadata: Metadata | None = None) -> GenerationResult | list[GenerationResult]:
        """Generate for one input (a string: one result) or many (a list: one result per input, in order).

        A list longer than the server's max_inputs_per_request is sent as several calls at once.

        Args:
            texts: one input text, or a list of them.
            {options}
        """
        items = convert.check_texts(texts)
        options = convert.build_options(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, strategy=strategy, num_beams=num_beams,
            length_penalty=length_penalty, num_return_sequences=num_return_sequences, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, return_log_probs=return_log_probs,
            return_alignments=return_alignments, truncate_input=truncate_input)
        call = self._call_args(timeout, metadata)
        per_call = self._inputs_per_call(call) if len(items) > 1 else 1
        futures = [self._stub.Generate.future(r, **call)
                   for r in self._generate_requests(items, options, request_id, per_call)]
        results: list[GenerationResult] = []
        try:
            for future in futures:
                results += convert.results_from_response(future.result(), log_probs=return_log_probs)
        except grpc.RpcError as exc:
            for future in futures:
                future.cancel()
            raise from_rpc_error(exc) from None
        return results[0] if isinstance(texts, str) else results

    @convert.with_option_docs
    def generate_stream(self, text: str, *, max_new_tokens: int | None = None, min_new_tokens: int = 0,
                        strategy: str | None = None, num_beams: int | None = None,
                        length_penalty: float | None = None, num_return_sequences: int | None = None,
                        temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                        seed: int | None = None, stop_token_ids: Iterable[int] = (),
                        return_log_probs: bool = False, return_alignments: bool = False,
                        truncate_input: bool = False, request_id: str | None = None, timeout: float | None = None,
                        metadata: Metadata | None = None) -> Iterator[TokenPiece | GenerationResult]:
        """Generate for one input, yielding each `TokenPiece` as it is decoded, then the `GenerationResult`.

        Leaving the loop early (or closing the iterator) cancels the call, which frees its rows on the server.

        Args:
            text: the input text.
            {options}
        """
        (text,) = convert.check_texts([text])
        options = convert.build_options(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, strategy=strategy, num_beams=num_beams,
            length_penalty=length_penalty, num_return_sequences=num_return_sequences, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, return_log_probs=return_log_probs,
            return_alignments=return_alignments, truncate_input=truncate_input)
        request = pb.GenerateStreamRequest(input=text, options=options, request_id=request_id or "")
        return self._stream(request, self._call_args(timeout, metadata), return_log_probs)

    def _stream(self, request: pb.GenerateStreamRequest, call_args: dict[str, Any],
                log_probs: bool) -> Iterator[TokenPiece | GenerationResult]:
        call = self._stub.GenerateStream(request, **call_args)
        try:
            for message in call:
                for event in convert.stream_events(message, log_probs=log_probs):
                    yield event
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # no-op once finished; otherwise the caller left early

    def model_info(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> ModelInfo:
        """The served model's description and the server's limits.

        Args:
            timeout: seconds before the call fails with DeadlineExceeded (None: the client's default).
            metadata: extra gRPC metadata for this call.
        """
        try:
            response = self._stub.GetModelInfo(pb.GetModelInfoRequest(), **self._call_args(timeout, metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        info = convert.model_info_from_proto(response)
        if self._max_inputs is None and info.limits.max_inputs_per_request:
            self._max_inputs = info.limits.max_inputs_per_request
        return info

    def health(self, service: str = SERVICE_NAME, *, timeout: float | None = None,
               metadata: Metadata | None = None) -> HealthStatus:
        """The `grpc.health.v1` status of a service ("" for the whole server).

        Args:
            service: the service name asked about (default: seqserve.v1.SeqServe).
            timeout: seconds before the call fails with DeadlineExceeded (None: the client's default).
            metadata: extra gRPC metadata for this call.
        """
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                          **self._call_args(timeout, metadata))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return HealthStatus.SERVICE_UNKNOWN
            raise from_rpc_error(exc) from None
        return HealthStatus(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_ready(self, timeout: float = 30.0, *, service: str = SERVICE_NAME, interval: float = 0.1) -> None:
        """Block until the server reports SERVING; DeadlineExceeded after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last: str = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"server not SERVING after {timeout:g} s ({last})")
            try:
                status = self.health(service, timeout=min(remaining, 5.0))
                if status is HealthStatus.SERVING:
                    return
                last = status.value
            except (Unavailable, DeadlineExceeded) as exc:
                last = str(exc)
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    # -- helpers ------------------------------------------------------------------------------

    def _inputs_per_call(self, call_args: dict[str, Any]) -> int:
        """How many inputs one Generate call may carry (the server's limit, asked once)."""
        if self._max_inputs is None:
            try:
                response = self._stub.GetModelInfo(pb.GetModelInfoRequest(), **call_args)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
            self._max_inputs = response.limits.max_inputs_per_request or 1
        return self._max_inputs
