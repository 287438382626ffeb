"""Reproduce the paper's comparison: baseline, BranchyNet, KD, BYOT, EED (KL) and EED (MSE).

Trains every method with several seeds on Fashion-MNIST with a CIFAR-style ResNet-18 through
``training/train.py`` (one subprocess per run), selects each run's epoch on a held-out
validation split, evaluates that epoch once on the test split, and writes a Markdown and a
JSON table (per-exit test accuracy mean ± std over seeds, ensemble accuracy, GFLOPs per
exit) plus two plots under ``benchmarks/results/``. The small-data preset reports the final
epoch instead, with paired-by-seed differences and 95 % t-intervals (``paired_report.py``).
Every run is resumable: stop the benchmark at any time and start the same command again;
finished runs are skipped and interrupted ones continue from their last epoch.

    python benchmarks/reproduce.py --preset cpu        # sized for a 2-core CPU (about 2.5 hours)
    python benchmarks/reproduce.py --preset small-data # 2,500 images x 200 epochs, paired seeds, intervals
    python benchmarks/reproduce.py --preset small-data --report-only   # interim report of finished runs
    python benchmarks/reproduce.py --preset paper      # the paper's full recipe, for a GPU
    python benchmarks/reproduce.py --preset smoke      # a minute: checks the pipeline end to end
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from benchmarks import plots
from benchmarks.paired_stats import paired_interval
from training.options import at_least

ROOT = Path(__file__).resolve().parent.parent

# name → train.py flags. KD distils logits only; BYOT adds the feature term (both from the
# main output); EED distils from the ensemble of all outputs, with KL or with MSE.
METHODS: dict[str, list[str]] = {
    "baseline": ["--method", "baseline"],
    "branchynet": ["--method", "branchynet"],
    "kd": ["--method", "kd", "--distill", "kl"],
    "byot": ["--method", "byot", "--distill", "kl"],
    "eed-kl": ["--method", "eed", "--distill", "kl"],
    "eed-mse": ["--method", "eed", "--distill", "mse"],
}

# α is left to train.py's defaults (0.1 with KL, 1 with MSE: what the authors ran) except in
# the cpu preset, whose committed runs used α = 1 with KL (10x the authors' KL weight).
COMMON = ["--arch", "resnet18", "--dataset", "fashion-mnist", "--temperature", "3"]
PRESETS: dict[str, dict] = {
    # Width 1/8 and 10 epochs with the paper's step schedule scaled to the run, fp32
    # (channels_last only changes the memory layout): 18 runs in about 1.5 hours on 2 cores,
    # two one-thread runs at a time.
    "cpu": {
        "flags": ["--width-mult", "0.125", "--epochs", "10", "--val-split", "5000", "--channels-last", "--alpha", "1"],
        "seeds": [0, 1, 2],
    },
    # A regime where the paper's premises hold (the network overfits its training set, and the
    # exit ensemble beats the main output): 2,500 seeded training images, the paper's full
    # 200-epoch schedule, the final epoch reported (no selection), the test split whole, a
    # 5,000-image validation split (the rest of the training split unused) checked every 20
    # epochs. About 6-9 minutes a run, two one-thread runs at a time. Seed 0 is left out: its
    # test figures were seen while choosing this regime. "phases" order the runs: 16 paired
    # seeds of BranchyNet vs EED-MSE (the comparison) first, then EED-KL and the baseline on
    # seeds 1-8, then more of each.
    "small-data": {
        "flags": [
            "--width-mult",
            "0.125",
            "--epochs",
            "200",
            "--train-size",
            "2500",
            "--val-split",
            "5000",
            "--eval-every",
            "20",
            "--channels-last",
        ],
        "seeds": list(range(1, 31)),
        "report": "final_epoch",
        "regime": "ResNet-18 (CIFAR-style) x0.125, fp32, trained on 2,500 Fashion-MNIST images (a seeded "
        "subset of the training split: same seed, same images and batch order for every method, and "
        "the same initial weights for every method with exits; the single-exit baseline's backbone "
        "drew other ones in runs before 2026-12-03) "
        "for 200 epochs with the paper's recipe (SGD 0.1, momentum 0.9, "
        "wd 5e-4, batch 128, lr x0.1 at epochs 75/130/180, crop + flip); validation: 5,000 other "
        "training images every 20 epochs; α = 0.1 with KL, 1 with MSE, β = 1, T = 3. Seed 0 "
        "is left out: its test figures were seen while this regime was chosen.",
        "phases": [
            (["branchynet", "eed-mse"], range(1, 17)),
            (["eed-kl", "baseline"], range(1, 9)),
            (["branchynet", "eed-mse"], range(17, 31)),
            (["eed-kl", "baseline"], range(9, 31)),
        ],
    },
    "paper": {"flags": ["--width-mult", "1.0", "--epochs", "200", "--val-split", "5000"], "seeds": [0, 1, 2]},
    "smoke": {
        "flags": [
            "--width-mult",
            "0.125",
            "--epochs",
            "2",
            "--val-split",
            "64",
            "--subset",
            "320",
            "--batch-size",
            "32",
        ],
        "seeds": [0, 1],
    },
}


def needs_beta(method_flags: list[str]) -> bool:
    return any(m in method_flags for m in ("byot", "eed"))


# Flags train.py refuses for a method (they weight terms it does not have), dropped from the
# preset's and --extra's flags for that method's runs.
NOT_FOR_METHOD = {
    "baseline": {"--alpha", "--temperature", "--distill", "--beta", "--teacher-exits"},
    "branchynet": {"--alpha", "--temperature", "--distill", "--beta", "--teacher-exits"},
    "kd": {"--beta", "--teacher-exits"},
    "byot": {"--teacher-exits"},
    "eed": set(),
}


# train.py flags that do not change what a run trains (where it runs, how it reports).
NOT_COMPARED = {"resume", "device", "workers", "progress", "threads", "output_dir", "run_name", "data_dir", "download"}


def planned_command(name: str, seed: int, preset: str, runs_dir: Path, extra: list[str], threads: int) -> list[str]:
    """train.py's command line for a new (method, seed) run of ``preset``; --extra's flags come last,
    so they win over the preset's and the β default (argparse keeps a flag's last value)."""
    method_flags = METHODS[name]
    cmd = [
        sys.executable,
        "training/train.py",
        *COMMON,
        *PRESETS[preset]["flags"],
        *method_flags,
        *(["--beta", "1"] if needs_beta(method_flags) else []),
        "--seed",
        str(seed),
        "--output-dir",
        str(_relative(runs_dir)),
        "--run-name",
        f"{name}-s{seed}",
        "--no-progress",
        "--threads",
        str(threads),
        *extra,
    ]
    unused = NOT_FOR_METHOD[method_flags[1]]
    if _last_value(cmd, "--distill") == "mse":  # the KL term's temperature (refused then)
        unused = unused | {"--temperature"}
    return _drop(cmd, unused)


def _last_value(cmd: list[str], flag: str) -> str | None:
    """The value argparse keeps for ``flag`` in ``cmd`` (its last occurrence's), or None."""
    values = [cmd[i + 1] for i, c in enumerate(cmd[:-1]) if c == flag]
    return values[-1] if values else None


def check_settings(run_dir: Path, cmd: list[str]) -> None:
    """RuntimeError unless the run in ``run_dir`` was trained with the settings ``cmd`` would give it:
    a finished run of another preset or other --extra flags must not be reported (or resumed) as
    this one. Every resolved setting is compared — those ``cmd`` types and those it leaves at their
    defaults — except those that do not change what is trained (where it runs, how it reports, the
    weights of terms the method does not have); a setting the run's config.json
    lacks (a flag added since) counts as that flag's default."""
    from training.options import UsageError, explicit_flags, get_args_parser, resolve_args

    saved = _run_config(run_dir)
    if saved is None:
        raise RuntimeError(f"{run_dir} has no readable config.json; move the folder away or delete it")
    parser = get_args_parser()
    argv = cmd[2:]
    typed = explicit_flags(parser, argv)
    try:
        planned = vars(resolve_args(parser.parse_args(argv), typed))
    except UsageError as exc:  # --extra flags that train.py would refuse
        raise RuntimeError(f"the command planned for {run_dir.name} is refused by train.py: {exc}") from None
    defaults = vars(parser.parse_args([]))
    unused = NOT_FOR_METHOD[planned["method"]] | ({"--temperature"} if planned["distill"] == "mse" else set())
    ignored = NOT_COMPARED | {flag.removeprefix("--").replace("-", "_") for flag in unused}  # e.g. a baseline's α
    if "eval_every" not in typed:  # how often it validates: a resume may change it (compared when a preset sets it)
        ignored |= {"eval_every"}
    differ = [
        f"--{k.replace('_', '-')} {planned[k]!r} (the run: {saved.get(k, defaults[k])!r})"
        for k in sorted(set(planned) - ignored)
        if saved.get(k, defaults[k]) != planned[k]
    ]
    if differ:
        raise RuntimeError(
            f"{run_dir} was trained with other settings than this benchmark would give it: {'; '.join(differ)}. "
            "Give another --runs-dir, or the --preset/--extra it was run with"
        )


def run_one(
    name: str,
    seed: int,
    preset: str,
    runs_dir: Path,
    extra: list[str],
    log,
    threads: int,
    stop_at: float | None = None,
    halt: threading.Event | None = None,
) -> Path | None:
    """Train one (method, seed) run, resuming it if it was interrupted; returns its folder, or
    None when ``stop_at`` (a time.time()) has passed or ``halt`` is set before the run could start.
    A run that fails sets ``halt``: the benchmark starts nothing more."""
    run_dir = runs_dir / f"{name}-s{seed}"
    planned = planned_command(name, seed, preset, runs_dir, extra, threads)
    if (run_dir / "final.json").is_file() or (run_dir / "checkpoint.pt").is_file():
        check_settings(run_dir, planned)
    if (run_dir / "final.json").is_file():
        log(f"{name} seed {seed}: done already, skipped")
        return run_dir
    if stop_at is not None and time.time() >= stop_at:
        log(f"{name} seed {seed}: not started (past --stop-launching-at); run the same command to continue")
        return None
    if halt is not None and halt.is_set():
        log(f"{name} seed {seed}: not started (a run failed)")
        return None
    if (run_dir / "checkpoint.pt").is_file():
        cmd = [
            sys.executable,
            "training/train.py",
            "--resume",
            str(_relative(run_dir)),
            "--no-progress",
            "--threads",
            str(threads),
        ]
        log(f"{name} seed {seed}: resuming")
    else:
        cmd = planned
        log(f"{name} seed {seed}: training")
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, env=env)
    with open(runs_dir / f"{run_dir.name}.log", "a") as fh:  # appended: a resumed run keeps every attempt
        fh.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        if halt is not None:
            halt.set()
        raise RuntimeError(f"{name} seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    log(f"{name} seed {seed}: finished in {time.perf_counter() - start:.0f}s")
    return run_dir


def _relative(path: Path) -> Path:
    """``path`` relative to the repository when inside it: train.py runs from the repository
    root, and its records then hold no absolute paths of this machine."""
    try:
        return path.resolve().relative_to(ROOT)
    except ValueError:
        return path


def _drop(cmd: list[str], flags: set[str]) -> list[str]:
    """``cmd`` without ``flags`` and their values (every value up to the next flag: --teacher-exits
    takes several)."""
    out, dropping = [], False
    for c in cmd:
        if c.startswith("--"):
            dropping = c in flags
        if not dropping:
            out.append(c)
    return out


def _run_config(run_dir: Path) -> dict | None:
    """The resolved flags a run trained with (``config`` of its config.json), or None if unreadable."""
    try:
        config = json.loads((run_dir / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return config if isinstance(config, dict) else None


def _loss_weights(config: dict | None) -> dict:
    """The distillation settings of a run's config, for the report to state: a preset may differ
    from train.py's defaults (the cpu preset's α = 1 with KL)."""
    if config is None or config.get("method") in ("baseline", "branchynet"):
        return {}
    return {k: config.get(k) for k in ("distill", "alpha", "beta", "temperature") if config.get(k) is not None}


def _seed_of(run_dir: Path, config: dict | None) -> int:
    """The seed a run folder was trained with (its config; the folder's -sN suffix otherwise)."""
    if config is not None and isinstance(config.get("seed"), int):
        return config["seed"]
    return int(run_dir.name.rpartition("-s")[2])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: dict[str, list[Path]]) -> dict:
    """Per method: per-exit test accuracy (val-selected epoch) mean/std over seeds, GFLOPs, curves."""
    table = {}
    for name, dirs in runs.items():
        finals = [json.loads((d / "final.json").read_text()) for d in dirs]
        selected = [f.get("val_selected") or f["final_epoch"] for f in finals]
        exits = sorted({int(k.removeprefix("test_acc_exit")) for k in selected[0] if k.startswith("test_acc_exit")})
        row = {"seeds": len(dirs), "exits": {}, "gflops": [c["gflops"] for c in finals[0]["exit_costs"]]}
        for e in exits:
            m, s = _mean_std([100 * r[f"test_acc_exit{e}"] for r in selected])
            row["exits"][e] = {"mean": m, "std": s}
        if "test_acc_ensemble" in selected[0]:
            m, s = _mean_std([100 * r["test_acc_ensemble"] for r in selected])
            row["ensemble"] = {"mean": m, "std": s}
        row["main_per_seed"] = [100 * r[f"test_acc_exit{exits[-1]}"] for r in selected]
        configs = [_run_config(d) for d in dirs]
        row["seed_ids"] = [_seed_of(d, c) for d, c in zip(dirs, configs)]  # what the differences below pair on
        row["loss_weights"] = _loss_weights(configs[0])
        m, s = _mean_std([100 * f["final_epoch"][f"test_acc_exit{exits[-1]}"] for f in finals])
        row["main_final_epoch"] = {"mean": m, "std": s}
        row["selected_epochs"] = [r.get("epoch") for r in selected]
        curves = []
        for d in dirs:
            log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
            curves.append([100 * r.get(f"val_acc_exit{exits[-1]}", float("nan")) for r in log])
        row["main_val_curve_mean"] = [statistics.fmean(v) for v in zip(*curves)]
        row["train_seconds"] = sum(
            json.loads(line).get("train_seconds", 0.0)
            for d in dirs
            for line in (d / "log.jsonl").read_text().splitlines()
        )
        table[name] = row
    return table


def to_markdown(table: dict, meta: dict) -> str:
    k = max(len(r["exits"]) for r in table.values())
    header = "| method | seeds | " + " | ".join(f"exit {e}" for e in range(1, k)) + " | main | ensemble |"
    lines = [
        f"# Paper comparison on Fashion-MNIST (preset `{meta['preset']}`)",
        "",
        f"ResNet-18 (CIFAR-style) x{meta['width_mult']}, {meta['epochs']} epochs, seeds {meta['seeds']}. "
        "Test accuracy (%) of the epoch selected on the validation split, mean ± std over seeds. The "
        "test split is evaluated only when a run ends: train.py scores that epoch, reported here, and "
        "also the final one (both in each run's final.json).",
        "",
        header,
        "|" + "---|" * (k + 3),
    ]
    for name, row in table.items():
        cells = []
        for e in range(1, k + 1):
            cell = row["exits"].get(e) if len(row["exits"]) == k else (row["exits"].get(1) if e == k else None)
            cells.append(f"{cell['mean']:.2f} ± {cell['std']:.2f}" if cell else "—")
        ens = row.get("ensemble")
        cells.append(f"{ens['mean']:.2f} ± {ens['std']:.2f}" if ens else "—")
        lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells) + " |")
    gflops = next(r["gflops"] for r in table.values() if len(r["gflops"]) == k)
    lines += ["", "GFLOPs per exit (full path): " + ", ".join(f"exit {i + 1}: {g:.4f}" for i, g in enumerate(gflops))]
    weights = [
        f"{name} {w['distill']} α {w['alpha']:g}"
        + (f" β {w['beta']:g}" if name != "kd" else "")
        + (f" T {w['temperature']:g}" if w["distill"] == "kl" else "")  # T is the KL term's only
        for name, row in table.items()
        if (w := row.get("loss_weights")) and {"distill", "alpha", "beta", "temperature"} <= set(w)
    ]
    if weights:  # what the runs trained with (their config.json), whatever the preset says today
        lines += ["", "Distillation settings of the runs: " + "; ".join(weights) + "."]
    lines.append("")
    for eed, other in (("eed-kl", "branchynet"), ("eed-mse", "branchynet"), ("eed-kl", "kd"), ("eed-kl", "byot")):
        if eed in table and other in table:
            # Paired by seed, not by position: with a run missing, positions pair different seeds.
            by_seed = [dict(zip(table[m]["seed_ids"], table[m]["main_per_seed"])) for m in (eed, other)]
            try:
                iv = paired_interval(*by_seed)
            except ValueError:  # no seed in common
                continue
            lines.append(
                f"{eed} − {other}, main output: {iv.mean:+.2f} points, std of the paired differences "
                f"{iv.std:.2f}, 95 % t-interval [{iv.low:+.2f}, {iv.high:+.2f}] ({iv.n} seeds).  "
            )
    lines += [
        "",
        f"Command: `{meta['command']}`  ",
        f"Git revision: `{meta['git_revision']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Training time, summed over runs (train loop only): "
        f"{sum(r['train_seconds'] for r in table.values()) / 3600:.2f} h; "
        f"this invocation's wall time: {meta['wall_seconds']:.0f} s",
    ]
    return "\n".join(lines) + "\n"


