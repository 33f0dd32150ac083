"""Prometheus metrics: the scheduler's observations and the service's records reach the exposition,
and /metrics is served over HTTP on its own port."""

from __future__ import annotations

import urllib.request

from seqserve.runtime.generation import FinishReason, RequestResult, SequenceResult, Timings
from seqserve.server.metrics import Metrics


def test_observations_reach_the_exposition() -> None:
    metrics = Metrics()
    metrics.on_encode(3, 0.002)
    metrics.on_step(5, 0.004, 0.003)
    metrics.on_queue_depth(7)
    metrics.on_rpc("Generate", "OK")
    metrics.on_rpc("Generate", "RESOURCE_EXHAUSTED")
    result = RequestResult([SequenceResult([5, 6, 7], FinishReason.EOS)], input_tokens=4,
                           timings=Timings(queue=0.01, encoder=0.002, decode=0.03, first_token=0.015, total=0.04))
    metrics.on_result(result, streamed=False)
    text = metrics.text()
    for line in ('seqserve_requests_total{code="OK",method="Generate"} 1.0',
                 'seqserve_requests_total{code="RESOURCE_EXHAUSTED",method="Generate"} 1.0',
                 "seqserve_queue_depth 7.0", "seqserve_batch_rows_sum 5.0",
                 "seqserve_step_seconds_count 1.0", "seqserve_step_onnx_seconds_sum 0.003",
                 "seqserve_encoder_seconds_count 1.0", "seqserve_encoder_batch_requests_sum 3.0",
                 "seqserve_generated_tokens_total 3.0", "seqserve_input_tokens_total 4.0",
                 "seqserve_queue_seconds_sum 0.01", "seqserve_time_to_first_token_seconds_sum 0.015",
                 "seqserve_inter_token_seconds_count 1.0"):
        assert line in text, line
    # (total - first token) / (tokens - 1): the mean gap of the sequence.
    samples = {s.name: s.value for s in metrics.inter_token_seconds.collect()[0].samples}
    assert abs(samples["seqserve_inter_token_seconds_sum"] - 0.0125) < 1e-9


def test_metrics_are_served_over_http() -> None:
    metrics = Metrics()
    metrics.on_rpc("GetModelInfo", "OK")
    port = metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
        assert 'seqserve_requests_total{code="OK",method="GetModelInfo"} 1.0' in body
        assert "python_gc" not in body  # its own registry, not the process-wide default
    finally:
        metrics.close()
