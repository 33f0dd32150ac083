"""Prometheus metrics of the server, on a registry of their own, served over HTTP on a separate port.

`Metrics` is the scheduler's observer (encoder passes, decoder steps, queue depth, all called from
the worker thread; prometheus-client's metrics are thread-safe) and the service's recorder of
finished requests (status codes, queue time, time to first token, inter-token latency, tokens).
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from seqserve.runtime.generation import RequestResult

# Seconds: from a fraction of a decoder step to a long queue wait.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric of the server; implements `scheduler.SchedulerObserver`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("seqserve_requests", "Finished RPCs, by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.queue_seconds = Histogram("seqserve_queue_seconds", "Per input: submitted -> admitted into the batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.first_token_seconds = Histogram("seqserve_time_to_first_token_seconds",
                                             "Per input: submitted -> first token chosen",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_seconds = Histogram(
            "seqserve_inter_token_seconds",
            "Time between two tokens of a sequence (streams: each gap as sent; unary calls: the mean gap of "
            "each input)", buckets=LATENCY_BUCKETS, registry=r)
        self.encoder_seconds = Histogram("seqserve_encoder_seconds",
                                         "One encoder pass over the requests admitted at a step boundary",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.encoder_requests = Histogram("seqserve_encoder_batch_requests", "Requests admitted per encoder pass",
                                          buckets=ROW_BUCKETS, registry=r)
        self.step_seconds = Histogram("seqserve_step_seconds", "One decoder step for the whole batch, "
                                      "token choice included", buckets=LATENCY_BUCKETS, registry=r)
        self.step_run_seconds = Histogram("seqserve_step_onnx_seconds", "Time of a decoder step spent inside "
                                          "ONNX Runtime's run", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("seqserve_batch_rows", "Rows (inputs, beams, samples) per decoder step",
                                    buckets=ROW_BUCKETS, registry=r)
        # Both read from the scheduler when scraped (`watch`), or set from every report of the
        # engine core process: an idle server reports 0, not the last step's figure. With several
        # front-ends (prometheus-client's multiprocess mode) each holds the engine's one value:
        # the largest of the live processes' is reported.
        self.active_rows = Gauge("seqserve_active_rows", "Rows in the running batch now", registry=r,
                                 multiprocess_mode="livemax")
        self.queue_depth = Gauge("seqserve_queue_depth", "Requests waiting for a batch row", registry=r,
                                 multiprocess_mode="livemax")
        self.calls_in_flight = Gauge("seqserve_calls_in_flight", "SeqServe calls being handled now (every "
                                     "front-end's)", registry=r, multiprocess_mode="livesum")
        self.input_tokens = Counter("seqserve_input_tokens", "Source tokens of finished inputs", registry=r)
        self.generated_tokens = Counter("seqserve_generated_tokens", "Tokens generated for finished inputs",
                                        registry=r)
        self._http: Any = None

    # -- SchedulerObserver (worker thread) --------------------------------------------------

    def on_encode(self, requests: int, seconds: float) -> None:
        self.encoder_seconds.observe(seconds)
        self.encoder_requests.observe(requests)

    def on_step(self, rows: int, seconds: float, run_seconds: float) -> None:
        self.step_seconds.observe(seconds)
        self.step_run_seconds.observe(run_seconds)
        self.batch_rows.observe(rows)

    def on_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def on_active_rows(self, rows: int) -> None:
        self.active_rows.set(rows)

    def watch(self, scheduler: Any) -> None:
        """Read the rows in the batch and the queue depth from the scheduler (anything with
        `active_rows` and `queue_depth`) whenever the metrics are scraped (in one process; in
        multiprocess mode only the values set count)."""
        self.active_rows.set_function(lambda: scheduler.active_rows)
        self.queue_depth.set_function(lambda: scheduler.queue_depth)

    # -- the service (event loop) -----------------------------------------------------------

    def on_rpc(self, method: str, code: str) -> None:
        """One finished RPC, with the name of its status code ("OK", "INVALID_ARGUMENT", ...)."""
        self.requests.labels(method=method, code=code).inc()

    def on_result(self, result: RequestResult, *, streamed: bool) -> None:
        """One finished input; a streamed one has had its inter-token gaps recorded as sent."""
        t = result.timings
        self.queue_seconds.observe(t.queue)
        if t.first_token:
            self.first_token_seconds.observe(t.first_token)
        self.input_tokens.inc(result.input_tokens)
        self.generated_tokens.inc(result.output_tokens)
        if not streamed and t.first_token:
            for seq in result.sequences:
                if len(seq.token_ids) > 1:
                    self.inter_token_seconds.observe(max(0.0, t.total - t.first_token) / (len(seq.token_ids) - 1))

    def on_token_gap(self, seconds: float) -> None:
        self.inter_token_seconds.observe(seconds)

    # -- HTTP -------------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port in a daemon thread; returns the bound port."""
        host = host.strip("[]")
        self._http, thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop the HTTP server, if serving."""
        if self._http is not None:
            http, self._http = self._http, None
            # shutdown() waits for the serving loop, which polls every 0.5 s: do it off the caller's path.
            threading.Thread(target=lambda: (http.shutdown(), http.server_close()), daemon=True).start()

    def text(self) -> str:
        """The exposition text, as /metrics serves it."""
        return generate_latest(self.registry).decode()
