"""The device-resident KV cache (ONNX Runtime I/O binding): forced on CPU, it must give exactly
what the numpy path gives through the real scheduler (greedy with rows joining and leaving, beam
search, seeded sampling); its small graphs must match their numpy twins; on CUDA (when a GPU is
lent) the cache must stay on the GPU and greedy results equal CPU's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from seqserve.runtime.errors import SeqserveError
from seqserve.runtime import device_cache as device_cache_module
from seqserve.runtime.batch import HOST
from seqserve.server.config import ConfigError, parse_args
from seqserve.runtime.device_cache import DeviceCache, DeviceCacheError, to_numpy
from seqserve.runtime.engine import OnnxSeq2Seq, greedy_generate
from seqserve.runtime.generation import GenerationParams, RequestResult, Strategy
from seqserve.server.scheduler import Scheduler
from seqserve.server.testing import InProcessServer, loopback_config


@pytest.fixture(scope="module")
def host(model_dir: Path) -> OnnxSeq2Seq:
    return OnnxSeq2Seq(model_dir, device="cpu", intra_op_threads=1, io_binding="off")


@pytest.fixture(scope="module")
def forced(model_dir: Path) -> OnnxSeq2Seq:
    return OnnxSeq2Seq(model_dir, device="cpu", intra_op_threads=1, io_binding="on")


@pytest.fixture(scope="module")
def sources(host: OnnxSeq2Seq) -> list[list[int]]:
    from seqserve.model.data import dates_pairs
    from seqserve.runtime.tokenizer import encode_source, load_tokenizer

    tok = load_tokenizer(host.model_dir.tokenizer_path)
    return [encode_source(tok, p.source) for p in dates_pairs(24, seed=78)]


class Spy:
    """Records the calls of one method of an object (monkeypatched on the instance)."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self.method = method
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.method(*args)


def serve_all(engine: OnnxSeq2Seq, requests: list[tuple[list[int], GenerationParams]], *,
              max_batch_size: int) -> list[RequestResult]:
    """Queue every request before the worker starts, so that admissions (who joins when, who
    waits for a free row) depend only on the results, not on timing: both paths see the same
    sequence of batches."""
    sched = Scheduler(engine, max_batch_size=max_batch_size)
    handles = [sched.submit(source, params) for source, params in requests]
    sched.start()
    try:
        return [h.future.result(timeout=120) for h in handles]
    finally:
        sched.stop()


def plain(result: RequestResult) -> list[tuple[Any, ...]]:
    """A result's sequences as comparable tuples (alignments as lists)."""
    return [(s.token_ids, s.finish_reason, s.log_probs, s.score,
             None if s.alignments is None else s.alignments.tolist()) for s in result.sequences]


# -- the forced path through the real scheduler ------------------------------------------------


