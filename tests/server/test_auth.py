"""Who can reach what: bearer-token authentication (`--auth-token-file`, reread on SIGHUP) against
real servers on loopback, through raw gRPC metadata and the client library's `auth_token`; health
stays open for probes unless `--auth-health on`; a token never shows in logs, errors or metrics;
and the metrics listener binds `--metrics-host`."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from seqserve.client import AsyncClient, Client, ServerError, Unavailable
from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.server import auth as auth_module
from seqserve.server.auth import TokenAuth, TokenFileError, read_tokens
from seqserve.server.config import ConfigError, ServerConfig, parse_args

TIMEOUT = 30.0
SEQSERVE = [sys.executable, "-m", "seqserve.server.cli"]


def new_token() -> str:
    """A token that cannot appear anywhere by chance, so finding it in a log or a metric means a leak."""
    return "tok-" + secrets.token_hex(16)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def write_tokens(path: Path, *lines: str) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    """The status a call ends with (OK when it returns)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def refusal(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def list_services(channel: grpc.Channel, metadata: Any = None) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=TIMEOUT))
    return [s.name for s in response.list_services_response.service]


# -- the token file ----------------------------------------------------------------------------

def test_token_file_one_per_line_comments_and_blank_lines_ignored(tmp_path: Path) -> None:
    a, b = new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_bytes(f"# the batch team\n\n  {a}  \r\n#{b}\n{b}\n{a}\n".encode())
    assert len(read_tokens(path)) == 2  # each token once; "#..." is a comment, not a token
    auth = TokenAuth(path)
    assert auth.check(bearer(a)) is None and auth.check(bearer(b)) is None
    assert auth.check((("authorization", f"bearer   {b}"),)) is None  # the scheme is case-insensitive
    assert a not in repr(auth) and b not in repr(auth)


@pytest.mark.parametrize("content, says", [
    ("", "no tokens"), ("# only a comment\n\n   \n", "no tokens"),
    ("tok-with a space\n", "line 1: a token must be printable ASCII"),
    ("# ok\ntok-\u00e9t\u00e9-1234567890\n", "line 2: a token must be printable ASCII"),
], ids=["empty", "comments only", "space", "non-ascii"])
def test_unusable_token_file_is_a_clear_error_that_quotes_no_token(tmp_path: Path, content: str, says: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenFileError) as info:
        TokenAuth(path)
    assert str(path) in str(info.value) and says in str(info.value)
    assert "tok-" not in str(info.value)
    with pytest.raises(TokenFileError, match="No such file"):
        read_tokens(tmp_path / "missing")


@pytest.mark.parametrize("metadata", [
    None, (), (("authorization", "Basic dXNlcjpwYXNz"),), (("authorization", "Bearer"),),
    (("authorization", "Bearer "),), (("x-token", "tok"),)], ids=["none", "empty", "basic", "scheme only",
                                                                  "blank token", "other header"])
def test_check_refuses_what_is_not_an_accepted_bearer_token(tmp_path: Path, metadata: Any) -> None:
    token = new_token()
    auth = TokenAuth(write_tokens(tmp_path / "tokens", token))
    assert auth.check(metadata) is not None
    assert auth.check(bearer(token[:-1])) is not None and auth.check(bearer(token + "x")) is not None
    assert auth.check(bearer(token) * 2) is not None, "two authorization headers: refused, not two guesses"


def test_sighup_during_start_up_is_replayed_once_started(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "tokens", new_token())
    auth = TokenAuth(path)
    on_sighup = auth_module.ReloadOnSignal()
    on_sighup()  # the server is still loading its model: nothing to reload yet
    later = new_token()
    write_tokens(path, later)
    assert auth.check(bearer(later)) is not None
    on_sighup.attach(auth)  # started: the file is reread now
    assert auth.check(bearer(later)) is None
    on_sighup.attach(None)  # no token file: a SIGHUP handler is never installed, attaching is harmless


