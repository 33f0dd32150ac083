"""The PyTorch model: size as in the paper, and the KV cache giving the same logits as recompute."""

from __future__ import annotations

import pytest
import torch

from seqserve.runtime.config import BASE, ModelConfig
from seqserve.runtime.errors import CheckpointError
from seqserve.model import kernels
from seqserve.model.training_pass import attention_backward, attention_bias, attention_forward
from seqserve.model.transformer import Transformer, count_parameters, greedy_decode

TINY = ModelConfig(vocab_size=50, d_model=32, encoder_layers=2, decoder_layers=3, n_heads=4, d_ff=64,
                   dropout=0.0, max_source_len=20, max_target_len=20)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TINY).eval()


def test_base_configuration_matches_paper_parameter_count() -> None:
    # Vaswani et al. 2017, Table 3: the base model has 65M parameters with a ~37k shared vocabulary.
    with torch.device("meta"):
        model = Transformer(ModelConfig(vocab_size=37000, **BASE))
    assert abs(count_parameters(model) - 65e6) / 65e6 < 0.05


def test_config_rejects_heads_that_do_not_divide_width() -> None:
    with pytest.raises(CheckpointError, match="n_heads"):
        ModelConfig(vocab_size=10, d_model=30, n_heads=4)


def test_config_round_trips_and_rejects_unknown_fields() -> None:
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(CheckpointError, match="bogus"):
        ModelConfig.from_dict({**TINY.to_dict(), "bogus": 1})


def _source(batch: int = 3, length: int = 7) -> torch.Tensor:
    src = torch.randint(4, TINY.vocab_size, (batch, length))
    if batch > 1:
        src[1, 5:] = TINY.pad_id  # a padded row
    return src


def test_incremental_decoding_matches_full_recompute(model: Transformer) -> None:
    src = _source()
    tgt = torch.randint(4, TINY.vocab_size, (3, 9))
    full = model(src, tgt)  # (B, T, V)
    mask = src != TINY.pad_id
    ck, cv = model.encode(src, mask)
    past_k = past_v = model.empty_cache(3)
    for t in range(tgt.shape[1]):
        logits, past_k, past_v, _ = model.decode(
            tgt[:, t:t + 1], torch.full((3, 1), t), past_k, past_v, torch.ones(3, t + 1, dtype=torch.bool),
            ck, cv, mask)
        torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-5, rtol=0)
    assert past_k.shape == (TINY.decoder_layers, 3, TINY.n_heads, tgt.shape[1], TINY.head_dim)


def test_several_new_tokens_after_a_cache_match_recompute(model: Transformer) -> None:
    src = _source()
    tgt = torch.randint(4, TINY.vocab_size, (3, 8))
    full = model(src, tgt)
    mask = src != TINY.pad_id
    ck, cv = model.encode(src, mask)
    empty = model.empty_cache(3)
    pos = torch.arange(8).expand(3, 8)
    ones = torch.ones(3, 8, dtype=torch.bool)
    _, k, v, _ = model.decode(tgt[:, :5], pos[:, :5], empty, empty, ones[:, :5], ck, cv, mask)
    logits, _, _, _ = model.decode(tgt[:, 5:], pos[:, 5:], k, v, ones, ck, cv, mask)
    torch.testing.assert_close(logits, full[:, 5:], atol=1e-5, rtol=0)


def test_row_with_padded_cache_slots_matches_row_alone(model: Transformer) -> None:
    """Continuous batching: a row whose cache holds masked filler slots gives its own result."""
    src = _source(batch=1)
    mask = src != TINY.pad_id
    ck, cv = model.encode(src, mask)
    prefix = torch.randint(4, TINY.vocab_size, (1, 4))
    empty = model.empty_cache(1)
    ones = torch.ones(1, 4, dtype=torch.bool)
    alone_logits, k, v, _ = model.decode(prefix, torch.arange(4)[None], empty, empty, ones, ck, cv, mask)
    # Same row, but its cache has 3 garbage slots in front that the self mask hides.
    junk = torch.randn(TINY.decoder_layers, 1, TINY.n_heads, 3, TINY.head_dim)
    pad_mask = torch.tensor([[False, False, False, True]])
    _, k2, v2, _ = model.decode(prefix[:, :1], torch.zeros(1, 1, dtype=torch.long), junk, junk, pad_mask,
                                ck, cv, mask)
    step_mask = torch.tensor([[False, False, False, True, True, True, True]])
    logits, _, _, _ = model.decode(prefix[:, 1:], torch.arange(1, 4)[None], k2, v2, step_mask, ck, cv, mask)
    torch.testing.assert_close(logits, alone_logits[:, 1:], atol=1e-5, rtol=0)


def test_alignment_is_a_distribution_over_real_source_tokens(model: Transformer) -> None:
    src = _source()
    mask = src != TINY.pad_id
    ck, cv = model.encode(src, mask)
    empty = model.empty_cache(3)
    _, _, _, alignment = model.decode(torch.full((3, 2), TINY.bos_id), torch.arange(2).expand(3, 2), empty, empty,
                                      torch.ones(3, 2, dtype=torch.bool), ck, cv, mask)
    assert alignment.shape == (3, 2, src.shape[1])
    torch.testing.assert_close(alignment.sum(-1), torch.ones(3, 2))
    assert torch.all(alignment[1, :, 5:] == 0)


def test_source_padding_does_not_change_results(model: Transformer) -> None:
    src = torch.randint(4, TINY.vocab_size, (1, 5))
    padded = torch.cat([src, torch.full((1, 3), TINY.pad_id)], dim=1)
    tgt = torch.randint(4, TINY.vocab_size, (1, 4))
    torch.testing.assert_close(model(src, tgt), model(padded, tgt), atol=1e-5, rtol=0)


