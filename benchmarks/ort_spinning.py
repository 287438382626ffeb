"""What spinning ONNX Runtime's intra-op threads buys and costs, raw ORT without a server.

The server's sessions spin for a bounded time by default (``EED_ORT_SPIN_US``, 3000 µs);
``0`` never spins, ``EED_ORT_ALLOW_SPINNING`` is ORT's own, longer spinning. For each option
set, opened with the server's own ``serving.sessions.open_session``, on the main exit of a model
folder, in alternating rounds (medians):

* batch-32 throughput (images/s);
* batch-1 p50 latency and process CPU per run, with 1 ms idle gaps between runs, as a server
  has them between single requests;
* process CPU spent in the 200 ms *after* one isolated run: what spinning burns while idle;
* the stage graphs in turn at batch 1 (a cascade run stage by stage: one session after another,
  each with its own thread pool), and the main exit right after them: what one session's
  threads, still spinning after its run, cost the next session's run.

Printed with each figure's ratio to "off" beside it; written as JSON.

    python benchmarks/ort_spinning.py                      # full-width export, ~1 minute
    python benchmarks/ort_spinning.py --model exported/fmnist-resnet18-eed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from benchmarks.server import positive
from serving.manifest import load_manifest
from serving.sessions import open_session, run_chain

ROOT = Path(__file__).resolve().parents[1]
OPTION_SETS = {  # name -> open_session keywords
    "off": {"spin_us": 0},
    "50us": {"spin_us": 50},
    "3000us (default)": {"spin_us": 3000},
    "3000us, spinning on after a run": {"spin_us": 3000, "stop_spinning_after_run": False},
    "ORT's own": {"allow_spinning": True},
}


def measure_chain(stages: list, main, inputs: tuple[str, str], shape: tuple[int, ...], seconds: float) -> dict:
    """Batch 1, 1 ms gaps: the stage sessions in turn (trunk features passed on), and the
    main-exit session right after them."""
    image_input, features_input = inputs
    x1 = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    stage_fns = [
        lambda x, session=session, name=(image_input if i == 0 else features_input): session.run(None, {name: x})
        for i, session in enumerate(stages)
    ]

    def chain() -> None:
        run_chain(stage_fns, x1)

    chained, after = [], []
    for _ in range(3):
        chain()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        chain()
        t1 = time.perf_counter()
        main.run(None, {image_input: x1})
        after.append(time.perf_counter() - t1)
        chained.append(t1 - t0)
        time.sleep(0.001)
    return {
        "stage_chain_b1_p50_ms": float(np.median(chained)) * 1e3,
        "main_after_chain_b1_p50_ms": float(np.median(after)) * 1e3,
    }


def measure(session, input_name: str, shape: tuple[int, ...], seconds: float) -> dict:
    x1 = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    x32 = np.random.default_rng(1).standard_normal((32, *shape), dtype=np.float32)
    run = lambda x: session.run(None, {input_name: x})  # noqa: E731
    for _ in range(3):
        run(x32)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(x32)
        images += 32
    throughput = images / (time.perf_counter() - start)
    latencies, cpu0, start = [], time.process_time(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        run(x1)
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.001)
    cpu_per_run = (time.process_time() - cpu0) / len(latencies)
    idle_cpu = []
    for _ in range(5):
        run(x1)
        cpu0 = time.process_time()
        time.sleep(0.2)
        idle_cpu.append(time.process_time() - cpu0)
    return {
        "batch32_img_s": throughput,
        "batch1_p50_ms": float(np.median(latencies)) * 1e3,
        "batch1_cpu_ms_per_run": cpu_per_run * 1e3,
        "idle_cpu_ms_after_run": float(np.mean(idle_cpu)) * 1e3,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs/bench/resnet18-cifar100")
    parser.add_argument("--rounds", type=positive(int), default=3)
    parser.add_argument("--seconds", type=positive(float), default=1.5, help="per figure, per option set, per round")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ort_spinning.json")
    args = parser.parse_args(argv)
    if not (args.model / "manifest.json").exists():
        parser.error(
            f"{args.model} has no manifest.json; build the full-width export with "
            "`python benchmarks/untrained_export.py --out runs/bench/resnet18-cifar100` or pass --model"
        )
    manifest = load_manifest(args.model)
    spec = manifest.input
    shape = (spec.channels, spec.height, spec.width)
    sessions = {name: open_session(args.model / manifest.exits[-1].path, **kw) for name, kw in OPTION_SETS.items()}
    stages = {
        name: [open_session(args.model / e.stage, **kw) for e in manifest.exits] for name, kw in OPTION_SETS.items()
    }
    inputs = (manifest.io.image_input, manifest.io.features_input)
    runs: dict[str, list[dict]] = {name: [] for name in sessions}
    for r in range(args.rounds):
        for name, session in sessions.items() if r % 2 == 0 else reversed(sessions.items()):
            figures = measure(session, manifest.io.image_input, shape, args.seconds)
            figures.update(measure_chain(stages[name], session, inputs, shape, args.seconds))
            runs[name].append(figures)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    result = {name: {k: float(np.median([m[k] for m in ms])) for k in ms[0]} for name, ms in runs.items()}
    off = result["off"]
    for name, figures in result.items():
        print(
            f"{name:>17}: "
            + ", ".join(
                f"{k} {v:.2f} ({v / off[k]:.2f}x off)" if off[k] else f"{k} {v:.2f}" for k, v in figures.items()
            )
        )
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"processor": platform.processor(), "cpus": len(os.sched_getaffinity(0))},
        "model": str(args.model),
        "graph": manifest.exits[-1].path,
        "rounds": args.rounds,
        "option_sets": {name: dict(kw) for name, kw in OPTION_SETS.items()},
        "medians": result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