def test_auth_settings_from_flags_and_variables(tmp_path: Path) -> None:
    path = str(write_tokens(tmp_path / "tokens", new_token()))
    config = parse_args(["/model"], environ={"SEQSERVE_AUTH_TOKEN_FILE": path, "SEQSERVE_AUTH_HEALTH": "on"})
    assert (config.auth_token_file, config.auth_health) == (path, "on")
    assert parse_args(["/model", "--auth-token-file", path]).auth_health == "off"
    assert parse_args(["/model"], environ={}).auth_token_file == ""
    with pytest.raises(ConfigError, match=r"auth_health \(--auth-health, SEQSERVE_AUTH_HEALTH\) on needs"):
        ServerConfig("/model", auth_health="on")
    with pytest.raises(ConfigError, match="must be on or off"):
        ServerConfig("/model", auth_token_file=path, auth_health="yes")


# -- a real server -----------------------------------------------------------------------------

@pytest.fixture
def token() -> str:
    return new_token()


@pytest.fixture
def authed(start_server: Callable[..., Any], tmp_path: Path, token: str) -> Any:
    """A server that accepts `token` (the only line of its token file)."""
    return start_server(auth_token_file=str(write_tokens(tmp_path / "tokens", "# seqserve tokens", token)),
                        metrics_port=free_port("127.0.0.1"))


def test_calls_without_an_accepted_token_are_unauthenticated(authed: Any, token: str,
                                                             caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_module, "LOG_INTERVAL_S", 0.0)  # a warning for every refusal, to look at each
    stub = authed.stub
    request = pb.GenerateRequest(inputs=["1 May 2000"])
    stream_request = pb.GenerateStreamRequest(input="1 May 2000")
    wrong = bearer(new_token())
    calls = {
        "Generate": lambda md: stub.Generate(request, metadata=md, timeout=TIMEOUT),
        "GenerateStream": lambda md: list(stub.GenerateStream(stream_request, metadata=md, timeout=TIMEOUT)),
        "GetModelInfo": lambda md: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md, timeout=TIMEOUT),
    }
    with caplog.at_level(logging.INFO):
        for method, call in calls.items():
            for metadata in (None, wrong, (("authorization", token),), (("authorization", f"Basic {token}"),)):
                error = refusal(lambda: call(metadata))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (method, metadata, error)
                assert token not in (error.details() or "") and "tok-" not in (error.details() or "")
                assert "Bearer" in error.details() or "not accepted" in error.details()
            assert code_of(lambda: call(bearer(token))) == grpc.StatusCode.OK, method
        # A method that does not exist: refused the same way without a token (nothing learnt),
        # UNIMPLEMENTED with one.
        unknown = authed.channel.unary_unary("/seqserve.v1.SeqServe/Nope")
        assert code_of(lambda: unknown(b"", timeout=TIMEOUT)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: unknown(b"", metadata=bearer(token), timeout=TIMEOUT)) == grpc.StatusCode.UNIMPLEMENTED
        # Reflection follows SeqServe's rule: it describes the API.
        assert code_of(lambda: list_services(authed.channel)) == grpc.StatusCode.UNAUTHENTICATED
        assert "seqserve.v1.SeqServe" in list_services(authed.channel, bearer(token))
    # Refusals are logged (a warning each, with the method and the peer) and counted, and the
    # token is nowhere: not in a log record, not in the metrics, served or not.
    refused = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "unauthenticated"]
    assert {r.fields["method"] for r in refused} >= {"Generate", "GenerateStream", "GetModelInfo"}
    assert all(r.levelno == logging.WARNING and r.fields["peer"] and r.fields["refused"] == 1 for r in refused)
    assert token not in caplog.text and all(token not in str(getattr(r, "fields", "")) for r in caplog.records)
    metrics = authed.server.metrics
    counted = metrics.registry.get_sample_value("seqserve_requests_total",
                                                {"method": "Generate", "code": "UNAUTHENTICATED"})
    assert counted == 4
    with urllib.request.urlopen(f"http://127.0.0.1:{authed.server.metrics_port}/metrics", timeout=TIMEOUT) as r:
        served = r.read().decode()
    assert 'seqserve_requests_total{code="UNAUTHENTICATED",method="Generate"} 4.0' in served
    assert token not in served and token not in metrics.text()


