"""The encoder-decoder Transformer of "Attention is all you need", in the paper's order.

Read top-down: positional encoding, attention, feed-forward, encoder layer, decoder layer, and
the Transformer itself. `encode` and `decode` split exactly where the two ONNX graphs split:
`encode` returns the cross-attention keys/values of every decoder layer (computed once per
request), and `decode` takes the self-attention cache as explicit tensors and returns the grown
cache, so the code that trains is the code that exports.

Shapes: B batch, S source length, T new target tokens, P cached target tokens, D d_model,
H heads, Dh head width, L decoder layers, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from seqserve.runtime.config import ModelConfig


class PositionalEncoding(nn.Module):
    """Sine-cosine positional encoding, looked up by explicit position so rows may differ."""

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]  # (max_len, 1)
        div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)  # (max_len, D)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        """(B, T) int positions -> (B, T, D) encodings."""
        return self.pe[positions]


def causal_mask(t: int, p: int, device: torch.device) -> Tensor:
    """(T, P+T): True where each of T new tokens after P cached ones may attend (every cached
    token, and the new ones up to itself)."""
    key_pos = torch.arange(p + t, device=device)  # (P+T,)
    query_pos = torch.arange(t, device=device) + p  # (T,)
    return key_pos[None, :] <= query_pos[:, None]


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over H heads, with separate projections for Q, K, V and output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, H, T, Dh)."""
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of a sequence, (B, H, S, Dh) each."""
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Queries from x (B, T, D) over k, v (B, H, S, Dh) where mask (broadcast to B, H, T, S) is True.

        Returns the output (B, T, D) and the attention weights (B, H, T, S).
        """
        q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, S)
        # The dtype's lowest value rather than -inf: a fully masked row then softmaxes to a uniform
        # row instead of NaN, and masked slots still get a weight of exactly zero otherwise.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)
        out = self.dropout(weights) @ v  # (B, H, T, Dh)
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, D)
        return self.out_proj(out), weights


class FeedForward(nn.Module):
    """Position-wise feed-forward network: two linear maps with a ReLU between."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.linear2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.linear2(self.dropout(torch.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each wrapped as LayerNorm(x + Dropout(sublayer(x)))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, S, D), mask (B, 1, 1, S) True at real tokens -> (B, S, D)."""
        k, v = self.self_attn.project_kv(x)
        x = self.norm1(x + self.dropout(self.self_attn.attend(x, k, v, mask)[0]))
        return self.norm2(x + self.dropout(self.feed_forward(x)))


class DecoderLayer(nn.Module):
    """Masked self-attention over the cache, cross-attention to the encoder, then feed-forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg)
        self.cross_attn = MultiHeadAttention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.norm3 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor, self_mask: Tensor,
                cross_k: Tensor, cross_v: Tensor, source_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B, T, D) with past K/V (B, H, P, Dh) -> x, present K/V (B, H, P+T, Dh), cross weights (B, H, T, S)."""
        k, v = self.self_attn.project_kv(x)
        k = torch.cat([past_k, k], dim=2)  # (B, H, P+T, Dh)
        v = torch.cat([past_v, v], dim=2)  # (B, H, P+T, Dh)
        x = self.norm1(x + self.dropout(self.self_attn.attend(x, k, v, self_mask)[0]))
        attended, weights = self.cross_attn.attend(x, cross_k, cross_v, source_mask)
        x = self.norm2(x + self.dropout(attended))
        x = self.norm3(x + self.dropout(self.feed_forward(x)))
        return x, k, v, weights


