"""Soak: a steady mixed load against a real `seqserve serve` process of the tiny model on loopback,
with the engine core in a process of its own and in a thread (`--engine-core`).

The load (closed loop, `CONCURRENCY` callers on one `AsyncClient`, no retries so nothing is hidden)
cycles through every kind in `KINDS` and every input in `SOURCES`: greedy (several inputs per call),
greedy streamed, beam search, seeded sampling (unary and streamed), alignments (unary and
streamed), streams the client cancels after a few tokens, and unary calls with deadlines too short
to be met under load. Each call carries its own request id, so the server's request log line is
matched with what the client saw.

What must hold:
- zero failed requests: every call ends OK, or with exactly what its own cancel or deadline implies
  (a cancelled stream: the client's cancel, having received a prefix of the right tokens; a short
  deadline: DEADLINE_EXCEEDED, or RESOURCE_EXHAUSTED saying the queue ahead outlasts the deadline,
  from deadline-aware admission), and the server logs each call with a status that agrees (OK; for
  a cancelled stream OK/CANCELLED; for a missed deadline OK/CANCELLED/DEADLINE_EXCEEDED, or the
  refusal that was on its way; for a refusal RESOURCE_EXHAUSTED);
- outputs still correct: every OK answer equals the reference taken before the load, one call at a
  time (greedy and alignments: tokens, text, alignments to 1e-3; beam: every returned hypothesis
  and its score; seeded sampling: the same samples for the same seed), streamed pieces add up to
  their result, and a last pass after the load gives the references again;
- nothing left behind: the server process (and its worker) still the same processes, no row
  in the batch and nothing queued once the calls have ended;
- resident memory (VmRSS from /proc, no psutil here) of the server process and, with the worker,
  of the worker process: at the end, idle, at most `RSS_TOLERANCE` above the value read idle after
  the warm-up (the same load for `WARMUP_SECONDS`). Only growth is bounded: a soak looks for leaks,
  and memory handed back to the system is not one.

Why the RSS bound depends on the length: right after a short warm-up, the allocators (ONNX
Runtime's arena, glibc's malloc arenas, gRPC's buffers) have not yet met every batch shape and
message interleaving the load will produce, so the first seconds after warm-up still grow by a few
MB for reasons that are not leaks, and a few MB is more than 5% of a small process on a busy shared
machine. A short run cannot tell a leak from that settling, so it checks correctness and zero
failures strictly and memory only generously (50%: it still catches a gross leak, such as every
request's cache or alignments kept). The 5% bound applies from `LONG_SOAK_S` seconds of load up,
where the warm-up is long enough (a tenth of the run, at most 30 s) for the settling to be over.

Known growth, not ours: gRPC's asyncio server keeps native memory for every call that ends by the
client's cancel or deadline (grpc/grpc#43360: a failed batch's `grpc_op` array is never freed).
Measured here at about 100 bytes a call in `seqserve serve`, and about 300 with
`seqserve.bench.transport_floor`, which has no seqserve code at all; streams run to the end leave
nothing. With 2 calls in 9 of that sort, the server process grew 1.8 to 2.3 MB in 340 s (its
worker process did not), so the 5% bound holds up to about 10 minutes of this load; a longer soak
would fail on this until gRPC frees those batches.

Short run (default suite, `SEQSERVE_SOAK_SECONDS` unset: 5 s of load after 2 s of warm-up a mode):
    .venv/bin/pytest tests/server/test_soak.py
Long run (prints requests by kind and outcome, and RSS per process):
    SEQSERVE_SOAK_SECONDS=300 .venv/bin/pytest tests/server/test_soak.py -s
(`SEQSERVE_SOAK_WARMUP_SECONDS` overrides the warm-up.) The load is bounded in time (the phase's
seconds, each call's deadline, a hard stop) and in count (`MAX_REQUESTS_PER_S` per second of
phase), and goes only to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from seqserve.client import (AsyncClient, DeadlineExceeded, GenerationResult, Overloaded, SeqserveClientError,
                             TokenPiece)
from seqserve.model.data import dates_pairs
from seqserve.bench.serve import free_port, server_pids

SOAK_SECONDS = float(os.environ.get("SEQSERVE_SOAK_SECONDS") or 5.0)
WARMUP_SECONDS = float(os.environ.get("SEQSERVE_SOAK_WARMUP_SECONDS") or min(30.0, max(2.0, SOAK_SECONDS / 10)))
LONG_SOAK_S = 60.0  # from this much load up, the strict memory bound applies (module doc)
RSS_TOLERANCE = 0.05 if SOAK_SECONDS >= LONG_SOAK_S else 0.50
CONCURRENCY = 6  # callers in the closed loop: at most 24 rows (6 calls of 4 beams) of the batch's 32
MAX_REQUESTS_PER_S = 400  # the count bound: far above what 2 cores serve, so time is what ends a phase
TIMEOUT = 60.0  # seconds: the deadline of every call that is not meant to miss it, and of every wait
SEQSERVE = [sys.executable, "-m", "seqserve.server.cli"]
SOURCES = [p.source for p in dates_pairs(12, seed=2024)]


# -- the mix --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    inputs: int = 1  # unary: inputs per call (consecutive SOURCES)
    seeded: bool = False  # sampling: seed = 1000 + the input's index, so the output is reproducible
    cancel_after: tuple[int, ...] = ()  # streams: the client cancels after this many pieces (cycled)
    deadlines: tuple[float, ...] = ()  # unary: these short timeouts (cycled); missing them is allowed
    reference: str = ""  # the kind whose reference output it must match (default: its own)


SAMPLING = {"strategy": "sample", "temperature": 0.9, "top_k": 8}
KINDS = (
    Kind("greedy", inputs=3),
    Kind("greedy_stream", stream=True, reference="greedy"),
    Kind("beam", {"strategy": "beam", "num_beams": 4, "num_return_sequences": 2}),
    Kind("sample", {**SAMPLING, "num_return_sequences": 2}, seeded=True),
    Kind("sample_stream", SAMPLING, stream=True, seeded=True),
    Kind("alignments", {"return_alignments": True}),
    Kind("alignments_stream", {"return_alignments": True}, stream=True, reference="alignments"),
    Kind("cancel_stream", stream=True, cancel_after=(1, 2, 3), reference="greedy"),
    Kind("deadline", deadlines=(0.001, 0.003, 0.01, 0.03), reference="greedy"),
)
REFERENCE_KINDS = ("greedy", "beam", "sample", "sample_stream", "alignments")
OUTCOMES = ("ok", "cancelled", "deadline", "refused", "failed")  # how a call ended, as the client saw it
# What the server's log may say for a call the client saw end this way.
# (A deadline the client saw pass may have passed while the server's answer, even a refusal, was on its way.)
SERVER_STATUSES = {"ok": {"OK"}, "cancelled": {"OK", "CANCELLED"}, "refused": {"RESOURCE_EXHAUSTED"},
                   "deadline": {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}}


def call_options(kind: Kind, index: int) -> dict[str, Any]:
    """The keyword options of one call of `kind` on SOURCES[index]."""
    options = dict(kind.options)
    if kind.seeded:
        options["seed"] = 1000 + index
    return options


# -- the server process ---------------------------------------------------------------------------

class SoakProcess:
    """`seqserve serve` in a subprocess; its stderr (JSON log lines) is read on a thread, which
    keeps each request's log record by request id and notifies waiters."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*SEQSERVE, "serve", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log: list[str] = []
        self.requests: dict[str, dict[str, Any]] = {}  # request id -> its request log record
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                self.log.append(line)
                continue
            if record.get("event") == "request":  # kept by id only: thousands of them
                with self.changed:
                    self.requests[record["request_id"]] = record
                    self.changed.notify_all()
            else:
                self.log.append(line)
                self.events.put(record)
        with self.changed:  # stderr closed: the process is gone, wake the waiters
            self.changed.notify_all()

    def tail(self, lines: int = 40) -> str:
        """The last lines the server wrote, request lines left out."""
        return "".join(self.log[-lines:])

    def wait_for_event(self, event: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The first JSON log record with this `event` field (request lines excepted)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                record = self.events.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None:
                    pytest.fail(f"server exited with {self.proc.returncode}:\n{self.tail()}")
                continue
            if record.get("event") == event:
                return record
        pytest.fail(f"no {event!r} log line within {timeout} s:\n{self.tail()}")

    def wait_for_requests(self, ids: set[str], timeout: float = TIMEOUT) -> set[str]:
        """Until the server has logged every request in `ids` (it logs a call when the call ends) or
        `timeout` passes; returns the ids still not logged."""
        with self.changed:
            self.changed.wait_for(lambda: ids <= self.requests.keys() or self.proc.poll() is not None, timeout)
            return ids - self.requests.keys()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def vm_rss_kb(pid: int) -> int:
    """Resident memory of a process (VmRSS of /proc/PID/status), in kB."""
    found = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert found, f"no VmRSS for process {pid}"
    return int(found.group(1))


def gauges(metrics_port: int) -> dict[str, float]:
    """The server's active rows and queue depth, read from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=TIMEOUT) as response:
        text = response.read().decode()
    out = {}
    for name in ("seqserve_active_rows", "seqserve_queue_depth"):
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert found, f"{name} missing from /metrics"
        out[name] = float(found.group(1))
    return out


def wait_until_idle(metrics_port: int, timeout: float = TIMEOUT) -> dict[str, float]:
    """Until the scheduler has no row in the batch and nothing queued (polled every 20 ms) or
    `timeout` passes; returns the gauges that are still not 0."""
    deadline = time.monotonic() + timeout
    while (busy := {k: v for k, v in gauges(metrics_port).items() if v}) and time.monotonic() < deadline:
        time.sleep(0.02)
    return busy


# -- one call, checked --------------------------------------------------------------------------

@dataclass
class Expected:
    """A reference answer for one input: what every later answer must equal."""

    token_ids: tuple[tuple[int, ...], ...]  # per returned sequence
    texts: tuple[str, ...]
    scores: tuple[float | None, ...]
    alignments: tuple[Any, ...] | None  # per sequence (T, S) arrays, only for the alignment kinds
    source_tokens: tuple[str, ...] | None


def expected_from(result: GenerationResult) -> Expected:
    aligned = result.source_tokens is not None
    return Expected(tuple(s.token_ids for s in result.sequences), tuple(s.text for s in result.sequences),
                    tuple(s.score for s in result.sequences),
                    tuple(np.asarray(s.alignments) for s in result.sequences) if aligned else None,
                    result.source_tokens)


def differences(got: Expected, expected: Expected) -> list[str]:
    """How an answer differs from the reference (empty: the same answer)."""
    problems = []
    if got.token_ids != expected.token_ids:
        problems.append(f"token ids {got.token_ids} != {expected.token_ids}")
    if got.texts != expected.texts:
        problems.append(f"texts {got.texts} != {expected.texts}")
    for a, b in zip(got.scores, expected.scores):
        if (a is None) != (b is None) or (a is not None and not math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3)):
            problems.append(f"scores {got.scores} != {expected.scores}")
            break
    if (got.alignments is None) != (expected.alignments is None):
        problems.append("alignments present in one answer only")
    elif got.alignments is not None and expected.alignments is not None:
        if got.source_tokens != expected.source_tokens:
            problems.append(f"source tokens {got.source_tokens} != {expected.source_tokens}")
        for a, b in zip(got.alignments, expected.alignments):
            if a.shape != b.shape or not np.allclose(a, b, atol=1e-3):
                problems.append(f"alignments differ (shapes {a.shape}, {b.shape})")
                break
    return problems


def stream_differences(pieces: list[TokenPiece], result: GenerationResult | None) -> list[str]:
    """Whether a finished stream's pieces add up to its result (tokens, text, alignment rows)."""
    if result is None:
        return ["stream ended without a result"]
    problems = []
    for number, sequence in enumerate(result.sequences):
        own = [p for p in pieces if p.sequence == number]
        if [p.index for p in own] != list(range(len(own))):
            problems.append(f"sequence {number}: piece indexes {[p.index for p in own]}")
        if tuple(p.token_id for p in own) != sequence.token_ids:
            problems.append(f"sequence {number}: pieces {[p.token_id for p in own]} != {sequence.token_ids}")
        if "".join(p.text for p in own) != sequence.text:
            problems.append(f"sequence {number}: piece texts {''.join(p.text for p in own)!r} != {sequence.text!r}")
        if sequence.alignments is not None and own:
            rows = np.stack([np.asarray(p.alignment) for p in own])
            if rows.shape != np.asarray(sequence.alignments).shape or not np.allclose(rows, sequence.alignments,
                                                                                        atol=1e-5):
                problems.append(f"sequence {number}: streamed alignment rows differ from the result's")
    return problems


@dataclass
class Tally:
    """What the load did: outcomes by kind, problems found, request ids the server must log."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, one of OUTCOMES)
    problems: list[str] = field(default_factory=list)
    client_ends: dict[str, str] = field(default_factory=dict)  # request id -> how the client saw it end
    must_be_logged: set[str] = field(default_factory=set)  # ids the server surely saw

    def fail(self, kind: Kind, request_id: str, problem: str) -> None:
        self.outcomes[kind.name, "failed"] += 1
        if len(self.problems) < 200:
            self.problems.append(f"{request_id} ({kind.name}): {problem}")


async def one_call(client: AsyncClient, kind: Kind, number: int, references: dict[tuple[str, int], Expected],
                   tally: Tally, prefix: str) -> None:
    """Send call `number` of `kind` and check how it ended; never raises for a failed call."""
    index = (number // len(KINDS)) % len(SOURCES)
    request_id = f"{prefix}-{number}-{kind.name}"
    reference = kind.reference or kind.name
    options = call_options(kind, index)
    outcome = "ok"
    problems: list[str] = []
    try:
        if kind.stream:
            pieces: list[TokenPiece] = []
            result: GenerationResult | None = None
            cancel_after = kind.cancel_after[number % len(kind.cancel_after)] if kind.cancel_after else 0
            stream = client.generate_stream(SOURCES[index], request_id=request_id, timeout=TIMEOUT, **options)
            async with contextlib.aclosing(stream):
                async for item in stream:
                    if isinstance(item, TokenPiece):
                        pieces.append(item)
                        tally.must_be_logged.add(request_id)  # it reached the server
                        if len(pieces) == cancel_after:
                            outcome = "cancelled"  # closing the stream cancels the call
                            break
                    else:
                        result = item
            expected = references[reference, index]
            if outcome == "cancelled":
                got = tuple(p.token_id for p in pieces)
                if got != expected.token_ids[0][:len(got)]:
                    problems.append(f"cancelled after {got}, not a prefix of {expected.token_ids[0]}")
            else:
                problems += stream_differences(pieces, result)
                if result is not None:
                    problems += differences(expected_from(result), expected)
                    if result.request_id != request_id:
                        problems.append(f"request id {result.request_id!r}")
        else:
            timeout = kind.deadlines[number % len(kind.deadlines)] if kind.deadlines else TIMEOUT
            indexes = [(index + i) % len(SOURCES) for i in range(kind.inputs)]
            try:
                results = await client.generate([SOURCES[i] for i in indexes], request_id=request_id,
                                                timeout=timeout, **options)
            except DeadlineExceeded:
                if not kind.deadlines:
                    raise
                outcome = "deadline"
            except Overloaded as exc:
                # Deadline-aware admission refuses at once a call whose deadline the queue ahead
                # would outlast. With CONCURRENCY callers and a queue of 128, a full queue cannot be
                # the reason, so this is what the call's own short deadline implies; any other
                # RESOURCE_EXHAUSTED (or one for a call with a long deadline) is a failure.
                if not kind.deadlines or "deadline" not in exc.details:
                    raise
                outcome = "refused"
                tally.must_be_logged.add(request_id)
            else:
                tally.must_be_logged.add(request_id)
                if len(results) != len(indexes):
                    problems.append(f"{len(results)} results for {len(indexes)} inputs")
                for i, result in zip(indexes, results):
                    problems += differences(expected_from(result), references[reference, i])
                    if result.request_id != request_id:
                        problems.append(f"request id {result.request_id!r}")
    except SeqserveClientError as exc:
        problems.append(f"{exc.code.name}: {exc.details}")
        tally.must_be_logged.add(request_id)
    except Exception as exc:  # anything else the client raised is a failed request too
        problems.append(f"{type(exc).__name__}: {exc}")
    tally.client_ends[request_id] = "failed" if problems else outcome
    if problems:
        tally.fail(kind, request_id, "; ".join(problems))
    else:
        tally.outcomes[kind.name, outcome] += 1


async def take_references(client: AsyncClient) -> dict[tuple[str, int], Expected]:
    """Every reference kind's answer for every input, one call at a time (nothing else running)."""
    references = {}
    for name in REFERENCE_KINDS:
        kind = next(k for k in KINDS if k.name == name)
        for index, source in enumerate(SOURCES):
            if kind.stream:
                items = [item async for item in client.generate_stream(source, **call_options(kind, index))]
                result = items[-1]
                assert isinstance(result, GenerationResult)
            else:
                result = await client.generate(source, **call_options(kind, index))
            references[name, index] = expected_from(result)
    return references


@dataclass
class RssTrace:
    """VmRSS of the server's processes, sampled while the load runs (for the report)."""

    pids: list[int]
    every_s: float
    samples: list[tuple[float, list[int]]] = field(default_factory=list)  # (seconds into the phase, kB per pid)
    started: float = field(default_factory=time.monotonic)
    next_at: float = 0.0

    def maybe_sample(self) -> None:
        now = time.monotonic()
        if now >= self.next_at:
            self.samples.append((round(now - self.started, 1), [vm_rss_kb(p) for p in self.pids]))
            self.next_at = now + self.every_s


async def run_phase(address: str, seconds: float, references: dict[tuple[str, int], Expected], tally: Tally,
                    prefix: str, trace: RssTrace | None = None) -> int:
    """The mixed load for `seconds` (closed loop, CONCURRENCY callers); returns the calls sent."""
    numbers = itertools.count()
    limit = max(1, int(MAX_REQUESTS_PER_S * seconds))
    stop_at = time.monotonic() + seconds
    sent = 0

    async def caller(client: AsyncClient) -> None:
        nonlocal sent
        while time.monotonic() < stop_at and sent < limit:
            number = next(numbers)
            sent += 1
            await one_call(client, KINDS[number % len(KINDS)], number, references, tally, prefix)
            if trace is not None:
                trace.maybe_sample()

    async with AsyncClient(address, retry=None, timeout=TIMEOUT, max_inputs_per_call=8) as client:
        callers = [asyncio.create_task(caller(client)) for _ in range(CONCURRENCY)]
        try:  # the hard stop: every call has a deadline, so this only fires on a hang
            await asyncio.wait_for(asyncio.gather(*callers), seconds + TIMEOUT + 10)
        except TimeoutError:
            pytest.fail(f"calls still running {TIMEOUT + 10:g} s after the {seconds:g} s phase ended")
    return sent


def check_server_log(process: SoakProcess, tally: Tally, prefix: str) -> list[str]:
    """Problems in the server's request log lines of one phase: a status the client's view does not
    allow, a call the client never sent."""
    problems = []
    for request_id, record in list(process.requests.items()):
        if not request_id.startswith(prefix + "-"):
            continue
        end = tally.client_ends.get(request_id)
        if end is None:
            problems.append(f"{request_id}: logged by the server, never sent")
        elif end != "failed" and record["status"] not in SERVER_STATUSES[end]:
            problems.append(f"{request_id}: client saw {end}, server logged {record['status']} "
                            f"({record.get('error', '')})")
    return problems


@dataclass
class Phase:
    """One stretch of load and what it left: the calls' tally, the server's state after it."""

    name: str  # also the prefix of its request ids
    seconds: float
    tally: Tally = field(default_factory=Tally)
    sent: int = 0
    wall_s: float = 0.0
    rss_kb: dict[int, int] = field(default_factory=dict)  # per pid, read idle after the phase
    problems: list[str] = field(default_factory=list)  # the server's side: log, leftovers


def total(phase: Phase, outcome: str) -> int:
    """Calls of a phase, all kinds together, that ended with `outcome`."""
    return sum(n for (_, end), n in phase.tally.outcomes.items() if end == outcome)


def report(mode: str, warmup: Phase, soak: Phase, trace: RssTrace) -> str:
    """Requests by kind and outcome, and VmRSS per process, for one server mode."""
    lines = [f"soak --engine-core {mode}: {CONCURRENCY} callers; warm-up {warmup.wall_s:.1f} s "
             f"({warmup.sent} calls: " + ", ".join(f"{o} {total(warmup, o)}" for o in OUTCOMES)
             + f"); soak {soak.wall_s:.1f} s ({soak.sent} calls, {soak.sent / soak.wall_s:.1f}/s):",
             f"  {'kind':<18}" + "".join(f"{o:>10}" for o in OUTCOMES)]
    for kind in KINDS:
        lines.append(f"  {kind.name:<18}" + "".join(f"{soak.tally.outcomes[kind.name, o]:>10}" for o in OUTCOMES))
    lines.append(f"  {'all':<18}" + "".join(f"{total(soak, o):>10}" for o in OUTCOMES))
    for pid, after_warmup in warmup.rss_kb.items():
        end = soak.rss_kb.get(pid, 0)
        lines.append(f"  pid {pid} ({'server' if pid == trace.pids[0] else 'engine core'}): VmRSS idle after warm-up "
                     f"{after_warmup / 1024:.1f} MiB, idle at the end {end / 1024:.1f} MiB "
                     f"({(end - after_warmup) / after_warmup:+.2%}; bound +{RSS_TOLERANCE:.0%})")
    lines.append("  VmRSS under load (s into the soak: MiB per pid): " + ", ".join(
        f"{t:g}: {'/'.join(f'{kb / 1024:.1f}' for kb in kbs)}" for t, kbs in trace.samples))
    return "\n".join(lines)


@pytest.mark.timeout(max(600, int(SOAK_SECONDS + WARMUP_SECONDS + 600)))  # fixtures train first
@pytest.mark.parametrize("engine_core", ["thread", "process"])
def test_soak_mixed_load(model_dir: Path, serve_process: Callable[..., Any], engine_core: str) -> None:
    """Mixed load for SEQSERVE_SOAK_SECONDS (5 s by default) after a warm-up: zero failed requests,
    the same answers as before the load, and each server process's VmRSS at the end at most 5%
    above its value after the warm-up in a long run (from 60 s), 50% in a short one, where
    allocator settling alone can pass 5% (module doc); prints requests by kind and outcome, and RSS."""
    metrics_port = free_port()
    process = serve_process(str(model_dir), "--host", "127.0.0.1", "--port", "0", "--metrics-port",
                            str(metrics_port), "--intra-op-threads", "1", "--engine-core", engine_core,
                            "--log-level", "info", cls=SoakProcess)
    port = process.wait_for_event("serving")["port"]
    pids = server_pids(process.proc.pid)
    assert len(pids) == (2 if engine_core == "process" else 1), pids
    address = f"127.0.0.1:{port}"

    async def take_references_now() -> dict[tuple[str, int], Expected]:
        async with AsyncClient(address, retry=None, timeout=TIMEOUT) as client:
            return await take_references(client)

    references = asyncio.run(take_references_now())
    warmup, soak = Phase("warm-up", WARMUP_SECONDS), Phase("soak", SOAK_SECONDS)
    trace = RssTrace(pids, every_s=max(1.0, SOAK_SECONDS / 10))
    for phase in (warmup, soak):
        started = trace.started = trace.next_at = time.monotonic()
        phase.sent = asyncio.run(run_phase(address, phase.seconds, references, phase.tally, phase.name,
                                           trace if phase is soak else None))
        phase.wall_s = time.monotonic() - started
        # Idle before reading memory: every call the server saw has ended there, no row is left.
        missing = process.wait_for_requests(phase.tally.must_be_logged)
        if missing:
            phase.problems.append(f"{len(missing)} calls never logged by the server, e.g. {sorted(missing)[:5]}")
        if busy := wait_until_idle(metrics_port):
            phase.problems.append(f"server not idle {TIMEOUT:g} s after the load: {busy}")
        phase.rss_kb = {pid: vm_rss_kb(pid) for pid in pids}
    assert process.proc.poll() is None, f"server exited with {process.proc.returncode}:\n{process.tail()}"
    assert server_pids(process.proc.pid) == pids, "the engine core was replaced during the soak"
    for phase in (warmup, soak):  # now: the last lines of calls the server saw late are in too
        phase.problems += check_server_log(process, phase.tally, phase.name)
    print("\n" + report(engine_core, warmup, soak, trace))

    for phase in (warmup, soak):
        assert not phase.tally.problems, (f"{phase.name}: {len(phase.tally.problems)} failed requests, e.g.:\n"
                                          + "\n".join(phase.tally.problems[:20]))
        assert not phase.problems, f"{phase.name}:\n" + "\n".join(phase.problems[:20])
    # Every kind was exercised: answered correctly, or (cancel kinds) cancelled after correct tokens.
    unexercised = [k.name for k in KINDS if soak.tally.outcomes[k.name, "cancelled" if k.cancel_after else "ok"] == 0
                   and not k.deadlines]
    assert not unexercised, f"kinds never answered OK (or cancelled mid-way) during the soak: {unexercised}"
    # The same answers after the load as before it, one call at a time again.
    after = asyncio.run(take_references_now())
    changed = [f"{key}: {'; '.join(problems)}" for key, expected in references.items()
               if (problems := differences(after[key], expected))]
    assert not changed, "answers changed after the soak:\n" + "\n".join(changed[:20])
    for pid, after_warmup in warmup.rss_kb.items():
        assert soak.rss_kb[pid] <= after_warmup * (1 + RSS_TOLERANCE), \
            f"pid {pid}: VmRSS grew from {after_warmup} kB after warm-up to {soak.rss_kb[pid]} kB " \
            f"(bound +{RSS_TOLERANCE:.0%}):\n" + report(engine_core, warmup, soak, trace)
