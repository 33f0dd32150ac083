"""The load generator behind `seqserve-loadtest`: drives an `AsyncClient` in closed or open loop and
records one `RequestRecord` per request sent.

- Closed loop: `concurrency` callers, each sending its next request as soon as the last one ended.
- Open loop: requests arrive at `rate` per second (Poisson: exponential gaps; or evenly spaced),
  whatever the server's speed, so queueing shows up in the latency instead of slowing the senders.
  Latency is measured from the arrival's scheduled time, so a client that falls behind does not
  hide the delay (no coordinated omission).

Every run stops by itself: at `duration_s` or after `requests` requests, whichever comes first; calls
still running then end within their own deadline, and anything left after a hard stop is cancelled
and counted as failed, so `sent == succeeded + failed` always holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import multiprocessing
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from seqserve.client.aio import AsyncClient
from seqserve.client.errors import SeqserveClientError
from seqserve.client.results import GenerationResult, TokenPiece
from seqserve.runtime.errors import SeqserveError

MODES = ("closed", "open")
ARRIVALS = ("poisson", "uniform")
CLIENT_CANCELLED = "CANCELLED_BY_LOADTEST"  # a call still running at the hard stop


@dataclass(frozen=True)
class LoadSpec:
    """One load level: how requests are sent and when the run ends."""

    mode: str = "closed"  # closed (concurrent callers) | open (arrivals at a fixed rate)
    concurrency: int = 1  # closed loop: callers
    rate: float = 10.0  # open loop: mean arrivals per second
    arrival: str = "poisson"  # open loop: poisson (exponential gaps) | uniform (evenly spaced)
    stream: bool = False  # GenerateStream (time to first token, inter-token latency) instead of Generate
    duration_s: float | None = 10.0  # stop sending after this many seconds (None: only `requests` bounds it)
    requests: int | None = None  # stop after sending this many requests (None: only `duration_s` bounds it)
    inputs_per_request: int = 1  # Generate only: inputs per call
    timeout_s: float = 30.0  # each call's deadline
    max_in_flight: int = 1024  # open loop: arrivals beyond this many unfinished calls are dropped (not sent)
    seed: int = 0  # open loop arrival times

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}")
        if self.arrival not in ARRIVALS:
            problems.append(f"arrival must be one of {', '.join(ARRIVALS)}")
        if self.concurrency < 1:
            problems.append("concurrency must be >= 1")
        if not self.rate > 0:
            problems.append("rate must be > 0")
        if self.duration_s is None and self.requests is None:
            problems.append("give a duration or a request count (a run must stop by itself)")
        if self.duration_s is not None and not self.duration_s > 0:
            problems.append("duration must be > 0")
        if self.requests is not None and self.requests < 1:
            problems.append("requests must be >= 1")
        if self.inputs_per_request < 1 or (self.stream and self.inputs_per_request != 1):
            problems.append("inputs per request must be >= 1 (and 1 when streaming)")
        if not self.timeout_s > 0 or self.max_in_flight < 1:
            problems.append("timeout must be > 0 and max in flight >= 1")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def level(self) -> float:
        """The load level this spec sweeps: callers (closed loop) or arrivals per second (open loop)."""
        return self.concurrency if self.mode == "closed" else self.rate


@dataclass
class RequestRecord:
    """One request sent: when, how it ended, what it produced."""

    start: float  # time.monotonic() it was due (open loop: its scheduled arrival)
    end: float = 0.0
    code: str = ""  # "OK" or the gRPC status name
    output_tokens: int = 0
    first_token_s: float | None = None  # streaming: start -> first piece
    token_gaps_s: list[float] = field(default_factory=list)  # streaming: between consecutive pieces

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def latency_s(self) -> float:
        return self.end - self.start


@dataclass
class RunResult:
    """Everything one load level produced."""

    spec: LoadSpec
    records: list[RequestRecord]
    started: float  # time.monotonic() of the first send
    finished: float  # time.monotonic() after the last call ended
    dropped: int = 0  # open loop: arrivals never sent (max_in_flight reached)
    max_send_lag_s: float = 0.0  # open loop: latest a request left after its scheduled time

    @property
    def wall_s(self) -> float:
        return max(self.finished - self.started, 1e-9)


async def one_request(client: AsyncClient, texts: list[str], spec: LoadSpec, options: dict[str, Any],
                      record: RequestRecord) -> None:
    """Send one call and fill its record; never raises for a failed call."""
    try:
        if spec.stream:
            last: float | None = None
            async for item in client.generate_stream(texts[0], timeout=spec.timeout_s, **options):
                now = time.monotonic()
                if isinstance(item, TokenPiece):
                    if last is None:
                        record.first_token_s = now - record.start
                    else:
                        record.token_gaps_s.append(now - last)
                    last = now
                elif isinstance(item, GenerationResult):
                    record.output_tokens = item.usage.output_tokens
        else:
            results = await client.generate(texts, timeout=spec.timeout_s, **options)
            record.output_tokens = sum(r.usage.output_tokens for r in results)
        record.code = "OK"
    except SeqserveClientError as exc:
        record.code = exc.code.name
    except asyncio.CancelledError:
        record.code = CLIENT_CANCELLED
        raise
    finally:
        record.end = time.monotonic()


class _Inputs:
    """Inputs handed out round-robin, `per_request` at a time."""

    def __init__(self, texts: Sequence[str], per_request: int) -> None:
        if not texts:
            raise ValueError("no inputs to send")
        self._cycle = itertools.cycle(texts)
        self.per_request = per_request

    def next(self) -> list[str]:
        return [next(self._cycle) for _ in range(self.per_request)]


async def run_load(client: AsyncClient, texts: Sequence[str], spec: LoadSpec,
                   options: dict[str, Any] | None = None, *, hard_stop_s: float | None = None) -> RunResult:
    """Run one load level; returns when every call sent has ended.

    Calls end within their deadline, so the run ends by duration + timeout; `hard_stop_s` (default:
    that plus 5 s) cancels whatever still runs then and records it as failed.
    """
    options = dict(options or {})
    inputs = _Inputs(texts, spec.inputs_per_request)
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    stop_at = started + spec.duration_s if spec.duration_s is not None else float("inf")
    if hard_stop_s is None:
        hard_stop_s = (spec.duration_s if spec.duration_s is not None else 24 * 3600) + spec.timeout_s + 5.0
    hard_stop = started + hard_stop_s
    result = RunResult(spec, records, started, started)

    def may_send() -> bool:
        return time.monotonic() < stop_at and (spec.requests is None or len(records) < spec.requests)

    async def caller() -> None:
        while may_send():
            record = RequestRecord(time.monotonic())
            records.append(record)
            await one_request(client, inputs.next(), spec, options, record)

    async def arrivals() -> None:
        rng = random.Random(spec.seed)
        due = time.monotonic()
        while True:
            due += rng.expovariate(spec.rate) if spec.arrival == "poisson" else 1.0 / spec.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() >= stop_at or not may_send():
                return
            if len(tasks) >= spec.max_in_flight:
                result.dropped += 1
                continue
            result.max_send_lag_s = max(result.max_send_lag_s, time.monotonic() - due)
            record = RequestRecord(due)
            records.append(record)
            task = asyncio.create_task(one_request(client, inputs.next(), spec, options, record))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    if spec.mode == "closed":
        drivers = [asyncio.create_task(caller()) for _ in range(spec.concurrency)]
    else:
        drivers = [asyncio.create_task(arrivals())]
    try:
        await asyncio.wait_for(asyncio.gather(*drivers), max(0.0, hard_stop - time.monotonic()))
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks), max(0.0, hard_stop - time.monotonic()))
    except TimeoutError:
        pending = [t for t in [*drivers, *tasks] if not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    result.finished = max((r.end for r in records), default=time.monotonic())
    return result


async def warm_up(client: AsyncClient, texts: Sequence[str], spec: LoadSpec, options: dict[str, Any] | None,
                  seconds: float) -> RunResult | None:
    """The same load for `seconds`, whose records are thrown away (None when seconds is 0)."""
    if seconds <= 0:
        return None
    warm = dataclasses.replace(spec, duration_s=seconds, requests=None)
    return await run_load(client, texts, warm, options)


async def sweep(client: AsyncClient, texts: Sequence[str], specs: Sequence[LoadSpec],
                options: dict[str, Any] | None = None, *, warmup_s: float = 0.0,
                on_done: Any = None) -> list[RunResult]:
    """Run each load level in turn, each after its own warm-up; `on_done(result)` after each."""
    out = []
    for spec in specs:
        await warm_up(client, texts, spec, options, warmup_s)
        result = await run_load(client, texts, spec, options)
        out.append(result)
        if on_done is not None:
            on_done(result)
    return out


# -- several sending processes --------------------------------------------------------------------
# One Python process drives about a thousand calls a second at most (gRPC Python's per-call work);
# a server with several front-ends on a machine of many cores needs more than one to be loaded.

def split_spec(spec: LoadSpec, parts: int) -> list[LoadSpec]:
    """Each of `parts` processes' share of one load level: the arrival rate (open loop) or the
    callers (closed loop), the request count and the in-flight limit divided among them, each
    process with its own arrival seed (Poisson streams at rate/parts add up to one at rate)."""
    if parts < 1:
        raise ValueError("processes must be >= 1")
    if spec.mode == "closed" and spec.concurrency < parts:
        raise ValueError(f"concurrency ({spec.concurrency}) must be at least the number of processes ({parts})")
    if spec.requests is not None and spec.requests < parts:
        raise ValueError(f"requests ({spec.requests}) must be at least the number of processes ({parts})")

    def share(total: int, i: int) -> int:
        return total // parts + (i < total % parts)

    return [dataclasses.replace(
        spec, concurrency=share(spec.concurrency, i) if spec.mode == "closed" else spec.concurrency,
        rate=spec.rate / parts, requests=None if spec.requests is None else share(spec.requests, i),
        max_in_flight=math.ceil(spec.max_in_flight / parts), seed=spec.seed + i) for i in range(parts)]


def merge_results(spec: LoadSpec, parts: Sequence[RunResult]) -> RunResult:
    """One level's result from its processes' (time.monotonic() is the same clock in all)."""
    return RunResult(spec, [record for part in parts for record in part.records],
                     min(part.started for part in parts), max(part.finished for part in parts),
                     dropped=sum(part.dropped for part in parts),
                     max_send_lag_s=max(part.max_send_lag_s for part in parts))


def _process_main(conn: Any, client_kwargs: dict[str, Any], texts: list[str], options: dict[str, Any]) -> None:
    """A sending process: connect, say ready, then run each level it is sent until told to stop."""
    async def serve() -> None:
        async with AsyncClient(**client_kwargs) as client:
            await client.model_info()  # the server answers before anything is measured
            conn.send(("ready", None))
            while (job := await asyncio.to_thread(conn.recv)) is not None:
                spec, warmup_s, start_at = job
                await asyncio.sleep(max(0.0, start_at - time.monotonic()))
                await warm_up(client, texts, spec, options, warmup_s)
                conn.send(("result", await run_load(client, texts, spec, options)))

    try:
        asyncio.run(serve())
    except (Exception, KeyboardInterrupt) as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", str(exc) if isinstance(exc, SeqserveClientError) else f"{type(exc).__name__}: {exc}"))


def _expect(conn: Any, kind: str) -> Any:
    try:
        got, value = conn.recv()
    except (EOFError, OSError):
        raise SeqserveError("a load process exited before it finished") from None
    if got == "error":
        raise SeqserveError(f"a load process failed: {value}")
    assert got == kind, (got, kind)
    return value


def sweep_in_processes(client_kwargs: dict[str, Any], texts: Sequence[str], specs: Sequence[LoadSpec],
                       options: dict[str, Any] | None = None, *, processes: int, warmup_s: float = 0.0,
                       on_done: Any = None, start_delay_s: float = 0.5) -> list[RunResult]:
    """`sweep` with each level's load split over `processes` sending processes (each with its own
    client and connections), started together and merged into one result per level."""
    shares = [split_spec(spec, processes) for spec in specs]  # bad splits fail before anything starts
    context = multiprocessing.get_context("spawn")  # not fork: gRPC's threads do not survive it
    pipes, procs = [], []
    try:
        for i in range(processes):
            parent, child = context.Pipe()
            offset = i * len(texts) // processes  # each process starts elsewhere in the inputs
            procs.append(context.Process(target=_process_main, name=f"seqserve-loadtest-{i}", daemon=True,
                                         args=(child, client_kwargs, [*texts[offset:], *texts[:offset]],
                                               dict(options or {}))))
            procs[-1].start()
            child.close()
            pipes.append(parent)
        for conn in pipes:
            _expect(conn, "ready")
        out = []
        for spec, parts in zip(specs, shares):
            start_at = time.monotonic() + start_delay_s
            for conn, part in zip(pipes, parts):
                conn.send((part, warmup_s, start_at))
            result = merge_results(spec, [_expect(conn, "result") for conn in pipes])
            out.append(result)
            if on_done is not None:
                on_done(result)
        return out
    finally:
        for conn in pipes:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
