"""`seqserve bench-serve MODEL_DIR`: the served model under streaming load, measured end to end.

Starts `seqserve serve` as a real process on loopback, and reports: seconds from spawn to health
SERVING, output tokens/s with 1 and with N concurrent streams (closed loop, through the client
library's load generator), the share of each decoder step spent in Python outside ONNX
Runtime's `run` (from the server's own step metrics, per load level), the server's resident
memory, and a clean exit on SIGTERM. A last level sends unary `Generate` calls of many inputs
each (`--unary CALLERSxINPUTS`): the batch full without a message per token, which shows what the
served decoding loop does when the per-stream gRPC work is out of the way.

Then (`--transport-floor on`, the default) the same levels go to a server with no model behind it
(`seqserve.bench.transport_floor`): what gRPC and the client alone reach on this machine, so the
report can say how much of the CPU the transport takes before any decoding (`floor_*` fields).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NO_STEPS = {"seqserve_step_seconds_sum": 0.0, "seqserve_step_onnx_seconds_sum": 0.0,
            "seqserve_step_seconds_count": 0.0, "seqserve_batch_rows_sum": 0.0}


def scrape(metrics_port: int) -> dict[str, float]:
    """The server's step sums and counts from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out = {}
    for name in ("seqserve_step_seconds_sum", "seqserve_step_onnx_seconds_sum", "seqserve_step_seconds_count",
                 "seqserve_batch_rows_sum"):
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(match.group(1)) if match else 0.0
    return out


