"""Export a trained multi-exit checkpoint to a model folder the server loads without torch.

    python -m training.export runs/RUN/checkpoint.pt --out exported/NAME [--name NAME] [--opset 20]

For every exit i the folder gets

* ``exit{i}.onnx``  — ``image`` → ``logits`` of exit i along its full path;
* ``stage{i}.onnx`` — trunk features after stage i-1 (``features_in``; the ``image`` for
  i = 1) → ``logits`` of exit i and, for i < k, the trunk features after stage i
  (``features_out``), so a confidence cascade never recomputes the trunk;

plus ``manifest.json`` (``serving.manifest.Manifest``): classes, input spec, per-exit
cost, accuracy on the evaluation split (measured with ONNX Runtime on the exported
graphs), cascade thresholds calibrated on the run's validation split, the sha256 of
every file, and provenance.

Graphs come from ``torch.onnx.export(..., dynamo=True)``, the default exporter since
torch 2.9. Measured on these models in torch 2.14, both it and the legacy TorchScript
exporter (``dynamo=False``) match PyTorch to ~1e-7; the legacy one is faster to run
but deprecated, capped at opset 20, and leaves Identity nodes in the graphs, while the
dynamo one folds batch norm into the convolutions, emits no dead nodes and keeps a named
dynamic batch axis. Nothing is trusted, though: every graph passes ``onnx.checker``, and
ONNX Runtime is compared with PyTorch on fresh inputs (batch sizes 1 and 7, and real
images when the data set is there), full paths and chained stage graphs alike. Any
failure stops the export; the folder is assembled in a temporary sibling and renamed
into place only when complete, so no half-written model is left.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from training.data import ArraySplit
from serving.manifest import (
    ExitSpec,
    GraphIO,
    InputSpec,
    Manifest,
    ManifestError,
    load_manifest,
    sha256_file,
    write_manifest,
)
from training import cascade
from training.evaluate import DEFAULT_ACCURACY_DROPS, DEFAULT_BUDGET_FRACTIONS, EvaluationError, analyze

DEFAULT_OPSET = 20  # torch's default for the dynamo exporter; onnxruntime >= 1.17 runs it
# What the dynamo exporter can emit: its translations start at opset 18, and 23 is the
# newest that torch 2.14 (the newest torch the train extra admits) knows.
SUPPORTED_OPSETS = range(18, 24)
DEFAULT_ATOL = 1e-4
PARITY_BATCHES = (1, 7)
SPOT_CHECK = 1000


class ExportError(RuntimeError):
    """The export cannot be trusted (parity, checker, shapes) or cannot start (arguments)."""


# ----------------------------------------------------------------------------- graphs


class ExitPath(nn.Module):
    """image → logits of one exit along its full path (what exit{i}.onnx computes)."""

    def __init__(self, model: nn.Module, exit_index: int):
        super().__init__()
        self.model, self.exit_index = model, exit_index

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.forward_exit(image, self.exit_index)


class StageGraph(nn.Module):
    """features_in → (logits, features_out) of one stage; the last stage returns logits only."""

    def __init__(self, model: nn.Module, exit_index: int):
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
                module, (example,), str(path), input_names=[input_name], output_names=list(output_names),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True, external_data=False,
                opset_version=opset, verbose=False,
            )  # fmt: skip
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
        raise ExportError(f"{path.name} has inputs {inputs} and outputs {outputs}; expected "
                          f"[{input_name!r}] and {list(output_names)}")  # fmt: skip
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if version != opset:
        raise ExportError(f"{path.name} uses opset {version}, not the requested {opset}")
    for value in list(proto.graph.input) + list(proto.graph.output):
        batch = value.type.tensor_type.shape.dim[0]
        if not batch.dim_param:
            raise ExportError(f"{path.name}: {value.name} has a fixed batch size {batch.dim_value}, not a dynamic axis")


def export_graphs(model: nn.Module, input_shape: tuple[int, int, int], folder: Path, opset: int,
                  io_names: GraphIO, metadata: dict[str, str]) -> list[tuple[str, str]]:  # fmt: skip
    """Write exit{i}.onnx and stage{i}.onnx for every exit; returns their file names."""
    model.eval()  # batch norm with running statistics, as served
    # A traced batch of 2: batch 1 would let the exporter specialise the batch axis away.
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    features, names = example, []
    with torch.no_grad():
        for i in range(1, model.num_exits + 1):
            exit_name, stage_name = f"exit{i}.onnx", f"stage{i}.onnx"
            inp, outs = graph_io(i, model.num_exits, "exit", io_names)
            export_graph(ExitPath(model, i).eval(), example, folder / exit_name, inp, outs, opset,
                         {**metadata, "graph": "exit", "exit": str(i)})  # fmt: skip
            inp, outs = graph_io(i, model.num_exits, "stage", io_names)
            export_graph(StageGraph(model, i).eval(), features, folder / stage_name, inp, outs, opset,
                         {**metadata, "graph": "stage", "exit": str(i)})  # fmt: skip
            features = model.forward_stage(features, i)[0]
            names.append((exit_name, stage_name))
    return names


# ----------------------------------------------------------------------------- ONNX Runtime


def ort_session(path: Path):
    """A CPU session (parity is checked where the export runs; the server picks its own provider)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxChain:
    """The stage graphs of a model folder run in turn: all exits' logits with the trunk run once."""

    def __init__(self, folder: Path, stage_files: Sequence[str], io_names: GraphIO):
        self.sessions = [ort_session(folder / f) for f in stage_files]
        self.io = io_names

    def __call__(self, images: np.ndarray, upto: int | None = None) -> list[np.ndarray]:
        """Logits of exits 1..upto (default all) for a float32 (N, C, H, W) batch."""
        x, logits = images, []
        for i, session in enumerate(self.sessions[:upto]):
            name = self.io.image_input if i == 0 else self.io.features_input
            out = session.run(None, {name: x})
            logits.append(out[0])
            if len(out) > 1:
                x = out[1]
        return logits

    def split_logits(self, loader) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, k, C), labels (N,)) over a loader of normalized image batches."""
        all_logits, all_labels = [], []
        for images, labels in loader:
            all_logits.append(np.stack(self(images.numpy().astype(np.float32)), 1))
            all_labels.append(labels.numpy())
        return np.concatenate(all_logits), np.concatenate(all_labels)


def check_parity(model: nn.Module, folder: Path, files: Sequence[tuple[str, str]], input_shape, io_names: GraphIO,
                 atol: float = DEFAULT_ATOL, extra_inputs: Sequence[np.ndarray] = ()) -> dict:  # fmt: skip
    """ONNX Runtime against PyTorch on inputs the tracer never saw; raises ExportError on any gap.

    For every exit: the full-path graph, and the chain of stage graphs 1..i, against
    ``model.forward_exit``; returns the largest differences seen.
    """
    model.eval()
    rng = np.random.default_rng(20240917)  # not the tracing input (torch seed 0)
    batches = [rng.standard_normal((b, *input_shape)).astype(np.float32) for b in PARITY_BATCHES]
    batches += [np.asarray(x, dtype=np.float32) for x in extra_inputs]
    exits = [ort_session(folder / e) for e, _ in files]
    chain = OnnxChain(folder, [s for _, s in files], io_names)
    worst = {"full_path": 0.0, "stage_chain": 0.0}
    for x in batches:
        with torch.no_grad():
            reference = [model.forward_exit(torch.from_numpy(x), i).numpy() for i in range(1, model.num_exits + 1)]
        chained = chain(x)
        for i, ref in enumerate(reference, start=1):
            full = exits[i - 1].run(None, {io_names.image_input: x})[0]
            for kind, got, name in (("full_path", full, files[i - 1][0]), ("stage_chain", chained[i - 1],
                                                                          f"stage1..{i}.onnx")):  # fmt: skip
                if got.shape != ref.shape:
                    raise ExportError(f"{name}: ONNX Runtime returned shape {got.shape} for a batch of {len(x)}, "
                                      f"PyTorch {ref.shape}")  # fmt: skip
                diff = float(np.abs(got - ref).max())
                worst[kind] = max(worst[kind], diff)
                if not diff <= atol:  # also catches NaN
                    raise ExportError(
                        f"exit {i} ({kind.replace('_', ' ')}, {name}): ONNX Runtime differs from PyTorch by "
                        f"{diff:.3g} > {atol:g} on a batch of {len(x)}; the exported graph cannot be trusted"
                    )
    return {**worst, "atol": atol, "batch_sizes": sorted({len(x) for x in batches})}


# ----------------------------------------------------------------------------- manifest


def input_spec(dataset: dict) -> InputSpec:
    """The network's input and how an arbitrary image is brought to it (as evaluation does)."""
    size = int(dataset["image_size"])
    common = dict(channels=int(dataset["channels"]), height=size, width=size, mean=list(dataset["mean"]),
                  std=list(dataset["std"]), interpolation="bilinear",
                  normalization="pixels scaled to [0, 1], then (x - mean) / std per channel")  # fmt: skip
    if dataset["name"] == "imagefolder":  # ImageNet evaluation: shorter side to 256, centre crop 224
        return InputSpec(resize="resize_center_crop", resize_size=round(size * 256 / 224), **common)
    # Fashion-MNIST draws bright garments on black, so transparent pixels become black.
    background = 0 if dataset["name"] == "fashion-mnist" else 255
    return InputSpec(resize="resize", background=background, **common)


