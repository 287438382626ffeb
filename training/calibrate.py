"""Calibrate an exported model folder's cascade policies again, on its own graphs.

    python -m training.calibrate exported/NAME [--budget-fractions 0.5 0.75] [--accuracy-drops 0.5 1]

Export calibrates the policies and measures the figures in ``manifest.json`` once. This
re-measures them on the folder's ONNX graphs — no checkpoint, no torch model — with the
data set and validation split its provenance records (same seed, same images), and rewrites
``thresholds``, ``evaluation`` and the per-exit accuracies: new targets for a model already
shipped, or figures recomputed under the rule this code applies (``serving.cascade.RULE``)
when an older export recorded another. The graphs are verified against their checksums
first and are not touched; ``provenance.recalibrated`` records the command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from serving.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest, write_manifest
from training.evaluate import (
    EvaluationError,
    add_calibration_args,
    add_data_args,
    calibration_targets,
    load_data_for,
)
from training.manifest_builder import evaluation_entry, thresholds_entry
from training.onnx_checks import evaluate_onnx

__all__ = ["get_args_parser", "main", "recalibrate"]


def recalibrate(
    folder: str | Path,
    split: str = "test",
    data_dir: str | None = None,
    subset: int | None = None,
    download: bool = True,
    argv: Sequence[str] = (),
    force: bool = False,
    **targets,
) -> Manifest:
    """Re-measure and re-calibrate ``folder`` in place; returns the new manifest. Figures of a whole
    split are replaced by those of a ``subset`` only with ``force``."""
    from training.checkpoint import git_revision

    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        raise EvaluationError(f"{folder} holds no {MANIFEST_NAME}; pass a folder written by python -m training.export")
    manifest = load_manifest(folder, verify=True)  # the graphs are what the figures will describe
    measured = manifest.evaluation
    if subset is not None and not force and measured is not None and measured.split and measured.subset is None:
        raise EvaluationError(
            f"{folder / MANIFEST_NAME}'s accuracies and policies were measured on the whole {measured.split} split "
            f"({measured.images} images); --subset {subset} would replace them with figures of {subset} images. "
            "Calibrate a copy of the folder, drop --subset, or add --force"
        )
    config = dict(manifest.provenance.training_config)
    if not config:
        raise EvaluationError(
            f"{folder / MANIFEST_NAME} records no training_config in its provenance, so its validation "
            "split cannot be rebuilt; export the checkpoint again instead"
        )
    # What load_data_for reads from a checkpoint, from the manifest: the data set, its classes and
    # input, and the run's split settings (data_dir, val_split, seed, train_size).
    payload = {
        "dataset": {"name": manifest.dataset, "classes": list(manifest.classes)},
        "config": config,
        "model_config": {"num_classes": len(manifest.classes), "in_channels": manifest.input.channels},
    }
    bundle = load_data_for(payload, data_dir, subset, download)
    if split == "val" and bundle.val is None:
        raise EvaluationError("the run has no validation split (trained without --val-split); use --split test")
    costs = [  # the manifest's own figures (analyze takes ExitCost's keys)
        {"gflops": e.gflops, "params": e.params, "stage_gflops": e.stage_gflops, "head_gflops": e.head_gflops}
        for e in manifest.exits
    ]
    files = [(e.path, e.stage) for e in manifest.exits]
    results = evaluate_onnx(folder, files, manifest.io, bundle, split, costs, **targets)
    exits = [
        e.model_copy(update={"accuracy": r["accuracy"], "top5_accuracy": r.get("top5_accuracy")})
        for e, r in zip(manifest.exits, results["exits"])
    ]
    provenance = manifest.provenance.model_dump()
    provenance["recalibrated"] = {
        "command": " ".join(["python -m training.calibrate", *argv]),
        "git_revision": git_revision(),
        "eval_subset": subset,
    }
    updated = Manifest.model_validate(
        {
            **manifest.model_dump(),
            "exits": [e.model_dump() for e in exits],
            "thresholds": thresholds_entry(results) or None,
            "evaluation": evaluation_entry(results, manifest.dataset, subset),
            "provenance": provenance,
        }
    )
    write_manifest(updated, folder)  # atomically
    return updated


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Calibrate an exported model folder's cascade policies again. The targets given are the "
        "whole new set: the policies calibrated before are replaced, and a family of targets not given "
        "(--budget-fractions, --accuracy-drops: 0.5 0.75 and 0.5 1 by default) takes its defaults."
    )
    p.add_argument("folder", help="model folder written by training.export (its manifest.json is rewritten)")
    p.add_argument("--split", default="test", choices=("val", "test"), help="split whose accuracy goes in the manifest")
    p.add_argument(
        "--force", action="store_true", help="with --subset, replace figures measured on a whole split all the same"
    )
    add_data_args(p)
    add_calibration_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from training.data import DatasetNotFoundError
    from training.export import print_summary

    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    try:
        manifest = recalibrate(
            args.folder,
            args.split,
            args.data_dir,
            args.subset,
            args.download,
            argv,
            args.force,
            **calibration_targets(args),
        )
    except (
        DatasetNotFoundError,
        EvaluationError,
        ManifestError,
        OSError,
        ValueError,
    ) as exc:  # ValueError: a split the data cannot give; OSError: the manifest could not be written
        print(f"error: {exc}\n{args.folder} was left as it was", file=sys.stderr)
        return 2
    print(f"rewrote {Path(args.folder) / MANIFEST_NAME}")
    print_summary(manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