def test_greedy_decode_is_batch_independent(model: Transformer) -> None:
    src = _source(batch=4)
    batched = greedy_decode(model, src, max_new_tokens=6)
    for i in range(4):
        row = src[i:i + 1]
        row = row[:, : int((row != TINY.pad_id).sum())]
        assert greedy_decode(model, row, max_new_tokens=6) == [batched[i]]


def _reference_forward(model: Transformer, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The training pass as `encode` then `decode` with an empty cache: the inference path, unfused."""
    source_mask = src != TINY.pad_id
    ck, cv = model.encode(src, source_mask)
    b, t = tgt.shape
    empty = model.empty_cache(b)
    logits, _, _, _ = model.decode(tgt, torch.arange(t).expand(b, t), empty, empty, tgt != TINY.pad_id,
                                   ck, cv, source_mask)
    return logits


def _padded_pair() -> tuple[torch.Tensor, torch.Tensor]:
    src = _source(4, 9)
    src[2, 3:] = TINY.pad_id
    tgt = torch.randint(4, TINY.vocab_size, (4, 8))
    tgt[1, 6:] = TINY.pad_id
    tgt[3, 2:] = TINY.pad_id
    return src, tgt


@pytest.mark.parametrize("fused", [False, True], ids=["torch-ops", "fused-kernels"])
def test_training_pass_matches_the_inference_path_in_value_and_gradient(fused: bool) -> None:
    torch.manual_seed(1)
    model = Transformer(TINY).train()
    src, tgt = _padded_pair()
    weights = torch.randn(4, 8, TINY.vocab_size)  # a loss that weighs every logit differently

    def grads(forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001
        model.zero_grad(set_to_none=True)
        logits = forward(model, src, tgt)
        (logits * weights).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    with kernels.switched(fused):
        if fused:
            assert kernels.get(src.device, torch.float32) is not None, kernels.unavailable()
        passed, passed_grads = grads(Transformer.forward)
    reference, reference_grads = grads(_reference_forward)
    torch.testing.assert_close(passed, reference, atol=1e-5, rtol=1e-5)
    assert passed_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():  # fp32 sums in another order: 1e-5, or 1e-6 of the largest
        torch.testing.assert_close(passed_grads[name], grad, atol=max(1e-5, 1e-6 * grad.abs().max().item()), rtol=1e-4,
                                   msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_pass_backward_is_exact_with_and_without_dropout(dropout: float) -> None:
    """gradcheck of the written-out backward against finite differences, in fp64, every parameter."""
    cfg = ModelConfig(vocab_size=11, d_model=8, encoder_layers=1, decoder_layers=2, n_heads=2, d_ff=12,
                      dropout=dropout, max_source_len=8, max_target_len=8)
    torch.manual_seed(5)
    model = Transformer(cfg).double().train()
    src = torch.randint(4, cfg.vocab_size, (2, 5))
    src[1, 3:] = cfg.pad_id
    tgt = torch.randint(4, cfg.vocab_size, (2, 4))
    tgt[0, 3:] = cfg.pad_id
    params = tuple(model.parameters())

    def logits(*_: torch.Tensor) -> torch.Tensor:  # gradcheck perturbs the parameters in place
        torch.manual_seed(6)  # the same dropout masks at every call
        return model(src, tgt)

    assert torch.autograd.gradcheck(logits, params, fast_mode=True)
    if dropout:
        with torch.no_grad():
            dropped = logits()
            model.eval()
            assert not torch.allclose(dropped, logits())  # the masks were drawn, and eval draws none


def test_training_pass_under_bf16_autocast_stays_close_to_fp32() -> None:
    torch.manual_seed(2)
    model = Transformer(TINY).train()
    src, tgt = _padded_pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(src, tgt)
    assert low.dtype == torch.bfloat16  # the residual stream stays bf16 through to the logits
    full = _reference_forward(model, src, tgt)
    assert (low.float() - full).abs().max() < 0.05 * full.abs().max()


class _Attention(torch.autograd.Function):
    """attention_forward / attention_backward as an autograd function, for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, bias, dropout):  # noqa: ANN001, ANN205
        out, ctx.weights = attention_forward(q, k, v, bias, dropout)
        ctx.save_for_backward(q, k, v)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return (*attention_backward(grad.contiguous(), *ctx.saved_tensors, ctx.weights), None, None)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_attention_backward_is_exact(dropout: float) -> None:
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 4, dtype=torch.float64, requires_grad=True) for n in (5, 6, 6))
    mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    mask[0, :, :, 4:] = False  # padded keys
    mask[1] = torch.ones(5, 6).tril().bool()  # causal
    bias = attention_bias(mask).double()

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(4)  # the same dropout mask at every call gradcheck makes
        return _Attention.apply(q, k, v, bias, dropout)

    assert torch.autograd.gradcheck(attention, (q, k, v))
    if dropout == 0:
        scores = (q @ k.transpose(-2, -1) / 2).masked_fill(~mask, torch.finfo(torch.float64).min)
        torch.testing.assert_close(attention(q, k, v), scores.softmax(-1) @ v)
    else:  # dropout zeroes whole weights and rescales the rest: each output mixes a subset of values
        with torch.no_grad():
            kept = attention(q, k, v)
            plain = attention_forward(q, k, v, bias, 0.0)[0]
        assert not torch.allclose(kept, plain)


def test_attention_gives_a_fully_masked_row_uniform_weights_as_attend_does() -> None:
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[0, 0, 1] = False
    out = attention_forward(q, k, v, attention_bias(mask), 0.0)[0]
    torch.testing.assert_close(out[:, :, 1], v.mean(dim=2))
