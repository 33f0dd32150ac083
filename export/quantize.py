"""Optional int8 graphs: ONNX Runtime dynamic quantization of the weights of MatMul/Gemm nodes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic

log = logging.getLogger(__name__)


def quantize_graph(path: Path) -> None:
    """Replace an fp32 graph by its int8 dynamic-quantized version, in place."""
    tmp = path.with_name(path.stem + ".int8.onnx")
    # Weights as signed int8, activations quantized per call: the kernels ONNX Runtime has for
    # CPUs without VNNI as well as with it.
    quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    os.replace(tmp, path)
