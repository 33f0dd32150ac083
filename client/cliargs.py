"""Command-line arguments shared by `seqserve-client` and `seqserve-loadtest`: how to reach the
server (address, TLS, token, metadata, timeout) and the generation options, with their help taken
from `convert.OPTION_DOCS` so the flags and the library document options the same way."""

from __future__ import annotations

import argparse
import os
from typing import Any

from seqserve.client.channel import ADDRESS_ENV, DEFAULT_ADDRESS, RetryPolicy
from seqserve.client.convert import OPTION_DOCS

TOKEN_ENV = "SEQSERVE_TOKEN"


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _key_value(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key.strip().lower(), val


def connection_parser() -> argparse.ArgumentParser:
    """A parent parser with the connection flags."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--address", "-a", action="append", metavar="HOST:PORT",
                   help=f"server address; repeat it (or separate with commas) for round-robin over replicas "
                        f"(env {ADDRESS_ENV}; default {DEFAULT_ADDRESS})")
    g.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="deadline of each call in seconds (default 60)")
    g.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    g.add_argument("--tls-ca", metavar="PEM", help="CA certificate that signed the server's (implies --tls)")
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate chain, for mutual TLS")
    g.add_argument("--tls-key", metavar="PEM", help="client private key, for mutual TLS")
    g.add_argument("--tls-server-name", metavar="NAME", help="name the server's certificate must carry")
    g.add_argument("--token", help=f"sent as 'authorization: Bearer TOKEN' (env {TOKEN_ENV})")
    g.add_argument("--metadata", "-H", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="extra call metadata; repeatable")
    g.add_argument("--connections", type=int, default=1, metavar="N",
                   help="connections to each address, calls spread over them in turn (a server with several "
                        "front-end processes balances connections between them; default 1)")
    g.add_argument("--retry-overloaded", action=argparse.BooleanOptionalAction, default=True,
                   help="retry calls the server refuses with RESOURCE_EXHAUSTED, after the wait its "
                        "grpc-retry-pushback-ms says (default on; off: such calls fail at once)")
    return p


def client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`Client`/`AsyncClient` keyword arguments from parsed connection flags."""
    return {
        "address": args.address,  # None: the client reads SEQSERVE_ADDRESS
        "timeout": args.timeout,
        "tls": args.tls,
        "root_certificates": args.tls_ca,
        "client_certificate": args.tls_cert,
        "client_key": args.tls_key,
        "tls_server_name": args.tls_server_name,
        "auth_token": args.token or os.environ.get(TOKEN_ENV) or None,
        "metadata": args.metadata,
        "retry": RetryPolicy(retry_overloaded=args.retry_overloaded),
        "connections": args.connections,
    }


def generation_parser() -> argparse.ArgumentParser:
    """A parent parser with the generation options (flags named after the keyword arguments)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation options")
    g.add_argument("--max-new-tokens", type=int, help=OPTION_DOCS["max_new_tokens"])
    g.add_argument("--min-new-tokens", type=int, default=0, help=OPTION_DOCS["min_new_tokens"])
    g.add_argument("--strategy", choices=("greedy", "beam", "sample"), help=OPTION_DOCS["strategy"])
    g.add_argument("--num-beams", type=int, help=OPTION_DOCS["num_beams"])
    g.add_argument("--length-penalty", type=float, help=OPTION_DOCS["length_penalty"])
    g.add_argument("--num-return-sequences", type=int, help=OPTION_DOCS["num_return_sequences"])
    g.add_argument("--temperature", type=float, help=OPTION_DOCS["temperature"])
    g.add_argument("--top-k", type=int, help=OPTION_DOCS["top_k"])
    g.add_argument("--top-p", type=float, help=OPTION_DOCS["top_p"])
    g.add_argument("--seed", type=int, help=OPTION_DOCS["seed"])
    g.add_argument("--stop-token-ids", type=_int_list, default=[], metavar="ID,ID", help=OPTION_DOCS["stop_token_ids"])
    g.add_argument("--log-probs", dest="return_log_probs", action="store_true", help=OPTION_DOCS["return_log_probs"])
    g.add_argument("--alignments", dest="return_alignments", action="store_true",
                   help=OPTION_DOCS["return_alignments"])
    g.add_argument("--truncate-input", action="store_true", help=OPTION_DOCS["truncate_input"])
    return p


GENERATION_FIELDS = ("max_new_tokens", "min_new_tokens", "strategy", "num_beams", "length_penalty",
                     "num_return_sequences", "temperature", "top_k", "top_p", "seed", "stop_token_ids",
                     "return_log_probs", "return_alignments", "truncate_input")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`generate` keyword arguments from parsed generation flags."""
    return {name: getattr(args, name) for name in GENERATION_FIELDS}
