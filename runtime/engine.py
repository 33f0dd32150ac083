"""ONNX Runtime sessions over an exported model directory, and batched greedy decoding in numpy.

This is the serving side's view of the model: torch is never imported here. The decoding loop
knows nothing of gRPC; the scheduler (and `seqserve translate`) drive it directly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnxruntime as ort

from seqserve.runtime import names
from seqserve.runtime.model_dir import ModelDir, open_model_dir
from seqserve.runtime.errors import SeqserveError
from seqserve.runtime.device_cache import DeviceCache, DeviceCacheError

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
# Intra-op threads spin-wait for work: "on" between kernels and between runs, "run" between the
# kernels of one run only (they park when it returns), "off" never (woken for every kernel).
SPINNING = ("on", "run", "off")
IoBinding = Literal["auto", "on", "off"]
IO_BINDINGS = ("auto", "on", "off")

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class DeviceError(SeqserveError):
    """The requested execution device cannot be used."""


def choose_providers(device: Device) -> list[str]:
    """ONNX Runtime providers for a device; `cuda` fails here if this build cannot offer it."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise DeviceError(f"--device cuda: this ONNX Runtime build offers only {', '.join(available)} "
                          "(install the `gpu` extra, onnxruntime-gpu, instead of `cpu`)")
    return ["CPUExecutionProvider"]