def plot(table: dict, out_dir: Path, preset: str) -> list[Path]:
    return [
        plots.exit_bars(
            table,
            out_dir / f"reproduce_{preset}_exits.png",
            f"Per-exit test accuracy by method (Fashion-MNIST, preset {preset})",
            "test accuracy (%)",
        ),
        plots.validation_curves(
            {name: dict(enumerate(row["main_val_curve_mean"], 1)) for name, row in table.items()},
            out_dir / f"reproduce_{preset}_curves.png",
            "Main-output accuracy per epoch (mean over seeds)",
        ),
    ]


def run_order(preset: str, methods: list[str] | None = None, seeds: list[int] | None = None) -> list[tuple[str, int]]:
    """(method, seed) runs in the order they are launched.

    A preset's "phases" are (methods, seeds) groups run one after the other (default: one
    phase, every method and the preset's seeds). ``methods`` narrows every phase (methods no
    phase names form a last one); ``seeds`` replaces every phase's seeds. Seeds are outermost
    within a phase, so an interrupted benchmark leaves whole comparisons (every method of the
    phase, paired by seed) rather than every seed of the first methods.
    """
    spec = PRESETS[preset]
    phases = [(list(ms), list(ss)) for ms, ss in spec.get("phases") or [(list(METHODS), spec["seeds"])]]
    if methods:
        listed = {m for ms, _ in phases for m in ms}
        phases.append(([m for m in methods if m not in listed], spec["seeds"]))
    phases = [([m for m in ms if not methods or m in methods], seeds or ss) for ms, ss in phases]
    return list(dict.fromkeys((name, seed) for ms, ss in phases for seed in ss for name in ms))


