"""Export: the model directory's contents, the graphs' dynamic shapes, parity with PyTorch, and
the errors a user can run into."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from seqserve.runtime import names
from seqserve.export.exporter import export_model_dir, validation_sources
from seqserve.runtime.model_dir import open_model_dir, sha256_file
from seqserve.export.verify import TOLERANCE, check_greedy_parity, check_numeric_parity
from seqserve.model.checkpoint import load_checkpoint, save_checkpoint
from seqserve.runtime.errors import CheckpointError, ModelDirError, ParityError
from seqserve.server.cli import main as seqserve
from seqserve.runtime.engine import OnnxSeq2Seq, greedy_generate, pad_batch


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> OnnxSeq2Seq:
    return OnnxSeq2Seq(model_dir, device="cpu", intra_op_threads=1)


def test_model_dir_describes_itself(model_dir: Path) -> None:
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(names.MODEL_DIR_FILES)
    meta = json.loads((model_dir / names.CONFIG_FILE).read_text())
    assert meta["format_version"] == names.FORMAT_VERSION
    for role, file in (("encoder", names.ENCODER_FILE), ("decoder", names.DECODER_FILE)):
        entry = meta["graphs"][role]
        assert entry["file"] == file
        assert entry["sha256"] == sha256_file(model_dir / file)
        assert entry["bytes"] == (model_dir / file).stat().st_size
        weights = model_dir / names.weights_file(file)  # the weights, as external data beside the graph
        assert entry["weights"] == {"file": weights.name, "bytes": weights.stat().st_size,
                                    "sha256": sha256_file(weights)}
        assert weights.stat().st_mode & 0o044 == 0o044  # readable by a server running as another user
        assert weights.stat().st_size > entry["bytes"]  # the graph file holds structure only
        onnx.checker.check_model(str(model_dir / file), full_check=True)
    assert meta["graphs"]["decoder"]["inputs"] == list(names.DECODER_INPUTS)
    assert meta["opset"] >= 17
    assert {"torch", "onnx", "onnxruntime"} <= set(meta["versions"])
    for key in ("pad_id", "bos_id", "eos_id", "unk_id", "max_source_len", "max_target_len", "vocab_size"):
        assert key in meta["model"]
    assert meta["parity"]["greedy_inputs"] == 200
    assert meta["parity"]["decoder_logits_max_diff"] <= TOLERANCE


def test_graph_axes_are_named_and_dynamic(model_dir: Path) -> None:
    decoder = onnx.load(str(model_dir / names.DECODER_FILE), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*decoder.graph.input, *decoder.graph.output]}
    assert dims["past_key"][1] == "batch" and dims["past_key"][3] == "past_len"
    assert dims["self_mask"] == ["batch", "total_len"]
    assert dims["logits"][:2] == ["batch", "new_len"]


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_graphs_run_at_other_batch_sizes_and_an_empty_cache(engine: OnnxSeq2Seq, batch: int) -> None:
    cfg = engine.config
    ids, mask = pad_batch([[5 + i] * (3 + i) + [cfg.eos_id] for i in range(batch)], cfg.pad_id)
    ck, cv = engine.encode(ids, mask)
    assert ck.shape == (cfg.decoder_layers, batch, cfg.n_heads, ids.shape[1], cfg.head_dim)
    empty = engine.empty_cache(batch)
    logits, pk, _, alignment = engine.decode(np.full((batch, 1), cfg.bos_id), np.zeros((batch, 1), np.int64),
                                             empty, empty, np.ones((batch, 1), bool), ck, cv, mask)
    assert logits.shape == (batch, 1, cfg.vocab_size)
    assert pk.shape[3] == 1
    assert alignment.shape == (batch, 1, ids.shape[1])
    np.testing.assert_allclose(alignment.sum(-1), 1.0, atol=1e-5)
    assert np.all(alignment[~np.broadcast_to(mask[:, None, :], alignment.shape)] == 0)


def test_numeric_and_greedy_parity_with_pytorch(checkpoint_path: Path, engine: OnnxSeq2Seq) -> None:
    ckpt = load_checkpoint(checkpoint_path)
    model = ckpt.build_model()
    diffs = check_numeric_parity(model, engine)
    assert max(diffs) <= TOLERANCE
    _, sources = validation_sources(ckpt, ckpt.tokenizer(), 200)
    assert len(sources) == 200
    assert len(check_greedy_parity(model, engine, sources, max_new_tokens=ckpt.config.max_target_len)) == 200


def test_rows_at_different_positions_match_each_row_alone(engine: OnnxSeq2Seq) -> None:
    """What continuous batching relies on: a row that joined late, its cache padded with masked slots."""
    cfg = engine.config
    rng = np.random.default_rng(0)
    sources = [list(rng.integers(4, cfg.vocab_size, n)) + [cfg.eos_id] for n in (9, 4, 6)]
    prefixes = [list(rng.integers(4, cfg.vocab_size, n)) for n in (5, 1, 3)]  # tokens already decoded per row

    def run_alone(src: list[int], prefix: list[int]) -> np.ndarray:
        ids, mask = pad_batch([src], cfg.pad_id)
        ck, cv = engine.encode(ids, mask)
        empty = engine.empty_cache(1)
        n = len(prefix)
        logits, *_ = engine.decode(np.array([prefix]), np.arange(n)[None], empty, empty, np.ones((1, n), bool),
                                   ck, cv, mask)
        return logits[0, -1]

    # Batched: fill each row's cache left-padded to the longest prefix, then one step for all rows.
    ids, mask = pad_batch(sources, cfg.pad_id)
    ck, cv = engine.encode(ids, mask)
    longest = max(len(p) for p in prefixes) - 1
    past_k = np.zeros((cfg.decoder_layers, 3, cfg.n_heads, longest, cfg.head_dim), np.float32)
    past_v = np.zeros_like(past_k)
    cache_mask = np.zeros((3, longest), bool)
    for row, prefix in enumerate(prefixes):
        n = len(prefix) - 1
        if n:
            empty = engine.empty_cache(1)
            _, k, v, _ = engine.decode(np.array([prefix[:-1]]), np.arange(n)[None], empty, empty,
                                       np.ones((1, n), bool), ck[:, row:row + 1], cv[:, row:row + 1],
                                       mask[row:row + 1])
            past_k[:, row, :, longest - n:] = k[:, 0]
            past_v[:, row, :, longest - n:] = v[:, 0]
            cache_mask[row, longest - n:] = True
        past_k[:, row, :, : longest - n] = rng.normal(size=(cfg.decoder_layers, cfg.n_heads, longest - n, cfg.head_dim))
    last = np.array([[p[-1]] for p in prefixes])
    positions = np.array([[len(p) - 1] for p in prefixes])
    self_mask = np.concatenate([cache_mask, np.ones((3, 1), bool)], axis=1)
    logits, *_ = engine.decode(last, positions, past_k, past_v, self_mask, ck, cv, mask)
    for row in range(3):
        np.testing.assert_allclose(logits[row, 0], run_alone(sources[row], prefixes[row]), atol=1e-5, rtol=0)


def test_greedy_output_does_not_depend_on_batch_company(engine: OnnxSeq2Seq, checkpoint_path: Path) -> None:
    ckpt = load_checkpoint(checkpoint_path)
    _, sources = validation_sources(ckpt, ckpt.tokenizer(), 16)
    batched = greedy_generate(engine, sources, max_new_tokens=ckpt.config.max_target_len)
    alone = [greedy_generate(engine, [s], max_new_tokens=ckpt.config.max_target_len)[0] for s in sources]
    assert batched == alone


def test_parity_check_catches_a_graph_that_differs(checkpoint_path: Path, engine: OnnxSeq2Seq) -> None:
    model = load_checkpoint(checkpoint_path).build_model()
    with torch.no_grad():
        # PyTorch no longer what was exported (noise, not a constant: LayerNorm would cancel a shift).
        bias = model.decoder[0].feed_forward.linear2.bias
        bias.add_(1e-2 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ParityError) as info:
        check_numeric_parity(model, engine)
    assert info.value.max_diff > TOLERANCE
    assert "decoder logits" in str(info.value) and "max abs difference" in str(info.value)


def test_failed_export_exits_nonzero_and_leaves_nothing(checkpoint_path: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import seqserve.export.exporter as exporter

    real_export = exporter.export_graphs

    def export_then_drift(model, out_dir):  # noqa: ANN001, ANN202
        paths = real_export(model, out_dir)
        with torch.no_grad():
            model.embedding.weight.mul_(1.01)
        return paths

    monkeypatch.setattr(exporter, "export_graphs", export_then_drift)
    out = tmp_path / "model"
    assert seqserve(["export", str(checkpoint_path), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max abs difference" in err
    assert list(tmp_path.iterdir()) == []  # no model dir, no temporary left behind


def test_export_refuses_to_overwrite_without_force(checkpoint_path: Path, model_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert seqserve(["export", str(checkpoint_path), "--out", str(model_dir)]) == 1
    assert "--force" in capsys.readouterr().err


def test_int8_export_reports_accuracy_change(checkpoint_path: Path, model_dir: Path, tmp_path: Path) -> None:
    meta = export_model_dir(load_checkpoint(checkpoint_path), tmp_path / "int8", quantize="int8", samples=50)
    assert meta["quantization"] == "int8"
    report = meta["quantization_report"]
    assert {"fp32_exact_match", "int8_exact_match", "greedy_agreement_with_fp32"} <= set(report)
    assert 0.0 <= report["int8_exact_match"] <= 1.0
    fp32_size = (model_dir / names.DECODER_FILE).stat().st_size
    assert (tmp_path / "int8" / names.DECODER_FILE).stat().st_size < fp32_size
    open_model_dir(tmp_path / "int8")


@pytest.mark.parametrize("damage", ["missing", "garbage", "mismatch"])
def test_bad_checkpoints_are_one_line_errors(checkpoint_path: Path, tmp_path: Path, damage: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    if damage == "garbage":
        bad.write_bytes(b"not a checkpoint at all")
    elif damage == "mismatch":
        ckpt = load_checkpoint(checkpoint_path)
        cfg = ckpt.config.to_dict()
        ckpt.config = type(ckpt.config).from_dict({**cfg, "d_ff": cfg["d_ff"] * 2})
        save_checkpoint(bad, ckpt)
    assert seqserve(["export", str(bad), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert {"missing": "no such checkpoint", "garbage": "not a readable checkpoint",
            "mismatch": "do not match its config"}[damage] in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_mismatch_is_a_checkpoint_error(checkpoint_path: Path) -> None:
    ckpt = load_checkpoint(checkpoint_path)
    ckpt.state_dict = {k: v for k, v in ckpt.state_dict.items() if not k.startswith("decoder.0.")}
    with pytest.raises(CheckpointError, match="do not match"):
        ckpt.build_model()


def _copy(model_dir: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(model_dir, dest)
    return dest


def test_model_dir_missing_file_or_altered_graph_is_refused(model_dir: Path, tmp_path: Path) -> None:
    missing = _copy(model_dir, tmp_path / "missing")
    (missing / names.TOKENIZER_FILE).unlink()
    with pytest.raises(ModelDirError, match="missing tokenizer.json"):
        open_model_dir(missing)
    altered = _copy(model_dir, tmp_path / "altered")
    with open(altered / names.DECODER_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelDirError, match="sha256"):
        open_model_dir(altered)
    weights = names.weights_file(names.ENCODER_FILE)
    altered_weights = _copy(model_dir, tmp_path / "altered-weights")
    with open(altered_weights / weights, "r+b") as f:  # one flipped byte in the middle of the weights
        f.seek(f.seek(0, 2) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ModelDirError, match=rf"{weights}: sha256 .* \(encoder graph altered or corrupt\)"):
        open_model_dir(altered_weights)
    missing_weights = _copy(model_dir, tmp_path / "missing-weights")
    (missing_weights / weights).unlink()
    with pytest.raises(ModelDirError, match=f"missing {weights}"):
        open_model_dir(missing_weights)
    with pytest.raises(ModelDirError, match="no such model directory"):
        open_model_dir(tmp_path / "nowhere")
    broken = _copy(model_dir, tmp_path / "broken")
    (broken / names.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        open_model_dir(broken)


def test_translate_command(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert seqserve(["translate", str(model_dir), "25 November 2026", "Nov 5th, 1999"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["25 November 2026", "Nov 5th, 1999"]
    assert all(len(line.split("\t")) == 2 for line in lines)


def test_model_dir_is_readable_by_other_users(model_dir: Path) -> None:
    """A server in a container runs as another user than the one who exported (mounted model)."""
    assert model_dir.stat().st_mode & 0o755 == 0o755


def test_model_version_covers_the_weights_file(model_dir: Path) -> None:
    import copy
    import dataclasses

    opened = open_model_dir(model_dir)
    meta = copy.deepcopy(opened.meta)
    meta["graphs"]["decoder"]["weights"]["sha256"] = "0" * 64  # same graph file, other weights
    other = dataclasses.replace(opened, meta=meta)
    assert other.version != opened.version and other.digest("encoder") == opened.digest("encoder")
    assert opened.version == opened.digest("decoder")[:12] and len(opened.digest("decoder")) == 64
