"""The decoder's KV cache kept on the session's device between steps (ONNX Runtime I/O binding).

With numpy in and out, `InferenceSession.run` on CUDA copies every step's whole cache to the GPU
and the grown cache back. Here past and cross-attention K/V stay `OrtValue`s on the device: a
step binds them as inputs and leaves `present_key`/`present_value` where ORT allocated them, so
they become the next step's past without a copy. What crosses to the host per step is small:
token ids, positions and masks go in; logits (and the little alignment) come out.

The batch's bookkeeping on the cache (rows joining, rows leaving, beams moving) runs as two tiny
ONNX graphs on the same device, built once per engine with dynamic shapes:
  take:       Gather rows on axis 1, then Slice cache columns [start, end) on axis 3 (filter, reorder)
  pad_concat: Pad axis 3 of two batches, then Concat them on axis 1 (admission)
Each graph works on a (key, value) pair at once, so one run covers both.

`DecodeBatch` (runtime/batch.py) talks to this through the same small interface as its numpy
implementation; on CPU numpy is zero-copy and faster, so this path is used there only when forced
(tests). `onnx` is imported only here, and only when the graphs are built: the CPU serving
install does without it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from seqserve.runtime import names
from seqserve.runtime.errors import SeqserveError

log = logging.getLogger(__name__)

OPSET = 17  # Pad and Slice take their amounts as inputs from opset 13; 17 is well inside every ORT >= 1.20
IR_VERSION = 8  # the IR that goes with opset 17, so older ORT builds load the graphs too
AXIS_ROWS, AXIS_LEN = 1, 3  # cache and cross K/V are (L, R, H, P or S, Dh)

Tensor = np.ndarray | ort.OrtValue
Pair = tuple[ort.OrtValue, ort.OrtValue]


class DeviceCacheError(SeqserveError):
    """The device-resident cache cannot be set up (no `onnx` package to build its graphs)."""


def _build_graphs() -> tuple[bytes, bytes]:
    """The serialized `take` and `pad_concat` graphs."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError as exc:  # the CPU serving install has no onnx; the gpu extra brings it
        raise DeviceCacheError("the device-resident KV cache (--io-binding) builds its graphs with the `onnx` "
                               "package: install the `gpu` extra (or `pip install onnx`)") from exc

    def cache(name: str) -> onnx.ValueInfoProto:
        # Every tensor gets its own symbolic rows and length: the graphs change both.
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["layers", f"{name}_rows", "heads",
                                                                       f"{name}_len", "head_dim"])

    def ints(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.INT64, shape)

    def model(nodes: list[onnx.NodeProto], name: str, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto] = ()) -> bytes:
        graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                                  producer_name="seqserve.device_cache")
        onnx.checker.check_model(proto, full_check=True)
        return proto.SerializeToString()

    take_nodes = []
    for x in ("key", "value"):
        take_nodes += [helper.make_node("Gather", [x, "rows"], [f"{x}_rows"], axis=AXIS_ROWS),
                       helper.make_node("Slice", [f"{x}_rows", "start", "end", "axes"], [f"{x}_out"])]
    take = model(take_nodes, "take",
                 [cache("key"), cache("value"), ints("rows", ["kept"]), ints("start", [1]), ints("end", [1])],
                 [cache("key_out"), cache("value_out")],
                 [helper.make_tensor("axes", TensorProto.INT64, [1], [AXIS_LEN])])

    pad_nodes = []
    for x in ("key", "value"):
        pad_nodes += [helper.make_node("Pad", [f"a_{x}", "a_pads"], [f"a_{x}_padded"]),
                      helper.make_node("Pad", [f"b_{x}", "b_pads"], [f"b_{x}_padded"]),
                      helper.make_node("Concat", [f"a_{x}_padded", f"b_{x}_padded"], [f"{x}_out"], axis=AXIS_ROWS)]
    pad_concat = model(pad_nodes, "pad_concat",
                       [cache("a_key"), cache("a_value"), cache("b_key"), cache("b_value"),
                        ints("a_pads", [10]), ints("b_pads", [10])],  # Pad's (begin x5, end x5)
                       [cache("key_out"), cache("value_out")])
    return take, pad_concat


def _pads(before: int, after: int) -> np.ndarray:
    """Pad's `pads` input for a 5-d tensor padded on its length axis only."""
    pads = np.zeros(10, dtype=np.int64)
    pads[AXIS_LEN], pads[5 + AXIS_LEN] = before, after
    return pads


