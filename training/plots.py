"""The evaluation's figures (PNG): accuracy against GFLOPs with the cascade curves and the
calibrated policies, per-epoch accuracy of every exit, and the exits' disagreement matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training import cascade


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_gflops(results: dict, path: str | Path, title: str = "") -> Path:
    """Per-exit points, the ensemble, the cascade curves and the calibrated policies."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    xs = [e["gflops"] for e in results["exits"]]
    ys = [100 * e["accuracy"] for e in results["exits"]]
    ax.plot(xs, ys, "o-", color="C0", label="exit i alone (full path)")
    for e in results["exits"]:
        ax.annotate(f"{e['exit']}", (e["gflops"], 100 * e["accuracy"]), textcoords="offset points", xytext=(4, -10))
    if "ensemble" in results:
        ax.plot(
            [results["ensemble"]["gflops"]],
            [100 * results["ensemble"]["accuracy"]],
            "s",
            color="C3",
            label="ensemble of all exits",
        )
    cas = results.get("cascade")
    if cas:
        for key, style, label in (
            ("curve", "C1", "cascade, one threshold"),
            ("geometric_curve", "C2", "cascade, per-exit thresholds (MSDNet, fitted on val)"),
        ):
            if key not in cas:  # a run without a validation split has no fitted thresholds
                continue
            front = cascade.pareto_front([cascade.CascadePoint(**p) for p in cas[key]])
            ax.plot(
                [p.mean_gflops for p in front],
                [100 * p.accuracy for p in front],
                ".-",
                color=style,
                alpha=0.8,
                label=label,
            )
        split = results["split"]
        chosen = [p[split] for p in cas["calibration"]["policies"] if p.get("thresholds") and split in p]
        if chosen:
            ax.plot(
                [c["mean_gflops"] for c in chosen],
                [100 * c["accuracy"] for c in chosen],
                "*",
                ms=12,
                color="k",
                label="thresholds calibrated on val",
            )
    ax.set_xlabel("GFLOPs per image (mean actually spent for cascades)")
    ax.set_ylabel(f"top-1 accuracy on {results['split']} (%)")
    ax.set_title(title or "accuracy vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def read_log(log_path: str | Path) -> list[dict]:
    """The per-epoch records of a run (one JSON object a line); broken lines are skipped."""
    records = []
    for line in Path(log_path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash mid-write
    return records


def plot_training_curves(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Per-epoch accuracy of every exit (evaluation split solid, training dashed)."""
    eval_prefix = next((p for p in ("val", "test") if any(f"{p}_acc_exit1" in r for r in records)), None)
    if not records or eval_prefix is None and not any("train_acc_exit1" in r for r in records):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    exits = sorted({int(key.rsplit("exit", 1)[1]) for r in records for key in r if key.startswith("train_acc_exit")})
    for i in exits:
        color = f"C{(i - 1) % 10}"
        for prefix, style in ((eval_prefix, "-"), ("train", "--")):
            if prefix is None:
                continue
            pts = [(r["epoch"], 100 * r[f"{prefix}_acc_exit{i}"]) for r in records if f"{prefix}_acc_exit{i}" in r]
            if pts:
                label = f"exit {i}{' (main)' if i == exits[-1] else ''} {prefix}"
                ax.plot(*zip(*pts), style, color=color, marker="o" if style == "-" else "x", ms=3, label=label)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy per exit during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_disagreement(results: dict, path: str | Path) -> Path | None:
    """Heat map of P(exit i right, exit j wrong) in percent."""
    if "disagreement" not in results:
        return None
    plt = _pyplot()
    m = 100 * np.asarray(results["disagreement"]["right_wrong"])
    k = len(m)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2, 1.1 * k + 1.5))
    im = ax.imshow(m, cmap="viridis")
    labels = [f"{i}" if i < k else f"{i} (main)" for i in range(1, k + 1)]
    ax.set_xticks(range(k), labels)
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("exit j wrong")
    ax.set_ylabel("exit i right")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", color="w" if m[i, j] < m.max() / 2 else "k")
    fig.colorbar(im, ax=ax, label="% of images")
    ax.set_title(f"right where another exit is wrong ({results['split']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
