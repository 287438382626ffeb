"""Evaluate a trained multi-exit checkpoint: per-exit accuracy and cost, cascades, disagreement.

    python -m training.evaluate runs/RUN/checkpoint.pt --split test --out runs/RUN/eval

Writes ``results.json`` and three plots into ``--out``:

* ``accuracy_vs_gflops.png`` — every exit at its full-path cost, the ensemble of all
  exits, and the confidence-cascade curves (mean GFLOPs actually spent, DESIGN §2);
* ``training_curves.png`` — per-epoch accuracy of every exit, from the run's log.jsonl;
* ``disagreement.png`` — for every pair of exits, how often one is right where the other
  is wrong (the paper's Figure 2 analysis).

Cascade thresholds are calibrated on the run's validation split (``--val-split`` at
training time) and only *reported* on the evaluated split; a run without a validation
split gets no calibrated thresholds rather than thresholds fitted on test data.

The analysis functions take numpy logits, so the exporter reuses them on ONNX Runtime
outputs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from training import cascade
from training.accuracy import topk_accuracy
from training.options import UsageError, at_least, check_device
from training.plots import plot_accuracy_vs_gflops, plot_disagreement, plot_training_curves, read_log

DEFAULT_BUDGET_FRACTIONS = (0.5, 0.75)  # of the main exit's GFLOPs
DEFAULT_ACCURACY_DROPS = (0.5, 1.0)  # points below the main exit's validation accuracy


class EvaluationError(ValueError):
    """The checkpoint and the data do not fit together, or a split is missing."""


# ----------------------------------------------------------------------------- metrics (numpy)


def disagreement(logits: np.ndarray, labels: np.ndarray) -> dict:
    """How the exits' mistakes differ (the paper's Figure 2).

    ``right_wrong[i][j]`` is the fraction of samples exit i+1 classifies correctly while
    exit j+1 does not; ``vs_main`` breaks every exit's agreement with the main output into
    both right / only this exit right / only main right / both wrong, plus how often their
    predictions differ at all.
    """
    correct = logits.argmax(-1) == labels[:, None]  # (N, k)
    pred = logits.argmax(-1)
    k = correct.shape[1]
    right_wrong = (correct[:, :, None] & ~correct[:, None, :]).mean(0)
    main = correct[:, -1]
    vs_main = []
    for i in range(k):
        c = correct[:, i]
        vs_main.append(
            {
                "exit": i + 1,
                "both_right": float((c & main).mean()),
                "exit_right_main_wrong": float((c & ~main).mean()),
                "exit_wrong_main_right": float((~c & main).mean()),
                "both_wrong": float((~c & ~main).mean()),
                "predictions_differ": float((pred[:, i] != pred[:, -1]).mean()),
            }
        )
    return {"right_wrong": right_wrong.tolist(), "vs_main": vs_main}


def analyze(
    logits: np.ndarray,
    labels: np.ndarray,
    costs: Sequence,
    split: str,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    budget_fractions: Sequence[float] = DEFAULT_BUDGET_FRACTIONS,
    budgets_gflops: Sequence[float] = (),
    accuracy_drops: Sequence[float] = DEFAULT_ACCURACY_DROPS,
    target_accuracies: Sequence[float] = (),
) -> dict:
    """All numbers of an evaluation, from (N, k, C) logits of the evaluated split.

    ``costs`` are ``training.flops.ExitCost`` (or dicts with the same keys). ``val`` is the
    validation split's (logits, labels) for calibrating thresholds; budgets are given as
    fractions of the main exit's GFLOPs and/or absolute GFLOPs, accuracy targets as drops
    (points) below the main exit's validation accuracy and/or absolute fractions.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    costs = [c if isinstance(c, dict) else asdict(c) for c in costs]
    n, k, num_classes = logits.shape
    if len(costs) != k:
        raise EvaluationError(f"{k} exits in the logits but {len(costs)} exit costs")
    stage = [c["stage_gflops"] for c in costs]
    chain = cascade.cumulative_gflops(stage)
    exits = []
    for i, c in enumerate(costs):
        entry = {
            "exit": i + 1,
            "accuracy": topk_accuracy(logits[:, i], labels, 1),
            "gflops": c["gflops"],
            "params": c["params"],
            "stage_gflops": c["stage_gflops"],
            "head_gflops": c.get("head_gflops"),
            "cascade_gflops": float(chain[i]),  # reaching this exit through exits 1..i-1
        }
        if num_classes >= 100:
            entry["top5_accuracy"] = topk_accuracy(logits[:, i], labels, 5)
        exits.append(entry)
    results: dict = {"split": split, "images": int(n), "num_exits": k, "exits": exits}
    if k > 1:
        ens = logits.mean(1)  # EED's teacher G_z: the mean of all exits' logits
        results["ensemble"] = {"accuracy": topk_accuracy(ens, labels, 1), "gflops": float(chain[-1])}
        if num_classes >= 100:
            results["ensemble"]["top5_accuracy"] = topk_accuracy(ens, labels, 5)
        results["disagreement"] = disagreement(logits, labels)
        results["cascade"] = _cascade_section(
            logits,
            labels,
            stage,
            split,
            val,
            costs[-1]["gflops"],
            budget_fractions,
            budgets_gflops,
            accuracy_drops,
            target_accuracies,
        )
    return results


