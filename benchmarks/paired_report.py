"""Report of a paired-seed method comparison (``reproduce.py --preset small-data``).

Reads finished run folders (``<method>-s<seed>/`` with config.json, log.jsonl, final.json),
and reports the *final epoch* of every run (no selection):

* per method: test accuracy of every exit and of the exit ensemble, mean ± std over seeds;
* EED − BranchyNet (and the other pairs present) per exit, paired by seed, with a 95 %
  t-interval — the seed fixes the training subset, initial weights (for the baseline, its
  backbone's, in runs of this code from 2026-12-03 on) and batch order, so a pair differs
  only in the loss;
* per method the two premises of the paper's mechanism: the exit ensemble beating the main
  output (ensemble − main) and the network fitting its training set beyond what it achieves
  on held-out data (train − test, main output), so a null result can be tied to whether the
  premise held;
* the pilot (seeds 1 and 2 of BranchyNet and EED-MSE) on the validation split only.

Writes ``reproduce_<preset>.md``, ``.json`` and three PNG plots into the results folder.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks import plots
from benchmarks.paired_stats import mean_interval, paired_interval

# (treatment, control) pairs reported when both methods have runs; the first is the claim.
PAIRS = (("eed-mse", "branchynet"), ("eed-kl", "branchynet"), ("branchynet", "baseline"), ("eed-kl", "eed-mse"))
PILOT = {"seeds": (1, 2), "methods": ("branchynet", "eed-mse")}


def load_run(run_dir: Path) -> dict:
    """One finished run: per-exit test accuracy (%), final train/val figures, val curve."""
    final = json.loads((run_dir / "final.json").read_text())["final_epoch"]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((run_dir / "config.json").read_text())
    k = max(int(key.removeprefix("test_acc_exit")) for key in final if key.startswith("test_acc_exit"))
    last = log[-1]
    return {
        "seed": config["config"]["seed"],
        "alpha": config["config"].get("alpha"),
        "exits": k,
        "test": {e: 100 * final[f"test_acc_exit{e}"] for e in range(1, k + 1)},
        "test_ensemble": 100 * final["test_acc_ensemble"] if "test_acc_ensemble" in final else None,
        "train_main": 100 * last[f"train_acc_exit{k}"],
        "val_main": 100 * last[f"val_acc_exit{k}"] if f"val_acc_exit{k}" in last else None,
        "val_ensemble": 100 * last["val_acc_ensemble"] if "val_acc_ensemble" in last else None,
        "val_curve": [(r["epoch"], 100 * r[f"val_acc_exit{k}"]) for r in log if f"val_acc_exit{k}" in r],
        "train_seconds": sum(r.get("train_seconds", 0.0) for r in log),
        "epochs": len(log),
        "exit_costs": json.loads((run_dir / "final.json").read_text()).get("exit_costs"),
    }


def _ms(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(runs: dict[str, list[Path]]) -> dict:
    """Everything the report shows, as plain data (also written as JSON)."""
    loaded = {name: {r["seed"]: r for r in map(load_run, dirs)} for name, dirs in runs.items()}
    methods: dict[str, dict] = {}
    for name, by_seed in loaded.items():
        rs = list(by_seed.values())
        k = rs[0]["exits"]
        row = {
            "seeds": sorted(by_seed),
            "n": len(rs),
            "alpha": rs[0]["alpha"],
            "exits": {e: _ms([r["test"][e] for r in rs]) for e in range(1, k + 1)},
            "train_minus_test_main": mean_interval([r["train_main"] - r["test"][k] for r in rs]).to_dict(),
            "train_main": _ms([r["train_main"] for r in rs]),
            "main_per_seed": {s: r["test"][k] for s, r in by_seed.items()},
            "train_hours": sum(r["train_seconds"] for r in rs) / 3600,
            "gflops": [c["gflops"] for c in rs[0]["exit_costs"] or []],
        }
        if rs[0]["test_ensemble"] is not None:
            row["ensemble"] = _ms([r["test_ensemble"] for r in rs])
            row["ensemble_minus_main_test"] = mean_interval([r["test_ensemble"] - r["test"][k] for r in rs]).to_dict()
            vals = [r for r in rs if r["val_ensemble"] is not None]
            if vals:
                row["ensemble_minus_main_val"] = mean_interval(
                    [r["val_ensemble"] - r["val_main"] for r in vals]
                ).to_dict()
        curves: dict[int, list[float]] = {}
        for r in rs:
            for epoch, acc in r["val_curve"]:
                curves.setdefault(epoch, []).append(acc)
        row["val_main_curve"] = {epoch: statistics.fmean(v) for epoch, v in sorted(curves.items())}
        methods[name] = row

    comparisons = []
    for a, b in PAIRS:
        if a not in loaded or b not in loaded or not set(loaded[a]) & set(loaded[b]):
            continue
        ka, kb = loaded[a][next(iter(loaded[a]))]["exits"], loaded[b][next(iter(loaded[b]))]["exits"]
        shared = sorted(set(loaded[a]) & set(loaded[b]))
        rows = {}
        # Exits exist in both only when both have exits; a baseline has the main output alone.
        exits = range(1, ka + 1) if ka == kb else [None]
        for e in exits:
            label = "main" if e is None or e == ka else f"exit {e}"
            ea, eb = (ka, kb) if e is None else (e, e)
            rows[label] = _comparison(
                {s: loaded[a][s]["test"][ea] for s in shared}, {s: loaded[b][s]["test"][eb] for s in shared}
            )
        if ka == kb and loaded[a][shared[0]]["test_ensemble"] is not None:
            rows["ensemble"] = _comparison(
                {s: loaded[a][s]["test_ensemble"] for s in shared}, {s: loaded[b][s]["test_ensemble"] for s in shared}
            )
        comparisons.append({"a": a, "b": b, "pairs": len(shared), "seeds": shared, "by_exit": rows})

    pilot = []
    for seed in PILOT["seeds"]:
        for name in PILOT["methods"]:
            r = loaded.get(name, {}).get(seed)
            if r is not None and r["val_main"] is not None:
                pilot.append(
                    {
                        "method": name,
                        "seed": seed,
                        "train_main": r["train_main"],
                        "val_main": r["val_main"],
                        "val_ensemble": r["val_ensemble"],
                        "overfits": r["train_main"] - r["val_main"],
                        "ensemble_gain": (r["val_ensemble"] or float("nan")) - r["val_main"],
                    }
                )
    return {"methods": methods, "comparisons": comparisons, "pilot": pilot}


def _comparison(a: dict, b: dict) -> dict:
    iv = paired_interval(a, b)
    wins = sum(a[s] > b[s] for s in a)
    return {**iv.to_dict(), "wins": wins, "ties": sum(a[s] == b[s] for s in a), "per_seed": {s: a[s] - b[s] for s in a}}


def _seed_list(seeds: list[int]) -> str:
    """1, 2, 3, 5 → "1-3, 5"."""
    parts, start = [], None
    for i, s in enumerate(seeds):
        if start is None:
            start = s
        if i + 1 == len(seeds) or seeds[i + 1] != s + 1:
            parts.append(f"{start}" if start == s else f"{start}-{s}")
            start = None
    return ", ".join(parts)


def _iv(d: dict) -> str:
    if d["n"] < 2:
        return f"{d['mean']:+.2f} (1 seed)"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def to_markdown(summary: dict, meta: dict) -> str:
    methods, comps = summary["methods"], summary["comparisons"]
    k = max(len(r["exits"]) for r in methods.values())
    lines = [
        f"# Paper comparison on Fashion-MNIST, preset `{meta['preset']}`",
        "",
        meta["regime"],
        "",
        "Finished runs: "
        + ", ".join(f"{name} {row['n']} (seeds {_seed_list(row['seeds'])})" for name, row in methods.items())
        + ".",
        "",
        "Test accuracy (%) after the final epoch (no epoch selection), mean ± std over seeds. The test "
        "split (10,000 images) is evaluated only when a run ends: train.py scores the final epoch, reported "
        "here, and also the epoch the validation split picked (both in each run's final.json); nothing here "
        "reads the latter.",
        "",
        "| method | runs | " + " | ".join(f"exit {e}" for e in range(1, k)) + " | main | ensemble |",
        "|" + "---|" * (k + 3),
    ]
    for name, row in methods.items():
        cells = []
        for e in range(1, k + 1):
            cell = row["exits"].get(e) if len(row["exits"]) == k else (row["exits"][1] if e == k else None)
            cells.append(f"{cell['mean']:.2f} ± {cell['std']:.2f}" if cell else "—")
        ens = row.get("ensemble")
        cells.append(f"{ens['mean']:.2f} ± {ens['std']:.2f}" if ens else "—")
        label = f"{name} (α = {row['alpha']:g})" if name.startswith(("eed", "kd", "byot")) else name
        lines.append(f"| {label} | {row['n']} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "## Paired differences (points), 95 % t-interval over seeds",
        "",
        "Each seed gives both methods the same training subset and batch order, and methods with exits the "
        "same initial weights. The single-exit baseline's backbone starts from their backbone's weights only "
        "in runs trained with this project's code of 2026-12-03 or later; earlier, building the exits first "
        "moved the random numbers it drew (the pairs share the data, not the initialisation).",
        "",
    ]
    for c in comps:
        labels = list(c["by_exit"])
        lines += [
            f"**{c['a']} − {c['b']}** ({c['pairs']} pair{'s' if c['pairs'] > 1 else ''})",
            "",
            "| | " + " | ".join(labels) + " |",
            "|" + "---|" * (len(labels) + 1),
            "| mean [95 % CI] | " + " | ".join(_iv(c["by_exit"][x]) for x in labels) + " |",
            f"| {c['a']} ahead in | " + " | ".join(f"{c['by_exit'][x]['wins']}/{c['pairs']}" for x in labels) + " |",
            "",
        ]

    lines += [
        "## The paper's premises, per method",
        "",
        "The mechanism needs an ensemble teacher better than the main output, and a network that fits its "
        "training set beyond held-out accuracy (something to regularise). Mean [95 % CI] over seeds, points; "
        "train accuracy is the final epoch's running accuracy on the (augmented) training batches.",
        "",
        "| method | ensemble − main (test) | ensemble − main (val) | train − test (main) |",
        "|---|---|---|---|",
    ]
    for name, row in methods.items():
        cells = [
            _iv(row[key]) if key in row else "—"
            for key in ("ensemble_minus_main_test", "ensemble_minus_main_val", "train_minus_test_main")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    if summary["pilot"]:
        lines += [
            "",
            "## Pilot (validation split only: 5,000 held-out training images, final epoch)",
            "",
            "| method | seed | train (main) | val main | val ensemble | train − val | ensemble − main |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in summary["pilot"]:
            lines.append(
                f"| {p['method']} | {p['seed']} | {p['train_main']:.2f} | {p['val_main']:.2f} | "
                f"{p['val_ensemble']:.2f} | {p['overfits']:+.2f} | {p['ensemble_gain']:+.2f} |"
            )

    gflops = next((r["gflops"] for r in methods.values() if len(r["gflops"]) == k), [])
    if gflops:
        lines += [
            "",
            "GFLOPs per exit (full path): " + ", ".join(f"exit {i + 1}: {g:.4f}" for i, g in enumerate(gflops)),
        ]
    hours = sum(r["train_hours"] for r in methods.values())
    lines += [
        "",
        f"Command: `{meta['command']}`  ",
        f"Git revision: `{meta['git_revision']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Training time summed over runs (train loop only): {hours:.2f} h",
    ]
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_dir: Path, preset: str) -> list[Path]:
    methods = summary["methods"]
    paths = [
        plots.exit_bars(
            methods,
            out_dir / f"reproduce_{preset}_exits.png",
            f"Per-exit test accuracy, final epoch (preset {preset})",
            "test accuracy (%), mean ± std",
            labels={name: f"{name} ({row['n']} seeds)" for name, row in methods.items()},
        )
    ]
    comps = [c for c in summary["comparisons"] if c["b"] == "branchynet"]
    if comps:
        paths.append(plots.paired_differences(comps, out_dir / f"reproduce_{preset}_differences.png"))
    paths.append(
        plots.validation_curves(
            {name: row["val_main_curve"] for name, row in methods.items()},
            out_dir / f"reproduce_{preset}_curves.png",
            "Validation accuracy of the main output (mean over seeds)",
        )
    )
    return paths


def write_report(runs: dict[str, list[Path]], out_dir: Path, meta: dict) -> str:
    """Write the Markdown, JSON and plots; returns the Markdown."""
    summary = summarize(runs)
    preset = meta["preset"]
    (out_dir / f"reproduce_{preset}.json").write_text(json.dumps({"meta": meta, **summary}, indent=2))
    md = to_markdown(summary, meta)
    (out_dir / f"reproduce_{preset}.md").write_text(md)
    for path in plot(summary, out_dir, preset):
        print(f"wrote {path}")
    return md
