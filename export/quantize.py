"""Optional int8 graphs: ONNX Runtime dynamic quantization of the weights of MatMul/Gemm nodes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from seqserve.export.graphs import save_graph


def quantize_graph(path: Path) -> None:
    """Replace an fp32 graph (and its external weights) by its int8 dynamic-quantized version, in place."""
    tmp = path.with_name(path.stem + ".int8.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs a line per tensor on the root logger
    try:
        # Weights as signed int8, activations quantized per call: the kernels ONNX Runtime has
        # for CPUs without VNNI as well as with it.
        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)
    quantized = onnx.load(str(tmp))  # weights and all, before the fp32 ones are overwritten
    save_graph(quantized, path)
    os.remove(tmp)