# A --stop-launching-at time that passed less than this long ago means "stop now"; one that passed
# longer ago means its next occurrence.
RECENTLY_PASSED_S = 3600.0


def _parse_stop_time(text: str, now: float | None = None) -> float:
    """HH:MM (UTC) as a time.time() value: its next occurrence ("01:00" said at 23:00 means
    tomorrow, "21:57" said at 08:57 tonight), unless it passed within the last hour ("06:24" said
    at 06:30 means six minutes ago: stop now)."""
    import datetime as dt

    now = time.time() if now is None else now
    try:
        hour, minute = (int(x) for x in text.split(":"))
        today = dt.datetime.fromtimestamp(now, dt.timezone.utc).replace(
            hour=hour, minute=minute, second=0, microsecond=0
        )
    except ValueError as exc:
        raise SystemExit(f"--stop-launching-at wants HH:MM (UTC), got {text!r}") from exc
    for days in (-1, 0, 1):
        when = (today + dt.timedelta(days=days)).timestamp()
        if when > now - RECENTLY_PASSED_S:
            return when
    raise AssertionError("unreachable: tomorrow's occurrence is in the future")


def main(argv=None) -> int:
    from training.checkpoint import git_revision

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=None,
        help="default: the preset's methods (all six, or small-data's four)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument(
        "--runs-dir",
        default=None,
        help="where run folders go (default benchmarks/results/reproduce-PRESET; their logs and "
        "final.json are committed, checkpoints are not)",
    )
    p.add_argument(
        "--jobs",
        type=at_least(1),
        default=max(1, min(2, os.cpu_count() or 1)),
        help="runs trained at once, each with cpu_count/jobs threads (default 2: this CPU preset's setup)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate every run of the preset that has finished so far (an interim report)",
    )
    p.add_argument(
        "--stop-launching-at",
        default=None,
        metavar="HH:MM",
        help="start no new run after this time of day (UTC), e.g. to end a session cleanly; "
        "running ones finish, and the same command later continues where it stopped",
    )
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed on to train.py")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    order = run_order(args.preset, args.methods, args.seeds)
    # The report covers every finished run of the preset, not only this invocation's (a run
    # narrowed with --methods/--seeds must not replace the full report with a partial one).
    report_order = list(dict.fromkeys([*run_order(args.preset), *order]))
    methods = list(dict.fromkeys(name for name, _ in report_order))
    stop_at = _parse_stop_time(args.stop_launching_at) if args.stop_launching_at else None
    out_dir = Path(args.out_dir)
    runs_dir = Path(args.runs_dir or out_dir / f"reproduce-{args.preset}")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    start = time.perf_counter()
    failures: list[str] = []
    if not args.report_only:
        # Small models use 2 cores better as 2 one-thread runs than as one 2-thread run
        # (per-op overhead dominates their thread-parallel speed-up).
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        # A failed run stops the launching (the rest would likely fail alike, or train for hours before
        # anyone sees the error); the runs in progress finish, and the report below covers what finished.
        halt = threading.Event()
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(run_one, *key, args.preset, runs_dir, args.extra, log, threads, stop_at, halt)
                for key in order
            ]
            for future in as_completed(futures):
                try:
                    future.result()
                except RuntimeError as exc:
                    failures.append(str(exc))
                    log(f"stopping: {str(exc).splitlines()[0]}")
    finished = {key: runs_dir / f"{key[0]}-s{key[1]}" for key in report_order}
    finished = {key: d for key, d in finished.items() if (d / "final.json").is_file()}
    try:  # a report of this preset covers only runs trained as this preset (and --extra) trains them
        for (name, seed), run_dir in finished.items():
            check_settings(run_dir, planned_command(name, seed, args.preset, runs_dir, args.extra, threads=1))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs: dict[str, list[Path]] = {name: [] for name in methods}
    for (name, _), run_dir in sorted(finished.items(), key=lambda kv: report_order.index(kv[0])):
        runs[name].append(run_dir)
    runs = {name: dirs for name, dirs in runs.items() if dirs}
    for message in failures:
        print(f"error: {message}", file=sys.stderr)
    if not runs:
        hint = "run without --report-only first" if args.report_only else "none finished in this invocation"
        print(f"no finished runs under {runs_dir}; {hint}", file=sys.stderr)
        return 2
    flags = PRESETS[args.preset]["flags"]
    meta = {
        "preset": args.preset,
        "seeds": sorted({seed for name, seed in finished}),
        "runs_per_method": {n: len(d) for n, d in runs.items()},
        "command": " ".join(["python", *sys.argv]),
        "width_mult": flags[flags.index("--width-mult") + 1],
        "epochs": flags[flags.index("--epochs") + 1],
        "git_revision": git_revision(),
        "wall_seconds": time.perf_counter() - start,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
    }
    if preset.get("report") == "final_epoch":  # paired-seed report with intervals (small-data)
        from benchmarks.paired_report import write_report

        meta["regime"] = preset["regime"]
        print(write_report(runs, out_dir, meta))
        return 1 if failures else 0
    table = summarize(runs)
    (out_dir / f"reproduce_{args.preset}.json").write_text(json.dumps({"meta": meta, "methods": table}, indent=2))
    md = to_markdown(table, meta)
    (out_dir / f"reproduce_{args.preset}.md").write_text(md)
    print(md)
    for path in plot(table, out_dir, args.preset):
        print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
