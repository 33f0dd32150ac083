"""The teacher-forced training pass of `Transformer` as one autograd function, backward written out.

The arithmetic is that of `Transformer.encode` then `Transformer.decode` with an empty cache (the
tests hold them to each other in value and in every parameter's gradient), arranged for speed:

- **One node instead of about 300.** Run op by op, a training step of the demo model recorded
  about 300 autograd nodes (each linear map alone: its weight's and bias's casts, the matrix
  multiply, views, transposes, two gradient accumulations). A step of two sentences, where the
  arithmetic is nothing, still took 11 ms on one CPU core, about a quarter of a real step's. Here
  the forward runs with autograd and autocast off and keeps what the backward reads; the backward
  is the chain rule written out, some 190 tensor operations for the demo model.
- **Casts once.** Under autocast (bf16 on a CPU with bf16 units) every weight matrix is cast to
  the low dtype once per pass, activations stay in it between layers (layer norms read and write
  it, with fp32 statistics and fp32 weights on a CPU), and gradients come back in the parameters'
  dtype.
- **Fused projections.** Q, K and V of each self-attention come from one matrix multiply, and so
  do the cross-attention keys and values of every decoder layer; heads are made contiguous once.
- **Attention in fp32 where it matters.** Scores, softmax and its backward are whole-tensor
  operations in fp32 (torch's softmax kernel took about 230 ns per row of 13 keys on a CPU core,
  these a fifth of that); the batched products run in the low dtype. Shifted scores are clamped
  at -80 before the exponential: torch's CPU exp took 12-35x as long on inputs whose result is
  subnormal or zero (masked slots, nearly half of a causal mask). A masked slot's weight is then
  e^-80 of the row's largest (1.8e-35) instead of exactly zero; a fully masked row stays uniform,
  as in `MultiHeadAttention.attend`.

- **Fused CPU kernels** where they could be built (`kernels.py`): the attention softmax and its
  backward, each residual add with its layer norm, and the norm's backward (which also sums the
  two gradients a residual's input gets), one pass over rows each; the copies between head
  layouts row by row. PyTorch operations take their
  place elsewhere (GPUs, fp64, dropout on the attention weights) and where `kernels.switched(False)`.

Shapes: B batch, S source length, T target length, N = B*S or B*T rows, D d_model, H heads,
Dh head width, L decoder layers, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from seqserve.model import kernels
from seqserve.model.transformer import Transformer, causal_mask

SCORE_FLOOR = -80.0  # shifted attention scores are clamped here before exp (see above)


def attention_bias(mask: Tensor) -> Tensor:
    """A boolean mask (True where attended) as an additive fp32 bias: 0 where attended, the lowest
    fp32 value elsewhere (so a fully masked row softmaxes to uniform, as in `attend`)."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
        ~mask, torch.finfo(torch.float32).min)


class Weights(NamedTuple):
    """What `attention_backward` reads of a forward: the attention weights in fp32 (fp64 for fp64
    inputs), the scaled dropout mask (None without dropout), and the weights in the values' dtype
    when the forward made them (the fused kernel does)."""
    p: Tensor
    keep: Tensor | None
    low: Tensor | None


def attention_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout: float,
                      ops: Any = None) -> tuple[Tensor, Weights]:
    """softmax(q k^T / sqrt(Dh) + bias) v for q (B, H, T, Dh) over k, v (B, H, S, Dh), dropout on
    the weights; bias broadcasts to (B, H, T, S). Returns the output (B, H, T, Dh) and what the backward
    reads. With `ops` (the fused kernels, `kernels.get`), no dropout and one bias for all heads
    (B, 1, 1 or T, S), scale, bias and softmax are one kernel that also writes the weights in the
    values' dtype."""
    scale = q.shape[-1] ** -0.5
    if ops is not None and dropout == 0 and bias.shape[1] == 1:
        p, low = ops.attention_softmax(torch.matmul(q, k.transpose(-2, -1)), bias[:, 0], scale, SCORE_FLOOR)
        return torch.matmul(low, v), Weights(p, None, low)
    # scale, bias and the cast to fp32 in one pass: (B, H, T, S) scores
    p = torch.add(bias, torch.matmul(q, k.transpose(-2, -1)), alpha=scale)
    p.sub_(p.amax(dim=-1, keepdim=True)).clamp_min_(SCORE_FLOOR).exp_()
    p.div_(p.sum(dim=-1, keepdim=True))  # softmax
    keep = None
    if dropout > 0:
        keep = torch.empty_like(p).bernoulli_(1 - dropout).div_(1 - dropout)  # 0 or 1/(1-dropout)
    out = torch.matmul((p if keep is None else p * keep).to(v.dtype), v)
    return out, Weights(p, keep, None)


def attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Weights, ops: Any = None,
                       out: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k and v from the output's gradient (B, H, T, Dh), contiguous, in v's dtype;
    written into `out` (three contiguous tensors) when given."""
    dq, dk, dv = out if out is not None else (None, None, None)
    scale = q.shape[-1] ** -0.5
    dropped = w.low if w.low is not None else (w.p if w.keep is None else w.p * w.keep).to(v.dtype)
    dv = torch.matmul(dropped.transpose(-2, -1), grad, out=dv)  # (B, H, S, Dh)
    dp = torch.matmul(grad, v.transpose(-2, -1))  # (B, H, T, S), in v's dtype
    if ops is not None and w.keep is None:
        ds = ops.attention_softmax_backward(dp, w.p, scale)
    else:
        if w.keep is not None:
            dp = dp * w.keep
        # softmax backward, p * (dp - sum(dp * p)), and the scores' scale, back in q's dtype
        ds = torch.sub(dp, (dp * w.p).sum(dim=-1, keepdim=True)).mul_(w.p)
        ds = torch.mul(ds, scale, out=torch.empty(ds.shape, dtype=q.dtype, device=ds.device))
    dq = torch.matmul(ds, k, out=dq)
    dk = torch.matmul(ds.transpose(-2, -1), q, out=dk)
    return dq, dk, dv


class _Dropout:
    """Inverted dropout whose masks are kept for the backward, in the order they were drawn."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.p == 0:
            return x, None
        keep = torch.empty_like(x).bernoulli_(1 - self.p).div_(1 - self.p)  # as nn.functional.dropout
        return x * keep, keep


def _masked(g: Tensor, keep: Tensor | None) -> Tensor:
    return g if keep is None else g * keep


class _Grads:
    """Gradients by parameter, returned in the order of the parameters given to the function."""

    def __init__(self, params: tuple[nn.Parameter, ...]) -> None:
        self.index = {id(p): i for i, p in enumerate(params)}
        self.out: list[Tensor | None] = [None] * len(params)

    def set(self, param: nn.Parameter, grad: Tensor) -> None:
        self.out[self.index[id(param)]] = grad.to(param.dtype)

    def linear(self, linears: list[nn.Linear], grad_out: Tensor, x: Tensor) -> None:
        """Weight and bias gradients of linear maps applied together to x (N, in), whose stacked
        outputs got grad_out (N, sum of outs)."""
        weight = torch.mm(grad_out.t(), x)  # (out, in)
        bias = grad_out.sum(dim=0)  # in grad_out's dtype: sum(dtype=...) would first copy all of grad_out
        start = 0
        for lin in linears:
            end = start + lin.out_features
            self.set(lin.weight, weight[start:end])
            self.set(lin.bias, bias[start:end])
            start = end


