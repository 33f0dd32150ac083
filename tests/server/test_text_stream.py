"""The streaming detokenizer: pieces concatenate to the decoded text for any token sequence,
incomplete UTF-8 is held back, and each push decodes a short window, not the whole sequence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from seqserve.runtime.tokenizer import decode, load_tokenizer
from seqserve.server.service import _TextStream


def _pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    stream = _TextStream(tokenizer)
    return [stream.push(i) for i in ids]


def test_pieces_concatenate_to_the_decoded_text(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    rng = np.random.default_rng(0)
    for _ in range(200):  # any ids at all, specials and unknowns included
        ids = rng.integers(0, tokenizer.get_vocab_size(), rng.integers(1, 40)).tolist()
        assert "".join(_pieces(tokenizer, ids)) == decode(tokenizer, ids), ids
    ids = tokenizer.encode("Tuesday, 25 November 2026 -> 2026-11-25").ids
    pieces = _pieces(tokenizer, ids)
    assert "".join(pieces) == decode(tokenizer, ids) and sum(bool(p) for p in pieces) > len(ids) // 2


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    """A byte-level BPE without merges: a multi-byte character takes several tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=1000, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["naïve café 日本"], trainer)
    return tokenizer


def test_incomplete_utf8_is_held_back(byte_tokenizer: Tokenizer) -> None:
    ids = byte_tokenizer.encode("a日本b").ids
    assert len(ids) == 8  # a, three bytes each for 日 and 本, b
    pieces = _pieces(byte_tokenizer, ids)
    assert pieces == ["a", "", "", "日", "", "", "本", "b"]


def test_each_push_decodes_a_short_window(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    stream = _TextStream(tokenizer)
    ids = tokenizer.encode("2026-11-25 " * 40).ids
    for i in ids:
        stream.push(i)
        assert len(stream.ids) - stream.prefix <= 3  # the last piece's tokens and the new one
    assert len(stream.ids) == len(ids) > 100
