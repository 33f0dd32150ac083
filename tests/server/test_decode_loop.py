"""The decode loop, driven step by step with a scripted engine and a fake clock: admission,
filtering, cancellation, deadlines, limits, streaming events, timings, and one request's failure
staying its own. No threads, no sleeps, no wall clock."""

from __future__ import annotations

import numpy as np
import pytest

from seqserve.runtime import decode_loop as decode_loop_module
from seqserve.runtime import errors
from seqserve.runtime.decode_loop import DecodeLoop, LoopRequest, StepEvents
from seqserve.runtime.generation import FinishReason, GenerationParams, RequestResult, Strategy
from seqserve.server.testing import ScriptedEngine

expected = ScriptedEngine.expected
VOCAB = ScriptedEngine.config.vocab_size


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def greedy(max_new: int = 100, **kw) -> GenerationParams:  # noqa: ANN003
    return GenerationParams(max_new_tokens=max_new, **kw)


def make(max_batch_size: int = 32, engine: ScriptedEngine | None = None) -> tuple[DecodeLoop, ScriptedEngine, Clock]:
    engine = engine or ScriptedEngine()
    clock = Clock()
    return DecodeLoop(engine, max_batch_size=max_batch_size, clock=clock), engine, clock


def run_until_idle(loop: DecodeLoop, limit: int = 1000) -> StepEvents:
    """Step until nothing is left; all events merged."""
    out = StepEvents()
    for _ in range(limit):
        if not loop.has_work:
            return out
        events = loop.step()
        out.tokens += events.tokens
        out.finished += events.finished
        out.failed += events.failed
    raise AssertionError("the loop never ran out of work")


def results(events: StepEvents) -> dict[int, RequestResult]:
    return dict(events.finished)


def test_requests_joining_at_different_steps_each_get_their_own_tokens() -> None:
    loop, engine, _ = make(max_batch_size=8)
    ks = [5, 1, 12, 3, 7, 20, 13, 9, 4, 15, 6, 11]
    done: dict[int, RequestResult] = {}
    for i, k in enumerate(ks):  # one or two requests join at every step boundary
        loop.add([LoopRequest(i, [k, 9, 9][: 1 + i % 3], greedy())])
        if i % 2:
            done.update(results(loop.step()))
    done.update(results(run_until_idle(loop)))
    assert {i: r.sequences[0].token_ids for i, r in done.items()} == {i: expected(k) for i, k in enumerate(ks)}
    assert all(r.sequences[0].finish_reason is FinishReason.EOS for r in done.values())
    assert max(engine.steps) <= 8  # never more rows than max_batch_size
    assert loop.active_rows == 0 and loop.queued == 0


def test_a_short_request_is_not_held_behind_a_long_one() -> None:
    loop, _, _ = make(max_batch_size=4)
    loop.add([LoopRequest(1, [40], greedy())])
    for _ in range(5):
        assert not loop.step().finished
    loop.add([LoopRequest(2, [3], greedy())])
    steps = 0
    while True:
        steps += 1
        finished = results(loop.step())
        if finished:
            break
    assert list(finished) == [2] and finished[2].sequences[0].token_ids == [3, 4, 5]
    assert steps == 4  # three tokens and EOS, beside the long one
    assert results(run_until_idle(loop))[1].sequences[0].token_ids == expected(40)


def test_length_stop_and_min_new_tokens() -> None:
    loop, _, _ = make()
    loop.add([LoopRequest(1, [10], greedy(max_new=4)), LoopRequest(2, [10], greedy(stop_token_ids=(12,))),
              LoopRequest(3, [3], greedy(max_new=6, min_new_tokens=6))])
    done = results(run_until_idle(loop))
    assert done[1].sequences[0].token_ids == [10, 11, 12, 13]
    assert done[1].sequences[0].finish_reason is FinishReason.LENGTH
    assert done[2].sequences[0].token_ids == [10, 11, 12] and done[2].sequences[0].finish_reason is FinishReason.STOP
    forced = done[3].sequences[0].token_ids
    assert len(forced) == 6 and forced[:3] == [3, 4, 5] and 2 not in forced


def test_cancel_and_deadline_free_the_rows_at_the_next_boundary() -> None:
    loop, engine, clock = make()
    loop.add([LoopRequest(1, [60], greedy()), LoopRequest(2, [60], greedy(), deadline=clock.now + 1.0),
              LoopRequest(3, [8], greedy())])
    for _ in range(3):
        loop.step()
    loop.cancel([1, 99])  # an unknown id is ignored
    clock.now += 1.5
    events = loop.step()
    failed = dict(events.failed)
    assert isinstance(failed[1], errors.Cancelled) and isinstance(failed[2], errors.DeadlineExceeded)
    assert engine.steps[-1] == 1  # both left before the step: only the third row stepped
    assert results(run_until_idle(loop))[3].sequences[0].token_ids == expected(8)


