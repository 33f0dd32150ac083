"""Token-count batches: every pair once per epoch, within the token budget, little padding,
a function of (seed, epoch) alone."""

from __future__ import annotations

import random

from seqserve.model.batching import Encoded, collate, rank_rows
from seqserve.model.data import Pair, train_tokenizer
from seqserve.runtime.config import ModelConfig
from seqserve.runtime.tokenizer import special_ids


def _corpus(n: int = 600) -> Encoded:
    rng = random.Random(1)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    pairs = [Pair(" ".join(rng.choices(words, k=rng.randrange(1, 30))), " ".join(rng.choices(words, k=rng.randrange(1, 12))))
             for _ in range(n)]
    tok = train_tokenizer((t for p in pairs for t in (p.source, p.target)), vocab_size=60)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), **special_ids(tok))
    return Encoded(pairs, tok, cfg, what="training")


def test_batches_cover_every_pair_once_within_the_token_budget() -> None:
    data = _corpus()
    batches = data.token_batches(256, seed=0, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(len(data)))
    for b in batches:
        longest = max(max(len(data.sources[i]), len(data.targets[i])) for i in b)
        assert len(b) == 1 or longest * len(b) <= 256


def test_batches_depend_on_seed_and_epoch_only() -> None:
    data = _corpus()
    assert data.token_batches(256, seed=0, epoch=3) == data.token_batches(256, seed=0, epoch=3)
    assert data.token_batches(256, seed=0, epoch=3) != data.token_batches(256, seed=0, epoch=4)
    assert data.token_batches(256, seed=0, epoch=3) != data.token_batches(256, seed=1, epoch=3)


def test_length_bucketing_trains_far_less_padding_than_random_batches() -> None:
    data = _corpus()
    cfg = ModelConfig(vocab_size=60)

    def padding(batches: list[list[int]]) -> float:
        real = padded = 0
        for b in batches:
            batch = collate(data, b, cfg)
            real, padded = real + batch.real_tokens, padded + batch.padded_tokens
        return 1 - real / padded

    bucketed = data.token_batches(512, seed=0, epoch=1)
    order = list(range(len(data)))
    random.Random(0).shuffle(order)
    size = len(data) // len(bucketed)
    shuffled = [order[i:i + size] for i in range(0, len(order), size)]
    assert padding(bucketed) < 0.5 * padding(shuffled)


def test_collate_shifts_the_target_right_behind_bos() -> None:
    data = _corpus(20)
    cfg = ModelConfig(vocab_size=60)
    batch = collate(data, [0, 1, 2], cfg)
    assert (batch.target_in[:, 0] == cfg.bos_id).all()
    assert (batch.target_in[:, 1:] == batch.target_out[:, :-1]).all()
    assert batch.target_tokens == sum(len(data.targets[i]) for i in (0, 1, 2))


def test_ranks_split_a_global_batch_without_overlap() -> None:
    rows = list(range(11))
    shares = [rank_rows(rows, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == rows and all(len(s) >= 3 for s in shares)


def test_a_small_corpus_gets_smaller_batches_not_fewer_steps() -> None:
    small, large = _corpus(300), _corpus(3000)
    assert 256 <= small.auto_max_tokens() < large.auto_max_tokens() < 2048
    huge = Encoded.__new__(Encoded)
    huge.sources = huge.targets = [[5] * 20] * 20_000
    assert huge.auto_max_tokens() == huge.auto_max_tokens("cpu") == 2048  # more updates an epoch on a CPU
    assert huge.auto_max_tokens("cuda") == 4096
    assert len(large.token_batches(large.auto_max_tokens(), seed=0, epoch=1)) >= 64
