"""Tensor-only wrappers around `Transformer.encode` / `Transformer.decode`, and their export to
ONNX with the names and dynamic axes of `export.names`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn
from torch.export import Dim

from seqserve.runtime import names
from seqserve.runtime.errors import ExportError
from seqserve.model.transformer import Transformer

log = logging.getLogger(__name__)

OPSET = 20


class EncoderGraph(nn.Module):
    """source_ids, source_mask -> cross_key, cross_value."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, source_ids: Tensor, source_mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.encode(source_ids, source_mask)


class DecoderGraph(nn.Module):
    """One decoder step with the cache as inputs and outputs (see `export.names`)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, positions: Tensor, past_key: Tensor, past_value: Tensor, self_mask: Tensor,
                cross_key: Tensor, cross_value: Tensor, source_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.model.decode(tokens, positions, past_key, past_value, self_mask, cross_key, cross_value,
                                 source_mask)


def example_inputs(model: Transformer, *, batch: int = 3, source_len: int = 5, past_len: int = 4,
                   new_len: int = 2, seed: int = 0) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Example encoder and decoder inputs.

    Every dynamic size is >= 2 and they are all different: torch.export specializes sizes 0 and 1
    and can merge equal ones, which would silently fix that axis in the graph.
    """
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    source_ids = torch.randint(4, cfg.vocab_size, (batch, source_len), generator=g)
    source_mask = torch.ones(batch, source_len, dtype=torch.bool)
    source_mask[0, -1] = False
    kv_shape = (cfg.decoder_layers, batch, cfg.n_heads, past_len, cfg.head_dim)
    cross_shape = (cfg.decoder_layers, batch, cfg.n_heads, source_len, cfg.head_dim)
    decoder = (
        torch.randint(4, cfg.vocab_size, (batch, new_len), generator=g),
        torch.arange(new_len).expand(batch, new_len) + past_len,
        torch.randn(kv_shape, generator=g), torch.randn(kv_shape, generator=g),
        torch.ones(batch, past_len + new_len, dtype=torch.bool),
        torch.randn(cross_shape, generator=g), torch.randn(cross_shape, generator=g),
        source_mask,
    )
    return (source_ids, source_mask), decoder


def _dynamic_shapes(input_names: tuple[str, ...]) -> dict[str, dict[int, Dim]]:
    return {name: {axis: Dim.DYNAMIC for axis in names.DYNAMIC_AXES[name]} for name in input_names}


def _name_dynamic_axes(model: onnx.ModelProto) -> None:
    """Replace the exporter's symbols (s0, s1 + s2, ...) by the names in `names.DYNAMIC_AXES`."""
    rename: dict[str, str] = {}
    for value in [*model.graph.input, *model.graph.output]:
        for axis, name in names.DYNAMIC_AXES.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param:
                rename.setdefault(dim.dim_param, name)
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def _export_one(module: nn.Module, args: tuple[Tensor, ...], input_names: tuple[str, ...],
                output_names: tuple[str, ...], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns at length about things that do not apply here
        try:
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=OPSET, input_names=list(input_names),
                output_names=list(output_names), dynamic_shapes=_dynamic_shapes(input_names),
                external_data=False, verbose=False)
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed for {path.name}: {type(exc).__name__}: {exc}") from exc
    proto = program.model_proto
    _name_dynamic_axes(proto)
    for value, expected in ((proto.graph.input, input_names), (proto.graph.output, output_names)):
        if tuple(v.name for v in value) != expected:
            raise ExportError(f"{path.name}: exported names {[v.name for v in value]} differ from {list(expected)}")
    # Every axis named dynamic must have come out dynamic (not fixed to the example's size).
    for value in [*proto.graph.input, *proto.graph.output]:
        for axis, name in names.DYNAMIC_AXES.get(value.name, {}).items():
            if value.type.tensor_type.shape.dim[axis].dim_param != name:
                raise ExportError(f"{path.name}: axis {axis} ({name}) of {value.name} was fixed by the exporter")
    save_graph(proto, path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name}: onnx.checker failed: {exc}") from None


def save_graph(proto: onnx.ModelProto, path: Path) -> None:
    """Write a graph with its weights as external data in `names.weights_file` beside it (replaced)."""
    data = path.with_name(names.weights_file(path.name))
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    data.chmod(0o644)  # onnx creates it private; a server running as another user must read it


def export_graphs(model: Transformer, out_dir: Path) -> tuple[Path, Path]:
    """Export the encoder and decoder-step graphs of an eval-mode model into out_dir."""
    model = model.eval()
    encoder_args, decoder_args = example_inputs(model)
    encoder_path, decoder_path = out_dir / names.ENCODER_FILE, out_dir / names.DECODER_FILE
    with torch.no_grad():
        _export_one(EncoderGraph(model), encoder_args, names.ENCODER_INPUTS, names.ENCODER_OUTPUTS, encoder_path)
        _export_one(DecoderGraph(model), decoder_args, names.DECODER_INPUTS, names.DECODER_OUTPUTS, decoder_path)
    return encoder_path, decoder_path