def server_pids(pid: int) -> list[int]:
    """The server process and its children (its engine core; with a supervisor, the front-ends too)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended since the listing
            continue
    return [pid, *children]


def rss_mb(pids: list[int]) -> tuple[int, int]:
    """(VmRSS, VmHWM) summed over processes, in MB (the sum of peaks bounds their joint peak from above)."""
    rss = hwm = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                rss += int(line.split()[1])
            elif line.startswith("VmHWM"):
                hwm += int(line.split()[1])
    return rss // 1024, hwm // 1024


def wait_serving(port: int, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until the health service says SERVING (polled every 10 ms)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    start = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"seqserve bench-serve: the server exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            time.sleep(0.01)
    raise SystemExit(f"seqserve bench-serve: not SERVING after {timeout} s")


async def measure_levels(port: int, metrics_port: int | None, levels: list[tuple[str, int, int]], duration: float,
                         warmup: float, max_new_tokens: int, server: list[int],
                         connections: int = 1) -> list[dict[str, Any]]:
    """Each level is (kind, concurrency, inputs per call): ("stream", N, 1) or ("unary", N, K), sent
    over `connections` connections in turn.

    Without a metrics port (the transport floor has none) the step fields are None.
    """
    from seqserve.client.aio import AsyncClient
    from seqserve.client.loadgen import LoadSpec, run_load, warm_up
    from seqserve.client.loadreport import summarize
    from seqserve.model.data import dates_pairs
    from seqserve.bench.bench import cpu_time_ticks

    ticks = os.sysconf("SC_CLK_TCK")

    def server_ticks() -> list[int]:
        return [cpu_time_ticks(pid) for pid in server]

    # The engine core's share of the server's CPU (what is left is the front-ends' and a supervisor's).
    engine = [i for i, pid in enumerate(server) if b"seqserve.server.engine_core" in Path(f"/proc/{pid}/cmdline")
              .read_bytes()]

    texts = [p.source for p in dates_pairs(500, seed=123)]
    # Exactly max_new_tokens per request, so every level decodes the same work per request.
    options = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens}
    rows = []
    async with AsyncClient(f"127.0.0.1:{port}", connections=connections) as client:
        for kind, concurrency, inputs in levels:
            spec = LoadSpec(mode="closed", concurrency=concurrency, stream=kind == "stream", duration_s=duration,
                            inputs_per_request=inputs)
            await warm_up(client, texts, spec, options, warmup)
            before = scrape(metrics_port) if metrics_port else NO_STEPS
            cpu_before, started = (server_ticks(), cpu_time_ticks(os.getpid())), time.monotonic()
            report = summarize(await run_load(client, texts, spec, options))
            cpu_after, wall = (server_ticks(), cpu_time_ticks(os.getpid())), time.monotonic() - started
            after = scrape(metrics_port) if metrics_port else NO_STEPS
            step = after["seqserve_step_seconds_sum"] - before["seqserve_step_seconds_sum"]
            onnx = after["seqserve_step_onnx_seconds_sum"] - before["seqserve_step_onnx_seconds_sum"]
            steps = after["seqserve_step_seconds_count"] - before["seqserve_step_seconds_count"]
            server_cores = (sum(cpu_after[0]) - sum(cpu_before[0])) / ticks / wall
            engine_cores = sum(cpu_after[0][i] - cpu_before[0][i] for i in engine) / ticks / wall
            client_cores = (cpu_after[1] - cpu_before[1]) / ticks / wall
            tok_s = report.output_tokens_per_s
            rows.append({
                "kind": kind, "concurrency": concurrency, "inputs_per_call": inputs,
                "output_tokens_per_s": round(tok_s, 1),
                "requests": report.sent, "failed": report.failed,
                "ttft_p50_ms": round(report.ttft_ms.p50, 2) if report.ttft_ms else None,
                "itl_p50_ms": round(report.itl_ms.p50, 2) if report.itl_ms else None,
                "mean_rows_per_step": round((after["seqserve_batch_rows_sum"] - before["seqserve_batch_rows_sum"])
                                            / steps, 1) if steps else None,
                "step_ms": round(1e3 * step / steps, 3) if steps else None,
                "python_share": round(1 - onnx / step, 3) if step else None,
                # Cores busy in the server (all its processes; the engine core's part) and in this
                # load-generating client (same machine).
                "server_cores": round(server_cores, 2),
                "engine_cores": round(engine_cores, 2),
                "client_cores": round(client_cores, 2),
                # CPU spent per output token: the budget that decides how far the cores carry; the
                # front-ends' part (without the engine core's) is what the transport floor bounds.
                "server_cpu_us_per_token": round(1e6 * server_cores / tok_s, 1) if tok_s else None,
                "frontend_cpu_us_per_token": round(1e6 * (server_cores - engine_cores) / tok_s, 1) if tok_s else None,
                "client_cpu_us_per_token": round(1e6 * client_cores / tok_s, 1) if tok_s else None,
            })
    return rows


def run_server(cmd: list[str], port: int, metrics_port: int | None, levels: list[tuple[str, int, int]],
               args: argparse.Namespace) -> dict[str, Any]:
    """Spawn a server, time it to SERVING, measure every level, SIGTERM it; its part of the report."""
    spawned = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(port, proc, timeout=60)
        start_s = time.monotonic() - spawned
        pids = server_pids(proc.pid)
        rss_ready, _ = rss_mb(pids)
        rows = asyncio.run(measure_levels(port, metrics_port, levels, args.duration, args.warmup,
                                          args.max_new_tokens, pids, args.connections))
        rss_now, rss_peak = rss_mb(pids)
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"start_to_serving_s": round(start_s, 2), "rss_mb_ready": rss_ready, "rss_mb_after_load": rss_now,
            "rss_mb_peak": rss_peak, "exit_code_on_sigterm": exit_code, "server_processes": len(pids),
            "levels": rows}


def _load_name(row: dict[str, Any]) -> str:
    return (f"{row['concurrency']} streams" if row["kind"] == "stream"
            else f"{row['concurrency']} unary callers x {row['inputs_per_call']} inputs")


def in_process(args: argparse.Namespace, levels: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """The engine alone (`seqserve bench`'s measurement, each batch in a fresh process) at batch 1 and
    at every level's batch: what the served figures are compared with."""
    from seqserve.bench.bench import measure_in_child

    batches = sorted({1, *(c * k for _, c, k in levels)})
    device = args.device
    if device == "auto":
        import onnxruntime

        device = "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    return [measure_in_child(args.model_dir, batch=batch, new_tokens=args.max_new_tokens, source_len=12,
                             threads=args.threads or len(os.sched_getaffinity(0)), budget=args.duration,
                             device=device, command="seqserve bench-serve: in-process")
            for batch in batches]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqserve bench-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="model directory to serve (e.g. runs/dates-model from `make demo`)")
    p.add_argument("--streams", default="1,32", help="concurrent streams per level, comma-separated (default 1,32)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per level (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per level (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per request, exactly (default 16)")
    p.add_argument("--threads", type=int, help="server's --intra-op-threads (default: the server's own choice)")
    p.add_argument("--max-batch-size", type=int, default=32, help="server's max batch size (default 32)")
    p.add_argument("--spinning", choices=("on", "run", "off"), help="server's --intra-op-spinning (default: the "
                   "server's)")
    p.add_argument("--stream-interval", type=int, help="server's --stream-interval (default: the server's)")
    p.add_argument("--engine-core", choices=("process", "thread"), help="server's --engine-core (default: the "
                   "server's)")
    p.add_argument("--frontends", default="", metavar="N[,N...]",
                   help="server's --frontends; several, comma-separated, measure one server each (default: the "
                        "server's)")
    p.add_argument("--unary", default="2x16", metavar="CALLERSxINPUTS",
                   help="last level: unary calls of this many inputs from this many callers (default 2x16; "
                        "'none' to skip)")
    p.add_argument("--transport-floor", choices=("on", "off"), default="on",
                   help="also run the levels against a server with no model (gRPC alone), for the CPU "
                        "budget (default on)")
    p.add_argument("--connections", type=int, default=4, help="client connections, calls spread over them in "
                   "turn: the kernel balances connections, not calls, between front-ends (default 4)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="server's --device, and the in-process engine's (auto: CUDA when ONNX Runtime has it)")
    p.add_argument("--in-process", choices=("on", "off"), default="on",
                   help="also measure the engine in-process (seqserve bench, no gRPC) at batch 1 and at the "
                        "unary level's batch, with all the cores, for the served/in-process ratios (default on)")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    levels = [("stream", int(x), 1) for x in args.streams.split(",")]
    if args.unary != "none":
        callers, _, inputs = args.unary.partition("x")
        levels.append(("unary", int(callers), int(inputs)))
    server_flags = [(flag, value) for flag, value in (
        ("--intra-op-threads", args.threads), ("--intra-op-spinning", args.spinning),
        ("--stream-interval", args.stream_interval), ("--engine-core", args.engine_core),
        ("--device", None if args.device == "auto" else args.device)) if value is not None]
    report: dict[str, Any] = {"model_dir": args.model_dir, "cores": len(os.sched_getaffinity(0)),
                              "server_flags": " ".join(f"{f} {v}" for f, v in server_flags), "servers": []}
    for frontends in (args.frontends.split(",") if args.frontends else [""]):
        port, metrics_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "seqserve.server.cli", "serve", args.model_dir, "--host", "127.0.0.1",
               "--port", str(port), "--metrics-port", str(metrics_port), "--max-batch-size", str(args.max_batch_size),
               "--max-queue", str(max(128, 2 * max(c * k for _, c, k in levels))),
               "--max-inputs-per-request", str(max(32, *(k for _, _, k in levels))), "--log-level", "warning",
               *(str(x) for pair in server_flags for x in pair), *(["--frontends", frontends] if frontends else [])]
        served = run_server(cmd, port, metrics_port, levels, args)
        streams = [r for r in served["levels"] if r["kind"] == "stream"]
        if len(streams) > 1 and streams[0]["output_tokens_per_s"]:
            served["speedup_last_vs_first"] = round(streams[-1]["output_tokens_per_s"]
                                                    / streams[0]["output_tokens_per_s"], 2)
        report["servers"].append({"frontends": frontends or "default", **served})
    first = report["servers"][0]
    streams = [r for r in first["levels"] if r["kind"] == "stream"]
    first_rate = streams[0]["output_tokens_per_s"] if len(streams) > 1 else 0.0
    floor_rows: list[dict[str, Any]] = []
    if args.transport_floor == "on":
        floor_port = free_port()
        floor = run_server([sys.executable, "-m", "seqserve.bench.transport_floor", "--port", str(floor_port)],
                           floor_port, None, levels, args)
        floor_rows = floor["levels"]
        report["transport_floor"] = {"exit_code_on_sigterm": floor["exit_code_on_sigterm"], "levels": floor_rows}
        if first_rate:
            # What the last level could reach over the model's first if decoding, batching and
            # everything seqserve does cost nothing: the transport alone.
            floor_last = [r for r in floor_rows if r["kind"] == "stream"][-1]
            report["floor_last_vs_model_first"] = round(floor_last["output_tokens_per_s"] / first_rate, 2)
    if args.in_process == "on":
        report["in_process"] = in_process(args, levels)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print()
    floor_by_load = {_load_name(r): r for r in floor_rows}
    for served in report["servers"]:
        print(f"Server with --frontends {served['frontends']} ({served['server_processes']} processes):\n")
        print("| load | output tok/s | of the floor | mean rows/step | step ms | Python share of step | TTFT p50 ms | "
              "ITL p50 ms | server cores (engine core) | client cores | CPU µs/token server + client | "
              "front-end CPU µs/token (of the floor server's) | failed |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in served["levels"]:
            share = f"{100 * r['python_share']:.0f}%" if r["python_share"] is not None else "-"
            floor = floor_by_load.get(_load_name(r))
            of_floor = f"{r['output_tokens_per_s'] / floor['output_tokens_per_s']:.2f}x" if floor and \
                floor["output_tokens_per_s"] else "-"
            frontend = r["frontend_cpu_us_per_token"]
            of_floor_cpu = f" ({frontend / floor['server_cpu_us_per_token']:.2f}x)" if floor and frontend and \
                floor["server_cpu_us_per_token"] else ""
            print(f"| {_load_name(r)} | {r['output_tokens_per_s']:.0f} | {of_floor} | {r['mean_rows_per_step']} | "
                  f"{r['step_ms']} | {share} | {r['ttft_p50_ms']} | {r['itl_p50_ms']} | {r['server_cores']} "
                  f"({r['engine_cores']}) | {r['client_cores']} | {r['server_cpu_us_per_token']} + "
                  f"{r['client_cpu_us_per_token']} | {frontend}{of_floor_cpu} | {r['failed']} |")
        print(f"\nstart to SERVING {served['start_to_serving_s']:.2f} s; RSS of all server processes "
              f"{served['rss_mb_ready']} MB ready, {served['rss_mb_peak']} MB peak; exit code on SIGTERM "
              f"{served['exit_code_on_sigterm']}")
        if "speedup_last_vs_first" in served:
            print(f"last stream level / first: {served['speedup_last_vs_first']}x\n")
    if floor_rows:
        print("\nTransport floor (no model: gRPC and the client alone, same levels):\n")
        print("| load | output tok/s | server cores | client cores | CPU µs/token server + client | failed |")
        print("|---|---|---|---|---|---|")
        for r in floor_rows:
            print(f"| {_load_name(r)} | {r['output_tokens_per_s']:.0f} | {r['server_cores']} | {r['client_cores']} | "
                  f"{r['server_cpu_us_per_token']} + {r['client_cpu_us_per_token']} | {r['failed']} |")
        if "floor_last_vs_model_first" in report:
            print(f"transport floor at the last stream level / the model's first: "
                  f"{report['floor_last_vs_model_first']}x (what the ratio above could reach if decoding "
                  "and seqserve cost nothing, one message per token)")
    if report.get("in_process"):
        print("\nIn-process engine (`seqserve bench`, no gRPC, every core), same model and tokens:\n")
        print("| batch | output tok/s | ms per step | served level | served / in-process |")
        print("|---|---|---|---|---|")
        for record in report["in_process"]:
            for served in report["servers"]:
                for r in served["levels"]:
                    if r["concurrency"] * r["inputs_per_call"] == record["batch"] or (
                            record["batch"] == 1 and r["concurrency"] == 1):
                        print(f"| {record['batch']} | {record['tok_per_s']:.0f} | {record['ms_per_step']} | "
                              f"{_load_name(r)}, --frontends {served['frontends']} | "
                              f"{r['output_tokens_per_s'] / record['tok_per_s']:.2f}x |")
    exit_codes = [served["exit_code_on_sigterm"] for served in report["servers"]]
    exit_codes += [report["transport_floor"]["exit_code_on_sigterm"]] if floor_rows else []
    return 0 if all(code == 0 for code in exit_codes) else 1


if __name__ == "__main__":
    sys.exit(main())