def test_a_flood_of_refused_calls_is_counted_not_logged_one_by_one(authed: Any,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    call = authed.stub.GetModelInfo
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="seqserve.server.auth"):
        for _ in range(50):
            assert code_of(lambda: call(pb.GetModelInfoRequest(), timeout=TIMEOUT)) == grpc.StatusCode.UNAUTHENTICATED
    elapsed = time.monotonic() - started
    warnings = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "unauthenticated"]
    # One warning per LOG_INTERVAL_S at most, each with the count of refusals it stands for.
    assert 1 <= len(warnings) <= 1 + elapsed / auth_module.LOG_INTERVAL_S
    assert warnings[0].fields["refused"] == 1 and sum(r.fields["refused"] for r in warnings) <= 50
    counted = authed.server.metrics.registry.get_sample_value("seqserve_requests_total",
                                                              {"method": "GetModelInfo", "code": "UNAUTHENTICATED"})
    assert counted == 50


def test_health_stays_open_for_probes(authed: Any) -> None:
    health = health_pb2_grpc.HealthStub(authed.channel)
    for service in ("", "seqserve.v1.SeqServe"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service="seqserve.v1.SeqServe"), timeout=TIMEOUT)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_client_library_auth_token_is_accepted(authed: Any, token: str) -> None:
    with Client(authed.address, auth_token=token) as client:
        assert client.generate("1 May 2000").text
        assert [r.text for r in client.generate(["1 May 2000", "2 June 2001"])]  # asks the limits first
        pieces = list(client.generate_stream("1 May 2000"))
        assert pieces and client.model_info().limits.max_inputs_per_request > 0
    with Client(authed.address, auth_token=new_token(), retry=None) as client:
        with pytest.raises(ServerError) as info:
            client.generate("1 May 2000")
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and token not in str(info.value)
    with Client(authed.address, retry=None) as client, pytest.raises(ServerError) as info:
        client.generate("1 May 2000")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED

    async def main() -> str:
        async with AsyncClient(authed.address, auth_token=token) as client:
            return (await client.generate("1 May 2000")).text

    assert asyncio.run(main())


def test_auth_health_on_guards_health_too(start_server: Callable[..., Any], tmp_path: Path, token: str) -> None:
    running = start_server(auth_token_file=str(write_tokens(tmp_path / "tokens", token)), auth_health="on")
    health = health_pb2_grpc.HealthStub(running.channel)
    check = health_pb2.HealthCheckRequest(service="seqserve.v1.SeqServe")
    assert code_of(lambda: health.Check(check, timeout=TIMEOUT)) == grpc.StatusCode.UNAUTHENTICATED
    assert health.Check(check, metadata=bearer(token), timeout=TIMEOUT).status == health_pb2.HealthCheckResponse.SERVING
    # The client library's channels watch health to skip replicas that start or drain, and that
    # watch carries no token: against a server that guards health they must turn it off.
    with Client(running.address, auth_token=token, retry=None, timeout=TIMEOUT) as client, \
            pytest.raises(Unavailable, match="health check"):
        client.generate("1 May 2000")
    with Client(running.address, auth_token=token, channel_options=[("grpc.inhibit_health_checking", 1)]) as client:
        assert client.generate("1 May 2000").text


