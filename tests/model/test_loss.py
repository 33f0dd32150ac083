"""The training loss: the same value and gradient as torch's label-smoothed cross-entropy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seqserve.model.loss import label_smoothed_nll_sum


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_equals_torch_cross_entropy_with_padding_ignored(smoothing: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(50, 37, generator=gen, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 37, (50,), generator=gen)
    target[::7] = 0  # padding
    reference = nn.CrossEntropyLoss(ignore_index=0, label_smoothing=smoothing, reduction="sum")(logits, target)
    (expected,) = torch.autograd.grad(2.5 * reference, logits)
    loss = label_smoothed_nll_sum(logits, target, smoothing=smoothing, ignore_index=0)
    (grad,) = torch.autograd.grad(2.5 * loss, logits)
    assert loss.dtype == torch.float32  # computed in fp32, whatever the logits' dtype
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6, check_dtype=False)
    assert grad.dtype == logits.dtype and not grad[::7].any()  # nothing flows back from padding


def test_bf16_logits_give_a_bf16_gradient_close_to_fp32() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 616, generator=gen)
    target = torch.randint(1, 616, (64,), generator=gen)
    half = logits.bfloat16().requires_grad_()
    loss = label_smoothed_nll_sum(half, target, smoothing=0.1, ignore_index=0)
    loss.backward()
    reference = nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum")(half.detach().float(), target)
    assert half.grad.dtype == torch.bfloat16
    assert float(loss.detach()) == pytest.approx(float(reference), rel=1e-5)


def test_a_target_whose_probability_underflows_still_gives_the_exact_loss() -> None:
    # a confident wrong prediction: the target's probability is e^-150, below what fp32 holds
    logits = torch.zeros(3, 10)
    logits[:, 2] = 150.0
    logits[1, 5] = 40.0
    target = torch.tensor([7, 7, 2])
    loss = label_smoothed_nll_sum(logits, target, smoothing=0.1, ignore_index=0)
    reference = nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum")(logits.double(), target)
    assert torch.isfinite(loss) and float(loss) == pytest.approx(float(reference), rel=1e-6)
