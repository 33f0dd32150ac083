"""A SeqServe server with no model and no seqserve code behind it: the floor of what gRPC alone
costs per streamed token on this machine, with the same client and the same messages.

`seqserve bench-serve` runs it (`python -m seqserve.bench.transport_floor --port P`) beside the
real server and sends it the same load levels, so a run says how much of the served figures the
transport takes before any decoding, batching or tokenizing. `GenerateStream` answers
`max_new_tokens` one-token messages as fast as gRPC sends them, then a last message shaped like
the real server's; `Generate` answers each input with `max_new_tokens` token ids; `GetModelInfo`
gives generous limits; health is SERVING. Not a mock for tests of seqserve: it decodes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.server.service import SERVICE_NAME

DEFAULT_TOKENS = 16  # when a request leaves max_new_tokens at 0
MAX_INPUTS = 1024
VERSION = "transport-floor"


def _token_id(index: int) -> int:
    """The floor's token at a position: ordinary ids, never a special one."""
    return 4 + index % 32


def _result(tokens: int) -> pb.InputResult:
    """A final result the size of a real one for `tokens` tokens (greedy, no scores)."""
    out = pb.InputResult(usage=pb.Usage(input_tokens=10, output_tokens=tokens),
                         timings=pb.Timings(queue_ms=0.1, encoder_ms=0.2, decode_ms=1.0, first_token_ms=0.3,
                                            total_ms=1.5))
    out.sequences.add(text="x" * tokens, token_ids=[_token_id(i) for i in range(tokens)],
                      finish_reason=pb.FINISH_REASON_LENGTH)
    return out


class FloorService(pb_grpc.SeqServeServicer):
    """Answers with fixed tokens at once: nothing between gRPC and the wire."""

    async def GenerateStream(self, request: pb.GenerateStreamRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        tokens = request.options.max_new_tokens or DEFAULT_TOKENS
        for i in range(tokens):
            yield pb.GenerateStreamResponse(tokens=[pb.TokenPiece(index=i, token_id=_token_id(i), text="x")])
        yield pb.GenerateStreamResponse(result=_result(tokens), request_id=request.request_id or "floor",
                                        model_version=VERSION)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        tokens = request.options.max_new_tokens or DEFAULT_TOKENS
        return pb.GenerateResponse(results=[_result(tokens) for _ in request.inputs],
                                   request_id=request.request_id or "floor", model_version=VERSION)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(model_version=VERSION, limits=pb.ServerLimits(
            max_batch_size=MAX_INPUTS, max_queue=MAX_INPUTS, max_inputs_per_request=MAX_INPUTS,
            max_new_tokens_limit=1 << 16))


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = grpc.aio.server()
    pb_grpc.add_SeqServeServicer_to_server(FloorService(), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if not server.add_insecure_port(f"{host}:{port}"):
        raise SystemExit(f"seqserve transport floor: cannot listen on {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqserve.bench.transport_floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
