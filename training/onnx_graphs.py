"""The ONNX graphs of a multi-exit model: what each computes, how it is exported and checked.

For every exit i: ``exit{i}.onnx`` (``image`` → ``logits`` of exit i along its full path)
and ``stage{i}.onnx`` (trunk features after stage i-1, or the image for i = 1 → logits of
exit i and, for i < k, the trunk features after stage i). Graphs come from
``torch.onnx.export(..., dynamo=True)``, the default exporter since torch 2.9: it folds batch
norm into the convolutions, emits no dead nodes and keeps a named dynamic batch axis (the
legacy TorchScript exporter is deprecated and capped at opset 20). Every graph passes
``onnx.checker`` and a check of the contract the server relies on (names, opset, dynamic
batch axis).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from serving.manifest import GraphIO
from training.models.multi_exit import MultiExitNetwork

DEFAULT_OPSET = 20  # torch's default for the dynamo exporter (graphs of IR version 10: onnxruntime >= 1.18)
# What the dynamo exporter can emit starts at opset 18; torch 2.14 knows up to 23, but the GPU image's
# onnxruntime-gpu 1.20 (requirements/gpu.in) runs up to 21: an export at 22 or 23 passed its parity
# checks here (onnxruntime 1.2x) and only failed when the GPU server loaded it.
SUPPORTED_OPSETS = range(18, 22)


class ExportError(RuntimeError):
    """The export cannot be trusted (parity, checker, shapes) or cannot start (arguments)."""


class ExitPath(nn.Module):
    """image → logits of one exit along its full path (what exit{i}.onnx computes)."""

    def __init__(self, model: MultiExitNetwork, exit_index: int):
        super().__init__()
        self.model, self.exit_index = model, exit_index

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.forward_exit(image, self.exit_index)


class StageGraph(nn.Module):
    """features_in → (logits, features_out) of one stage; the last stage returns logits only."""

    def __init__(self, model: MultiExitNetwork, exit_index: int):
        super().__init__()
        self.model, self.exit_index = model, exit_index
        self.last = exit_index == model.num_exits

    def forward(self, features: torch.Tensor):
        features_out, logits = self.model.forward_stage(features, self.exit_index)
        return logits if self.last else (logits, features_out)


def graph_io(exit_index: int, num_exits: int, kind: str, io_names: GraphIO) -> tuple[str, list[str]]:
    """(input name, output names) of an exit or stage graph, as the manifest's ``io`` names them."""
    if kind == "exit":
        return io_names.image_input, [io_names.logits_output]
    input_name = io_names.image_input if exit_index == 1 else io_names.features_input
    outputs = [io_names.logits_output] + ([io_names.features_output] if exit_index < num_exits else [])
    return input_name, outputs


def export_graph(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_names: Sequence[str],
    opset: int,
    metadata: dict[str, str],
) -> None:
    """Export one graph with a dynamic batch axis and weights embedded, then check it."""
    import onnx

    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter chatter; correctness is checked below
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=list(output_names),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                dynamo=True,
                external_data=False,
                opset_version=opset,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {path.name}: {exc}\n{log.getvalue()[-2000:]}") from exc
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=str(value))
    onnx.save(proto, str(path))  # small models: one file, no external data
    check_graph(path, input_name, output_names, opset)


def check_graph(path: Path, input_name: str, output_names: Sequence[str], opset: int) -> None:
    """onnx.checker with shape inference, plus the contract: names, opset, dynamic batch axis."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {exc}") from exc
    proto = onnx.load(str(path), load_external_data=False)
    inputs = [v.name for v in proto.graph.input]
    outputs = [v.name for v in proto.graph.output]
    if inputs != [input_name] or outputs != list(output_names):
        raise ExportError(
            f"{path.name} has inputs {inputs} and outputs {outputs}; expected [{input_name!r}] and {list(output_names)}"
        )
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if version != opset:
        raise ExportError(f"{path.name} uses opset {version}, not the requested {opset}")
    for value in list(proto.graph.input) + list(proto.graph.output):
        batch = value.type.tensor_type.shape.dim[0]
        if not batch.dim_param:
            raise ExportError(f"{path.name}: {value.name} has a fixed batch size {batch.dim_value}, not a dynamic axis")


def export_graphs(
    model: MultiExitNetwork,
    input_shape: tuple[int, int, int],
    folder: Path,
    opset: int,
    io_names: GraphIO,
    metadata: dict[str, str],
) -> list[tuple[str, str]]:
    """Write exit{i}.onnx and stage{i}.onnx for every exit; returns their file names."""
    model.eval()  # batch norm with running statistics, as served
    # A traced batch of 2: batch 1 would let the exporter specialise the batch axis away.
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    features, names = example, []
    with torch.no_grad():
        for i in range(1, model.num_exits + 1):
            exit_name, stage_name = f"exit{i}.onnx", f"stage{i}.onnx"
            inp, outs = graph_io(i, model.num_exits, "exit", io_names)
            export_graph(
                ExitPath(model, i).eval(),
                example,
                folder / exit_name,
                inp,
                outs,
                opset,
                {**metadata, "graph": "exit", "exit": str(i)},
            )
            inp, outs = graph_io(i, model.num_exits, "stage", io_names)
            export_graph(
                StageGraph(model, i).eval(),
                features,
                folder / stage_name,
                inp,
                outs,
                opset,
                {**metadata, "graph": "stage", "exit": str(i)},
            )
            features = model.forward_stage(features, i)[0]
            names.append((exit_name, stage_name))
    return names
