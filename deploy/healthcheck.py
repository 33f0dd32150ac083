#!/usr/bin/env python3
"""Container health probe: one `grpc.health.v1.Health/Check` call to the local seqserve server.

Exit 0 when the service reports SERVING, 1 otherwise (NOT_SERVING while the model loads and while
draining after SIGTERM, or no answer). Used by the image's HEALTHCHECK and docker-compose; Kubernetes
uses its native gRPC probes instead. Needs only grpcio and grpcio-health-checking, never the model.

    python3 healthcheck.py [ADDRESS] [--service NAME] [--timeout SECONDS]

ADDRESS defaults to $SEQSERVE_HEALTHCHECK_ADDRESS, else 127.0.0.1:$SEQSERVE_PORT (50051).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_SERVICE = "seqserve.v1.SeqServe"  # "" asks about the whole server


def default_address(environ: Mapping[str, str]) -> str:
    """Where the server in this container listens: loopback, on the port it was configured with."""
    explicit = environ.get("SEQSERVE_HEALTHCHECK_ADDRESS", "").strip()
    if explicit:
        return explicit
    return f"127.0.0.1:{environ.get('SEQSERVE_PORT', '').strip() or '50051'}"


def check(address: str, service: str = DEFAULT_SERVICE, timeout: float = 3.0) -> str:
    """The service's serving status name, or 'UNREACHABLE: ...' when the call fails."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return f"UNREACHABLE: {exc.code().name} {exc.details() or ''}".rstrip()
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="grpc.health.v1 probe of a seqserve server")
    parser.add_argument("address", nargs="?", default=default_address(os.environ), help="HOST:PORT")
    parser.add_argument("--service", default=DEFAULT_SERVICE, help=f"service asked about (default {DEFAULT_SERVICE})")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    args = parser.parse_args(argv)
    status = check(args.address, args.service, args.timeout)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