def _stacked(linears: list[nn.Linear], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The weights and biases of linear maps on one input, stacked and cast: (sum of outs, in), (sum,)."""
    if len(linears) == 1:
        return linears[0].weight.to(dtype), linears[0].bias.to(dtype)
    return (torch.cat([lin.weight for lin in linears]).to(dtype),
            torch.cat([lin.bias for lin in linears]).to(dtype))


class _LayerNorm:
    """LayerNorm(x + sub) on rows of the low dtype; fp32 statistics. A CPU takes the fp32 weights
    as they are (and, with the fused kernels, does the add and the norm in one pass); other
    devices get them cast to the rows' dtype, as their kernels want one dtype."""

    def __init__(self, norm: nn.LayerNorm, dtype: torch.dtype, device: torch.device, ops: Any) -> None:
        self.norm = norm
        cast = device.type != "cpu"
        self.weight = norm.weight.to(dtype) if cast else norm.weight
        self.bias = norm.bias.to(dtype) if cast else norm.bias
        self.ops = ops if not cast and norm.weight.dtype == torch.float32 else None

    def forward(self, x: Tensor, sub: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        if self.ops is not None:
            y, s, mean, rstd = self.ops.add_layer_norm(x, sub, self.weight, self.bias, self.norm.eps)
            return y, (s, mean, rstd)
        s = x + sub
        y, mean, rstd = torch.native_layer_norm(s, self.norm.normalized_shape, self.weight, self.bias, self.norm.eps)
        return y, (s, mean, rstd)

    def backward(self, grad: Tensor, extra: Tensor | None, saved: tuple[Tensor, Tensor, Tensor],
                 grads: _Grads) -> Tensor:
        """The gradient of x + sub for the output's gradient grad + extra (extra may be None)."""
        s, mean, rstd = saved
        if self.ops is not None:
            gx, gw, gb = self.ops.layer_norm_backward(grad, extra, s, mean, rstd, self.weight)
        else:
            if extra is not None:
                grad = grad + extra
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(grad, s, self.norm.normalized_shape, mean, rstd,
                                                                   self.weight, self.bias, [True, True, True])
        grads.set(self.norm.weight, gw)
        grads.set(self.norm.bias, gb)
        return gx


def _contiguous(x: Tensor, ops: Any) -> Tensor:
    """x (a view whose last dimension is contiguous) as a contiguous tensor: with the fused
    kernels, row by row (`rows_contiguous`; torch's strided copy took 3-4x as long on these shapes)."""
    return ops.rows_contiguous(x) if ops is not None else x.contiguous()


def _heads(y: Tensor, b: int, t: int, n: int, h: int, ops: Any) -> Tensor:
    """(B*T, n*D) stacked projections -> (n, B, H, T, Dh), contiguous."""
    return _contiguous(y.view(b, t, n, h, -1).permute(2, 0, 3, 1, 4), ops)


def _unheads(g: Tensor, ops: Any) -> Tensor:
    """(n, B, H, T, Dh) -> (B*T, n*D), the inverse layout of `_heads`."""
    n, b, h, t, dh = g.shape
    return _contiguous(g.permute(1, 3, 0, 2, 4), ops).view(b * t, n * h * dh)


def _merge(out: Tensor, ops: Any) -> Tensor:
    """(B, H, T, Dh) -> (B*T, D)."""
    b, h, t, dh = out.shape
    return _contiguous(out.transpose(1, 2), ops).view(b * t, h * dh)


def _split(g: Tensor, b: int, t: int, h: int, ops: Any) -> Tensor:
    """(B*T, D) -> (B, H, T, Dh), contiguous."""
    return _contiguous(g.view(b, t, h, -1).transpose(1, 2), ops)


class _Pass:
    """One forward of the training pass, keeping what its backward needs."""

    def __init__(self, model: Transformer, low: torch.dtype, dropout: float) -> None:
        self.model, self.cfg, self.low = model, model.cfg, low
        self.drop = _Dropout(dropout)
        self.p_attn = dropout

    # -- pieces ------------------------------------------------------------------------------

    def embed(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, T) ids at positions 0.. -> (B*T, D) in the low dtype: scaled embedding plus position."""
        b, t = ids.shape
        x = torch.embedding(self.model.embedding.weight, ids.reshape(-1)).mul_(math.sqrt(self.cfg.d_model))
        x = x.view(b, t, -1).add_(self.model.positional.pe[:t]).view(b * t, -1)
        x, keep = self.drop(x)
        return x.to(self.low), keep

    def embed_backward(self, g: Tensor, ids: Tensor, keep: Tensor | None, into: Tensor) -> None:
        g = _masked(g.to(into.dtype), keep).mul_(math.sqrt(self.cfg.d_model))
        into.index_add_(0, ids.reshape(-1), g)

    def self_attention(self, attn: nn.Module, x: Tensor, b: int, t: int, bias: Tensor) -> tuple[Tensor, dict]:
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        w, bb = _stacked(projections, self.low)
        heads = _heads(torch.addmm(bb, x, w.t()), b, t, 3, attn.n_heads, self.ops)  # (3, B, H, T, Dh)
        q, k, v = heads.unbind(0)
        out, weights = attention_forward(q, k, v, bias, self.p_attn, self.ops)
        merged = _merge(out, self.ops)
        wo = attn.out_proj.weight.to(self.low)
        o = torch.addmm(attn.out_proj.bias.to(self.low), merged, wo.t())
        return o, dict(attn=attn, x=x, w=w, heads=heads, weights=weights, merged=merged, wo=wo)

    def self_attention_backward(self, g: Tensor, s: dict, grads: _Grads) -> Tensor:
        """g (N, D) of the output -> gradient of x (N, D)."""
        attn, heads = s["attn"], s["heads"]
        grads.linear([attn.out_proj], g, s["merged"])
        _, b, h, t, _ = heads.shape
        g_out = _split(torch.mm(g, s["wo"]), b, t, h, self.ops)
        g_heads = torch.empty_like(heads)
        attention_backward(g_out, *heads.unbind(0), s["weights"], self.ops, out=tuple(g_heads.unbind(0)))
        g_qkv = _unheads(g_heads, self.ops)
        grads.linear([attn.q_proj, attn.k_proj, attn.v_proj], g_qkv, s["x"])
        return torch.mm(g_qkv, s["w"])

    def cross_attention(self, attn: nn.Module, x: Tensor, b: int, t: int, k: Tensor, v: Tensor,
                        bias: Tensor) -> tuple[Tensor, dict]:
        wq = attn.q_proj.weight.to(self.low)
        q = _split(torch.addmm(attn.q_proj.bias.to(self.low), x, wq.t()), b, t, attn.n_heads, self.ops)
        out, weights = attention_forward(q, k, v, bias, self.p_attn, self.ops)
        merged = _merge(out, self.ops)
        wo = attn.out_proj.weight.to(self.low)
        o = torch.addmm(attn.out_proj.bias.to(self.low), merged, wo.t())
        return o, dict(attn=attn, x=x, wq=wq, q=q, k=k, v=v, weights=weights, merged=merged, wo=wo)

    def cross_attention_backward(self, g: Tensor, s: dict, g_k: Tensor, g_v: Tensor, grads: _Grads) -> Tensor:
        """g (N, D) of the output -> gradient of x (N, D); the keys' and values' into g_k, g_v."""
        attn, q = s["attn"], s["q"]
        grads.linear([attn.out_proj], g, s["merged"])
        b, h, t, _ = q.shape
        g_out = _split(torch.mm(g, s["wo"]), b, t, h, self.ops)
        g_q = torch.empty_like(q)
        attention_backward(g_out, q, s["k"], s["v"], s["weights"], self.ops, out=(g_q, g_k, g_v))
        g_q = _merge(g_q, self.ops)
        grads.linear([attn.q_proj], g_q, s["x"])
        return torch.mm(g_q, s["wq"])

    def feed_forward(self, ff: nn.Module, x: Tensor) -> tuple[Tensor, dict]:
        w1, w2 = ff.linear1.weight.to(self.low), ff.linear2.weight.to(self.low)
        hidden = torch.addmm(ff.linear1.bias.to(self.low), x, w1.t()).relu_()
        dropped, keep = self.drop(hidden)
        return torch.addmm(ff.linear2.bias.to(self.low), dropped, w2.t()), dict(
            ff=ff, x=x, w1=w1, w2=w2, hidden=hidden, dropped=dropped, keep=keep)

    def feed_forward_backward(self, g: Tensor, s: dict, grads: _Grads) -> Tensor:
        ff = s["ff"]
        grads.linear([ff.linear2], g, s["dropped"])
        g_hidden = torch.ops.aten.threshold_backward(_masked(torch.mm(g, s["w2"]), s["keep"]), s["hidden"], 0)
        grads.linear([ff.linear1], g_hidden, s["x"])
        return torch.mm(g_hidden, s["w1"])

    def residual(self, x: Tensor, sub: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, dict]:
        """LayerNorm(x + Dropout(sub))."""
        sub, keep = self.drop(sub)
        ln = _LayerNorm(norm, self.low, x.device, self.ops)
        y, saved = ln.forward(x, sub)
        return y, dict(ln=ln, saved=saved, keep=keep)

    @staticmethod
    def residual_backward(g: Tensor, extra: Tensor | None, s: dict, grads: _Grads) -> tuple[Tensor, Tensor]:
        """The output's gradient g + extra (None: g alone) -> gradients of x and of the sublayer's output."""
        g = s["ln"].backward(g, extra, s["saved"], grads)
        return g, _masked(g, s["keep"])

    # -- the pass ----------------------------------------------------------------------------

    def forward(self, source_ids: Tensor, target_in: Tensor) -> Tensor:
        model, cfg = self.model, self.cfg
        b, s = source_ids.shape
        t = target_in.shape[1]
        self.shape = (b, s, t)
        self.source_ids, self.target_in = source_ids, target_in
        self.ops = kernels.get(source_ids.device, self.low)
        source_bias = attention_bias((source_ids != cfg.pad_id)[:, None, None, :])  # (B, 1, 1, S)
        self_bias = attention_bias((target_in != cfg.pad_id)[:, None, None, :]
                                   & causal_mask(t, 0, target_in.device))  # (B, 1, T, T)

        x, self.source_keep = self.embed(source_ids)
        self.encoder = []
        for layer in model.encoder:
            o, sa = self.self_attention(layer.self_attn, x, b, s, source_bias)
            x, r1 = self.residual(x, o, layer.norm1)
            o, ff = self.feed_forward(layer.feed_forward, x)
            x, r2 = self.residual(x, o, layer.norm2)
            self.encoder.append((sa, r1, ff, r2))

        # every decoder layer's cross-attention keys and values in one matrix multiply
        self.cross_linears = [p for layer in model.decoder for p in (layer.cross_attn.k_proj, layer.cross_attn.v_proj)]
        w, bb = _stacked(self.cross_linears, self.low)
        self.memory, self.cross_w = x, w
        self.cross = _heads(torch.addmm(bb, x, w.t()), b, s, len(self.cross_linears), cfg.n_heads, self.ops)  # (2L, B, H, S, Dh)

        y, self.target_keep = self.embed(target_in)
        self.decoder = []
        for i, layer in enumerate(model.decoder):
            o, sa = self.self_attention(layer.self_attn, y, b, t, self_bias)
            y, r1 = self.residual(y, o, layer.norm1)
            o, ca = self.cross_attention(layer.cross_attn, y, b, t, self.cross[2 * i], self.cross[2 * i + 1], source_bias)
            y, r2 = self.residual(y, o, layer.norm2)
            o, ff = self.feed_forward(layer.feed_forward, y)
            y, r3 = self.residual(y, o, layer.norm3)
            self.decoder.append((sa, r1, ca, r2, ff, r3))

        self.output, self.embedding_low = y, model.embedding.weight.to(self.low)
        return torch.mm(y, self.embedding_low.t()).view(b, t, -1)  # the output projection is the shared embedding

    def backward(self, g_logits: Tensor, grads: _Grads) -> None:
        b, s, t = self.shape
        g_logits = g_logits.reshape(b * t, -1).to(self.low)
        embedding = self.model.embedding.weight
        g_embedding = torch.mm(g_logits.t(), self.output).to(embedding.dtype)  # (V, D)
        g = torch.mm(g_logits, self.embedding_low)

        # a residual's input gets g through the add and g_add through the sublayer: the next layer
        # norm's backward takes the two and sums them itself
        g_cross, g_add = torch.empty_like(self.cross), None
        for i, (sa, r1, ca, r2, ff, r3) in reversed(list(enumerate(self.decoder))):
            g, g_sub = self.residual_backward(g, g_add, r3, grads)
            g_add = self.feed_forward_backward(g_sub, ff, grads)
            g, g_sub = self.residual_backward(g, g_add, r2, grads)
            g_add = self.cross_attention_backward(g_sub, ca, g_cross[2 * i], g_cross[2 * i + 1], grads)
            g, g_sub = self.residual_backward(g, g_add, r1, grads)
            g_add = self.self_attention_backward(g_sub, sa, grads)
        self.embed_backward(g + g_add, self.target_in, self.target_keep, g_embedding)

        g_cross = _unheads(g_cross, self.ops)
        grads.linear(self.cross_linears, g_cross, self.memory)
        g, g_add = torch.mm(g_cross, self.cross_w), None
        for sa, r1, ff, r2 in reversed(self.encoder):
            g, g_sub = self.residual_backward(g, g_add, r2, grads)
            g_add = self.feed_forward_backward(g_sub, ff, grads)
            g, g_sub = self.residual_backward(g, g_add, r1, grads)
            g_add = self.self_attention_backward(g_sub, sa, grads)
        self.embed_backward(g + g_add, self.source_ids, self.source_keep, g_embedding)
        grads.set(embedding, g_embedding)


class _TrainingPass(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, model: Transformer, source_ids: Tensor, target_in: Tensor, low: torch.dtype,
                dropout: float, *params: nn.Parameter) -> Tensor:
        with torch.autocast(source_ids.device.type, enabled=False):
            run = _Pass(model, low, dropout)
            logits = run.forward(source_ids, target_in)
        ctx.run, ctx.params = run, params
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_logits: Tensor) -> tuple[Tensor | None, ...]:
        grads = _Grads(ctx.params)
        ctx.run.backward(g_logits, grads)
        return (None, None, None, None, None, *grads.out)


def training_pass(model: Transformer, source_ids: Tensor, target_in: Tensor) -> Tensor:
    """Logits (B, T, V) of the teacher-forced pass over source (B, S) and shifted target (B, T),
    differentiable in every parameter of `model`. Under autocast the matrices run in its dtype
    and so do the logits; otherwise everything runs in the parameters' dtype."""
    device = source_ids.device.type
    params = tuple(model.parameters())
    low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else params[0].dtype
    dropout = model.cfg.dropout if model.training else 0.0
    return _TrainingPass.apply(model, source_ids, target_in, low, dropout, *params)