def thresholds_entry(results: dict) -> dict:
    """The manifest's ``thresholds``: the rule and every policy calibrated on validation."""
    cal = (results.get("cascade") or {}).get("calibration")
    if cal is None:
        return {}
    entry = {"rule": cascade.RULE, "score": "top softmax probability", "calibrated_on": cal["split"],
             "images": cal.get("images"), "policies": {}, "not_calibrated": []}  # fmt: skip
    if cal["split"] is None:
        entry["reason"] = cal["reason"]
    for p in cal["policies"]:
        if p["thresholds"] is None:
            entry["not_calibrated"].append({"name": p["name"], "target": p["target"], "reason": p["reason"]})
        else:
            entry["policies"][p["name"]] = {k: v for k, v in p.items() if k not in ("name", "reason")}
    return entry


def build_manifest(name: str, payload: dict, files: Sequence[tuple[str, str]], costs: Sequence,
                   results: dict | None, folder: Path, provenance: dict) -> Manifest:  # fmt: skip
    """Assemble and validate the manifest of a folder whose graphs are written."""
    dataset = payload["dataset"]
    exits = []
    chain = cascade.cumulative_gflops([c.stage_gflops for c in costs])
    for (exit_file, stage_file), c in zip(files, costs):
        measured = results["exits"][c.exit - 1] if results else {}
        exits.append(ExitSpec(
            exit=c.exit, gflops=c.gflops, params=c.params, accuracy=measured.get("accuracy"),
            top5_accuracy=measured.get("top5_accuracy"), path=exit_file, stage=stage_file,
            stage_gflops=c.stage_gflops, head_gflops=c.head_gflops, stage_params=c.stage_params,
            cascade_gflops=float(chain[c.exit - 1]),
        ))  # fmt: skip
    evaluation: dict = {"split": None, "reason": "export ran with --skip-eval"}
    if results:
        evaluation = {
            "split": results["split"], "dataset": dataset["name"], "images": results["images"],
            "subset": provenance.get("eval_subset"), "backend": "onnxruntime (exported stage graphs, CPU)",
            "accuracy": "top-1, fraction",
        }  # fmt: skip
        if "spot_check" in results:
            evaluation["spot_check"] = results["spot_check"]
        if "ensemble" in results:
            evaluation["ensemble"] = results["ensemble"]
            evaluation["disagreement"] = results["disagreement"]
            front = cascade.pareto_front([cascade.CascadePoint(**p) for p in results["cascade"]["curve"]])
            evaluation["cascade_curve"] = [
                {"threshold": p.parameter, "accuracy": p.accuracy, "mean_gflops": p.mean_gflops} for p in front
            ]
    hashes = {f: sha256_file(folder / f) for pair in files for f in pair}
    manifest = Manifest(
        name=name, arch=payload["model_config"]["arch"], dataset=dataset["name"], classes=list(dataset["classes"]),
        input=input_spec(dataset), exits=exits, files=hashes, io=GraphIO(),
        thresholds=(thresholds_entry(results) or None) if results else None, provenance=provenance,
        evaluation=evaluation,
        width_mult=payload["model_config"].get("width_mult"), method=(payload.get("config") or {}).get("method"),
    )  # fmt: skip
    return manifest