def policy_names(budget_fractions=(), budgets_gflops=(), accuracy_drops=(), target_accuracies=()) -> list[str]:
    """The manifest names of the policies these targets calibrate, in that order; EvaluationError when
    two targets would share a name (``%g`` of 0.0250000001 and of 0.025: the later policy replaced
    the earlier in the manifest without a word)."""
    names = [f"budget_{f:g}x_main" for f in budget_fractions]
    names += [f"budget_{g:g}_gflops" for g in budgets_gflops]
    names += [f"accuracy_main_minus_{d:g}pt" for d in accuracy_drops]
    names += [f"accuracy_{a:g}" for a in target_accuracies]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise EvaluationError(
            f"two calibration targets would both be named {', '.join(repeated)} (names keep 6 significant "
            "digits); give each target once, differing within those digits"
        )
    return names


def _cascade_section(
    logits, labels, stage, split, val, main_gflops, budget_fractions, budgets_gflops, accuracy_drops, target_accuracies
) -> dict:
    scores = cascade.confidences(logits)  # softmax once for every policy below
    section: dict = {
        "rule": cascade.RULE,
        "cost": "mean GFLOPs actually spent: stage graphs of every exit evaluated (trunk once, each head run)",
        "curve": [p.to_dict() for p in cascade.sweep(scores, labels, stage)],  # a fixed grid of thresholds
    }
    if val is None:
        section["calibration"] = {
            "split": None,
            "reason": "the run has no validation split (train with --val-split N); thresholds are "
            "never fitted on the evaluated split",
            "policies": [],
        }
        return section  # no MSDNet curve either: its thresholds are fitted, on validation only
    val_logits, val_labels = np.asarray(val[0]), np.asarray(val[1])
    section["geometric_curve"] = [
        p.to_dict() for p in cascade.geometric_family(scores, labels, stage, fit_on=val_logits)
    ]
    section["geometric_fitted_on"] = "val"
    main_val_acc = topk_accuracy(val_logits[:, -1], val_labels, 1)
    names = iter(policy_names(budget_fractions, budgets_gflops, accuracy_drops, target_accuracies))
    budgets = [(next(names), {"fraction_of_main": f}, f * main_gflops) for f in budget_fractions]
    budgets += [(next(names), {"fraction_of_main": g / main_gflops}, g) for g in budgets_gflops]
    targets = [(next(names), {"drop_points": d}, main_val_acc - d / 100) for d in accuracy_drops]
    targets += [(next(names), {}, a) for a in target_accuracies]
    cals = cascade.calibrate(
        val_logits, val_labels, stage, [b[2] for b in budgets], [t[2] for t in targets], {split: (scores, labels)}
    )
    policies = []
    for cal, (name, extra, _) in zip(cals, budgets + targets):
        d = cal.to_dict()
        d["target"] = {**d["target"], **extra}
        policies.append({"name": name, **d})
    section["calibration"] = {
        "split": "val",
        "images": int(len(val_labels)),
        "main_val_accuracy": main_val_acc,
        "policies": policies,
    }
    return section


