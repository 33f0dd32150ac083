"""`seqserve translate MODEL_DIR [TEXT ...]`: decode inputs offline with the exported graphs
(greedy, batched); texts from the arguments, or one per line from standard input."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from seqserve.runtime.tokenizer import decode, encode_source, load_tokenizer
from seqserve.runtime.errors import SeqserveError
from seqserve.runtime.engine import OnnxSeq2Seq, greedy_generate


class Translator:
    """Text in, text out, over an `OnnxSeq2Seq` engine and the model directory's tokenizer."""

    def __init__(self, engine: OnnxSeq2Seq) -> None:
        self.engine = engine
        self.tokenizer = load_tokenizer(engine.model_dir.tokenizer_path)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Source ids of each text; empty or over-long texts are a SeqserveError naming the input."""
        limit = self.engine.config.max_source_len
        out = []
        for i, text in enumerate(texts):
            if not text.strip():
                raise SeqserveError(f"input {i + 1} is empty")
            ids = encode_source(self.tokenizer, text)
            if len(ids) > limit:
                raise SeqserveError(f"input {i + 1} has {len(ids)} tokens; max_source_len is {limit}")
            out.append(ids)
        return out

    def __call__(self, texts: Sequence[str], *, max_new_tokens: int | None = None,
                 batch_size: int = 64) -> list[str]:
        """Greedy translations of texts, in order."""
        max_new = max_new_tokens or self.engine.config.max_target_len
        sources = self.encode(texts)
        results: list[str] = []
        for start in range(0, len(sources), batch_size):
            outs = greedy_generate(self.engine, sources[start:start + batch_size], max_new_tokens=max_new)
            results += [decode(self.tokenizer, o) for o in outs]
        return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqserve translate", description=__doc__)
    p.add_argument("model_dir", help="model directory written by `seqserve export`")
    p.add_argument("texts", nargs="*", help="inputs (default: one per line from standard input)")
    p.add_argument("--max-new-tokens", type=int, help="cap on generated tokens (default: the model's max_target_len)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default auto)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: all cores)")
    args = p.parse_args(argv)
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    translator = Translator(OnnxSeq2Seq(args.model_dir, device=args.device, intra_op_threads=args.threads))
    for text, out in zip(texts, translator(texts, max_new_tokens=args.max_new_tokens)):
        print(f"{text}\t{out}")
    return 0