def provenance_entry(checkpoint: Path, payload: dict, argv: Sequence[str], opset: int, parity: dict,
                     eval_subset: int | None) -> dict:  # fmt: skip
    """Where the model came from and how it was exported."""
    import onnx
    import onnxruntime

    from training.checkpoint import git_revision

    config = payload.get("config") or {}
    train_command = None
    run_config = checkpoint.parent / "config.json"
    if run_config.is_file():
        with contextlib.suppress(ValueError, OSError):
            train_command = json.loads(run_config.read_text()).get("command")
    return {
        "command": " ".join(["python -m training.export", *argv]),
        "git_revision": git_revision(),
        "training_command": train_command,
        "training_git_revision": payload.get("git_revision"),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "dataset": payload["dataset"]["name"],
        "epochs": payload.get("epoch"),
        "epochs_planned": config.get("epochs"),
        "training_config": config,
        "eval_subset": eval_subset,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": opset,
        "parity": parity,
    }


# ----------------------------------------------------------------------------- the export


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    name: str | None = None,
    opset: int = DEFAULT_OPSET,
    split: str = "test",
    data_dir: str | None = None,
    subset: int | None = None,
    skip_eval: bool = False,
    download: bool = True,
    atol: float = DEFAULT_ATOL,
    force: bool = False,
    argv: Sequence[str] = (),
    log=print,
    samples: int = 0,
    **targets,
) -> Manifest:
    """Export, verify, evaluate and write ``out`` atomically; returns the manifest.

    With ``samples``, the first N test images are also written as PNG under ``samples/``
    (named ``INDEX-LABEL-CLASS.png``) for examples and smoke tests; they are not model files
    and are not in the manifest's checksums.
    """
    from training.checkpoint import load_model, resolve_checkpoint_path
    from training.data import make_loader
    from training.evaluate import load_data_for
    from training.flops import exit_costs

    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    checkpoint = resolve_checkpoint_path(checkpoint)
    model, payload = load_model(checkpoint)
    if not payload.get("dataset"):
        raise ExportError(f"{checkpoint} does not record its data set (classes, input size); re-train with train.py")
    dataset = payload["dataset"]
    shape = (int(dataset["channels"]), int(dataset["image_size"]), int(dataset["image_size"]))
    name = name or out.name
    bundle = None
    if not skip_eval:  # load the data first: a missing data set should fail before minutes of work
        bundle = load_data_for(payload, data_dir, subset, download)
        if split == "val" and bundle.val is None:
            raise EvaluationError("the run has no validation split (trained without --val-split); use --split test")
    costs = exit_costs(model, shape)
    io_names = GraphIO()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        log(f"exporting {model.num_exits} exits of {payload['model_config']['arch']} (opset {opset}) ...")
        metadata = {"model": name, "arch": payload["model_config"]["arch"], "dataset": dataset["name"]}
        files = export_graphs(model, shape, tmp, opset, io_names, metadata)
        real = []
        if bundle is not None:  # a batch of real images too: their activations look unlike noise
            real_split = bundle.test if split == "test" else bundle.val
            real = [next(iter(make_loader(real_split, bundle.spec, 7, train=False)))[0].numpy()]
        parity = check_parity(model, tmp, files, shape, io_names, atol, real)
        log(f"parity ok: max |ONNX Runtime - PyTorch| = {parity['full_path']:.2g} (full paths), "
            f"{parity['stage_chain']:.2g} (stage chains)")  # fmt: skip
        results = None
        if bundle is not None:
            results = evaluate_onnx(tmp, files, io_names, bundle, split, costs, **targets)
            log("accuracy (" + results["split"] + ", ONNX Runtime): " + ", ".join(
                f"exit {e['exit']} {100 * e['accuracy']:.2f}%" for e in results["exits"]))  # fmt: skip
        provenance = provenance_entry(checkpoint, payload, argv, opset, parity, subset)
        manifest = build_manifest(name, payload, files, costs, results, tmp, provenance)
        write_manifest(manifest, tmp)
        if samples and bundle is not None:
            if isinstance(bundle.test, ArraySplit):
                write_samples(bundle, tmp / "samples", samples)
            else:  # ImageFolder: the originals are files already
                log(f"--samples: skipped; {dataset['name']} images are files under the data folder already")
        load_manifest(tmp, verify=True)  # what the server will do: the folder must pass it
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def evaluate_onnx(folder: Path, files, io_names: GraphIO, bundle, split: str, costs, **targets) -> dict:
    """Accuracy and calibrated thresholds measured on the exported graphs themselves."""
    from training.data import make_loader

    data = bundle.test if split == "test" else bundle.val
    if data is None:
        raise EvaluationError(f"the run has no {split} split; use --split test")
    chain = OnnxChain(folder, [s for _, s in files], io_names)
    logits, labels = chain.split_logits(make_loader(data, bundle.spec, 256, train=False))
    val = None
    if bundle.val is not None:
        val_loader = make_loader(bundle.val, bundle.spec, 256, train=False)
        val = (logits, labels) if split == "val" else chain.split_logits(val_loader)
    results = analyze(logits, labels, [asdict(c) for c in costs], split, val, **targets)
    # Per-exit accuracy on a systematic sample of SPOT_CHECK images (every len/SPOT_CHECK-th
    # image), so a check that can afford only those images compares exactly, not within
    # sampling noise. A spread sample, not the first images: test sets are not shuffled
    # (Fashion-MNIST's first 1,000 test images are 2.5 points easier than the rest).
    n = min(SPOT_CHECK, len(labels))
    stride = len(labels) // n
    idx = np.arange(0, stride * n, stride)
    results["spot_check"] = {"images": n, "stride": stride,
                             "selection": f"every {stride}th image of the {split} split, from the first",
                             "accuracy": (logits[idx].argmax(-1) == labels[idx, None]).mean(0).tolist()}  # fmt: skip
    return results


