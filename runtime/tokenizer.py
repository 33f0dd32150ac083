"""The tokenizer side of a model: loading a tokenizer.json, its special ids, and turning text into
token ids and back. Training (which encodes whole corpora) and serving (one request at a time)
share this one code path; it needs only HF `tokenizers`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import tokenizers

from seqserve.runtime.errors import DataError


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_SPECIAL_IDS = {"pad_id": PAD_ID, "bos_id": BOS_ID, "eos_id": EOS_ID, "unk_id": UNK_ID}


def guard_specials(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Make a literal "</s>" in user text plain characters rather than the EOS id."""
    # The flag is not stored in tokenizer.json, so every constructor here sets it.
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """Load a tokenizer.json written by `tokenizer.save`, checking its special ids."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such tokenizer file")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises plain Exception for any parse error
        raise DataError(f"{path}: not a valid tokenizer file: {e}") from None
    try:
        special_ids(tokenizer)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return guard_specials(tokenizer)


def tokenizer_from_str(json_text: str) -> tokenizers.Tokenizer:
    """Build a tokenizer from the JSON text of a tokenizer.json, checking its special ids."""
    try:
        tokenizer = tokenizers.Tokenizer.from_str(json_text)
    except Exception as e:  # the Rust side raises plain Exception for any parse error
        raise DataError(f"not a valid tokenizer JSON: {e}") from None
    special_ids(tokenizer)
    return guard_specials(tokenizer)


def special_ids(tokenizer: tokenizers.Tokenizer) -> dict[str, int]:
    """The special token ids, {"pad_id": 0, ...}, after checking the tokenizer has them there."""
    for token, (key, expected) in zip(SPECIAL_TOKENS, _SPECIAL_IDS.items()):
        got = tokenizer.token_to_id(token)
        if got is None:
            raise DataError(f"tokenizer lacks the special token {token}")
        if got != expected:
            raise DataError(f"tokenizer has {token} at id {got}, expected {expected} ({key})")
    return dict(_SPECIAL_IDS)


def encode_source(tokenizer: tokenizers.Tokenizer, text: str) -> list[int]:
    """Token ids of a source text followed by EOS (no BOS: the encoder needs no start signal)."""
    return tokenizer.encode(text, add_special_tokens=False).ids + [EOS_ID]


def encode_target(tokenizer: tokenizers.Tokenizer, text: str) -> list[int]:
    """Token ids of a target text alone; the trainer adds BOS and EOS where each belongs."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def decode(tokenizer: tokenizers.Tokenizer, ids: Sequence[int]) -> str:
    """Text of `ids` up to the first EOS, with special ids skipped."""
    ids = list(ids)
    if EOS_ID in ids:
        ids = ids[: ids.index(EOS_ID)]
    # Filtered here rather than by skip_special_tokens so that it holds for any tokenizer
    # that passed `special_ids`, whether or not it flags these tokens as special.
    return tokenizer.decode([i for i in ids if i > UNK_ID])
