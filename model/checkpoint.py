"""Checkpoints: one file holding the config, the weights, the tokenizer and held-out samples, so
that a model can be rebuilt, exported and verified from the checkpoint alone."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seqserve.runtime.config import ModelConfig
from seqserve.model.data import Pair
from seqserve.runtime.tokenizer import tokenizer_from_str
from seqserve.runtime.errors import CheckpointError, DataError
from seqserve.model.transformer import Transformer

CHECKPOINT_VERSION = 1


@dataclass
class Checkpoint:
    """Everything `seqserve export` needs: model, tokenizer and the data to verify it on."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_json: str
    validation: list[Pair] = field(default_factory=list)  # held-out pairs for export's parity checks
    metrics: dict[str, Any] = field(default_factory=dict)  # training summary (epoch, exact match, ...)

    def build_model(self) -> Transformer:
        """The model in eval mode; weights that do not fit the config are a CheckpointError."""
        model = Transformer(self.config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise CheckpointError(f"checkpoint weights do not match its config: {detail}") from None
        return model.eval()

    def tokenizer(self):  # noqa: ANN201 - tokenizers.Tokenizer
        """The tokenizer the model was trained with."""
        return tokenizer_from_str(self.tokenizer_json)


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Write atomically: a crash never leaves a truncated file under the final name."""
    payload = {
        "version": CHECKPOINT_VERSION,
        "config": ckpt.config.to_dict(),
        "model": ckpt.state_dict,
        "tokenizer": ckpt.tokenizer_json,
        "validation": [[p.source, p.target] for p in ckpt.validation],
        "metrics": ckpt.metrics,
    }
    atomic_save(payload, path)


def atomic_save(payload: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside `path`, then rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_versioned(path: Path, what: str, version: int, *, missing: str) -> dict[str, Any]:
    """A dict saved by `atomic_save` with {"version": version}; anything else is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {missing}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable {what} ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("version") != version:
        raise CheckpointError(f"{path}: not a seqserve {what} (version {version} expected)")
    return payload


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint; a missing, corrupt or foreign file is a CheckpointError naming it."""
    path = Path(path)
    payload = load_versioned(path, "checkpoint", CHECKPOINT_VERSION, missing="no such checkpoint file")
    missing = [k for k in ("config", "model", "tokenizer") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    try:
        config = ModelConfig.from_dict(payload["config"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    ckpt = Checkpoint(
        config=config,
        state_dict=payload["model"],
        tokenizer_json=payload["tokenizer"],
        validation=[Pair(s, t) for s, t in payload.get("validation", [])],
        metrics=dict(payload.get("metrics", {})),
    )
    try:
        vocab = ckpt.tokenizer().get_vocab_size()
    except DataError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if vocab != config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {vocab} tokens but the config says vocab_size {config.vocab_size}")
    return ckpt
