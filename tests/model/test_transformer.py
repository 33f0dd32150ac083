"""The PyTorch model: size as in the paper, and the KV cache giving the same logits as recompute."""

from __future__ import annotations

import pytest
import torch

from seqserve.runtime.config import BASE, ModelConfig
from seqserve.runtime.errors import CheckpointError
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
