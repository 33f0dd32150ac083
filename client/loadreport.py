"""What `seqserve-loadtest` reports: per load level, throughput and goodput, latency percentiles,
time to first token and inter-token latency (streaming), errors by status code with their latency,
and the check that every request sent either succeeded or failed. Rendered as a terminal table,
JSON, or a PNG plot (matplotlib, the `loadtest` extra).

Goodput is the rate of requests that finished OK within their deadline (the calls' timeout),
counted from when each was due: under overload a server can keep its throughput while more and
more of what it returns comes too late to be of use, and goodput is what says so.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seqserve.client.loadgen import RunResult

PERCENTILES = (50, 90, 99)


class CountMismatch(RuntimeError):
    """Requests sent != succeeded + failed: the load generator lost track of a call (a bug)."""


@dataclass(frozen=True)
class Distribution:
    """Milliseconds: percentiles, mean and max of one kind of measurement."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @staticmethod
    def of(seconds: Sequence[float]) -> Distribution | None:
        if len(seconds) == 0:
            return None
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
        return Distribution(count=int(ms.size), mean=float(ms.mean()), p50=p50, p90=p90, p99=p99, max=float(ms.max()))


@dataclass(frozen=True)
class LevelReport:
    """The summary of one load level."""

    mode: str  # closed | open
    stream: bool
    concurrency: int | None  # closed loop
    rate: float | None  # open loop: offered arrivals per second
    wall_s: float  # first send -> last call ended
    sent: int
    succeeded: int
    failed: int
    dropped: int  # open loop: arrivals not sent (max in flight reached)
    errors: dict[str, int]  # status name -> count
    requests_per_s: float  # succeeded / wall_s
    goodput_per_s: float  # succeeded within their deadline (latency <= the calls' timeout) / wall_s
    output_tokens: int  # over succeeded calls
    output_tokens_per_s: float
    latency_ms: Distribution | None  # succeeded calls: due -> ended
    ttft_ms: Distribution | None  # streaming: due -> first piece
    itl_ms: Distribution | None  # streaming: gap between consecutive pieces
    max_send_lag_ms: float  # open loop: how late the client sent (large: the client, not the server, was slow)
    error_latency_ms: dict[str, Distribution]  # status name -> latency of the calls that ended with it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(run: RunResult) -> LevelReport:
    """The report of one run; CountMismatch when the counts do not add up."""
    ok = [r for r in run.records if r.ok]
    failed = [r for r in run.records if not r.ok]
    sent = len(run.records)
    if sent != len(ok) + len(failed) or any(not r.code for r in run.records):
        raise CountMismatch(f"sent {sent} != succeeded {len(ok)} + failed {len(failed)} "
                            f"(or a call never ended)")
    tokens = sum(r.output_tokens for r in ok)
    spec = run.spec
    good = sum(1 for r in ok if r.latency_s <= spec.timeout_s)
    by_code: dict[str, list[float]] = {}
    for r in failed:
        by_code.setdefault(r.code, []).append(r.latency_s)
    return LevelReport(
        mode=spec.mode, stream=spec.stream,
        concurrency=spec.concurrency if spec.mode == "closed" else None,
        rate=spec.rate if spec.mode == "open" else None,
        wall_s=run.wall_s, sent=sent, succeeded=len(ok), failed=len(failed), dropped=run.dropped,
        errors=dict(sorted(Counter(r.code for r in failed).items())),
        requests_per_s=len(ok) / run.wall_s, goodput_per_s=good / run.wall_s,
        output_tokens=tokens, output_tokens_per_s=tokens / run.wall_s,
        latency_ms=Distribution.of([r.latency_s for r in ok]),
        ttft_ms=Distribution.of([r.first_token_s for r in ok if r.first_token_s is not None]) if spec.stream else None,
        itl_ms=Distribution.of([g for r in ok for g in r.token_gaps_s]) if spec.stream else None,
        max_send_lag_ms=run.max_send_lag_s * 1e3,
        error_latency_ms={code: d for code, seconds in sorted(by_code.items())
                          if (d := Distribution.of(seconds)) is not None},
    )


