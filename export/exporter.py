"""`seqserve export`: checkpoint -> verified model directory, written atomically.

The graphs, tokenizer and config.json are written into a hidden temporary directory beside the
target; only once every check has passed is it renamed into place, so a failed or interrupted
export never leaves something that looks like a complete model directory.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from seqserve.runtime import names
from seqserve.export.graphs import OPSET, export_graphs
from seqserve.runtime.model_dir import graph_entry, open_model_dir, write_config_json
from seqserve.export.verify import verify
from seqserve.model.checkpoint import Checkpoint
from seqserve.model.data import Pair
from seqserve.runtime.tokenizer import decode, encode_source, encode_target
from seqserve.runtime.errors import ExportError
from seqserve.runtime.engine import OnnxSeq2Seq, greedy_generate

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("seqserve", "torch", "onnx", "onnxscript", "onnxruntime", "tokenizers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _exact_match(tokenizer, pairs: list[Pair], outputs: list[list[int]]) -> float:  # noqa: ANN001
    """Share of pairs whose greedy output text equals the reference."""
    hits = sum(decode(tokenizer, out) == pair.target for out, pair in zip(outputs, pairs, strict=True))
    return hits / max(1, len(outputs))


def validation_sources(ckpt: Checkpoint, tokenizer, limit: int) -> tuple[list[Pair], list[list[int]]]:  # noqa: ANN001
    """Up to `limit` held-out pairs that fit the model's source length, and their source ids."""
    pairs, sources = [], []
    for pair in ckpt.validation[:limit]:
        ids = encode_source(tokenizer, pair.source)
        if len(ids) <= ckpt.config.max_source_len:
            pairs.append(pair)
            sources.append(ids)
    return pairs, sources


def export_model_dir(ckpt: Checkpoint, out: Path, *, quantize: str | None = None, force: bool = False,
                     samples: int = 200) -> dict[str, Any]:
    """Export, verify and write a model directory at `out`; returns config.json's contents."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists (pass --force to replace it)")
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize: unknown mode {quantize!r} (known: int8)")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = ckpt.build_model()
    tokenizer = ckpt.tokenizer()
    pairs, sources = validation_sources(ckpt, tokenizer, samples)
    max_new = min(ckpt.config.max_target_len,
                  max((len(encode_target(tokenizer, p.target)) for p in ckpt.validation[:samples]), default=0) + 8)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        encoder_path, decoder_path = export_graphs(model, tmp)
        (tmp / names.TOKENIZER_FILE).write_text(ckpt.tokenizer_json, encoding="utf-8")
        meta: dict[str, Any] = {
            "format_version": names.FORMAT_VERSION,
            "model": ckpt.config.to_dict(),
            "opset": OPSET,
            "quantization": quantize,
            "alignment": {"layer": ckpt.config.alignment_layer_index, "reduction": "mean over heads",
                          "output": "alignment"},
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "training": ckpt.metrics,
        }

        def write_meta() -> None:
            meta["graphs"] = {
                "encoder": graph_entry(encoder_path, names.ENCODER_INPUTS, names.ENCODER_OUTPUTS),
                "decoder": graph_entry(decoder_path, names.DECODER_INPUTS, names.DECODER_OUTPUTS),
            }
            write_config_json(tmp, meta)

        write_meta()
        engine = OnnxSeq2Seq(open_model_dir(tmp), device="cpu")
        report, fp32_outputs = verify(model, engine, sources, max_new_tokens=max_new)
        meta["parity"] = report.as_dict()
        log.info("parity: %s", report.as_dict())
        if sources:
            meta["validation"] = {"inputs": len(sources), "onnx_exact_match": _exact_match(tokenizer, pairs, fp32_outputs)}
        if quantize == "int8":
            from seqserve.export.quantize import quantize_graph

            del engine
            quantize_graph(encoder_path)
            quantize_graph(decoder_path)
            write_meta()
            engine = OnnxSeq2Seq(open_model_dir(tmp), device="cpu")
            int8_outputs = greedy_generate(engine, sources, max_new_tokens=max_new) if sources else []
            agree = sum(a == b for a, b in zip(fp32_outputs, int8_outputs)) / max(1, len(sources))
            meta["quantization_report"] = {"greedy_agreement_with_fp32": agree}
            if sources:
                meta["quantization_report"]["fp32_exact_match"] = meta["validation"]["onnx_exact_match"]
                meta["quantization_report"]["int8_exact_match"] = _exact_match(tokenizer, pairs, int8_outputs)
        write_meta()
        open_model_dir(tmp)  # the directory as a server will see it
        tmp.chmod(0o755)  # mkdtemp made it private; a server running as another user must read it
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