def test_greedy_rows_joining_and_leaving_match_numpy(host: OnnxSeq2Seq, forced: OnnxSeq2Seq,
                                                     sources: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    ops = forced.device_cache
    assert isinstance(ops, DeviceCache) and host.device_cache is None
    spies = {name: Spy(getattr(ops, name)) for name in ("decode", "take", "pad_concat")}
    for name, spy in spies.items():
        monkeypatch.setattr(ops, name, spy)
    # Six rows for 24 requests: most join a running batch with a longer cache and another source
    # length, and every step some rows leave, so the cache and sources are trimmed too. The lengths
    # differ by request whatever the model says (where it puts EOS depends on how it trained).
    lengths = [3 + (5 * i) % 9 for i in range(len(sources))]  # 3..11 tokens, shorter than most answers
    requests = [(s, GenerationParams(n, return_log_probs=i % 3 == 0, return_alignments=i % 4 == 0))
                for i, (s, n) in enumerate(zip(sources, lengths))]
    on_host = serve_all(host, requests, max_batch_size=6)
    on_device = serve_all(forced, requests, max_batch_size=6)
    assert [plain(r) for r in on_device] == [plain(r) for r in on_host]
    assert [r.sequences[0].token_ids for r in on_host] == [
        greedy_generate(host, [s], max_new_tokens=n)[0] for s, n in zip(sources, lengths)]

    # Every step ran on OrtValues: past K/V came from the previous step, not from the host.
    assert spies["decode"].calls
    assert all(isinstance(call[2], ort.OrtValue) and isinstance(call[5], ort.OrtValue)
               for call in spies["decode"].calls)
    # Admissions padded both the cache (in front) and the sources (behind)...
    pads = [(call[2], call[5]) for call in spies["pad_concat"].calls]
    assert any(a[0] > 0 or b[0] > 0 for a, b in pads), "no cache was left-padded"
    assert any(a[1] > 0 or b[1] > 0 for a, b in pads), "no source was right-padded"
    # ...and finished rows trimmed leading cache columns.
    assert any(call[3] > 0 for call in spies["take"].calls), "no cache column was trimmed"


def test_beam_search_and_sampling_match_numpy(host: OnnxSeq2Seq, forced: OnnxSeq2Seq, sources: list[list[int]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ops = forced.device_cache
    assert ops is not None
    take = Spy(ops.take)
    monkeypatch.setattr(ops, "take", take)
    max_new = host.config.max_target_len
    beam = GenerationParams(max_new, strategy=Strategy.BEAM, num_beams=4, num_return_sequences=3,
                            return_log_probs=True, return_alignments=True)
    sampling = GenerationParams(max_new, strategy=Strategy.SAMPLE, temperature=1.5, top_k=20, top_p=0.9, seed=7,
                                num_return_sequences=2, return_log_probs=True)
    requests = [(sources[0], beam), (sources[1], sampling), (sources[2], GenerationParams(max_new)),
                (sources[3], beam), (sources[4], sampling), (sources[5], GenerationParams(max_new, num_beams=2,
                                                                                          strategy=Strategy.BEAM))]
    on_host = serve_all(host, requests, max_batch_size=12)
    on_device = serve_all(forced, requests, max_batch_size=12)
    assert [plain(r) for r in on_device] == [plain(r) for r in on_host]
    # Beams moved between rows (reorder: the whole cache, rows not in order).
    assert any(call[3] == 0 and not np.array_equal(call[2], np.sort(call[2])) for call in take.calls)


def test_greedy_generate_and_empty_cache_stay_numpy(forced: OnnxSeq2Seq, host: OnnxSeq2Seq,
                                                    sources: list[list[int]]) -> None:
    max_new = host.config.max_target_len
    assert greedy_generate(forced, sources[:5], max_new_tokens=max_new) == \
        greedy_generate(host, sources[:5], max_new_tokens=max_new)
    assert isinstance(forced.empty_cache(2), np.ndarray)


# -- the small graphs against numpy --------------------------------------------------------------


def cache(rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
    return rng.standard_normal((2, rows, 3, length, 4)).astype(np.float32)  # (L, R, H, P, Dh)


@pytest.mark.parametrize("rows, length, index, start, end", [
    (4, 5, [0, 2, 3], 1, 5),  # filter: rows dropped, leading columns trimmed
    (4, 5, [3, 3, 0, 1], 0, 5),  # reorder: beams copied and moved
    (3, 0, [2, 0], 0, 0),  # an empty cache (the first step's)
    (3, 6, [1], 6, 6),  # every column trimmed
    (3, 6, [0, 1, 2], 0, 2),  # trailing source columns cut
    (2, 4, [], 0, 4),  # no rows left
])
def test_take_matches_numpy(forced: OnnxSeq2Seq, rows: int, length: int, index: list[int], start: int,
                            end: int) -> None:
    ops = forced.device_cache
    assert ops is not None
    rng = np.random.default_rng(rows * 10 + length)
    key, value = cache(rng, rows, length), cache(rng, rows, length)
    index_array = np.array(index, dtype=np.int64)
    got = ops.take(ops.upload(key), ops.upload(value), index_array, start, end)
    want = HOST.take(key, value, index_array, start, end)
    for g, w in zip(got, want):
        assert isinstance(g, ort.OrtValue)
        np.testing.assert_array_equal(to_numpy(g), w)


@pytest.mark.parametrize("a_shape, a_pad, b_shape, b_pad", [
    ((3, 4), (0, 0), (2, 0), (4, 0)),  # admission: new rows' empty cache padded in front
    ((3, 7), (0, 0), (1, 4), (0, 3)),  # sources: the shorter right-padded
    ((2, 4), (0, 5), (2, 9), (0, 0)),  # the running batch's sources are the shorter
    ((1, 2), (3, 0), (2, 5), (0, 0)),  # the running batch's cache is the shorter
    ((2, 0), (0, 0), (3, 0), (0, 0)),  # both empty
])
def test_pad_concat_matches_numpy(forced: OnnxSeq2Seq, a_shape: tuple[int, int], a_pad: tuple[int, int],
                                  b_shape: tuple[int, int], b_pad: tuple[int, int]) -> None:
    ops = forced.device_cache
    assert ops is not None
    rng = np.random.default_rng(sum(a_shape) + 7 * sum(b_shape))
    a = cache(rng, *a_shape), cache(rng, *a_shape)
    b = cache(rng, *b_shape), cache(rng, *b_shape)
    got = ops.pad_concat(ops.upload(a[0]), a[1], a_pad, b[0], ops.upload(b[1]), b_pad)  # host or device inputs
    want = HOST.pad_concat(a[0], a[1], a_pad, b[0], b[1], b_pad)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(to_numpy(g), w)


# -- selection -------------------------------------------------------------------------------------


def test_auto_keeps_numpy_on_cpu_and_bad_values_are_refused(model_dir: Path) -> None:
    assert OnnxSeq2Seq(model_dir, device="cpu").device_cache is None  # io_binding="auto"
    with pytest.raises(SeqserveError, match="io_binding must be one of auto, on, off"):
        OnnxSeq2Seq(model_dir, device="cpu", io_binding="yes")  # type: ignore[arg-type]


def test_forcing_it_without_onnx_fails_at_load(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_onnx() -> tuple[bytes, bytes]:
        raise DeviceCacheError("the device-resident KV cache (--io-binding) builds its graphs with the `onnx` package")

    monkeypatch.setattr(device_cache_module, "_build_graphs", no_onnx)
    with pytest.raises(DeviceCacheError, match="onnx"):
        OnnxSeq2Seq(model_dir, device="cpu", io_binding="on")
    assert OnnxSeq2Seq(model_dir, device="cpu", io_binding="auto").device_cache is None


def test_io_binding_setting() -> None:
    assert parse_args(["m"], environ={}).io_binding == "auto"
    assert parse_args(["m", "--io-binding", "on"], environ={}).io_binding == "on"
    assert parse_args(["m"], environ={"SEQSERVE_IO_BINDING": "off"}).io_binding == "off"
    assert parse_args(["m", "--io-binding", "auto"], environ={"SEQSERVE_IO_BINDING": "off"}).io_binding == "auto"
    with pytest.raises(ConfigError, match="SEQSERVE_IO_BINDING='gpu': expected one of auto, on, off"):
        parse_args(["m"], environ={"SEQSERVE_IO_BINDING": "gpu"})


def test_server_flag_reaches_the_engine(model_dir: Path) -> None:
    with InProcessServer(loopback_config(model_dir, io_binding="on")) as server:
        engine = server.scheduler.engine
        assert isinstance(engine, OnnxSeq2Seq) and isinstance(engine.device_cache, DeviceCache)


# -- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_keeps_the_cache_on_the_gpu(model_dir: Path, host: OnnxSeq2Seq, sources: list[list[int]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = OnnxSeq2Seq(model_dir, device="cuda")  # io_binding="auto": on with CUDA
    ops = gpu.device_cache
    assert isinstance(ops, DeviceCache) and ops.device_type == "cuda"
    decode = Spy(ops.decode)
    take = Spy(ops.take)
    monkeypatch.setattr(ops, "decode", decode)
    monkeypatch.setattr(ops, "take", take)
    max_new = host.config.max_target_len
    requests = [(s, GenerationParams(max_new)) for s in sources]
    results = serve_all(gpu, requests, max_batch_size=6)
    assert [r.sequences[0].token_ids for r in results] == greedy_generate(host, sources, max_new_tokens=max_new)
    # Past, cross and present K/V were all on the GPU at every step; only logits came back.
    assert decode.calls and take.calls
    for call in decode.calls:
        assert {call[i].device_name() for i in (2, 3, 5, 6)} == {"cuda"}
    logits, present_key, present_value, alignment = ops.decode(*decode.calls[-1])
    assert isinstance(logits, np.ndarray) and isinstance(alignment, np.ndarray)
    assert present_key.device_name() == present_value.device_name() == "cuda"
    for call in take.calls:
        assert call[0].device_name() == "cuda"