def test_queued_requests_cancelled_or_expired_leave_without_an_encoder_pass() -> None:
    loop, engine, clock = make(max_batch_size=1)
    loop.add([LoopRequest(1, [90], greedy())])
    loop.step()
    loop.add([LoopRequest(2, [3], greedy()), LoopRequest(3, [3], greedy(), deadline=clock.now + 0.01)])
    assert loop.queued == 2
    loop.cancel([2])
    clock.now += 0.02
    loop.purge()  # a driver whose queue is full makes room at once
    assert loop.queued == 0
    failed = dict(loop.step().failed)
    assert isinstance(failed[2], errors.Cancelled) and isinstance(failed[3], errors.DeadlineExceeded)


def test_streaming_requests_get_token_events_before_their_result() -> None:
    loop, _, _ = make()
    loop.add([LoopRequest(1, [6], greedy(), stream=True), LoopRequest(2, [7], greedy()),
              LoopRequest(3, [5], GenerationParams(100, strategy=Strategy.BEAM, num_beams=2), stream=True)])
    seen: dict[int, list[int]] = {1: [], 2: [], 3: []}
    finished_at: dict[int, int] = {}
    step = 0
    while loop.has_work:
        step += 1
        events = loop.step()
        for request_id, event in events.tokens:
            assert request_id not in finished_at
            seen[request_id].append(event.token_id)
        for request_id, _ in events.finished:
            finished_at[request_id] = step
    assert seen[1] == expected(6) and seen[2] == []  # only streams get token events
    assert seen[3] == expected(5)  # a beam's tokens come at its end, with its result
    assert finished_at[1] == 7 and finished_at[3] > 1


def test_timings_come_from_the_clock_it_is_given() -> None:
    loop, _, clock = make()
    loop.add([LoopRequest(1, [3], greedy(), submitted=clock.now - 0.5)])
    clock.now += 0.25
    steps = 0
    while loop.has_work:
        clock.now += 0.01
        finished = results(loop.step())
        steps += 1
    t = finished[1].timings
    assert t.queue == pytest.approx(0.76) and t.first_token == pytest.approx(0.76)
    assert t.total == pytest.approx(0.5 + 0.25 + 0.01 * steps) and t.encoder == 0.0


def test_requests_the_loop_cannot_take_fail_alone() -> None:
    loop, _, _ = make(max_batch_size=2)
    loop.add([LoopRequest(1, [3], greedy()), LoopRequest(1, [4], greedy()),  # the id is taken
              LoopRequest(2, [3] * 17, greedy()),  # longer than max_source_len
              LoopRequest(3, [3], GenerationParams(10, strategy=Strategy.BEAM, num_beams=3))])
    events = run_until_idle(loop)
    failed = dict(events.failed)
    assert set(failed) == {1, 2, 3} and all(isinstance(e, errors.InvalidRequest) for e in failed.values())
    assert results(events)[1].sequences[0].token_ids == [3, 4, 5]


def test_fail_all_forgets_every_request() -> None:
    loop, _, _ = make(max_batch_size=1)
    loop.add([LoopRequest(i, [50], greedy()) for i in range(3)])
    loop.step()
    assert sorted(loop.fail_all()) == [0, 1, 2]
    assert not loop.has_work and loop.active_rows == 0 and loop.queued == 0


# -- one request's failure is its own --------------------------------------------------------------

POISON = 77  # a source starting with this token makes the engine's decoder step fail


class PoisonedEngine(ScriptedEngine):
    """Its decoder step raises (as ONNX Runtime would) whenever the batch holds a row of a poisoned
    source: the failure is bound to one request's rows, not to the batch."""

    def decode(self, tokens, positions, past_key, past_value, self_mask, cross_key, cross_value, source_mask):  # noqa: ANN001
        if (cross_key[0, :, 0, 0, 0] == POISON).any():
            self.steps.append(-tokens.shape[0])
            raise RuntimeError("injected ONNX Runtime failure")
        return super().decode(tokens, positions, past_key, past_value, self_mask, cross_key, cross_value, source_mask)


def test_a_failing_decoder_step_fails_only_the_request_that_causes_it() -> None:
    engine = PoisonedEngine()
    loop, _, _ = make(max_batch_size=16, engine=engine)
    ks = [5, 9, 3, 12, 7, 4, 15, 6, 11, 8]
    loop.add([LoopRequest(i, [k, 1], greedy()) for i, k in enumerate(ks)])
    loop.add([LoopRequest(100, [POISON, 1], greedy()),
              LoopRequest(101, [10], GenerationParams(100, strategy=Strategy.BEAM, num_beams=3))])
    events = run_until_idle(loop)
    (failed_id, error), = events.failed
    assert failed_id == 100 and type(error) is errors.ServingError and "this request alone" in str(error)
    assert "RuntimeError" not in str(error)
    done = results(events)
    assert {i: done[i].sequences[0].token_ids for i in range(len(ks))} == {i: expected(k) for i, k in enumerate(ks)}
    assert done[101].sequences[0].token_ids == expected(10)
    assert engine.steps[0] == -14  # the first step failed with all 14 rows in the batch