# ----------------------------------------------------------------------------- checkpoint + data


def load_data_for(payload: dict, data_dir: str | None = None, subset: int | None = None, download: bool = True):
    """The data set a checkpoint was trained on, with the run's validation split (same seed).

    Raises EvaluationError when the checkpoint lacks the information or the data found does
    not match what the model was trained on (classes, channels).
    """
    from training.checkpoint import from_record
    from training.data import build_datasets

    info, config = payload.get("dataset"), payload.get("config") or {}
    if not info or "name" not in info:
        raise EvaluationError("the checkpoint does not say which data set it was trained on (no 'dataset' entry)")
    data_dir = data_dir if data_dir is not None else from_record(config.get("data_dir"))
    try:
        bundle = build_datasets(
            info["name"],
            data_dir,
            int(config.get("val_split") or 0),
            subset,
            int(config.get("seed") or 0),
            download,
            config.get("train_size"),
        )
    except ValueError as exc:  # the run's split does not fit this data: name the data, not train.py's flags
        raise EvaluationError(
            f"the data in {data_dir} cannot be split as this run's was at training time ({exc}); point "
            "--data-dir at the data set the run was trained on"
        ) from None
    model_cfg = payload.get("model_config") or {}
    problems = []
    if model_cfg.get("num_classes") not in (None, bundle.spec.num_classes):
        problems.append(f"the model has {model_cfg['num_classes']} classes, the data {bundle.spec.num_classes}")
    if model_cfg.get("in_channels") not in (None, bundle.spec.channels):
        problems.append(f"the model takes {model_cfg['in_channels']} channels, the data has {bundle.spec.channels}")
    if info.get("classes") and list(info["classes"]) != list(bundle.classes):
        problems.append("the class names differ from the ones the model was trained with")
    if problems:
        raise EvaluationError(f"checkpoint and data set {info['name']} do not match: " + "; ".join(problems))
    return bundle


def split_logits(model, bundle, split: str, batch_size: int = 256, device: str = "cpu"):
    """(logits (N, k, C) float32, labels (N,)) of one split, as numpy arrays."""
    import torch

    from training.data import make_loader
    from training.engine import collect_logits

    data = {"train": bundle.train, "val": bundle.val, "test": bundle.test}[split]
    if data is None:
        raise EvaluationError(f"the run has no {split} split (it was trained without --val-split); use --split test")
    loader = make_loader(data, bundle.spec, batch_size, train=False)
    logits, _, labels = collect_logits(model.to(device), loader, torch.device(device))
    return logits.numpy(), labels.numpy()


