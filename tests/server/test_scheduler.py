"""The scheduler: the decode loop on a thread of its own, driven through handles and futures from
other threads (admission from any thread, cancellation, the queue's limit, stop, token callbacks),
with a scripted engine stepped through a gate the test opens, and with the real ONNX Runtime
engine (results independent of batch company, beam search, sampling). The loop's own bookkeeping
is tested step by step in test_decode_loop.py."""

from __future__ import annotations

import threading
import time
from concurrent.futures import wait
from pathlib import Path

import numpy as np
import pytest

from seqserve.runtime import errors
from seqserve.runtime.engine import OnnxSeq2Seq, greedy_generate
from seqserve.runtime.generation import FinishReason, GenerationParams, Strategy
from seqserve.server.scheduler import Scheduler
from seqserve.server.testing import ScriptedEngine


class Gate:
    """Lets the fake engine's decoder steps through only as the test allows: what happens at
    which step then depends on the order of events, never on how fast the machine is."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.allowed = 0
        self.passed = 0

    def allow(self, steps: int) -> None:
        with self._cond:
            self.allowed += steps
            self._cond.notify_all()

    def open(self) -> None:
        self.allow(1 << 30)

    def wait_passed(self, steps: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.passed >= steps, timeout=10), f"{self.passed} of {steps} steps"

    def enter(self) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.passed < self.allowed, timeout=10), "the test never allowed a step"
            self.passed += 1
            self._cond.notify_all()


class FakeEngine(ScriptedEngine):
    """The scripted engine, optionally slowed down or held at a gate before every decoder step."""

    def __init__(self, step_delay: float = 0.0, gate: Gate | None = None) -> None:
        super().__init__()
        self.step_delay = step_delay
        self.gate = gate

    @property
    def batch_sizes(self) -> list[int]:
        return self.steps

    def decode(self, *args: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.gate is not None:
            self.gate.enter()
        return super().decode(*args)


expected = ScriptedEngine.expected


def greedy(max_new: int = 100, **kw) -> GenerationParams:  # noqa: ANN003
    return GenerationParams(max_new_tokens=max_new, **kw)


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()


def run(scheduler: Scheduler) -> Scheduler:
    scheduler.start()
    return scheduler


def test_concurrent_requests_each_get_their_own_tokens(fake: FakeEngine) -> None:
    sched = run(Scheduler(fake, max_batch_size=8))
    try:
        handles = []
        for i, k in enumerate([5, 1, 12, 3, 7, 20, 13, 9, 4, 15, 6, 11]):
            handles.append((k, sched.submit([k, 9, 9][: 1 + i % 3], greedy())))
            time.sleep(0.001 * (i % 3))  # some arrive while others decode
        for k, h in handles:
            result = h.future.result(timeout=10)
            assert result.sequences[0].token_ids == expected(k)
            assert result.sequences[0].finish_reason is FinishReason.EOS
        assert max(fake.batch_sizes) <= 8
        assert sched.wait_idle(5) and sched.active_rows == 0
    finally:
        sched.stop()


def test_short_request_is_not_held_behind_long_ones() -> None:
    gate = Gate()
    sched = run(Scheduler(FakeEngine(gate=gate), max_batch_size=4))
    try:
        long = sched.submit([40], greedy())
        gate.allow(5)
        gate.wait_passed(5)  # the long request is decoding
        short = sched.submit([3], greedy())
        gate.allow(10)  # enough for the short one (4 steps) after one more of the long one alone
        assert short.future.result(timeout=10).sequences[0].token_ids == [3, 4, 5]
        assert not long.future.done(), "the short request waited for the long one"
        gate.open()
        assert long.future.result(timeout=10).sequences[0].token_ids == expected(40)
    finally:
        gate.open()
        sched.stop()


def test_cancel_and_deadline_free_the_rows() -> None:
    gate = Gate()
    fake = FakeEngine(gate=gate)
    sched = run(Scheduler(fake, max_batch_size=4))
    try:
        deadline = time.monotonic() + 0.05
        cancelled = sched.submit([60], greedy())
        late = sched.submit([60], greedy(), deadline=deadline)
        gate.allow(3)
        gate.wait_passed(3)
        cancelled.cancel()
        while time.monotonic() <= deadline:  # the deadline passes while the fourth step waits
            time.sleep(0.01)
        gate.open()
        with pytest.raises(errors.Cancelled):
            cancelled.future.result(timeout=5)
        with pytest.raises(errors.DeadlineExceeded):
            late.future.result(timeout=5)
        assert sched.wait_idle(5) and sched.active_rows == 0
        # Both rows leave by the boundary after the fourth step (the cancelled one may leave just
        # before it): at most 4 steps of their 61.
        assert len(fake.batch_sizes) <= 4, "the server kept decoding cancelled or expired rows"
    finally:
        gate.open()
        sched.stop()


def test_full_queue_is_refused_at_once() -> None:
    gate = Gate()
    sched = run(Scheduler(FakeEngine(gate=gate), max_batch_size=1, max_queue=2))
    try:
        running = sched.submit([50], greedy())
        gate.allow(1)
        gate.wait_passed(1)  # admitted: the queue is empty again
        queued = [sched.submit([1], greedy()) for _ in range(2)]
        with pytest.raises(errors.Overloaded, match="queue is full"):
            sched.submit([1], greedy())
        assert gate.passed == 1 and not running.future.done()  # refused without waiting for a step
        running.cancel()
        gate.open()
        assert all(q.future.result(timeout=5).sequences[0].token_ids == [1] for q in queued)
    finally:
        gate.open()
        sched.stop()


def test_close_refuses_new_work_but_finishes_admitted(fake: FakeEngine) -> None:
    sched = run(Scheduler(fake))
    h = sched.submit([30], greedy())
    sched.close()
    with pytest.raises(errors.Unavailable):
        sched.submit([1], greedy())
    assert h.future.result(timeout=5).sequences[0].token_ids == expected(30)
    sched.stop()


def test_stop_fails_unfinished_requests() -> None:
    gate = Gate()
    sched = run(Scheduler(FakeEngine(gate=gate), max_batch_size=1))
    handles = [sched.submit([90], greedy()) for _ in range(2)]
    gate.allow(1)
    gate.wait_passed(1)
    stopper = threading.Thread(target=sched.stop)
    stopper.start()

    def stopping() -> bool:  # stop() closes the scheduler before it waits for the worker
        try:
            sched.submit([1], greedy()).cancel()
        except errors.Unavailable:
            return True
        return False

    while not stopping():
        time.sleep(0.001)
    gate.open()  # the worker finishes its step and sees that it must stop
    stopper.join(10)
    assert not stopper.is_alive()
    for h in handles:
        with pytest.raises(errors.Unavailable):
            h.future.result(timeout=5)


def test_streaming_callback_sees_tokens_before_the_end() -> None:
    sched = run(Scheduler(FakeEngine(step_delay=0.002)))
    seen: list[int] = []
    first_seen_while_running = threading.Event()
    handle = None

    def on_token(event) -> None:  # noqa: ANN001
        seen.append(event.token_id)
        if handle is not None and not handle.future.done():
            first_seen_while_running.set()

    try:
        handle = sched.submit([8], greedy(), on_token=on_token)
        assert handle.future.result(timeout=5).sequences[0].token_ids == seen == expected(8)
        assert first_seen_while_running.is_set()
    finally:
        sched.stop()


# -- with the real model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> OnnxSeq2Seq:
    return OnnxSeq2Seq(model_dir, device="cpu", intra_op_threads=1)


@pytest.fixture(scope="module")
def sources(engine: OnnxSeq2Seq) -> list[list[int]]:
    from seqserve.model.data import dates_pairs
    from seqserve.runtime.tokenizer import encode_source, load_tokenizer

    tok = load_tokenizer(engine.model_dir.tokenizer_path)
    return [encode_source(tok, p.source) for p in dates_pairs(40, seed=77)]


def test_results_do_not_depend_on_batch_company(engine: OnnxSeq2Seq, sources: list[list[int]]) -> None:
    max_new = engine.config.max_target_len
    alone = [greedy_generate(engine, [s], max_new_tokens=max_new)[0] for s in sources[:32]]
    sched = run(Scheduler(engine, max_batch_size=32))
    try:
        handles = [sched.submit(s, greedy(max_new)) for s in sources[:32]]
        wait([h.future for h in handles], timeout=60)
        assert [h.future.result().sequences[0].token_ids for h in handles] == alone
        # Staggered arrivals: rows join a running batch at different steps.
        handles = []
        for s in sources[:32]:
            handles.append(sched.submit(s, greedy(max_new)))
            time.sleep(0.002)
        assert [h.future.result(timeout=60).sequences[0].token_ids for h in handles] == alone
    finally:
        sched.stop()


def test_beam_search_and_sampling_share_the_batch(engine: OnnxSeq2Seq, sources: list[list[int]]) -> None:
    max_new = engine.config.max_target_len
    sched = run(Scheduler(engine, max_batch_size=32))
    try:
        one_beam = sched.submit(sources[0], GenerationParams(max_new, strategy=Strategy.BEAM, num_beams=1))
        beams = sched.submit(sources[1], GenerationParams(max_new, strategy=Strategy.BEAM, num_beams=4,
                                                          num_return_sequences=3, return_log_probs=True))
        samples = [sched.submit(sources[2], GenerationParams(max_new, strategy=Strategy.SAMPLE, temperature=1.5,
                                                             top_k=20, top_p=0.9, seed=7, num_return_sequences=2))
                   for _ in range(2)]
        cold = sched.submit(sources[3], GenerationParams(max_new, strategy=Strategy.SAMPLE, temperature=0.0, seed=1))
        plain = [sched.submit(s, greedy(max_new)) for s in sources[:4]]
        greedy_out = [h.future.result(timeout=60).sequences[0].token_ids for h in plain]
        assert one_beam.future.result(timeout=60).sequences[0].token_ids == greedy_out[0]
        result = beams.future.result(timeout=60)
        scores = [s.score for s in result.sequences]
        assert len(result.sequences) == 3 and scores == sorted(scores, reverse=True)
        assert len({tuple(s.token_ids) for s in result.sequences}) == 3
        assert all(len(s.log_probs) >= len(s.token_ids) for s in result.sequences)
        a, b = (h.future.result(timeout=60) for h in samples)
        assert [s.token_ids for s in a.sequences] == [s.token_ids for s in b.sequences]  # same seed, same output
        assert cold.future.result(timeout=60).sequences[0].token_ids == greedy_out[3]
    finally:
        sched.stop()


def test_cancelled_or_expired_queued_requests_free_their_queue_place() -> None:
    gate = Gate()  # the running request holds the only row for as many steps as the test allows
    sched = run(Scheduler(FakeEngine(gate=gate), max_batch_size=1, max_queue=1))
    try:
        running = sched.submit([90], greedy())
        gate.allow(1)
        gate.wait_passed(1)
        queued = sched.submit([3], greedy())
        queued.cancel()
        gate.allow(1)  # one step boundary later
        with pytest.raises(errors.Cancelled):
            queued.future.result(timeout=5)  # resolved while still queued, not when it reaches the head
        deadline = time.monotonic() + 0.02
        late = sched.submit([3], greedy(), deadline=deadline)
        while time.monotonic() <= deadline:
            time.sleep(0.005)
        accepted = sched.submit([3], greedy())  # the expired one holds no place in the queue
        with pytest.raises(errors.DeadlineExceeded):
            late.future.result(timeout=5)
        assert not running.future.done()
        running.cancel()
        gate.open()
        assert accepted.future.result(timeout=5).sequences[0].token_ids == [3, 4, 5]
    finally:
        gate.open()
        sched.stop()


def test_a_failing_token_callback_fails_only_its_own_request() -> None:
    sched = run(Scheduler(FakeEngine(step_delay=0.002)))

    def explode(event) -> None:  # noqa: ANN001
        raise ValueError("consumer went away")

    try:
        bad = sched.submit([6], greedy(), on_token=explode)
        good = sched.submit([7], greedy())
        with pytest.raises(errors.ServingError, match="callback"):
            bad.future.result(timeout=5)
        assert good.future.result(timeout=5).sequences[0].token_ids == expected(7)
    finally:
        sched.stop()