class Transformer(nn.Module):
    """Encoder-decoder Transformer with one shared embedding for source, target and output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positional = PositionalEncoding(cfg.d_model, max(cfg.max_source_len, cfg.max_target_len) + 1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices, zero biases; embeddings N(0, D^-1/2) since they are scaled by sqrt(D)."""
        for name, p in self.named_parameters():
            if name == "embedding.weight":
                nn.init.normal_(p, std=self.cfg.d_model ** -0.5)
            elif p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        """(B, T) ids at (B, T) positions -> (B, T, D): scaled embedding plus position, with dropout."""
        return self.dropout(self.embedding(ids) * math.sqrt(self.cfg.d_model) + self.positional(positions))

    def encode(self, source_ids: Tensor, source_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Source (B, S) and its mask (B, S, True at real tokens) -> cross-attention K and V, (L, B, H, S, Dh) each."""
        b, s = source_ids.shape
        positions = torch.arange(s, device=source_ids.device).expand(b, s)  # (B, S)
        x = self.embed(source_ids, positions)
        mask = source_mask[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.encoder:
            x = layer(x, mask)
        keys, values = zip(*(layer.cross_attn.project_kv(x) for layer in self.decoder))
        return torch.stack(keys), torch.stack(values)  # (L, B, H, S, Dh)

    def decode(self, tokens: Tensor, positions: Tensor, past_key: Tensor, past_value: Tensor,
               self_mask: Tensor, cross_key: Tensor, cross_value: Tensor,
               source_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """T new tokens per row after a cache of P slots.

        tokens, positions (B, T); past_key/value (L, B, H, P, Dh); self_mask (B, P+T) True at the
        slots a row may attend to (its real cached tokens and its new ones); cross K/V from
        `encode`; source_mask (B, S). New tokens also see each other causally.
        Returns logits (B, T, V), present K/V (L, B, H, P+T, Dh) and the alignment: cross-attention
        weights of layer `cfg.alignment_layer` averaged over heads (B, T, S).
        """
        t, p = tokens.shape[1], past_key.shape[3]
        attn_mask = self_mask[:, None, None, :] & causal_mask(t, p, tokens.device)  # (B, 1, T, P+T)
        cross_mask = source_mask[:, None, None, :]  # (B, 1, 1, S)
        x = self.embed(tokens, positions)
        keys, values, alignment = [], [], None
        for i, layer in enumerate(self.decoder):
            x, k, v, weights = layer(x, past_key[i], past_value[i], attn_mask, cross_key[i], cross_value[i], cross_mask)
            keys.append(k)
            values.append(v)
            if i == self.cfg.alignment_layer_index:
                alignment = weights.mean(dim=1)  # (B, T, S)
        logits = x @ self.embedding.weight.t()  # (B, T, V): the output projection is the shared embedding
        return logits, torch.stack(keys), torch.stack(values), alignment

    def empty_cache(self, batch: int, device: torch.device | None = None) -> Tensor:
        """A zero-length self-attention cache, (L, B, H, 0, Dh)."""
        cfg = self.cfg
        return torch.zeros(cfg.decoder_layers, batch, cfg.n_heads, 0, cfg.head_dim, device=device)

    def forward(self, source_ids: Tensor, target_in: Tensor) -> Tensor:
        """Teacher-forced training pass: all target positions in parallel, (B, T) -> logits (B, T, V).

        The arithmetic of `encode` then `decode` with an empty cache (the tests hold them to each
        other), as one autograd function with its backward written out (`training_pass`): under
        autocast the matrices, the activations between layers and the logits are in its dtype.
        """
        from seqserve.model.training_pass import training_pass  # it builds on this module's pieces

        return training_pass(self, source_ids, target_in)


@torch.no_grad()
def greedy_decode(model: Transformer, source_ids: Tensor, *, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding with the KV cache, one token per step for the whole batch; EOS not included."""
    cfg = model.cfg
    source_mask = source_ids != cfg.pad_id
    cross_key, cross_value = model.encode(source_ids, source_mask)
    b = source_ids.shape[0]
    past_key = past_value = model.empty_cache(b, source_ids.device)
    tokens = torch.full((b, 1), cfg.bos_id, dtype=torch.long, device=source_ids.device)
    self_mask = torch.ones(b, 0, dtype=torch.bool, device=source_ids.device)
    done = torch.zeros(b, dtype=torch.bool, device=source_ids.device)
    out: list[list[int]] = [[] for _ in range(b)]
    for step in range(max_new_tokens):
        positions = torch.full((b, 1), step, dtype=torch.long, device=source_ids.device)
        self_mask = torch.cat([self_mask, torch.ones(b, 1, dtype=torch.bool, device=source_ids.device)], dim=1)
        logits, past_key, past_value, _ = model.decode(tokens, positions, past_key, past_value, self_mask,
                                                       cross_key, cross_value, source_mask)
        tokens = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        for row in (~done).nonzero().flatten().tolist():
            token = int(tokens[row])
            if token == cfg.eos_id:
                done[row] = True
            else:
                out[row].append(token)
        if bool(done.all()):
            break
    return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (shared weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
