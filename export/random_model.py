"""Random-weight models of given dimensions, exported through the normal export path: what the
benchmark measures (speed does not depend on the weights), e.g. at the peers' dimensions
(`seqserve.bench.bench.PRESETS`).

`python -m seqserve.export.random_model --dims '{"vocab_size": 8000, "d_model": 256, ...}' --out DIR`
writes a verified model directory; the benchmark calls it in a subprocess so that its own
process never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from seqserve.export.exporter import export_model_dir
from seqserve.model.checkpoint import Checkpoint
from seqserve.runtime.config import ModelConfig
from seqserve.runtime.tokenizer import SPECIAL_TOKENS
from seqserve.model.transformer import Transformer

def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A word-level tokenizer over `t4 ... t{V-1}` with the usual special tokens at ids 0-3."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def random_checkpoint(dims: dict[str, Any], *, seed: int = 0, max_len: int = 512) -> Checkpoint:
    """A checkpoint with seeded random weights and a synthetic tokenizer."""
    cfg = ModelConfig(dropout=0.0, max_source_len=max_len, max_target_len=max_len, **dims)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    return Checkpoint(config=cfg, state_dict=model.state_dict(), tokenizer_json=synthetic_tokenizer(cfg.vocab_size).to_str(),
                      metrics={"random_weights_seed": seed})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dims", required=True, help="JSON object of ModelConfig fields (vocab_size, d_model, ...)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quantize", choices=("int8",))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    export_model_dir(random_checkpoint(json.loads(args.dims), seed=args.seed), args.out, quantize=args.quantize,
                     force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
