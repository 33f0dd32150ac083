"""The training loss: label-smoothed cross-entropy summed over the real target tokens, in one pass.

`nn.CrossEntropyLoss(label_smoothing=...)` on fp32 logits copied from the bf16 ones computes a
log-softmax over the vocabulary, then the target's term and the smoothing term as separate
passes, each with its own backward. Here the forward pass is one log-softmax (in fp32, read
straight from the bf16 logits), a gather and a mean, and the backward pass writes the gradient
in one buffer: softmax - (1 - e) * onehot(target) - e / V, zero at padding. On the demo model
(4,000 target tokens a step, vocabulary 616, one CPU thread) a step took about 8 ms less of 160.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _LabelSmoothedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, smoothing: float, ignore_index: int) -> Tensor:
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (N, V)
        keep = target != ignore_index
        index = target.masked_fill(~keep, 0)[:, None]  # (N, 1): padding points anywhere, then weighs 0
        nll = -logp.gather(1, index)[:, 0]
        smooth = -logp.mean(dim=-1)
        ctx.save_for_backward(logp, index, keep)
        ctx.smoothing, ctx.dtype = smoothing, logits.dtype
        return (((1 - smoothing) * nll + smoothing * smooth) * keep).sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        logp, index, keep = ctx.saved_tensors
        e = ctx.smoothing
        g = logp.exp()  # softmax
        g.sub_(e / g.shape[-1])
        g.scatter_add_(1, index, g.new_full(index.shape, -(1 - e)))
        g.mul_((keep.to(g.dtype) * grad)[:, None])
        return g.to(ctx.dtype), None, None, None


def label_smoothed_nll_sum(logits: Tensor, target: Tensor, *, smoothing: float, ignore_index: int) -> Tensor:
    """Cross-entropy with label smoothing `smoothing`, summed over the tokens of `target` that are
    not `ignore_index`: logits (N, V) in any float dtype, target (N,) -> fp32 scalar. Equals
    `nn.CrossEntropyLoss(ignore_index=..., label_smoothing=..., reduction="sum")` on fp32 logits."""
    return _LabelSmoothedSum.apply(logits, target, smoothing, ignore_index)
