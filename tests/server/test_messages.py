"""The typed messages between front-ends and the engine core: every kind survives the
MessagePack framing with its types (arrays, enums, errors and what they carry), and peers of
different protocol versions refuse each other at their first message, loudly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from seqserve.runtime.model_dir import open_model_dir
from seqserve.runtime.errors import SeqserveError
from seqserve.runtime import errors
from seqserve.server import messages
from seqserve.runtime.generation import (FinishReason, GenerationParams, RequestResult, SequenceResult, Strategy,
                                        Timings, TokenEvent)
from seqserve.server.engine_core import EngineCoreClient, EngineCoreOptions, EngineCoreProcess


def test_commands_round_trip() -> None:
    params = GenerationParams(12, min_new_tokens=2, strategy=Strategy.SAMPLE, temperature=0.7, top_k=5, top_p=0.9,
                              seed=2**64 - 1, stop_token_ids=(4, 5), return_log_probs=True)
    for command in (messages.Submit(7, [3, 4, 5], params, None, 12.5, True),
                    messages.Submit(8, [3], GenerationParams(1), 99.0, 98.0, False),
                    messages.Cancel(7), messages.Close(), messages.Stop()):
        assert messages.decode_command(messages.encode(command)) == command


def test_a_report_carries_tokens_results_errors_and_figures() -> None:
    report = messages.Report(rows=3, depth=2, encoded=1, encoder_seconds=0.5, step_rows=3, step_seconds=0.01,
                             run_seconds=0.008)
    alignment = np.linspace(0, 1, 5, dtype=np.float32)
    report.tokens.add(1, TokenEvent(0, 0, 9, -0.25, alignment))
    report.tokens.add(2, TokenEvent(1, 4, 11))
    result = RequestResult([SequenceResult([9, 10], FinishReason.STOP, [-0.1, -0.2], -0.3,
                                           np.ones((2, 5), np.float32))], 5, Timings(0.1, 0.2, 0.3, 0.15, 0.6))
    report.done.append(messages.Done(1, result))
    for request_id, error in enumerate([errors.InvalidRequest("options.top_k", "too large"),
                                        errors.Overloaded("queue is full", 0.125), errors.DeadlineExceeded("late"),
                                        errors.Cancelled("bye"), errors.Unavailable("stopping"),
                                        errors.ServingError("decoding failed")], start=10):
        report.errors.append(messages.Error.of(request_id, error))
    out = messages.decode_report(messages.encode(report))
    assert isinstance(out, messages.Report)
    (i1, e1), (i2, e2) = out.tokens.events()
    assert (i1, e1.sequence, e1.index, e1.token_id, e1.log_prob) == (1, 0, 0, 9, -0.25)
    assert np.array_equal(e1.alignment, alignment) and e1.alignment.dtype == np.float32
    assert (i2, e2.sequence, e2.index, e2.token_id, e2.log_prob, e2.alignment) == (2, 1, 4, 11, None, None)
    (done,) = out.done
    seq = done.result.sequences[0]
    assert done.id == 1 and seq.finish_reason is FinishReason.STOP and seq.token_ids == [9, 10]
    assert np.array_equal(seq.alignments, np.ones((2, 5), np.float32)) and done.result.timings.total == 0.6
    back = [e.error() for e in out.errors]
    assert [type(e) for e in back] == [errors.InvalidRequest, errors.Overloaded, errors.DeadlineExceeded,
                                       errors.Cancelled, errors.Unavailable, errors.ServingError]
    assert str(back[0]) == "options.top_k: too large" and back[0].field == "options.top_k"
    assert back[1].retry_after_s == 0.125 and str(back[4]) == "stopping"
    assert (out.rows, out.depth, out.encoded, out.step_rows, out.run_seconds) == (3, 2, 1, 3, 0.008)


def test_an_engine_core_of_another_protocol_version_is_refused_at_start(model_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def children() -> set[str]:
        return {pid for f in Path("/proc/self/task").glob("*/children") for pid in f.read_text().split()}

    before = children()
    monkeypatch.setattr(messages, "PROTOCOL_VERSION", messages.PROTOCOL_VERSION + 1)  # the owner only
    engine = EngineCoreProcess(EngineCoreOptions(str(model_dir)))
    with pytest.raises(SeqserveError, match=r"protocol version \d+, this server \d+"):
        engine.start()
    assert engine.pid is None and children() <= before  # not started, and nothing left running
    engine.stop()


def test_a_front_end_of_another_protocol_version_is_refused_and_others_still_served(model_dir: Path) -> None:
    import asyncio

    engine = EngineCoreProcess(EngineCoreOptions(str(model_dir)))
    engine.start()
    loop = asyncio.new_event_loop()
    try:
        config = open_model_dir(model_dir).config
        stale = EngineCoreClient(engine.address, config, 32, loop)
        real = messages.PROTOCOL_VERSION
        messages.PROTOCOL_VERSION = real + 1  # this front-end only
        try:
            with pytest.raises(SeqserveError, match=rf"front-end speaks protocol version {real + 1}, the engine core "
                                                    rf"{real}"):
                stale.connect(timeout=10)
        finally:
            messages.PROTOCOL_VERSION = real
        good = EngineCoreClient(engine.address, config, 32, loop)
        good.connect(timeout=10)
        assert good.pid == engine.pid and good.providers == ["CPUExecutionProvider"]
        good.stop()
    finally:
        engine.stop()
        loop.close()
