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
from typing import Any

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


def attention_bias(mask: Tensor) -> Tensor:
    """A boolean mask (True where attended) as the additive fp32 bias the fused path takes: 0 where
    attended, the lowest fp32 value elsewhere (so a fully masked row softmaxes to uniform, as in
    `attend`). Built once per pass and shared by every layer."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
        ~mask, torch.finfo(torch.float32).min)


class _FusedAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(Dh) + bias) v with its backward written out, for training.

    The same arithmetic as `MultiHeadAttention.attend`, arranged for speed on short rows: torch's
    softmax kernel took about 230 ns per row of 13 keys on a CPU core (18 ns a score), while the
    same softmax as whole-tensor max, exp, sum and divide ran 4-5x faster; the backward is five
    tensor operations instead of autograd's chain of about a dozen nodes, and the probabilities are
    kept once, in fp32. Matrix multiplies run in the inputs' dtype (bf16 under autocast), the
    softmax in fp32.

    Shifted scores are clamped at -80 before the exponential: torch's CPU exp took 12-35x as long
    on inputs whose result is subnormal or zero (below about -87: masked slots, of which a causal
    mask makes nearly half) as on the rest, and this halved the time of a decoder self-attention's
    forward and backward on the demo's shapes (2.0 to 1.1 ms). A masked slot's weight is then
    e^-80 of the row's largest (1.8e-35) instead of exactly zero; a fully masked row stays uniform.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout: float) -> Tensor:
        scale = q.shape[-1] ** -0.5
        softmax_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        p = torch.matmul(q, k.transpose(-2, -1)).to(softmax_dtype)  # (B, H, T, S) scores
        p.mul_(scale).add_(bias)
        p.sub_(p.amax(dim=-1, keepdim=True)).clamp_min_(-80.0).exp_()
        p.div_(p.sum(dim=-1, keepdim=True))  # softmax
        keep = None
        if dropout > 0:
            keep = torch.empty_like(p).bernoulli_(1 - dropout).div_(1 - dropout)  # 0 or 1/(1-dropout)
        out = torch.matmul((p if keep is None else p * keep).to(v.dtype), v)  # (B, H, T, Dh)
        ctx.save_for_backward(q, k, v, p, keep)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        q, k, v, p, keep = ctx.saved_tensors
        grad = grad.to(v.dtype).contiguous()  # arrives as a view of the merged heads; read twice below
        dropped = p if keep is None else p * keep
        dv = torch.matmul(dropped.to(v.dtype).transpose(-2, -1), grad)  # (B, H, S, Dh)
        dp = torch.matmul(grad, v.transpose(-2, -1)).to(p.dtype)  # (B, H, T, S)
        if keep is not None:
            dp.mul_(keep)
        # softmax backward: p * (dp - sum(dp * p)), then the scale of the scores
        dp.sub_((dp * p).sum(dim=-1, keepdim=True)).mul_(p).mul_(ctx.scale)
        ds = dp.to(q.dtype)
        return torch.matmul(ds, k), torch.matmul(ds.transpose(-2, -1), q), dv, None, None


def fused_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout: float = 0.0) -> Tensor:
    """Attention of q (B, H, T, Dh) over k, v (B, H, S, Dh) with an additive `bias` (broadcast to
    B, H, T, S) from `attention_bias`, dropout on the weights: (B, H, T, Dh)."""
    return _FusedAttention.apply(q, k, v, bias, dropout)


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

    def attend_fused(self, x: Tensor, bias: Tensor, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """`attend` for the training pass: x (B, T, D) over its own keys and values (kv None: Q, K
        and V in one matrix multiply) or over given contiguous kv (B, H, S, Dh) each, with an
        additive `bias` from `attention_bias`; returns the output (B, T, D)."""
        b, t, d = x.shape
        if kv is None:
            heads = project_heads(x, [self.q_proj, self.k_proj, self.v_proj], self.n_heads)  # (3, B, H, T, Dh)
            q, k, v = heads.unbind(0)
        else:
            q = self.split_heads(self.q_proj(x)).contiguous()
            k, v = kv
        out = fused_attention(q, k, v, bias, self.dropout.p if self.training else 0.0)  # (B, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


def project_heads(x: Tensor, projections: list[nn.Linear], n_heads: int) -> Tensor:
    """Several linear maps of x (B, T, D) as one matrix multiply, split into heads: (N, B, H, T, Dh),
    contiguous, so attention's batched multiplies read each head without copying it again."""
    b, t, _ = x.shape
    weight = torch.cat([p.weight for p in projections]) if len(projections) > 1 else projections[0].weight
    bias = torch.cat([p.bias for p in projections]) if len(projections) > 1 else projections[0].bias
    y = nn.functional.linear(x, weight, bias)  # (B, T, N*D)
    return y.view(b, t, len(projections), n_heads, -1).permute(2, 0, 3, 1, 4).contiguous()


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

    def forward_fused(self, x: Tensor, bias: Tensor) -> Tensor:
        """`forward` for the training pass, with the mask as an additive bias (`attention_bias`)."""
        x = self.norm1(x + self.dropout(self.self_attn.attend_fused(x, bias)))
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

    def forward_fused(self, x: Tensor, self_bias: Tensor, cross_kv: tuple[Tensor, Tensor],
                      source_bias: Tensor) -> Tensor:
        """`forward` for the training pass: no cache, masks as additive biases, cross K/V given."""
        x = self.norm1(x + self.dropout(self.self_attn.attend_fused(x, self_bias)))
        x = self.norm2(x + self.dropout(self.cross_attn.attend_fused(x, source_bias, cross_kv)))
        return self.norm3(x + self.dropout(self.feed_forward(x)))


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
        other), arranged for training: masks become additive biases built once and shared by every
        layer, attention runs through `fused_attention`, Q, K and V of a self-attention come from
        one matrix multiply and so do all the layers' cross-attention K and V, and no cache is
        concatenated or stacked.
        """
        source_mask = source_ids != self.cfg.pad_id
        b, s = source_ids.shape
        t = target_in.shape[1]
        source_bias = attention_bias(source_mask[:, None, None, :])  # (B, 1, 1, S)
        device = source_ids.device.type
        # Under a CPU's autocast the residual stream is kept in its dtype (bf16) from the embedding
        # on: layer norms take and give bf16 (their statistics in fp32), and every linear map reads
        # its input without a cast, where an fp32 stream was cast again for each matrix. (CUDA's
        # autocast runs layer norms in fp32, so there the stream is fp32 after the first one.)
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        x = self.embed(source_ids, torch.arange(s, device=source_ids.device).expand(b, s)).to(low)
        for layer in self.encoder:
            x = layer.forward_fused(x, source_bias)
        # every decoder layer's cross-attention keys and values in one matrix multiply
        cross = project_heads(x, [p for layer in self.decoder for p in (layer.cross_attn.k_proj, layer.cross_attn.v_proj)],
                              self.cfg.n_heads)  # (2L, B, H, S, Dh)
        self_bias = attention_bias((target_in != self.cfg.pad_id)[:, None, None, :]
                                   & causal_mask(t, 0, target_in.device))  # (B, 1, T, T)
        y = self.embed(target_in, torch.arange(t, device=target_in.device).expand(b, t)).to(low)
        cross_kv = cross.unbind(0)  # one view each; its backward stacks the gradients in one copy
        for i, layer in enumerate(self.decoder):
            y = layer.forward_fused(y, self_bias, (cross_kv[2 * i], cross_kv[2 * i + 1]), source_bias)
        return y @ self.embedding.weight.t()  # (B, T, V)


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
