"""`seqserve-loadtest` against a real server: short closed-loop, open-loop and streaming runs whose
counts add up, well-formed table/JSON reports, a PNG plot, errors counted by status code, and runs
that stop by themselves even when every call is slow."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import pytest

from seqserve.client import AsyncClient
from seqserve.client.loadgen import LoadSpec, RequestRecord, RunResult, merge_results, run_load, split_spec
from seqserve.client.loadreport import CountMismatch, format_table, summarize
from seqserve.client.loadtest import main, read_inputs

LEVEL_KEYS = {"mode", "stream", "concurrency", "rate", "wall_s", "sent", "succeeded", "failed", "dropped", "errors",
              "requests_per_s", "goodput_per_s", "output_tokens", "output_tokens_per_s", "latency_ms", "ttft_ms",
              "itl_ms", "max_send_lag_ms", "error_latency_ms"}


def run_main(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    return main(argv, out=out), out.getvalue()


def test_closed_loop_sweep_json_and_plot(served, tmp_path: Path) -> None:
    png = tmp_path / "load.png"
    code, out = run_main(["-a", served.address, "--concurrency", "1,4", "--duration", "0.6", "--warmup", "0.2",
                          "--json", "--plot", str(png), "-q"])
    assert code == 0
    report = json.loads(out)
    assert report["meta"]["model_version"] and report["meta"]["mode"] == "closed"
    levels = report["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 4]
    for lv in levels:
        assert set(lv) == LEVEL_KEYS
        assert lv["sent"] == lv["succeeded"] + lv["failed"] and lv["succeeded"] > 0 and lv["failed"] == 0
        lat = lv["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] and lat["count"] == lv["succeeded"]
        assert lv["requests_per_s"] > 0 and lv["output_tokens_per_s"] > lv["requests_per_s"]
        assert 0 < lv["goodput_per_s"] <= lv["requests_per_s"]
        assert lv["ttft_ms"] is None and lv["errors"] == {} and lv["error_latency_ms"] == {}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_streaming_by_request_count_reports_ttft_and_inter_token_latency(served, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.tsv"
    inputs.write_text("nov 5 1999\t1999-11-05\n\n1 may 2000\t2000-05-01\n")
    assert read_inputs(inputs) == ["nov 5 1999", "1 may 2000"]
    code, out = run_main(["-a", served.address, "--stream", "-c", "3", "--requests", "25", "--warmup", "0",
                          "--inputs", str(inputs), "-q"])
    assert code == 0
    header, rule, row, *rest = out.splitlines()
    assert header.split()[:4] == ["conc", "sent", "ok", "failed"] and "ttft" in header and set(rule) <= {"-", " "}
    cells = row.split()
    assert cells[:4] == ["3", "25", "25", "0"]
    assert rest[-1].startswith("GenerateStream, closed loop")


def test_open_loop_counts_and_stream_timings(served) -> None:
    async def go() -> RunResult:
        async with AsyncClient(served.address) as client:
            spec = LoadSpec(mode="open", rate=150, duration_s=0.5, stream=True, timeout_s=10)
            return await run_load(client, ["nov 5 1999", "1 may 2000", "Sat 29 Feb 2020"], spec)

    run = asyncio.run(go())
    report = summarize(run)
    assert report.sent == report.succeeded + report.failed == len(run.records)
    assert 30 <= report.sent <= 140 and report.failed == 0  # Poisson around 75
    assert report.ttft_ms.p50 <= report.latency_ms.p50 and report.itl_ms.count > 0
    assert report.rate == 150 and report.concurrency is None
    assert "150.0" in format_table([report]).splitlines()[2]


def test_errors_are_counted_by_status_code(start_server) -> None:
    server = start_server(max_batch_size=1, max_queue=1)
    code, out = run_main(["-a", server.address, "-c", "12", "--requests", "120", "--warmup", "0", "--json", "-q",
                          "--no-retry-overloaded"])  # refusals counted, not retried after the server's pushback
    report = json.loads(out)
    (level,) = report["levels"]
    assert code == 0 and level["sent"] == 120 == level["succeeded"] + level["failed"]
    assert level["errors"].get("RESOURCE_EXHAUSTED", 0) == level["failed"] > 0
    refused = level["error_latency_ms"]["RESOURCE_EXHAUSTED"]  # how soon the callers learnt of it
    assert refused["count"] == level["failed"] and 0 < refused["p50"] <= refused["p99"] <= refused["max"]
    assert report["meta"]["retry_overloaded"] is False


def test_runs_stop_by_themselves_when_calls_hang(fake_server) -> None:
    servicer, address = fake_server
    servicer.delay = 60.0  # far past the calls' deadline: the fake answers only calls that are over

    async def go() -> RunResult:
        async with AsyncClient(address) as client:
            return await run_load(client, ["x"], LoadSpec(concurrency=4, duration_s=0.3, timeout_s=0.2))

    start = time.monotonic()
    report = summarize(asyncio.run(go()))
    assert time.monotonic() - start < servicer.delay / 2  # the run ended without waiting for an answer
    assert report.succeeded == 0 and report.failed == report.sent > 0
    assert report.errors == {"DEADLINE_EXCEEDED": report.sent}
    assert report.latency_ms is None and "errors DEADLINE_EXCEEDED" in format_table([report])


def test_hard_stop_cancels_and_counts_what_is_left(fake_server) -> None:
    servicer, address = fake_server
    servicer.delay = 60.0

    async def go() -> RunResult:
        async with AsyncClient(address) as client:
            spec = LoadSpec(mode="open", rate=50, duration_s=0.2, timeout_s=30)
            return await run_load(client, ["x"], spec, hard_stop_s=0.5)  # long before the calls' deadline

    start = time.monotonic()
    run = asyncio.run(go())
    report = summarize(run)
    assert time.monotonic() - start < 30  # the hard stop ended it: neither the answers nor the deadline did
    assert report.sent > 0 and report.failed == report.sent
    assert set(report.errors) == {"CANCELLED_BY_LOADTEST"}


def test_several_sending_processes_share_a_level_and_report_it_as_one(served) -> None:
    code, out = run_main(["-a", served.address, "--processes", "2", "-c", "3", "--requests", "21", "--warmup", "0.2",
                          "--stream", "--json", "-q"])
    assert code == 0, out
    report = json.loads(out)
    (level,) = report["levels"]
    assert report["meta"]["processes"] == 2 and level["concurrency"] == 3
    assert level["sent"] == level["succeeded"] == 21 and level["ttft_ms"]["count"] == 21
    code, out = run_main(["-a", served.address, "--processes", "2", "--mode", "open", "--rate", "120",
                          "--duration", "0.5", "--warmup", "0", "--json", "-q"])
    (level,) = json.loads(out)["levels"]
    assert code == 0 and level["rate"] == 120 and 20 <= level["sent"] == level["succeeded"] <= 120  # Poisson, ~60


def test_a_level_splits_over_processes_and_merges_back() -> None:
    closed = split_spec(LoadSpec(concurrency=5, requests=11, max_in_flight=9), 2)
    assert [(s.concurrency, s.requests, s.max_in_flight) for s in closed] == [(3, 6, 5), (2, 5, 5)]
    opened = split_spec(LoadSpec(mode="open", rate=90.0, seed=7), 3)
    assert [(s.rate, s.seed) for s in opened] == [(30.0, 7), (30.0, 8), (30.0, 9)]  # an arrival stream each
    for bad in (LoadSpec(concurrency=1), LoadSpec(concurrency=4, requests=1)):
        with pytest.raises(ValueError, match="at least the number of processes"):
            split_spec(bad, 2)
    spec = LoadSpec(concurrency=2)
    parts = [RunResult(spec, [RequestRecord(1.0, 2.0, "OK")], 1.0, 2.0, dropped=1, max_send_lag_s=0.1),
             RunResult(spec, [RequestRecord(0.5, 3.0, "OK"), RequestRecord(0.6, 0.7, "UNAVAILABLE")], 0.5, 3.0,
                       dropped=2, max_send_lag_s=0.3)]
    merged = merge_results(spec, parts)
    assert (len(merged.records), merged.started, merged.finished, merged.dropped) == (3, 0.5, 3.0, 3)
    assert merged.max_send_lag_s == 0.3 and summarize(merged).sent == 3


def test_goodput_counts_the_calls_that_succeeded_within_their_deadline() -> None:
    spec = LoadSpec(mode="open", rate=10, duration_s=1.0, timeout_s=1.0)
    records = [RequestRecord(0.0, 0.5, "OK", output_tokens=10), RequestRecord(0.1, 1.0, "OK", output_tokens=10),
               RequestRecord(0.2, 1.5, "OK", output_tokens=10),  # sent late by the client: 1.3 s after it was due
               RequestRecord(0.3, 0.32, "RESOURCE_EXHAUSTED"), RequestRecord(0.4, 0.44, "RESOURCE_EXHAUSTED"),
               RequestRecord(0.5, 1.5, "DEADLINE_EXCEEDED")]
    report = summarize(RunResult(spec, records, 0.0, 2.0))
    assert report.succeeded == 3 and report.requests_per_s == pytest.approx(1.5)
    assert report.goodput_per_s == pytest.approx(1.0)  # the late one is throughput, not goodput
    refused = report.error_latency_ms["RESOURCE_EXHAUSTED"]
    assert refused.count == 2 and refused.p50 == pytest.approx(30.0) and refused.max == pytest.approx(40.0)
    assert report.error_latency_ms["DEADLINE_EXCEEDED"].p99 == pytest.approx(1000.0)
    assert set(report.error_latency_ms) == set(report.errors) == {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
    header, _, row, *notes = format_table([report]).splitlines()
    cells = dict(zip(header.split(), row.split()))
    assert cells["req/s"] == "1.5" and cells["good/s"] == "1.0"
    assert any("RESOURCE_EXHAUSTED seen after p50 30.0 / p99 39.8 / max 40.0 ms" in n for n in notes), notes


def test_counts_that_do_not_add_up_are_an_error() -> None:
    run = RunResult(LoadSpec(requests=2), [RequestRecord(0.0, 1.0, "OK"), RequestRecord(0.0)], 0.0, 1.0)
    with pytest.raises(CountMismatch):
        summarize(run)


def test_bad_arguments_and_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["-a", "127.0.0.1:1", "--timeout", "2", "-n", "5", "--warmup", "0", "-q"])[0] == 1
    assert "cannot use the server: UNAVAILABLE" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must stop by itself"):
        LoadSpec(duration_s=None, requests=None)
    with pytest.raises(SystemExit):
        main(["--concurrency", "0"])
