"""`seqserve serve` as a real process: it never loads torch, drains on SIGTERM (in-flight calls finish,
new ones get UNAVAILABLE, exit 0; exit 3 when the grace period runs out and calls are cut), and
refuses a broken model directory with one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqserve.model.data import dates_pairs
from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.bench.serve import server_pids

TIMEOUT = 30.0
SEQSERVE = [sys.executable, "-m", "seqserve.server.cli"]
# These tests queue many inputs on purpose; whether their 30 s deadlines look reachable behind that
# queue depends on how fast the machine is, so deadline-aware admission stays out of them.
NO_DEADLINE_ADMISSION = ("--deadline-admission", "off")


@pytest.mark.parametrize("engine_core", ["thread", "process"])
def test_serve_without_torch_and_sigterm_drains(model_dir: Path, serve_process: Callable[..., Any],
                                                engine_core: str) -> None:
    # One batch row and 2 x 128 inputs of 24 forced tokens ahead of the stream: about a second of
    # decoding on a fast machine, so all three calls are still in flight when SIGTERM is handled.
    with socket.socket() as s:  # a free port for /metrics
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    process = serve_process(str(model_dir), "--host", "127.0.0.1", "--port", "0", "--max-batch-size", "1",
                            "--max-queue", "512", "--max-inputs-per-request", "128", "--grace-period", "30",
                            "--intra-op-threads", "1", "--metrics-port", str(metrics_port),
                            "--engine-core", engine_core, *NO_DEADLINE_ADMISSION)
    serving = process.wait_for_event("serving")
    port, pid = serving["port"], process.proc.pid
    assert serving["metrics_port"] == metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=TIMEOUT) as response:
        steps = re.search(r"^seqserve_step_seconds_count (\S+)$", response.read().decode(), re.MULTILINE)
    assert steps and float(steps.group(1)) >= 1  # the warm-up generation's steps

    workers = server_pids(pid)[1:]
    assert len(workers) == (1 if engine_core == "process" else 0)
    for process_id in (pid, *workers):
        maps = Path(f"/proc/{process_id}/maps").read_text()
        assert "libtorch" not in maps and "/torch/" not in maps, "the server loaded torch"

    sources = [p.source for p in dates_pairs(128, seed=99)]
    forced = pb.GenerationOptions(min_new_tokens=24, max_new_tokens=24)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SeqServeStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="seqserve.v1.SeqServe")
        assert health.Check(check, timeout=TIMEOUT).status == health_pb2.HealthCheckResponse.SERVING
        batches = [stub.Generate.future(pb.GenerateRequest(inputs=sources, options=forced), timeout=TIMEOUT)
                   for _ in range(2)]
        # The stream goes in only once the batches wait in the queue, so it is queued behind them:
        # otherwise, on a fast machine, it can be admitted first and finish before SIGTERM.
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=TIMEOUT) as response:
                depth = re.search(r"^seqserve_queue_depth (\S+)$", response.read().decode(), re.MULTILINE)
            if depth and float(depth.group(1)) >= 64:
                break
            time.sleep(0.005)
        streamed = stub.GenerateStream(pb.GenerateStreamRequest(input=sources[0], options=forced), timeout=TIMEOUT)
        messages: list[pb.GenerateStreamResponse] = []
        reader = threading.Thread(target=lambda: messages.extend(streamed), daemon=True)
        reader.start()
        time.sleep(0.1)  # the calls reach the server
        os.kill(pid, signal.SIGSTOP)  # frozen: nothing finishes between this check and SIGTERM
        try:
            assert not any(b.done() for b in batches) and reader.is_alive(), "calls finished before SIGTERM"
            os.kill(pid, signal.SIGTERM)
        finally:
            os.kill(pid, signal.SIGCONT)
        process.wait_for_event("draining")
        error = pytest.raises(grpc.RpcError, stub.Generate, pb.GenerateRequest(inputs=["1 May 2000"]),
                              timeout=TIMEOUT).value
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()
        assert health.Check(check, timeout=TIMEOUT).status == health_pb2.HealthCheckResponse.NOT_SERVING

        for batch in batches:  # in flight at SIGTERM: finished, not cut
            response = batch.result(timeout=TIMEOUT)
            assert [len(r.sequences[0].token_ids) for r in response.results] == [24] * 128
        reader.join(TIMEOUT)
        assert messages and messages[-1].HasField("result")
        assert len(messages[-1].result.sequences[0].token_ids) == 24 == sum(len(m.tokens) for m in messages)

    assert process.proc.wait(TIMEOUT) == 0
    assert process.wait_for_event("stopped")["drained"] is True
    assert not any(Path(f"/proc/{w}").exists() for w in workers), "the engine core outlived the server"
    # One JSON line per request, with its status and token counts.
    requests = [json.loads(line) for line in process.log if '"event": "request"' in line]
    statuses = sorted((r["method"], r["status"], r["inputs"]) for r in requests)
    assert statuses == [("Generate", "OK", 128), ("Generate", "OK", 128), ("Generate", "UNAVAILABLE", 0),
                        ("GenerateStream", "OK", 1)]
    assert all(r["output_tokens"] == 24 * r["inputs"] and "first_token_ms" in r for r in requests if r["status"] == "OK")


def test_bad_model_dir_refuses_to_start_with_one_line(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    with open(broken / "decoder.onnx", "r+b") as f:  # one flipped byte: the sha256 no longer matches
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0xFF]))
    missing = tmp_path / "missing"
    shutil.copytree(model_dir, missing)
    (missing / "tokenizer.json").unlink()
    for path, reason in ((broken, "sha256"), (missing, "missing tokenizer.json"),
                         (tmp_path / "nowhere", "no such model directory")):
        result = subprocess.run([*SEQSERVE, "serve", str(path), "--port", "0"], capture_output=True, text=True,
                                timeout=TIMEOUT)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("seqserve serve: error:") and reason in lines[0], result.stderr



def test_drain_cut_short_exits_3_and_says_so(model_dir: Path, serve_process: Callable[..., Any]) -> None:
    # One batch row and 3 x 256 inputs of 24 forced tokens (seconds of decoding, about three on a
    # fast machine), a stream queued behind the first batch, and a grace period of 0.2 s: calls are
    # still in flight when it runs out. An orchestrator must be able to tell: exit 3, a warning
    # with the count of calls cut, and the status each cut call got is the one logged for it.
    with socket.socket() as s:  # a free port for /metrics
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    process = serve_process(str(model_dir), "--host", "127.0.0.1", "--port", "0", "--max-batch-size", "1",
                            "--max-queue", "1024", "--max-inputs-per-request", "256", "--grace-period", "0.2",
                            "--intra-op-threads", "1", "--metrics-port", str(metrics_port), *NO_DEADLINE_ADMISSION)
    port = process.wait_for_event("serving")["port"]

    def wait_for_queue_depth(depth: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=TIMEOUT) as response:
                found = re.search(r"^seqserve_queue_depth (\S+)$", response.read().decode(), re.MULTILINE)
            if found and float(found.group(1)) >= depth:
                return
            time.sleep(0.005)
        pytest.fail(f"queue depth never reached {depth}")

    sources = [p.source for p in dates_pairs(256, seed=99)]
    request = pb.GenerateRequest(inputs=sources, options=pb.GenerationOptions(min_new_tokens=24, max_new_tokens=24))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SeqServeStub(channel)
        first = stub.Generate.future(request, timeout=TIMEOUT)
        wait_for_queue_depth(64)  # the first batch waits in the queue: the stream goes in behind it
        streamed = stub.GenerateStream(pb.GenerateStreamRequest(input=sources[0], options=request.options),
                                       timeout=TIMEOUT)
        calls = [first, *(stub.Generate.future(request, timeout=TIMEOUT) for _ in range(2))]
        wait_for_queue_depth(2 * 256 + 1)  # more than the first batch and the stream: all are in
        process.proc.send_signal(signal.SIGTERM)
        in_flight = process.wait_for_event("draining")["in_flight"]
        got: list[tuple[str, str, str]] = []  # (method, status, details) as the client saw them
        for method, call in [*(("Generate", c) for c in calls), ("GenerateStream", streamed)]:
            try:
                call.result(TIMEOUT) if method == "Generate" else list(call)
                got.append((method, "OK", ""))
            except grpc.RpcError as exc:
                got.append((method, exc.code().name, exc.details()))
    assert process.proc.wait(TIMEOUT) == 3
    stopped = process.wait_for_event("stopped")
    assert stopped["level"] == "warning" and stopped["drained"] is False and stopped["exit_status"] == 3
    cut = [g for g in got if g[1] == "UNAVAILABLE" and "shutting down" not in g[2]]  # not refused on arrival
    assert 1 <= stopped["calls_cut"] == len(cut) <= in_flight, (stopped, got)
    assert all(status in ("OK", "UNAVAILABLE") for _, status, _ in got), got
    # Each call's log line records the status its client got (not CANCELLED for a call the server cut).
    logged = [json.loads(line) for line in process.log if '"event": "request"' in line]
    assert sorted((r["method"], r["status"]) for r in logged) == sorted((m, s) for m, s, _ in got)
    assert sum(r.get("error") == "server stopped before the call finished" for r in logged) == len(cut)
