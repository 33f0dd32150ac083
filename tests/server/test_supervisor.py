"""`seqserve serve --frontends 2`: a supervisor, one engine core and two gRPC front-ends on one port.

Real processes on loopback: both front-ends serve the port and feed the one engine core; metrics
are served once for the whole server; a killed front-end fails only the calls it held and is
replaced; a killed engine core fails the calls in it and both front-ends reconnect to the new one;
SIGTERM drains every process, and nothing is left running."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqserve.bench.serve import free_port, server_pids
from seqserve.client import Client
from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc

TIMEOUT = 30.0
LONG = pb.GenerationOptions(min_new_tokens=24, max_new_tokens=24)
CHANNELS = 12  # separate connections: the kernel spreads them between the front-ends


def start(serve_process: Callable[..., Any], model_dir: Path, *args: str) -> tuple[Any, dict, int]:
    metrics_port = free_port()
    process = serve_process(str(model_dir), "--host", "127.0.0.1", "--port", "0", "--frontends", "2",
                            "--intra-op-threads", "1", "--metrics-port", str(metrics_port), "--max-batch-size", "4",
                            "--deadline-admission", "off", *args)
    serving = process.wait_for_event("serving", timeout=90)
    assert serving["frontends"] == 2 and serving["metrics_port"] == metrics_port
    return process, serving, metrics_port


def connect(port: int) -> grpc.Channel:
    """A channel with a connection of its own (gRPC shares one between channels to one address otherwise)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def connections_of(pid: int, port: int) -> int:
    """Established TCP connections to `port` that process `pid` holds (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                count += 1
    return count


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_two_front_ends_share_the_port_the_engine_and_the_metrics(serve_process: Callable[..., Any],
                                                                  model_dir: Path) -> None:
    process, serving, metrics_port = start(serve_process, model_dir)
    port, frontends, engine = serving["port"], serving["pids"], serving["engine_core_pid"]
    assert sorted(server_pids(process.proc.pid)[1:]) == sorted([*frontends, engine])
    channels = [connect(port) for _ in range(CHANNELS)]
    try:
        info = pb_grpc.SeqServeStub(channels[0]).GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
        assert (info.layout.engine_core, info.layout.frontends, info.layout.intra_op_threads) == ("process", 2, 1)
        calls = [pb_grpc.SeqServeStub(c).Generate.future(pb.GenerateRequest(inputs=["nov 5 1999", "1 May 2000"]),
                                                         timeout=TIMEOUT) for c in channels]
        texts = {tuple(r.sequences[0].text for r in call.result().results) for call in calls}
        assert len(texts) == 1  # the same answers whichever front-end took the call
        assert sum(connections_of(pid, port) for pid in frontends) >= CHANNELS
        # Metrics once for the whole server: every front-end's calls, the engine's steps once.
        wait_until(lambda: metric(metrics_port, "seqserve_requests_total") >= CHANNELS + 1)
        assert metric(metrics_port, "seqserve_requests_total") == CHANNELS + 1  # + GetModelInfo
        assert metric(metrics_port, "seqserve_step_seconds_count") > 0
        assert metric(metrics_port, "seqserve_active_rows") == 0
        # The client library spreads its calls over as many connections as it is told to.
        before = sum(connections_of(pid, port) for pid in frontends)
        with Client(f"127.0.0.1:{port}", connections=5, max_inputs_per_call=1) as client:
            assert len({r.text for r in client.generate(["nov 5 1999"] * 10)}) == 1  # 10 calls
            assert sum(connections_of(pid, port) for pid in frontends) == before + 5
        # SIGTERM with calls in flight on every front-end: each drains, the calls finish.
        os.kill(engine, signal.SIGSTOP)  # nothing finishes before SIGTERM is handled
        try:
            calls = [pb_grpc.SeqServeStub(c).GenerateStream(pb.GenerateStreamRequest(input="nov 5 1999", options=LONG),
                                                            timeout=TIMEOUT) for c in channels]
            wait_until(lambda: metric(metrics_port, "seqserve_calls_in_flight") == CHANNELS)
            process.proc.send_signal(signal.SIGTERM)
            process.wait_for_event("draining")
        finally:
            os.kill(engine, signal.SIGCONT)
        for call in calls:
            assert len(list(call)[-1].result.sequences[0].token_ids) == 24
    finally:
        for channel in channels:
            channel.close()
    assert process.proc.wait(TIMEOUT) == 0
    assert process.wait_for_event("stopped")["drained"] is True
    assert not any(alive(pid) for pid in [*frontends, engine]), "a child outlived the supervisor"


def test_a_killed_front_end_fails_only_its_calls_and_is_replaced(serve_process: Callable[..., Any],
                                                                 model_dir: Path) -> None:
    process, serving, _ = start(serve_process, model_dir)
    port, frontends = serving["port"], serving["pids"]
    channels = [connect(port) for _ in range(CHANNELS)]
    try:
        for channel in channels:  # connected before anything is killed
            grpc.channel_ready_future(channel).result(TIMEOUT)
        held = {pid: connections_of(pid, port) for pid in frontends}
        victim = max(held, key=held.__getitem__)  # holds at least half the connections
        assert sum(held.values()) == CHANNELS and held[victim] >= CHANNELS // 2
        engine = serving["engine_core_pid"]
        os.kill(engine, signal.SIGSTOP)  # nothing finishes before the kill, whenever each call arrives
        try:
            calls = [pb_grpc.SeqServeStub(c).GenerateStream(
                pb.GenerateStreamRequest(input="nov 5 1999", options=LONG), timeout=TIMEOUT) for c in channels]
            os.kill(victim, signal.SIGKILL)
        finally:
            os.kill(engine, signal.SIGCONT)
        failed = ok = 0
        for call in calls:
            try:
                last = list(call)[-1]
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                failed += 1
            else:
                assert len(last.result.sequences[0].token_ids) == 24
                ok += 1
        assert failed == held[victim] and ok == CHANNELS - held[victim]
        restart = process.wait_for_event("frontend_restart")
        assert restart["exit_code"] == -signal.SIGKILL
        process.wait_for_event("frontend_serving")  # the replacement
        # Served again on every connection, by the survivor and the replacement.
        health = health_pb2_grpc.HealthStub(channels[0])
        wait_until(lambda: len([p for p in server_pids(process.proc.pid)[1:] if p != serving["engine_core_pid"]]) == 2)
        for channel in channels:
            result = pb_grpc.SeqServeStub(channel).Generate(pb.GenerateRequest(inputs=["1 May 2000"]), timeout=TIMEOUT,
                                                            wait_for_ready=True)
            assert result.results[0].sequences[0].token_ids
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == \
            health_pb2.HealthCheckResponse.SERVING
    finally:
        for channel in channels:
            channel.close()
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(TIMEOUT) == 0, "".join(process.log)


def test_a_killed_engine_core_fails_its_calls_and_both_front_ends_reconnect(serve_process: Callable[..., Any],
                                                                            model_dir: Path) -> None:
    process, serving, metrics_port = start(serve_process, model_dir)
    port, engine = serving["port"], serving["engine_core_pid"]
    channels = [connect(port) for _ in range(CHANNELS)]
    try:
        for channel in channels:  # connected before anything is killed
            grpc.channel_ready_future(channel).result(TIMEOUT)
        os.kill(engine, signal.SIGSTOP)  # nothing finishes before the kill
        calls = [pb_grpc.SeqServeStub(c).GenerateStream(pb.GenerateStreamRequest(input="nov 5 1999", options=LONG),
                                                        timeout=TIMEOUT) for c in channels]
        wait_until(lambda: metric(metrics_port, "seqserve_calls_in_flight") == CHANNELS)
        os.kill(engine, signal.SIGKILL)
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "engine core" in info.value.details()
        # Every front-end (whichever takes each connection) decodes again, on a new engine core.
        deadline = time.monotonic() + TIMEOUT
        for channel in channels:
            while True:
                try:
                    result = pb_grpc.SeqServeStub(channel).Generate(pb.GenerateRequest(inputs=["1 May 2000"]),
                                                                    timeout=TIMEOUT)
                    break
                except grpc.RpcError as exc:  # the engine core is still restarting
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
                    time.sleep(0.05)
            assert result.results[0].sequences[0].token_ids
        children = server_pids(process.proc.pid)[1:]
        assert engine not in children and len(children) == 3
    finally:
        for channel in channels:
            channel.close()
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(TIMEOUT) == 0