def write_samples(bundle, folder: Path, count: int) -> list[Path]:
    """The first ``count`` test images as PNG files, named by index, label and class."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(count, len(bundle.test))):
        image = bundle.test.images[i].permute(1, 2, 0).numpy()  # uint8 HWC, as stored
        label = int(bundle.test.labels[i])
        slug = "".join(c if c.isalnum() else "-" for c in bundle.classes[label].lower()).strip("-")
        paths.append(folder / f"{i:02d}-{label}-{slug}.png")
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(paths[-1])
    return paths


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old one is removed only after the rename."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export every exit and stage of a checkpoint to ONNX, with a manifest")
    p.add_argument("checkpoint", help="checkpoint.pt (or its run folder) written by training/train.py")
    p.add_argument("--out", required=True, help="model folder to write, e.g. exported/NAME")
    p.add_argument("--name", default=None, help="model name in the manifest (default: the folder's name)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument("--split", default="test", choices=("val", "test"), help="split whose accuracy goes in the manifest")
    p.add_argument("--data-dir", default=None, help="where the data set lives (default: the run's)")
    p.add_argument("--no-download", dest="download", action="store_false", help="never try to download data")
    p.add_argument("--subset", type=int, default=None, help="evaluate on the first N images of each split only")
    p.add_argument("--skip-eval", action="store_true", help="no data set: no accuracy, no calibrated thresholds")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="max |ORT - PyTorch| on logits")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--samples", type=int, default=0, help="also write the first N test images as PNG in samples/")
    p.add_argument("--budget-fractions", type=float, nargs="*", default=list(DEFAULT_BUDGET_FRACTIONS),
                   help="cascade budgets to calibrate, as fractions of the main exit's GFLOPs")  # fmt: skip
    p.add_argument("--accuracy-drops", type=float, nargs="*", default=list(DEFAULT_ACCURACY_DROPS),
                   help="accuracy targets, in points below the main exit's validation accuracy")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    from training.checkpoint import CheckpointError
    from training.data import DatasetNotFoundError

    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    if args.opset not in SUPPORTED_OPSETS:
        print(f"error: --opset {args.opset} is outside what this exporter supports "
              f"({SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1})", file=sys.stderr)  # fmt: skip
        return 2
    try:
        manifest = export_checkpoint(
            args.checkpoint, args.out, args.name, args.opset, args.split, args.data_dir, args.subset,
            args.skip_eval, args.download, args.atol, args.force, argv,
            samples=args.samples, budget_fractions=args.budget_fractions, accuracy_drops=args.accuracy_drops,
        )  # fmt: skip
    except (ExportError, CheckpointError, DatasetNotFoundError, EvaluationError, ManifestError) as exc:
        print(f"error: {exc}\n{args.out} was not written (or, with --force, left as it was)", file=sys.stderr)
        return 2
    size = sum((Path(args.out) / f).stat().st_size for f in manifest.files) / 1e6
    print(f"wrote {args.out}: {len(manifest.files)} ONNX files ({size:.1f} MB) + manifest.json")
    for e in manifest.exits:
        acc = f"{100 * e.accuracy:.2f}%" if e.accuracy is not None else "n/a"
        print(f"  exit {e.exit}: {e.gflops:.4f} GFLOPs, {e.params:,} params, accuracy {acc}")
    for policy, p in (manifest.thresholds.policies if manifest.thresholds else {}).items():
        if p.test is not None and manifest.evaluation.split == "test":
            print(f"  cascade {policy}: {100 * p.test.accuracy:.2f}% at {p.test.mean_gflops:.4f} GFLOPs "
                  f"(thresholds from val: {[round(t, 6) for t in p.thresholds]})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