def test_a_step_that_fails_for_every_request_fails_them_all_and_the_loop_goes_on() -> None:
    loop, _, _ = make(engine=PoisonedEngine())
    loop.add([LoopRequest(k, [POISON, k], greedy()) for k in (1, 2)])
    failed = dict(run_until_idle(loop).failed)
    assert set(failed) == {1, 2} and all("decoding failed" in str(e) for e in failed.values())
    loop.add([LoopRequest(3, [6], greedy())])
    assert results(run_until_idle(loop))[3].sequences[0].token_ids == expected(6)


EXTREMES = [
    GenerationParams(30, strategy=Strategy.BEAM, num_beams=2, length_penalty=400.0),
    GenerationParams(30, strategy=Strategy.BEAM, num_beams=2, length_penalty=-1100.0),
    GenerationParams(30, strategy=Strategy.BEAM, num_beams=3, length_penalty=1e308, num_return_sequences=3,
                     return_log_probs=True),
    GenerationParams(30, strategy=Strategy.BEAM, num_beams=2, length_penalty=-1e308, min_new_tokens=30),
    GenerationParams(30, strategy=Strategy.SAMPLE, temperature=5e-324, seed=1),
    GenerationParams(30, strategy=Strategy.SAMPLE, temperature=1e308, top_k=1, seed=2),
    GenerationParams(30, strategy=Strategy.SAMPLE, temperature=1e-30, top_p=5e-324, seed=3, num_return_sequences=4),
    GenerationParams(30, strategy=Strategy.SAMPLE, temperature=1e30, top_k=VOCAB, top_p=1.0, seed=2**63),
    GenerationParams(1, min_new_tokens=1, return_log_probs=True, return_alignments=True),
]


def test_options_at_their_extremes_never_fail_a_step() -> None:
    loop, _, _ = make()
    loop.add([LoopRequest(k, [k], greedy()) for k in (4, 9, 13)])
    loop.add([LoopRequest(100 + i, [8], params, stream=True) for i, params in enumerate(EXTREMES)])
    events = run_until_idle(loop)
    assert not events.failed
    done = results(events)
    assert all(len(s.token_ids) <= 30 for i in range(len(EXTREMES)) for s in done[100 + i].sequences)
    assert [done[k].sequences[0].token_ids for k in (4, 9, 13)] == [expected(4), expected(9), expected(13)]


def test_a_request_whose_token_choice_fails_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    real_sample = decode_loop_module.sample

    def sample(logits: np.ndarray, rng: np.random.Generator, *, temperature: float, top_k: int,
               top_p: float) -> np.ndarray:
        if temperature == 0.5:  # this request's own arithmetic goes wrong
            raise OverflowError("injected")
        return real_sample(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)

    monkeypatch.setattr(decode_loop_module, "sample", sample)
    loop, _, _ = make()
    loop.add([LoopRequest(1, [5], GenerationParams(50, strategy=Strategy.SAMPLE, temperature=0.5, seed=1)),
              LoopRequest(3, [3], greedy()), LoopRequest(7, [7], greedy()),
              LoopRequest(6, [6], GenerationParams(50, strategy=Strategy.SAMPLE, temperature=0.0, seed=1))])
    events = run_until_idle(loop)
    (failed_id, error), = events.failed
    assert failed_id == 1 and "rest of its batch went on" in str(error) and "OverflowError" not in str(error)
    done = results(events)
    assert [done[k].sequences[0].token_ids for k in (3, 7, 6)] == [expected(3), expected(7), expected(6)]


# -- deadline-aware admission ------------------------------------------------------------------------


def test_the_wait_estimate_follows_the_recent_completion_rate() -> None:
    from seqserve.server.scheduler import admit_deadline

    loop, _, clock = make(max_batch_size=1)
    assert loop.estimate_wait(ahead=5) == 0.0  # no completions yet: no estimate, nobody refused
    loop.add([LoopRequest(i, [3], greedy()) for i in range(6)])  # 4 steps each, one at a time
    while loop.has_work:
        clock.now += 0.01
        loop.step()
    # One request finished every 4 steps of 10 ms: 25 per second.
    assert loop.estimate_wait(ahead=0) == 0.0  # a free row: admitted at the next boundary
    loop.add([LoopRequest(10, [50], greedy())])
    loop.step()  # the only row is taken
    assert loop.estimate_wait(ahead=2) == pytest.approx(3 / 25)

    late = GenerationParams(10)
    with pytest.raises(errors.Overloaded, match="deadline") as info:
        admit_deadline(loop, 2, late, deadline=clock.now + 0.05, now=clock.now)
    assert info.value.retry_after_s == pytest.approx(3 / 25)
    admit_deadline(loop, 2, late, deadline=clock.now + 1.0, now=clock.now)  # time enough: admitted
