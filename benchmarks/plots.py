"""The two plots every method comparison draws, for ``reproduce.py`` (epoch-selected tables)
and ``paired_report.py`` (final-epoch tables with paired seeds): test accuracy per exit as
grouped bars, and the main output's validation accuracy over epochs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def exit_bars(
    rows: Mapping[str, Mapping[str, Any]],
    path: Path,
    title: str,
    ylabel: str,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Grouped bars, one group per exit, one bar per method: ``rows[method]["exits"]`` maps each
    exit to ``{"mean", "std"}`` (a method with one exit is drawn at the main exit), and an
    optional ``rows[method]["ensemble"]`` adds a last group. ``labels``: legend text per method."""
    plt = _pyplot()
    k = max(len(r["exits"]) for r in rows.values())
    with_ensemble = any("ensemble" in r for r in rows.values())
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(rows)
    for j, (name, row) in enumerate(rows.items()):
        exits = list(range(1, k + 1)) if len(row["exits"]) == k else [k]
        values = list(row["exits"].values())
        if "ensemble" in row:
            exits, values = exits + [k + 1], values + [row["ensemble"]]
        xs = [e + (j - len(rows) / 2 + 0.5) * width for e in exits]
        ax.bar(
            xs,
            [v["mean"] for v in values],
            width,
            yerr=[v["std"] for v in values],
            capsize=2,
            label=(labels or {}).get(name, name),
        )
    groups = [f"exit {e}" for e in range(1, k)] + ["main"] + (["ensemble"] if with_ensemble else [])
    ax.set_xticks(range(1, len(groups) + 1), groups)
    lows = [v["mean"] for r in rows.values() for v in r["exits"].values()]
    ax.set_ylim(max(0, min(lows) - 3), min(100, max(lows) + 1.5))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    return _save(plt, fig, path)


def validation_curves(curves: Mapping[str, Mapping[int, float]], path: Path, title: str) -> Path:
    """The main output's validation accuracy over epochs, one line per method: ``curves[method]``
    maps epoch → accuracy (%)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), marker="o" if len(curve) <= 20 else None, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("main-output validation accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def paired_differences(comparisons: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Mean paired difference per exit with its 95 % t-interval, one series per comparison
    (``by_exit[exit] = {"mean", "low", "high"}``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for j, c in enumerate(comparisons):
        labels = list(c["by_exit"])
        xs = [i + (j - len(comparisons) / 2 + 0.5) * 0.25 for i in range(len(labels))]
        rows = [c["by_exit"][x] for x in labels]
        ax.errorbar(
            xs,
            [r["mean"] for r in rows],
            fmt="o",
            capsize=4,
            yerr=[[r["mean"] - r["low"] for r in rows], [r["high"] - r["mean"] for r in rows]],
            label=f"{c['a']} − {c['b']} ({c['pairs']} pairs)",
        )
        ax.set_xticks(range(len(labels)), labels)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("difference in test accuracy (points)")
    ax.set_title("Paired by seed, mean and 95 % t-interval")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def serving_rounds(throughput: Mapping[str, Any], targets: Mapping[str, float], path: Path) -> Path:
    """serve_bench's figures round by round, one series per server (the reference server included):
    saturation against raw ORT at the main exit and at exit 1, and the one-connection p50 overhead,
    each with its target as a dashed line — the spread of rounds shows how far the host moves them."""
    plt = _pyplot()
    cases = throughput["cases"]
    panels = [
        ("saturation_main", "saturation, main exit (x raw ORT)", "saturation_main"),
        ("saturation_exit1", "saturation, exit 1 (x raw ORT)", "saturation_exit1"),
        ("overhead_main", "1 connection: p50 over raw batch 1 (ms)", "overhead_p50_ms"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    marked = False
    for ax, (case, title, target) in zip(axes, panels):
        for name, served in cases[case]["servers"].items():
            key = "ratio_vs_raw_default" if case.startswith("saturation") else "p50_overhead_ms_vs_raw_default"
            values = served.get(f"{key}_per_round") or [
                run["p50_overhead_ms_vs_raw_default"]
                for run in served["runs"]  # results before 2026-12-01
            ]
            (line,) = ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
            # Rounds whose baseline the host slowed: left out of the figures, drawn hollow.
            stalled = served.get(f"{key}_stalled_rounds", [])
            if stalled:
                ax.plot(
                    [i + 1 for i in stalled],
                    [values[i] for i in stalled],
                    ls="none",
                    marker="o",
                    ms=9,
                    mfc="white",
                    color=line.get_color(),
                    mec=line.get_color(),
                    label=None if marked else "stalled baseline (left out)",
                )
                marked = True
        ax.axhline(targets[target], color="grey", ls="--", lw=1, label="target")
        ax.set_xlabel("round")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(1, throughput["rounds"] + 1))
    for ax in axes:
        ax.legend(fontsize=8)
    fresh = "fresh servers, " if throughput.get("fresh_servers_each_round") else ""
    fig.suptitle(f"serve_bench, {throughput['model']} (each round: {fresh}raw ORT timed beside them)")
    return _save(plt, fig, path)
