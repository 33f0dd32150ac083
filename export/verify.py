"""Proof that the exported graphs compute what the PyTorch model computes.

Two checks, both run by `seqserve export` and again by the tests: numeric parity of encoder
outputs and decoder logits/caches on random inputs (padding, batch > 1, empty and non-empty
cache, one and several new tokens), and token-for-token equality of greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from seqserve.export.graphs import example_inputs
from seqserve.runtime.errors import ParityError
from seqserve.model.transformer import Transformer, greedy_decode
from seqserve.runtime.engine import OnnxSeq2Seq, greedy_generate, pad_batch

TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityReport:
    """Largest differences seen between ONNX Runtime and PyTorch."""

    encoder_max_diff: float
    decoder_logits_max_diff: float
    decoder_cache_max_diff: float
    greedy_inputs: int  # number of inputs decoded both ways, all token-for-token equal

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def _max_diff(onnx_out: np.ndarray, torch_out: torch.Tensor) -> float:
    if onnx_out.shape != tuple(torch_out.shape):
        return float("inf")
    return float(np.abs(onnx_out - torch_out.numpy()).max()) if onnx_out.size else 0.0


def check_numeric_parity(model: Transformer, engine: OnnxSeq2Seq, *, tolerance: float = TOLERANCE,
                         seed: int = 1) -> tuple[float, float, float]:
    """Max abs differences (encoder, logits, caches) over random inputs; ParityError beyond tolerance."""
    enc_diff = logit_diff = cache_diff = 0.0
    cases = [(4, 7, 0, 1), (3, 9, 5, 1), (2, 6, 3, 3), (1, 4, 0, 1), (5, 11, 1, 2)]  # B, S, P, T
    for i, (batch, source_len, past_len, new_len) in enumerate(cases):
        (source_ids, source_mask), decoder_args = example_inputs(
            model, batch=batch, source_len=source_len, past_len=past_len, new_len=new_len, seed=seed + i)
        if batch > 1:
            source_mask[1, source_len // 2:] = False  # a padded source row
        with torch.no_grad():
            cross = model.encode(source_ids, source_mask)
        onnx_cross = engine.encode(source_ids.numpy(), source_mask.numpy())
        enc_diff = max(enc_diff, *(_max_diff(o, t) for o, t in zip(onnx_cross, cross)))
        tokens, positions, past_k, past_v, self_mask, _, _, _ = decoder_args
        if batch > 1 and past_len > 1:
            self_mask[0, : past_len - 1] = False  # a row whose cache holds filler slots
        args = (tokens, positions, past_k, past_v, self_mask, cross[0], cross[1], source_mask)
        with torch.no_grad():
            logits, present_k, present_v, alignment = model.decode(*args)
        onnx_out = engine.decode(*(a.numpy() for a in args))
        logit_diff = max(logit_diff, _max_diff(onnx_out[0], logits))
        cache_diff = max(cache_diff, _max_diff(onnx_out[1], present_k), _max_diff(onnx_out[2], present_v),
                         _max_diff(onnx_out[3], alignment))
    for what, diff in (("encoder cross-attention K/V", enc_diff), ("decoder logits", logit_diff),
                       ("decoder present K/V and alignment", cache_diff)):
        if not diff <= tolerance:
            raise ParityError(f"ONNX Runtime vs PyTorch, {what}: max abs difference {diff:.3g} exceeds "
                              f"tolerance {tolerance:.3g}", max_diff=diff, tolerance=tolerance)
    return enc_diff, logit_diff, cache_diff


def check_greedy_parity(model: Transformer, engine: OnnxSeq2Seq, sources: Sequence[Sequence[int]], *,
                        max_new_tokens: int, batch_size: int = 64) -> list[list[int]]:
    """Greedy outputs of the cached ONNX loop and of PyTorch must be token-for-token equal; returns them."""
    mismatches: list[int] = []
    outputs: list[list[int]] = []
    for start in range(0, len(sources), batch_size):
        chunk = sources[start:start + batch_size]
        ids, _ = pad_batch(chunk, model.cfg.pad_id)
        expected = greedy_decode(model, torch.from_numpy(ids), max_new_tokens=max_new_tokens)
        actual = greedy_generate(engine, chunk, max_new_tokens=max_new_tokens)
        outputs += actual
        mismatches += [start + i for i, (e, a) in enumerate(zip(expected, actual)) if e != a]
    if mismatches:
        raise ParityError(f"greedy decoding, ONNX vs PyTorch: token outputs differ on {len(mismatches)}/"
                          f"{len(sources)} inputs (first: input #{mismatches[0]})",
                          max_diff=float(len(mismatches)), tolerance=0.0)
    return outputs


def verify(model: Transformer, engine: OnnxSeq2Seq, sources: Sequence[Sequence[int]], *,
           max_new_tokens: int) -> tuple[ParityReport, list[list[int]]]:
    """Run both checks (ParityError on the first failure); returns the report and the greedy outputs."""
    enc, logits, cache = check_numeric_parity(model, engine)
    outputs = check_greedy_parity(model, engine, sources, max_new_tokens=max_new_tokens)
    return ParityReport(enc, logits, cache, len(outputs)), outputs
