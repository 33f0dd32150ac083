"""Adam stepped on the flat parameter buffer: the updates and the state dict of per-parameter Adam."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seqserve.model.flat_adam import FlatAdam
from seqserve.model.transformer import Transformer
from seqserve.model.workers import shared_flat
from seqserve.runtime.config import ModelConfig

CFG = ModelConfig(vocab_size=30, d_model=16, encoder_layers=1, decoder_layers=1, n_heads=2, d_ff=32,
                  dropout=0.0, max_source_len=8, max_target_len=8)
ARGS = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-9, fused=True)


def _models() -> tuple[nn.Module, nn.Module, FlatAdam, torch.optim.Adam]:
    torch.manual_seed(0)
    flat_model = Transformer(CFG)
    plain_model = Transformer(CFG)
    plain_model.load_state_dict(flat_model.state_dict())
    flat, grads = shared_flat(flat_model)
    return (flat_model, plain_model, FlatAdam(flat, grads, list(flat_model.parameters()), **ARGS),
            torch.optim.Adam(plain_model.parameters(), **ARGS))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        g = torch.randn(p.shape, generator=gen)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)  # a flat model's .grad are views of its buffer: keep them
    optimizer.step()


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)


def test_steps_as_per_parameter_adam_does() -> None:
    flat_model, plain_model, flat_opt, plain_opt = _models()
    for seed in range(3):
        _step(flat_model, flat_opt, seed)
        _step(plain_model, plain_opt, seed)
    _assert_same(flat_model, plain_model)
    assert not torch.equal(flat_model.embedding.weight, Transformer(CFG).embedding.weight)  # it did move


def test_state_dict_is_per_parameter_adams_both_ways() -> None:
    flat_model, plain_model, flat_opt, plain_opt = _models()
    assert flat_opt.state_dict()["state"] == {} and plain_opt.state_dict()["state"] == {}
    for seed in range(2):
        _step(flat_model, flat_opt, seed)
        _step(plain_model, plain_opt, seed)
    saved, expected = flat_opt.state_dict(), plain_opt.state_dict()
    assert saved["param_groups"] == expected["param_groups"]
    assert saved["state"].keys() == expected["state"].keys()
    for i, s in expected["state"].items():
        for key, value in s.items():
            torch.testing.assert_close(saved["state"][i][key], value, rtol=0, atol=1e-7, msg=f"{i} {key}")
    # each continues from the other's state as it would from its own
    _, other_plain, _, other_plain_opt = _models()
    other_plain.load_state_dict(flat_model.state_dict())
    other_plain_opt.load_state_dict(saved)
    flat_again, _, flat_again_opt, _ = _models()
    flat_again.load_state_dict(plain_model.state_dict())
    flat_again_opt.load_state_dict(expected)
    for model, opt in ((flat_model, flat_opt), (other_plain, other_plain_opt), (flat_again, flat_again_opt)):
        _step(model, opt, 7)
    _assert_same(other_plain, flat_model)
    _assert_same(flat_again, flat_model)


def test_refuses_parameters_that_are_not_the_buffers_views() -> None:
    torch.manual_seed(0)
    model = Transformer(CFG)
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    with pytest.raises(ValueError, match="consecutive views"):
        FlatAdam(flat, torch.zeros_like(flat), params, **ARGS)
    _, grads = shared_flat(model)
    with pytest.raises(ValueError, match="consecutive views"):
        FlatAdam(flat, grads, params, **ARGS)
