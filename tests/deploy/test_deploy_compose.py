"""docker-compose.yml, without a container engine: two server replicas built from the Dockerfile's
server target with settings the server accepts, health-checked by the image's probe, stopped with
time for the drain; and a load test that waits for both, spreads its calls over both with
round-robin (its command line parsed by the real `seqserve-loadtest` parser) and stops by itself."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from seqserve.client.channel import split_addresses
from seqserve.client.loadtest import build_parser

ROOT = Path(__file__).resolve().parents[2]
DRAIN_MARGIN_S = 5


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def servers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run `seqserve serve` (the image's entrypoint, not overridden)."""
    return {name: s for name, s in compose["services"].items() if "entrypoint" not in s}


def seconds(value: str) -> float:
    """A compose duration ('30s', '1m30s', '1500ms') in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_two_server_replicas_from_the_server_target(compose: dict[str, Any], config_from_env) -> None:
    replicas = servers(compose)
    assert len(replicas) == 2, f"expected two server replicas, got {sorted(replicas)}"
    images = {s["image"] for s in replicas.values()}
    assert len(images) == 1, "both replicas run one image"
    for name, service in replicas.items():
        assert service["build"]["target"] == "server" and service["build"]["context"] == "."
        assert "MODEL_DIR" in service["build"]["args"]
        config = config_from_env(service["environment"])  # the server's own parser accepts them
        assert {str(config.port), str(config.metrics_port)} <= set(map(str, service["expose"])), name
        published = [p.split(":") for p in service["ports"]]
        assert all(host_ip == "127.0.0.1" for host_ip, _, _ in published), f"{name}: publish on loopback only"
        assert {int(container) for _, _, container in published} == {config.port, config.metrics_port}
        assert service["healthcheck"]["test"] == ["CMD", "python3", "/opt/seqserve/healthcheck.py"]
        assert seconds(service["stop_grace_period"]) >= config.grace_period_s + DRAIN_MARGIN_S, \
            f"{name}: stop_grace_period must cover the drain ({config.grace_period_s} s) plus a margin"
    host_ports = [p.split(":")[1] for s in replicas.values() for p in s["ports"]]
    assert len(host_ports) == len(set(host_ports)), f"host ports collide: {host_ports}"


def test_load_test_round_robins_over_both_replicas_and_stops(compose: dict[str, Any], config_from_env) -> None:
    replicas = servers(compose)
    load = compose["services"]["loadtest"]
    assert load["image"] == next(iter(replicas.values()))["image"], "the server image carries the load test"
    assert load["entrypoint"] == ["seqserve-loadtest"]
    assert load["depends_on"] == {name: {"condition": "service_healthy"} for name in replicas}
    assert load["healthcheck"] == {"disable": True} and load["restart"] == "no"
    args = build_parser().parse_args([str(a) for a in load["command"]])
    targets = {tuple(a.rsplit(":", 1)) for a in split_addresses(args.address)}
    expected = {(name, str(config_from_env(s["environment"]).port)) for name, s in replicas.items()}
    assert targets == expected, "the load test must name every replica by its service name and gRPC port"
    assert args.duration or args.requests, "the load test must be bounded"