def test_reload_rotates_tokens_and_a_bad_file_keeps_the_old_ones(authed: Any, token: str, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """What SIGHUP does, in-process: `auth.reload()`."""
    path = tmp_path / "tokens"
    generate = authed.stub.Generate
    request = pb.GenerateRequest(inputs=["1 May 2000"])

    def accepted(t: str) -> bool:
        return code_of(lambda: generate(request, metadata=bearer(t), timeout=TIMEOUT)) == grpc.StatusCode.OK

    auth = authed.server.auth
    new = new_token()
    with caplog.at_level(logging.INFO):
        write_tokens(path, token, new)  # rotation, step 1: both
        assert auth.reload() and accepted(token) and accepted(new)
        write_tokens(path, new)  # step 2: the old one goes
        assert auth.reload() and not accepted(token) and accepted(new)
        for bad in ("", "# nothing\n", "two words\n"):  # a bad file: the tokens in use stay
            path.write_text(bad)
            assert not auth.reload() and accepted(new) and not accepted(token)
        path.unlink()
        assert not auth.reload() and accepted(new)
    failed = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "auth_tokens_reload_failed"]
    assert len(failed) == 4 and all(r.levelno == logging.ERROR for r in failed)
    assert token not in caplog.text and new not in caplog.text


def test_metrics_listen_on_metrics_host(start_server: Callable[..., Any]) -> None:
    # 127.0.0.2 is loopback too on Linux: a host of its own, distinct from the gRPC host 127.0.0.1.
    port = free_port("127.0.0.2")
    running = start_server(metrics_host="127.0.0.2", metrics_port=port)
    assert running.server.metrics_port == port
    with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=TIMEOUT) as response:
        assert "seqserve_step_seconds_count" in response.read().decode()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT)
    assert parse_args(["/model", "--host", "10.0.0.5"]).metrics_address_host == "10.0.0.5"
    assert parse_args(["/model", "--host", "10.0.0.5"], environ={"SEQSERVE_METRICS_HOST": "127.0.0.1"}) \
        .metrics_address_host == "127.0.0.1"


# -- `seqserve serve` as a process: a real SIGHUP, a clear start-up error -----------------------

def test_sighup_rereads_the_token_file(model_dir: Path, tmp_path: Path, serve_process: Callable[..., Any],
                                       token: str) -> None:
    path = write_tokens(tmp_path / "tokens", token)
    process = serve_process(str(model_dir), "--host", "127.0.0.1", "--port", "0", "--intra-op-threads", "1",
                            "--auth-token-file", str(path))
    port = process.wait_for_event("serving")["port"]
    new = new_token()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SeqServeStub(channel)

        def code(t: str | None) -> grpc.StatusCode:
            metadata = bearer(t) if t else None
            return code_of(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=TIMEOUT))

        assert (code(token), code(None)) == (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED)
        write_tokens(path, new)
        process.proc.send_signal(signal.SIGHUP)
        assert process.wait_for_event("auth_tokens_reloaded")["tokens"] == 1
        assert (code(token), code(new)) == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK)
        path.write_text("# emptied by mistake\n")
        process.proc.send_signal(signal.SIGHUP)
        failed = process.wait_for_event("auth_tokens_reload_failed")
        assert failed["level"] == "error" and "no tokens" in failed["message"]
        assert code(new) == grpc.StatusCode.OK, "a bad reread keeps the tokens in use"
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(TIMEOUT) == 0
    log = "".join(process.log)
    assert token not in log and new not in log
    refused = [json.loads(line) for line in process.log if '"event": "unauthenticated"' in line]
    assert refused[0]["reason"] == "missing" and all(r["level"] == "warning" for r in refused)


def test_empty_token_file_refuses_to_start_with_one_line(model_dir: Path, tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "tokens", "# put the tokens here, one per line")
    result = subprocess.run([*SEQSERVE, "serve", str(model_dir), "--port", "0", "--auth-token-file", str(path)],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqserve serve: error: --auth-token-file") \
        and "no tokens" in lines[0], result.stderr