def evaluate_checkpoint(
    checkpoint: str | Path,
    split: str = "test",
    data_dir: str | None = None,
    subset: int | None = None,
    download: bool = True,
    batch_size: int = 256,
    device: str = "cpu",
    **targets,
) -> tuple[dict, dict]:
    """Load, run and analyse a checkpoint; returns (results, payload)."""
    from serving.manifest import sha256_file
    from training.checkpoint import load_model, resolve_checkpoint_path
    from training.flops import exit_costs

    path = resolve_checkpoint_path(checkpoint)
    model, payload = load_model(path)
    bundle = load_data_for(payload, data_dir, subset, download)
    spec = bundle.spec
    costs = exit_costs(model, (spec.channels, spec.image_size, spec.image_size))
    logits, labels = split_logits(model, bundle, split, batch_size, device)
    val = None
    if bundle.val is not None:
        val = (logits, labels) if split == "val" else split_logits(model, bundle, "val", batch_size, device)
    results = analyze(logits, labels, costs, split, val, **targets)
    config = payload.get("config") or {}
    results = {
        "checkpoint": str(path),
        "checkpoint_sha256": sha256_file(path),
        "epoch": payload.get("epoch"),
        "arch": payload["model_config"]["arch"],
        "width_mult": payload["model_config"].get("width_mult"),
        "method": config.get("method"),
        "dataset": spec.name,
        "subset": subset,
        **results,
    }
    return results, payload


