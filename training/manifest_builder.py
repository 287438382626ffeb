"""The manifest of an exported model folder: input spec, per-exit costs and accuracy,
calibrated policies, evaluation record and provenance (``serving.manifest.Manifest``)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from serving.manifest import ExitSpec, GraphIO, InputSpec, Manifest, sha256_file
from training import cascade


def input_spec(dataset: dict) -> InputSpec:
    """The network's input and how an arbitrary image is brought to it (as evaluation does)."""
    size = int(dataset["image_size"])
    common = dict(
        channels=int(dataset["channels"]),
        height=size,
        width=size,
        mean=list(dataset["mean"]),
        std=list(dataset["std"]),
        interpolation="bilinear",
        normalization="pixels scaled to [0, 1], then (x - mean) / std per channel",
    )
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
    entry = {
        "rule": cascade.RULE,
        "score": "top softmax probability",
        "calibrated_on": cal["split"],
        "images": cal.get("images"),
        "policies": {},
        "not_calibrated": [],
    }
    if cal["split"] is None:
        entry["reason"] = cal["reason"]
    for p in cal["policies"]:
        if p["thresholds"] is None:
            entry["not_calibrated"].append({"name": p["name"], "target": p["target"], "reason": p["reason"]})
        else:
            entry["policies"][p["name"]] = {k: v for k, v in p.items() if k not in ("name", "reason")}
    return entry


def evaluation_entry(results: dict | None, dataset_name: str, subset: int | None) -> dict:
    """The manifest's ``evaluation``: what was measured on the exported graphs, and on what."""
    if not results:
        return {"split": None, "reason": "export ran with --skip-eval"}
    evaluation = {
        "split": results["split"],
        "dataset": dataset_name,
        "images": results["images"],
        "subset": subset,
        "backend": "onnxruntime (exported stage graphs, CPU)",
        "accuracy": "top-1, fraction",
    }
    if "spot_check" in results:
        evaluation["spot_check"] = results["spot_check"]
    if "ensemble" in results:
        evaluation["ensemble"] = results["ensemble"]
        evaluation["disagreement"] = results["disagreement"]
        front = cascade.pareto_front([cascade.CascadePoint(**p) for p in results["cascade"]["curve"]])
        evaluation["cascade_curve"] = [
            {"threshold": p.parameter, "accuracy": p.accuracy, "mean_gflops": p.mean_gflops} for p in front
        ]
    return evaluation


def build_manifest(
    name: str,
    payload: dict,
    files: Sequence[tuple[str, str]],
    costs: Sequence,
    results: dict | None,
    folder: Path,
    provenance: dict,
) -> Manifest:
    """Assemble and validate the manifest of a folder whose graphs are written."""
    dataset = payload["dataset"]
    exits = []
    chain = cascade.cumulative_gflops([c.stage_gflops for c in costs])
    for (exit_file, stage_file), c in zip(files, costs):
        measured = results["exits"][c.exit - 1] if results else {}
        exits.append(
            ExitSpec(
                exit=c.exit,
                gflops=c.gflops,
                params=c.params,
                accuracy=measured.get("accuracy"),
                top5_accuracy=measured.get("top5_accuracy"),
                path=exit_file,
                stage=stage_file,
                stage_gflops=c.stage_gflops,
                head_gflops=c.head_gflops,
                stage_params=c.stage_params,
                cascade_gflops=float(chain[c.exit - 1]),
            )
        )
    evaluation = evaluation_entry(results, dataset["name"], provenance.get("eval_subset"))
    hashes = {f: sha256_file(folder / f) for pair in files for f in pair}
    manifest = Manifest(
        name=name,
        arch=payload["model_config"]["arch"],
        dataset=dataset["name"],
        classes=list(dataset["classes"]),
        input=input_spec(dataset),
        exits=exits,
        files=hashes,
        io=GraphIO(),
        thresholds=(thresholds_entry(results) or None) if results else None,
        provenance=provenance,
        evaluation=evaluation,
        width_mult=payload["model_config"].get("width_mult"),
        method=(payload.get("config") or {}).get("method"),
    )
    return manifest


def provenance_entry(
    checkpoint: Path, payload: dict, argv: Sequence[str], opset: int, parity: dict, eval_subset: int | None
) -> dict:
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