class DeviceCache:
    """The cache operations of `DecodeBatch` on OrtValues on one decoder session's device."""

    on_device = True

    def __init__(self, decoder: ort.InferenceSession) -> None:
        self.decoder = decoder
        providers = decoder.get_providers()
        provider_options = decoder.get_provider_options()
        if "CUDAExecutionProvider" in providers:
            self.device_type = "cuda"
            self.device_id = int(provider_options["CUDAExecutionProvider"].get("device_id", 0))
        else:
            self.device_type, self.device_id = "cpu", 0
        take, pad_concat = _build_graphs()
        # The small graphs run a few times per admission or finished row, not per step: one thread
        # each and no spinning, so they never take cores from the decoder's pool.
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options = [provider_options.get(p, {}) for p in providers]
        self._take = ort.InferenceSession(take, opts, providers=providers, provider_options=options)
        self._pad_concat = ort.InferenceSession(pad_concat, opts, providers=providers, provider_options=options)
        log.info("decoder KV cache stays on %s:%d between steps (ONNX Runtime I/O binding)",
                 self.device_type, self.device_id)

    def upload(self, x: Tensor) -> ort.OrtValue:
        """A host array as an OrtValue on the device (on CPU it wraps the array, no copy)."""
        if isinstance(x, ort.OrtValue):
            return x
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), self.device_type, self.device_id)

    def _run(self, session: ort.InferenceSession, device: dict[str, Tensor], host: dict[str, np.ndarray]) -> Pair:
        """Run a small graph with K/V inputs on the device and index inputs from the host."""
        binding = session.io_binding()
        for name, value in device.items():
            binding.bind_ortvalue_input(name, self.upload(value))
        for name, array in host.items():
            binding.bind_cpu_input(name, array)
        for name in ("key_out", "value_out"):
            binding.bind_output(name, self.device_type, self.device_id)
        session.run_with_iobinding(binding)
        key, value = binding.get_outputs()
        return key, value

    def take(self, key: Tensor, value: Tensor, rows: np.ndarray, start: int, end: int) -> Pair:
        """key/value[:, rows, :, start:end]: rows (K,) int64 in the order wanted."""
        return self._run(self._take, {"key": key, "value": value},
                         {"rows": np.asarray(rows, dtype=np.int64), "start": np.array([start], dtype=np.int64),
                          "end": np.array([end], dtype=np.int64)})

    def pad_concat(self, a_key: Tensor, a_value: Tensor, a_pad: tuple[int, int],
                   b_key: Tensor, b_value: Tensor, b_pad: tuple[int, int]) -> Pair:
        """a's rows then b's on axis 1, each first zero-padded (before, after) on axis 3."""
        return self._run(self._pad_concat, {"a_key": a_key, "a_value": a_value, "b_key": b_key, "b_value": b_value},
                         {"a_pads": _pads(*a_pad), "b_pads": _pads(*b_pad)})

    def decode(self, tokens: np.ndarray, positions: np.ndarray, past_key: Tensor, past_value: Tensor,
               self_mask: np.ndarray, cross_key: Tensor, cross_value: Tensor,
               source_mask: np.ndarray) -> tuple[np.ndarray, ort.OrtValue, ort.OrtValue, np.ndarray]:
        """One decoder step (shapes as `OnnxSeq2Seq.decode`): logits and alignment come back to the
        host, present K/V stay on the device."""
        binding = self.decoder.io_binding()
        host = {"tokens": tokens, "positions": positions, "self_mask": self_mask, "source_mask": source_mask}
        for name, array in host.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        device = {"past_key": past_key, "past_value": past_value, "cross_key": cross_key, "cross_value": cross_value}
        for name, value in device.items():
            binding.bind_ortvalue_input(name, self.upload(value))
        # Bound in DECODER_OUTPUTS order, so get_outputs() returns them in that order.
        for name in names.DECODER_OUTPUTS:
            if name in ("present_key", "present_value"):
                binding.bind_output(name, self.device_type, self.device_id)  # ORT allocates on the device
            else:
                binding.bind_output(name, "cpu")  # logits, alignment: ORT copies them out after the run
        self.decoder.run_with_iobinding(binding)
        logits, present_key, present_value, alignment = binding.get_outputs()
        # numpy() on a CPU OrtValue is a view that keeps the value alive: no further copy.
        return logits.numpy(), present_key, present_value, alignment.numpy()


def to_numpy(x: Tensor) -> np.ndarray:
    """A cache tensor on the host, wherever it lives (tests, debugging)."""
    return x.numpy() if isinstance(x, ort.OrtValue) else x
