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

The work is split by concern: ``training.onnx_graphs`` (what each graph computes, its
export and contract check), ``training.onnx_checks`` (parity with PyTorch and accuracy,
measured with ONNX Runtime as the server runs it) and ``training.manifest_builder``; this
module runs them in order and holds the CLI. Any failure stops the export; the folder is
assembled in a temporary sibling and renamed into place only when complete, so no
half-written model is left.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from serving.manifest import MODEL_NAME_PATTERN, GraphIO, Manifest, ManifestError, load_manifest, write_manifest
from training.data import ArraySplit
from training.evaluate import EvaluationError, add_calibration_args, add_data_args, calibration_targets
from training.manifest_builder import build_manifest, provenance_entry
from training.onnx_checks import DEFAULT_ATOL, DEFAULT_RTOL, check_parity, evaluate_onnx
from training.onnx_graphs import DEFAULT_OPSET, SUPPORTED_OPSETS, ExportError, export_graphs
from training.options import at_least, non_negative_float

__all__ = ["ExportError", "export_checkpoint", "get_args_parser", "main", "write_samples"]


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
    rtol: float = DEFAULT_RTOL,
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
    checkpoint = resolve_checkpoint_path(checkpoint)
    refuse_to_replace(out, checkpoint, force)
    model, payload = load_model(checkpoint)
    if not payload.get("dataset"):
        raise ExportError(f"{checkpoint} does not record its data set (classes, input size); re-train with train.py")
    dataset = payload["dataset"]
    shape = (int(dataset["channels"]), int(dataset["image_size"]), int(dataset["image_size"]))
    name = name or out.name
    try:  # before the data and the export: an --out that cannot be written fails first
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"--out {out}: its folder {out.parent} cannot be created ({exc.strerror or exc})") from None
    bundle = None
    if not skip_eval:  # load the data first: a missing data set should fail before minutes of work
        bundle = load_data_for(payload, data_dir, subset, download)
        if split == "val" and bundle.val is None:
            raise EvaluationError("the run has no validation split (trained without --val-split); use --split test")
    costs = exit_costs(model, shape)
    io_names = GraphIO()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()  # an OSError here (a folder that is not writable) is reported by main, as any other
    try:
        log(f"exporting {model.num_exits} exits of {payload['model_config']['arch']} (opset {opset}) ...")
        metadata = {"model": name, "arch": payload["model_config"]["arch"], "dataset": dataset["name"]}
        files = export_graphs(model, shape, tmp, opset, io_names, metadata)
        real = []
        if bundle is not None:  # a batch of real images too: their activations look unlike noise
            real_split = bundle.test if split == "test" else bundle.val
            real = [next(iter(make_loader(real_split, bundle.spec, 7, train=False)))[0].numpy()]
        parity = check_parity(model, tmp, files, shape, io_names, atol, real, rtol)
        log(
            f"parity ok: max |ONNX Runtime - PyTorch| = {parity['full_path']:.2g} (full paths), "
            f"{parity['stage_chain']:.2g} (stage chains)"
        )
        results = None
        if bundle is not None:
            results = evaluate_onnx(tmp, files, io_names, bundle, split, costs, **targets)
            log(
                "accuracy ("
                + results["split"]
                + ", ONNX Runtime): "
                + ", ".join(f"exit {e['exit']} {100 * e['accuracy']:.2f}%" for e in results["exits"])
            )
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


def refuse_to_replace(out: Path, checkpoint: Path, force: bool) -> None:
    """``out`` may be written: it does not exist, or ``force`` replaces an earlier export there — never
    a folder that holds the checkpoint (``--out`` set to the run folder, or a folder of runs: with
    --force it was deleted, checkpoints, config and logs with it) nor one that is not an export."""
    if checkpoint.resolve().is_relative_to(out.resolve()):
        raise ExportError(
            f"--out {out} holds the checkpoint being exported ({checkpoint}); replacing it would delete the run. "
            "Export to a folder of its own, e.g. --out exported/NAME"
        )
    if not out.exists():
        return
    if not force:
        raise ExportError(f"{out} already exists; pass --force to replace an earlier export there")
    if not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file()):
        raise ExportError(
            f"{out} is not an earlier export (no manifest.json) and not empty; --force replaces only an export. "
            "Choose another --out, or move that folder away first"
        )


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old one is removed only after the rename."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:  # the earlier export back where it was, as main's error message says
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- CLI


MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export every exit and stage of a checkpoint to ONNX, with a manifest")
    p.add_argument("checkpoint", help="checkpoint.pt (or its run folder) written by training/train.py")
    p.add_argument("--out", required=True, help="model folder to write, e.g. exported/NAME")
    p.add_argument("--name", default=None, help="model name in the manifest (default: the folder's name)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument("--split", default="test", choices=("val", "test"), help="split whose accuracy goes in the manifest")
    add_data_args(p)
    p.add_argument("--skip-eval", action="store_true", help="no data set: no accuracy, no calibrated thresholds")
    p.add_argument(
        "--atol",
        type=non_negative_float,
        default=DEFAULT_ATOL,
        help="parity: max |ORT - PyTorch| on logits, absolute part",
    )
    p.add_argument(
        "--rtol",
        type=non_negative_float,
        default=DEFAULT_RTOL,
        help="parity: plus this fraction of the largest |logit| (deep models' float32 error grows with their logits)",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--samples", type=at_least(0), default=0, help="also write the first N test images as PNG in samples/"
    )
    add_calibration_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from training.checkpoint import CheckpointError
    from training.data import DatasetNotFoundError

    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    name = args.name if args.name is not None else Path(args.out).name
    if not MODEL_NAME.fullmatch(name):
        # The name is a path segment of the server's routes (/v2/models/NAME/infer) and a metric label.
        print(
            f"error: model name {name!r} cannot name a model in a URL; use letters, digits and . _ - "
            "and not dots alone (--name, or the --out folder's name)",
            file=sys.stderr,
        )
        return 2
    if args.samples and args.skip_eval:
        print("error: --samples writes test images, which --skip-eval does not load; drop one", file=sys.stderr)
        return 2
    if args.opset not in SUPPORTED_OPSETS:
        print(
            f"error: --opset {args.opset} is outside what this exporter supports "
            f"({SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1})",
            file=sys.stderr,
        )
        return 2
    try:
        manifest = export_checkpoint(
            args.checkpoint,
            args.out,
            args.name,
            args.opset,
            args.split,
            args.data_dir,
            args.subset,
            args.skip_eval,
            args.download,
            args.atol,
            args.force,
            argv,
            samples=args.samples,
            rtol=args.rtol,
            **calibration_targets(args),
        )
    except (ExportError, CheckpointError, DatasetNotFoundError, EvaluationError, ManifestError, OSError) as exc:
        # OSError: the folder could not be written (a full disk, a rename refused); what was begun is removed
        print(f"error: {exc}\n{args.out} was not written (or, with --force, left as it was)", file=sys.stderr)
        return 2
    size = sum((Path(args.out) / f).stat().st_size for f in manifest.files) / 1e6
    print(f"wrote {args.out}: {len(manifest.files)} ONNX files ({size:.1f} MB) + manifest.json")
    print_summary(manifest)
    return 0


def print_summary(manifest: Manifest) -> None:
    """Per-exit cost and accuracy, the calibrated policies' test figures, or why there are none."""
    for e in manifest.exits:
        acc = f"{100 * e.accuracy:.2f}%" if e.accuracy is not None else "n/a"
        print(f"  exit {e.exit}: {e.gflops:.4f} GFLOPs, {e.params:,} params, accuracy {acc}")
    main = manifest.exits[-1]
    for policy, p in (manifest.thresholds.policies if manifest.thresholds else {}).items():
        if p.test is not None and manifest.evaluation.split == "test":
            print(
                f"  cascade {policy}: {100 * p.test.accuracy:.2f}% at {p.test.mean_gflops:.4f} GFLOPs "
                f"(thresholds from val: {[round(t, 6) for t in p.thresholds]})"
            )
            if main.accuracy is not None and p.test.mean_gflops >= main.gflops and p.test.accuracy <= main.accuracy:
                # The cascade evaluates every head on the way: on a weakly trained model its exits
                # rarely stop early, and it then costs more than the main exit for no gain.
                print(
                    f"    note: the main exit alone (exit={main.exit}) is as accurate for less "
                    f"({100 * main.accuracy:.2f}% at {main.gflops:.4f} GFLOPs)"
                )
    for missed in manifest.thresholds.not_calibrated if manifest.thresholds else ():
        print(f"  not calibrated: {missed.name}: {missed.reason}")
    if not (manifest.thresholds and manifest.thresholds.policies):
        # policy=NAME will answer 422 for every name: say so here, where it can still be fixed
        t = manifest.thresholds
        if manifest.num_exits == 1:
            why = "the model has one exit, so there is nothing to cascade"
        elif t is None:
            why = "exported with --skip-eval; calibrate them with python -m training.calibrate FOLDER"
        elif t.reason:  # e.g. the run has no validation split (the reason says what to do)
            why = t.reason
        else:
            why = "no target could be met (the reasons above)" if t.not_calibrated else "no target was given"
        print(f"  no calibrated cascade policies, so policy=NAME has nothing to serve: {why}")


if __name__ == "__main__":
    raise SystemExit(main())
