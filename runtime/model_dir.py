"""The model directory, the one contract between training and serving: writing its config.json
and reading it back with every file present and every graph matching its recorded sha256.

Torch-free: the server opens model directories through this module.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqserve.runtime import names
from seqserve.runtime.config import ModelConfig
from seqserve.runtime.errors import CheckpointError, ModelDirError


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def graph_entry(path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> dict[str, Any]:
    """config.json's record of one graph: file, signature, size and sha256, and the same for its
    external weights file when it has one."""
    entry = {"file": path.name, "inputs": list(inputs), "outputs": list(outputs),
             "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    weights = path.with_name(names.weights_file(path.name))
    if weights.is_file():
        entry["weights"] = {"file": weights.name, "bytes": weights.stat().st_size, "sha256": sha256_file(weights)}
    return entry


def _files(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A graph entry's files: the graph and, when recorded, its external weights."""
    return [entry, *([entry["weights"]] if "weights" in entry else [])]


@dataclass(frozen=True)
class ModelDir:
    """An opened, checked model directory."""

    path: Path
    config: ModelConfig
    meta: dict[str, Any]  # the whole config.json

    @property
    def encoder_path(self) -> Path:
        return self.path / self.meta["graphs"]["encoder"]["file"]

    @property
    def decoder_path(self) -> Path:
        return self.path / self.meta["graphs"]["decoder"]["file"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / names.TOKENIZER_FILE

    def digest(self, role: str) -> str:
        """sha256 (hex) standing for a graph and its weights: the graph file's own sha256 when its
        weights are inside it, else the sha256 of "<graph sha256>:<weights sha256>"."""
        entry = self.meta["graphs"][role]
        if "weights" not in entry:
            return str(entry["sha256"])
        return hashlib.sha256(f"{entry['sha256']}:{entry['weights']['sha256']}".encode()).hexdigest()

    @functools.cached_property
    def version(self) -> str:
        """Short model version: the first 12 hex digits of the decoder's digest (graph and weights).
        Cached: every response carries it."""
        return self.digest("decoder")[:12]


def open_model_dir(path: str | os.PathLike, *, check_hashes: bool = True) -> ModelDir:
    """Open a model directory; anything missing, unreadable or altered is a one-line ModelDirError."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: no such model directory")
    config_path = path / names.CONFIG_FILE
    if not config_path.is_file():
        raise ModelDirError(f"{path}: missing {names.CONFIG_FILE}")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != names.FORMAT_VERSION:
        raise ModelDirError(f"{config_path}: unsupported format_version {meta.get('format_version') if isinstance(meta, dict) else None!r}"
                            f" (this seqserve reads {names.FORMAT_VERSION})")
    try:
        config = ModelConfig.from_dict(meta["model"])
        graphs = {role: meta["graphs"][role] for role in ("encoder", "decoder")}
        expected = {"encoder": (names.ENCODER_INPUTS, names.ENCODER_OUTPUTS),
                    "decoder": (names.DECODER_INPUTS, names.DECODER_OUTPUTS)}
        for role, entry in graphs.items():
            if (tuple(entry["inputs"]), tuple(entry["outputs"])) != expected[role]:
                raise ModelDirError(f"{config_path}: {role} graph signature does not match this seqserve")
    except (KeyError, TypeError, CheckpointError) as exc:
        raise ModelDirError(f"{config_path}: malformed ({exc})") from None
    try:
        files = {role: _files(entry) for role, entry in graphs.items()}
    except TypeError as exc:
        raise ModelDirError(f"{config_path}: malformed ({exc})") from None
    for name in (names.TOKENIZER_FILE, *(f["file"] for fs in files.values() for f in fs)):
        if not (path / name).is_file():
            raise ModelDirError(f"{path}: missing {name}")
    if check_hashes:
        for role, role_files in files.items():
            for entry in role_files:
                actual = sha256_file(path / entry["file"])
                if actual != entry["sha256"]:
                    raise ModelDirError(f"{path / entry['file']}: sha256 {actual[:12]}... does not match "
                                        f"config.json's {entry['sha256'][:12]}... ({role} graph altered or corrupt)")
    return ModelDir(path=path, config=config, meta=meta)


def write_config_json(out_dir: Path, meta: dict[str, Any]) -> None:
    """Write config.json with stable key order, so two exports of one checkpoint diff cleanly."""
    (out_dir / names.CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