class OnnxSeq2Seq:
    """The two graphs of a model directory as ONNX Runtime sessions."""

    def __init__(self, model_dir: ModelDir | str | os.PathLike, *, device: Device = "auto",
                 intra_op_threads: int = 0, inter_op_threads: int = 1,
                 optimization: str = "all", spinning: bool | str = "on", io_binding: IoBinding = "auto") -> None:
        self.model_dir = model_dir if isinstance(model_dir, ModelDir) else open_model_dir(model_dir)
        self.config = self.model_dir.config
        spin = ("on" if spinning else "off") if isinstance(spinning, bool) else spinning
        if spin not in SPINNING:
            raise SeqserveError(f"spinning must be one of {', '.join(SPINNING)}, got {spinning!r}")
        if optimization not in OPTIMIZATION_LEVELS:
            raise SeqserveError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {optimization!r}")
        if io_binding not in IO_BINDINGS:
            raise SeqserveError(f"io_binding must be one of {', '.join(IO_BINDINGS)}, got {io_binding!r}")

        def options(stop_spinning_after_run: bool = False) -> ort.SessionOptions:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = intra_op_threads
            opts.inter_op_num_threads = inter_op_threads
            opts.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if spin == "off" else "1")
            if stop_spinning_after_run:
                opts.add_session_config_entry("session.force_spinning_stop", "1")
            return opts

        # Intra-op threads that spin between the many small kernels of a decode step pick up the
        # next kernel at once instead of being woken for each (measured: docs/benchmarks.md).
        # Spinning burns the cores it waits on, so it can be turned off where busy neighbours share
        # them. The encoder's threads stop spinning as soon as its run returns: it runs once per
        # admission, and a pool spinning on between runs would take the cores from the decoder's.
        providers = choose_providers(device)
        self.encoder = ort.InferenceSession(str(self.model_dir.encoder_path),
                                            options(stop_spinning_after_run=True), providers=providers)
        self.decoder = ort.InferenceSession(str(self.model_dir.decoder_path),
                                            options(stop_spinning_after_run=spin == "run"), providers=providers)
        # ONNX Runtime silently falls back to CPU when CUDA cannot load: check what it actually uses.
        self.providers = self.decoder.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            raise DeviceError(f"--device cuda: CUDA could not be loaded; sessions run on {', '.join(self.providers)}")
        log.info("model %s loaded on %s", self.model_dir.path, ", ".join(self.providers))
        self.device_cache = self._device_cache(io_binding)

    def _device_cache(self, io_binding: IoBinding) -> DeviceCache | None:
        """The device-resident KV cache for the scheduler's batch, or None for numpy K/V.

        On CUDA numpy K/V would cross to the GPU and back at every step; on CPU numpy is already
        zero-copy, and the OrtValue path only adds binding work, so `auto` keeps numpy there.
        """
        on_cuda = "CUDAExecutionProvider" in self.providers
        if io_binding == "off" or (io_binding == "auto" and not on_cuda):
            log.info("decoder KV cache: numpy on the host, passed to ONNX Runtime each step")
            return None
        try:
            return DeviceCache(self.decoder)
        except DeviceCacheError as exc:
            if io_binding == "on":
                raise
            # auto on CUDA without the onnx package: still serve, only slower.
            log.warning("%s; the KV cache goes through the host each step instead", exc)
            return None

    def encode(self, source_ids: np.ndarray, source_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, S) int64 ids and bool mask -> cross-attention K, V (L, B, H, S, Dh)."""
        cross_key, cross_value = self.encoder.run(None, {"source_ids": source_ids, "source_mask": source_mask})
        return cross_key, cross_value

    def decode(self, tokens: np.ndarray, positions: np.ndarray, past_key: np.ndarray, past_value: np.ndarray,
               self_mask: np.ndarray, cross_key: np.ndarray, cross_value: np.ndarray,
               source_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One decoder step; see `export.names` for shapes. Returns logits, present K, present V, alignment.

        numpy in and out whatever `io_binding` says (greedy_generate, benchmarks); the scheduler's
        batch uses `device_cache.decode` instead when there is one.
        """
        feeds = dict(zip(names.DECODER_INPUTS, (tokens, positions, past_key, past_value, self_mask,
                                                 cross_key, cross_value, source_mask)))
        logits, present_key, present_value, alignment = self.decoder.run(None, feeds)
        return logits, present_key, present_value, alignment

    def empty_cache(self, batch: int) -> np.ndarray:
        """A zero-length self-attention cache, (L, B, H, 0, Dh)."""
        cfg = self.config
        return np.zeros((cfg.decoder_layers, batch, cfg.n_heads, 0, cfg.head_dim), dtype=np.float32)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id lists into (B, S) int64 ids and a bool mask that is True at real tokens."""
    lengths = np.array([len(s) for s in sequences])
    ids = np.full((len(sequences), int(lengths.max())), pad_id, dtype=np.int64)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = seq
    return ids, np.arange(ids.shape[1]) < lengths[:, None]  # (B, S) True at real tokens


def greedy_generate(engine: OnnxSeq2Seq, sources: Sequence[Sequence[int]], *,
                    max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding of a batch with the KV cache; returns each row's tokens without EOS.

    Finished rows are dropped from the batch (and from the caches) so the remaining rows do not
    pay for them.
    """
    cfg = engine.config
    source_ids, source_mask = pad_batch(sources, cfg.pad_id)
    cross_key, cross_value = engine.encode(source_ids, source_mask)
    rows = np.arange(len(sources))  # original index of each live row
    past_key = past_value = engine.empty_cache(len(sources))
    tokens = np.full((len(sources), 1), cfg.bos_id, dtype=np.int64)
    out: list[list[int]] = [[] for _ in sources]
    for step in range(max_new_tokens):
        b = len(rows)
        positions = np.full((b, 1), step, dtype=np.int64)
        self_mask = np.ones((b, step + 1), dtype=bool)
        logits, past_key, past_value, _ = engine.decode(tokens, positions, past_key, past_value, self_mask,
                                                        cross_key, cross_value, source_mask)
        next_tokens = logits[:, -1].argmax(axis=-1)  # (B,)
        live = next_tokens != cfg.eos_id
        for row, token in zip(rows[live], next_tokens[live]):
            out[row].append(int(token))
        if not live.all():
            rows, next_tokens = rows[live], next_tokens[live]
            past_key, past_value = past_key[:, live], past_value[:, live]
            cross_key, cross_value, source_mask = cross_key[:, live], cross_value[:, live], source_mask[live]
        if len(rows) == 0:
            break
        tokens = next_tokens[:, None].astype(np.int64)
    return out
