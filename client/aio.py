"""`AsyncClient`: the asyncio (`grpc.aio`) Python client of a seqserve server.

Its channel is opened by the first call and belongs to that call's event loop:

    async with AsyncClient("localhost:50051") as client:
        result = await client.generate("25 November 2026")
        async for item in client.generate_stream("nov 5th 1999"):
            ...  # TokenPiece objects as they are decoded, then the GenerationResult
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterable, Sequence
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


class AsyncClient(ClientBase):
    """An asyncio client of a seqserve server; an async context manager (or `await close()`)."""

    def _open(self) -> None:
        # A grpc.aio channel belongs to the event loop it was made in, so it is made by the first
        # call, inside the caller's loop (the client may be built outside any loop).
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[pb_grpc.SeqServeStub] = []
        self._turn = itertools.count()
        self._health_: health_pb2_grpc.HealthStub | None = None

    def _connect(self) -> None:
        if not self._channels:
            s = self.settings
            for _ in range(self.connections):
                if s.credentials is not None:
                    channel = grpc.aio.secure_channel(s.target, s.credentials, options=self._channel_options())
                else:
                    channel = grpc.aio.insecure_channel(s.target, options=self._channel_options())
                self._channels.append(channel)
            self._stubs = [pb_grpc.SeqServeStub(c) for c in self._channels]
            self._health_ = health_pb2_grpc.HealthStub(self._channels[0])

    @property
    def _stub(self) -> pb_grpc.SeqServeStub:
        """The next connection's stub, in turn."""
        self._connect()
        return self._stubs[next(self._turn) % len(self._stubs)]

    @property
    def _health(self) -> health_pb2_grpc.HealthStub:
        self._connect()
        assert self._health_ is not None
        return self._health_

    # -- lifecycle ----------------------------------------------------------------------------

    async def close(self, grace: float | None = None) -> None:
        """Close the channels; calls still in flight after `grace` seconds are cancelled."""
        for channel in self._channels:
            await channel.close(grace)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- calls --------------------------------------------------------------------------------

    @overload
    async def generate(self, texts: str, **options: Any) -> GenerationResult: ...

    @overload
    async def generate(self, texts: Sequence[str], **options: Any) -> list[GenerationResult]: ...

    @convert.with_option_docs
    async def generate(self, texts: str | Sequence[str], *, max_new_tokens: int | None = None,
                       min_new_tokens: int = 0, strategy: str | None = None, num_beams: int | None = None,
                       length_penalty: float | None = None, num_return_sequences: int | None = None,
                       temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                       seed: int | None = None, stop_token_ids: Iterable[int] = (),
                       return_log_probs: bool = False, return_alignments: bool = False,
                       truncate_input: bool = False, request_id: str | None = None, timeout: float | None = None,
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
        per_call = await self._inputs_per_call(call) if len(items) > 1 else 1
        requests = self._generate_requests(items, options, request_id, per_call)
        try:
            if len(requests) == 1:
                responses = [await self._stub.Generate(requests[0], **call)]
            else:
                calls = [self._stub.Generate(r, **call) for r in requests]
                try:
                    responses = await asyncio.gather(*calls)
                except BaseException:
                    for c in calls:
                        c.cancel()
                    raise
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        results = [r for response in responses
                   for r in convert.results_from_response(response, log_probs=return_log_probs)]
        return results[0] if isinstance(texts, str) else results

    @convert.with_option_docs
    async def generate_stream(self, text: str, *, max_new_tokens: int | None = None, min_new_tokens: int = 0,
                              strategy: str | None = None, num_beams: int | None = None,
                              length_penalty: float | None = None, num_return_sequences: int | None = None,
                              temperature: float | None = None, top_k: int | None = None,
                              top_p: float | None = None, seed: int | None = None,
                              stop_token_ids: Iterable[int] = (), return_log_probs: bool = False,
                              return_alignments: bool = False, truncate_input: bool = False,
                              request_id: str | None = None, timeout: float | None = None,
                              metadata: Metadata | None = None) -> AsyncIterator[TokenPiece | GenerationResult]:
        """Generate for one input, yielding each `TokenPiece` as it is decoded, then the `GenerationResult`.

        Leaving the loop early cancels the call once the generator is closed (at once with
        `contextlib.aclosing`), which frees its rows on the server.

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
        call = self._stub.GenerateStream(request, **self._call_args(timeout, metadata))
        try:
            async for message in call:
                for event in convert.stream_events(message, log_probs=return_log_probs):
                    yield event
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # no-op once finished; otherwise the caller left early

    async def model_info(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> ModelInfo:
        """The served model's description and the server's limits.

        Args:
            timeout: seconds before the call fails with DeadlineExceeded (None: the client's default).
            metadata: extra gRPC metadata for this call.
        """
        try:
            response = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), **self._call_args(timeout, metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        if self._max_inputs is None and response.limits.max_inputs_per_request:
            self._max_inputs = response.limits.max_inputs_per_request
        return convert.model_info_from_proto(response)

    async def health(self, service: str = SERVICE_NAME, *, timeout: float | None = None,
                     metadata: Metadata | None = None) -> HealthStatus:
        """The `grpc.health.v1` status of a service ("" for the whole server).

        Args:
            service: the service name asked about (default: seqserve.v1.SeqServe).
            timeout: seconds before the call fails with DeadlineExceeded (None: the client's default).
            metadata: extra gRPC metadata for this call.
        """
        try:
            response = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                                **self._call_args(timeout, metadata))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return HealthStatus.SERVICE_UNKNOWN
            raise from_rpc_error(exc) from None
        return HealthStatus(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def wait_ready(self, timeout: float = 30.0, *, service: str = SERVICE_NAME, interval: float = 0.1) -> None:
        """Wait until the server reports SERVING; DeadlineExceeded after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"server not SERVING after {timeout:g} s ({last})")
            try:
                status = await self.health(service, timeout=min(remaining, 5.0))
                if status is HealthStatus.SERVING:
                    return
                last = status.value
            except (Unavailable, DeadlineExceeded) as exc:
                last = str(exc)
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    # -- helpers ------------------------------------------------------------------------------

    async def _inputs_per_call(self, call_args: dict[str, Any]) -> int:
        """How many inputs one Generate call may carry (the server's limit, asked once)."""
        if self._max_inputs is None:
            try:
                response = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), **call_args)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
            self._max_inputs = response.limits.max_inputs_per_request or 1
        return self._max_inputs