def to_json(reports: Sequence[LevelReport], meta: dict[str, Any] | None = None) -> str:
    """{"meta": {...}, "levels": [one object per load level]}."""
    return json.dumps({"meta": meta or {}, "levels": [r.to_dict() for r in reports]}, indent=2)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(reports: Sequence[LevelReport]) -> str:
    """A plain-text table, one row per load level (times in ms)."""
    stream = any(r.stream for r in reports)
    open_loop = any(r.mode == "open" for r in reports)
    head = ["rate/s" if open_loop else "conc", "sent", "ok", "failed", "req/s", "good/s", "tok/s",
            "p50", "p90", "p99", "max"]
    if stream:
        head += ["ttft p50", "ttft p99", "itl p50", "itl p99"]
    rows = [head]
    for r in reports:
        lat = r.latency_ms
        row = [_fmt(r.rate, 1) if r.mode == "open" else str(r.concurrency), str(r.sent), str(r.succeeded),
               str(r.failed), _fmt(r.requests_per_s), _fmt(r.goodput_per_s), _fmt(r.output_tokens_per_s, 0)]
        row += [_fmt(getattr(lat, k, None)) for k in ("p50", "p90", "p99", "max")]
        if stream:
            row += [_fmt(getattr(r.ttft_ms, "p50", None)), _fmt(getattr(r.ttft_ms, "p99", None)),
                    _fmt(getattr(r.itl_ms, "p50", None)), _fmt(getattr(r.itl_ms, "p99", None))]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    for r in reports:
        level = f"rate {r.rate:g}/s" if r.mode == "open" else f"concurrency {r.concurrency}"
        if r.errors:
            notes.append(f"{level}: errors " + ", ".join(f"{code} {n}" for code, n in r.errors.items()))
            for code, d in r.error_latency_ms.items():
                notes.append(f"{level}: {code} seen after p50 {d.p50:,.1f} / p99 {d.p99:,.1f} / max {d.max:,.1f} ms")
        if r.dropped:
            notes.append(f"{level}: {r.dropped} arrivals dropped (client max in flight reached)")
    kind = "GenerateStream" if stream else "Generate"
    footer = (f"{kind}, {'open' if open_loop else 'closed'} loop; latency in ms (p50/p90/p99/max over "
              "succeeded calls); good/s = calls OK within their deadline per second; tok/s = output tokens "
              "per second; sent = ok + failed (checked)")
    return "\n".join(lines + notes + [footer])


def plot(reports: Sequence[LevelReport], runs: Sequence[RunResult], path: str | Path) -> Path:
    """A PNG: the latency distribution of each level, and throughput/latency against the level when
    there are several. Needs matplotlib (pip install 'seqserve[loadtest]')."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'seqserve[loadtest]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    sweep = len(reports) > 1
    open_loop = reports[0].mode == "open"
    level_name = "offered rate (requests/s)" if open_loop else "concurrency (callers)"
    fig, axes = plt.subplots(1, 3 if sweep else 1, figsize=(16 if sweep else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    for report, run in zip(reports, runs):
        ms = np.sort(np.asarray([r.latency_s for r in run.records if r.ok]) * 1e3)
        if ms.size:
            label = f"{report.rate:g}/s" if open_loop else f"c={report.concurrency}"
            ax.plot(ms, np.arange(1, ms.size + 1) / ms.size, label=label)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("latency distribution (CDF)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if sweep:
        levels = [r.rate if open_loop else r.concurrency for r in reports]
        labels = [f"{v:g}" for v in levels]
        ax = axes[0][1]
        ax.plot(levels, [r.output_tokens_per_s for r in reports], "o-")
        for level, r in zip(levels, reports):  # requests/s is proportional; written beside each point
            ax.annotate(f"{r.requests_per_s:,.0f} req/s ({r.goodput_per_s:,.0f} in time)",
                        (level, r.output_tokens_per_s), fontsize=8, textcoords="offset points", xytext=(4, -12))
        ax.set_ylabel("output tokens/s")
        ax.set_ylim(bottom=0)
        ax.set_title("throughput")
        ax = axes[0][2]
        for key, style in (("p50", "o-"), ("p90", "^-"), ("p99", "s-")):
            ax.plot(levels, [getattr(r.latency_ms, key, np.nan) for r in reports], style, label=key)
        ax.set_ylabel("latency (ms)")
        ax.set_ylim(bottom=0)
        ax.set_title("latency")
        ax.legend(fontsize=8)
        for ax in axes[0][1:]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, labels)
            ax.minorticks_off()
            ax.set_xlabel(level_name)
            ax.grid(True, alpha=0.3)
    kind = "GenerateStream" if reports[0].stream else "Generate"
    fig.suptitle(f"seqserve-loadtest: {kind}, {'open' if open_loop else 'closed'} loop")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
