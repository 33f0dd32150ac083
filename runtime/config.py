"""The one model configuration: every dimension of the Transformer, saved in every checkpoint
and in every exported model directory, so a model can always be rebuilt from its own files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from seqserve.runtime.errors import CheckpointError


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions, special token ids and length limits of an encoder-decoder Transformer."""

    vocab_size: int  # shared source/target vocabulary (one embedding for both sides and the output)
    d_model: int = 512  # width of every residual stream
    encoder_layers: int = 6  # N in the paper, encoder side
    decoder_layers: int = 6  # N in the paper, decoder side
    n_heads: int = 8  # M attention heads; d_model must divide evenly among them
    d_ff: int = 2048  # inner width of the position-wise feed-forward network
    dropout: float = 0.1  # applied to sub-layer outputs, embeddings+positions and attention weights
    max_source_len: int = 256  # longest source (in tokens, EOS included) the model accepts
    max_target_len: int = 256  # longest target (in tokens, EOS included) the model generates
    pad_id: int = 0  # padding: masked out of attention and of the loss
    bos_id: int = 1  # first decoder input token
    eos_id: int = 2  # ends source and target sequences
    unk_id: int = 3  # tokenizer's unknown token
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm
    alignment_layer: int = -1  # decoder layer whose cross-attention (head mean) the decoder returns

    def __post_init__(self) -> None:
        """Reject configurations that cannot build a model, naming the field."""
        for name in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "n_heads", "d_ff",
                     "max_source_len", "max_target_len"):
            if getattr(self, name) < 1:
                raise CheckpointError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise CheckpointError(f"model config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise CheckpointError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if not -self.decoder_layers <= self.alignment_layer < self.decoder_layers:
            raise CheckpointError(f"model config: alignment_layer {self.alignment_layer} out of range "
                                  f"for {self.decoder_layers} decoder layers")
        for name in ("pad_id", "bos_id", "eos_id", "unk_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise CheckpointError(f"model config: {name} {getattr(self, name)} outside vocabulary of {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head (Dh)."""
        return self.d_model // self.n_heads

    @property
    def alignment_layer_index(self) -> int:
        """`alignment_layer` as a non-negative index."""
        return self.alignment_layer % self.decoder_layers

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON and checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from `to_dict` output; unknown or missing fields are a CheckpointError."""
        if not isinstance(data, dict):
            raise CheckpointError(f"model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"model config has unknown fields: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise CheckpointError(f"model config: {exc}") from None


# The paper's two configurations (Vaswani et al. 2017, Table 3), with its 37k shared vocabulary.
BASE = dict(d_model=512, encoder_layers=6, decoder_layers=6, n_heads=8, d_ff=2048, dropout=0.1)
BIG = dict(d_model=1024, encoder_layers=6, decoder_layers=6, n_heads=16, d_ff=4096, dropout=0.3)
