"""The names shared by the exporter and the server: files of a model directory, graph inputs and
outputs, and which of their axes are dynamic. Torch-free, so the serving side can import it."""

from __future__ import annotations

FORMAT_VERSION = 1  # bumped when the model directory layout or graph signatures change

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
GRAPH_FILES = (ENCODER_FILE, DECODER_FILE)
# Each graph's weights live beside it as ONNX external data, which ONNX Runtime maps from the file
# instead of copying out of the protobuf: pages it never touches (most embedding rows in the
# encoder, weights it has repacked) need no memory of their own.
WEIGHTS_SUFFIX = ".data"
MODEL_DIR_FILES = (CONFIG_FILE, TOKENIZER_FILE, *(f + s for f in GRAPH_FILES for s in ("", WEIGHTS_SUFFIX)))


def weights_file(graph_file: str) -> str:
    """The external-data file of a graph: encoder.onnx -> encoder.onnx.data."""
    return graph_file + WEIGHTS_SUFFIX

# Encoder: source ids (B, S) int64 and mask (B, S) bool -> cross-attention K/V (L, B, H, S, Dh) float32.
ENCODER_INPUTS = ("source_ids", "source_mask")
ENCODER_OUTPUTS = ("cross_key", "cross_value")

# Decoder step: T new tokens per row after a cache of P slots.
#   tokens, positions (B, T) int64; past_key/value (L, B, H, P, Dh); self_mask (B, P+T) bool, True at
#   slots the row may attend to; cross_key/value (L, B, H, S, Dh); source_mask (B, S) bool.
#   -> logits (B, T, V); present_key/value (L, B, H, P+T, Dh); alignment (B, T, S).
DECODER_INPUTS = ("tokens", "positions", "past_key", "past_value", "self_mask", "cross_key", "cross_value",
                  "source_mask")
DECODER_OUTPUTS = ("logits", "present_key", "present_value", "alignment")

# Symbolic axis names written into the graphs, per tensor: axis index -> name.
DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "source_ids": {0: "batch", 1: "source_len"},
    "source_mask": {0: "batch", 1: "source_len"},
    "cross_key": {1: "batch", 3: "source_len"},
    "cross_value": {1: "batch", 3: "source_len"},
    "tokens": {0: "batch", 1: "new_len"},
    "positions": {0: "batch", 1: "new_len"},
    "past_key": {1: "batch", 3: "past_len"},
    "past_value": {1: "batch", 3: "past_len"},
    "self_mask": {0: "batch", 1: "total_len"},
    "logits": {0: "batch", 1: "new_len"},
    "present_key": {1: "batch", 3: "total_len"},
    "present_value": {1: "batch", 3: "total_len"},
    "alignment": {0: "batch", 1: "new_len", 2: "source_len"},
}