def format_summary(results: dict) -> str:
    """A few human-readable lines: per-exit accuracy/cost, ensemble, calibrated policies."""
    lines = [
        f"{results['arch']} on {results['dataset']} {results['split']} ({results['images']} images), "
        f"epoch {results.get('epoch')}"
    ]
    lines.append(f"{'exit':>6} {'acc %':>7} {'GFLOPs':>9} {'stage GFLOPs':>13} {'params':>10}")
    for e in results["exits"]:
        lines.append(
            f"{e['exit']:>6} {100 * e['accuracy']:>7.2f} {e['gflops']:>9.4f} {e['stage_gflops']:>13.4f} "
            f"{e['params']:>10,}"
        )
    if "ensemble" in results:
        ens = results["ensemble"]
        lines.append(f"{'ens.':>6} {100 * ens['accuracy']:>7.2f} {ens['gflops']:>9.4f}")
    cal = (results.get("cascade") or {}).get("calibration")
    if cal:
        if not cal["policies"]:
            lines.append(f"cascade thresholds: not calibrated ({cal.get('reason')})")
        for p in cal["policies"]:
            if p["thresholds"] is None:
                lines.append(f"cascade {p['name']}: none ({p['reason']})")
                continue
            ev = p.get(results["split"], {})
            lines.append(
                f"cascade {p['name']}: thresholds {[round(t, 6) for t in p['thresholds']]} -> val "
                f"{100 * p['val']['accuracy']:.2f}% @ {p['val']['mean_gflops']:.4f} GFLOPs; {results['split']} "
                f"{100 * ev.get('accuracy', float('nan')):.2f}% @ {ev.get('mean_gflops', float('nan')):.4f} GFLOPs"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Per-exit accuracy, cost, cascades and disagreement of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint.pt (or its run folder) written by training/train.py")
    p.add_argument("--split", default="test", choices=("val", "test"), help="split to evaluate")
    p.add_argument("--out", default=None, help="output folder (default: RUN/eval-SPLIT)")
    add_data_args(p)
    p.add_argument("--batch-size", type=at_least(1), default=256)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    add_calibration_args(p)
    return p


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Where a checkpoint's data set comes from (``python -m training.evaluate`` and ``training.export``)."""
    p.add_argument("--data-dir", default=None, help="where the data set lives (default: the run's)")
    p.add_argument("--no-download", dest="download", action="store_false", help="never try to download data")
    p.add_argument(
        "--subset", type=at_least(1), default=None, help="only the first N images of each split (quick look)"
    )


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    """The cascade policies to calibrate on validation (evaluation and export alike). They are the
    whole set: a family not given keeps its defaults, and nothing calibrated earlier is kept."""
    p.add_argument(
        "--budget-fractions",
        type=float,
        nargs="*",
        default=list(DEFAULT_BUDGET_FRACTIONS),
        help="cascade budgets to calibrate, as fractions of the main exit's GFLOPs",
    )
    p.add_argument("--budget-gflops", type=float, nargs="*", default=[], help="cascade budgets in GFLOPs")
    p.add_argument(
        "--accuracy-drops",
        type=float,
        nargs="*",
        default=list(DEFAULT_ACCURACY_DROPS),
        help="accuracy targets, in points below the main exit's validation accuracy",
    )
    p.add_argument("--target-accuracy", type=float, nargs="*", default=[], help="absolute accuracy targets (0..1)")


def calibration_targets(args: argparse.Namespace) -> dict:
    """:func:`analyze`'s calibration keywords from :func:`add_calibration_args`' flags; EvaluationError
    now, before any work, for targets whose policies would share a name."""
    targets = {
        "budget_fractions": args.budget_fractions,
        "budgets_gflops": args.budget_gflops,
        "accuracy_drops": args.accuracy_drops,
        "target_accuracies": args.target_accuracy,
    }
    for flag, values, ok, wanted in (
        ("--budget-fractions", args.budget_fractions, lambda v: 0 < v <= 1, "in (0, 1] (0.5 = half the main exit's)"),
        ("--budget-gflops", args.budget_gflops, lambda v: v > 0, "above 0"),
        ("--accuracy-drops", args.accuracy_drops, lambda v: 0 <= v < 100, "points in [0, 100) (0.5 = half a point)"),
        ("--target-accuracy", args.target_accuracy, lambda v: 0 < v <= 1, "fractions in (0, 1] (0.93, not 93)"),
    ):
        bad = [v for v in values if not (math.isfinite(v) and ok(v))]
        if bad:
            raise EvaluationError(f"{flag} {' '.join(f'{v:g}' for v in bad)}: give values {wanted}")
    policy_names(**targets)
    return targets


def main(argv: list[str] | None = None) -> int:
    from training.checkpoint import CheckpointError, resolve_checkpoint_path
    from training.data import DatasetNotFoundError

    args = get_args_parser().parse_args(argv)
    made: Path | None = None  # the --out folder this run made: removed again if it fails before writing
    try:
        check_device(args.device, allow_auto=False)
        targets = calibration_targets(args)
        run_dir = resolve_checkpoint_path(args.checkpoint).parent
        out = Path(args.out) if args.out else run_dir / f"eval-{args.split}"
        if out.exists() and not out.is_dir():  # found before minutes of evaluation, not after
            raise EvaluationError(f"--out {out} is a file; give a folder (it receives results.json and plots)")
        if not out.exists() and out.suffix == ".json":
            raise EvaluationError(f"--out is the folder that receives results.json and plots; {out} names a file")
        try:
            if not out.exists():
                made = next((p for p in reversed(out.parents) if not p.exists()), out)
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            made = None
            raise EvaluationError(
                f"--out {out} cannot be created ({exc.strerror or exc}); give a writable folder"
            ) from None
        results, _ = evaluate_checkpoint(
            args.checkpoint,
            args.split,
            args.data_dir,
            args.subset,
            args.download,
            args.batch_size,
            args.device,
            **targets,
        )
    except (CheckpointError, DatasetNotFoundError, EvaluationError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if made is not None:  # nothing written yet: leave no empty folder (by default inside the run)
            for folder in (out, *out.parents):  # empty ones only: another process may be writing there
                try:
                    folder.rmdir()
                except OSError:
                    break
                if folder == made:
                    break
        return 2
    title = f"{results['arch']} x{results['width_mult']} {results['method']} on {results['dataset']}"
    plots: dict[str, Path | None] = {
        "accuracy_vs_gflops": plot_accuracy_vs_gflops(results, out / "accuracy_vs_gflops.png", title)
    }
    plots["disagreement"] = plot_disagreement(results, out / "disagreement.png")
    log = run_dir / "log.jsonl"
    if log.is_file():
        plots["training_curves"] = plot_training_curves(read_log(log), out / "training_curves.png", title)
    results["plots"] = {k: str(v) for k, v in plots.items() if v is not None}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_summary(results))
    print(f"wrote {out / 'results.json'} and {len(results['plots'])} plots in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
