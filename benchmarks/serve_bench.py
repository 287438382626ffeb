"""Serving benchmark, one method for every figure: the real server under ``wrk`` vs raw ONNX Runtime.

One command measures the three request-path targets (issue 13):

1. **Saturation** — server requests/s with 32 keep-alive connections (``wrk``, a C load
   generator that costs the server little CPU) against raw ONNX Runtime samples/s at
   batch 32, in this process, at the main exit and at exit 1.
2. **Single-request overhead** — the server's p50 latency with one connection against
   raw ORT's p50 at batch 1, at the main exit: in each round, short raw and server runs
   alternate (``--overhead-slices``) and the round's overhead is the median of each
   server slice's p50 minus the raw p50 timed beside it.
3. **Cascade efficiency** (``serve_cascade.py``) — sequential requests over real test images, once with
   ``?exit=<main>`` and once as a confidence cascade: the share of inference time the
   cascade saves (mean ``inference_ms`` of the answers) against the share of GFLOPs it
   saves (mean ``gflops``). Target ≥ 0.8. The cascade's answers are checked against the
   same rule simulated offline on raw ORT outputs (``agreement``), so "accuracy
   unchanged" is verified, not assumed. Beside it, two ceilings from the same run: the
   efficiency of the server's ORT runs alone (its ``eed_inference_latency_seconds``
   sums: what the answers' ``inference_ms`` would show with no cost around ORT but the
   hand-off to the inference thread, for graphs not run on the event loop), and of
   the same graphs, loaded as the server loads them, timed in this process without HTTP.
   And not the target's figure but what a loaded server gets from a cascade
   (``--cascade-at-saturation``, on by default): both modes under the saturation case's
   connections, the test images sent in turn (a wrk script rotating a bundle), the time per
   answer saved (from answers/s) against the GFLOPs per answer saved (from the server's metrics).

Beside raw ORT, the **reference server** (``benchmarks/least_server.py``: httptools, the server's
decoder, batching, ORT, a small JSON answer and nothing else) is measured in the same rounds, and
each server against it (``ratio_vs_least_server``, ``p50_ms_over_least_server``): what the host allows
any Python server of this shape, apart from what this server's code adds (``--no-least-server``: off).

Raw ORT runs twice: with ONNX Runtime's default session options (the baseline of the
targets) and with the server's options. Server and raw runs alternate round by round
in one invocation, so a busy machine hits both alike; medians over rounds are
reported. Every server but the one being measured is frozen (SIGSTOP; an idle server
probes its graphs and ORT spins after each probe), and raw ORT runs with all of them frozen.
``--variant NAME=ARGS`` (repeatable) starts one server per variant (extra
``python -m serving`` flags, optionally from another source tree with
``--variant-tree NAME=PATH``) and alternates between them too: an A/B in one run.

    python benchmarks/serve_bench.py                       # all three targets, ~5 minutes
    python benchmarks/serve_bench.py --variant base= --variant spin=--ort-allow-spinning

Defaults: saturation and overhead on the full-width CIFAR-100 ResNet-18 export
(``runs/bench/resnet18-cifar100``; built by ``python benchmarks/untrained_export.py
--out runs/bench/resnet18-cifar100`` when missing); cascade efficiency on the shipped
model over Fashion-MNIST test images and on the full-width export (thresholds at the
median top probability of each early exit on the same images). Without ``wrk`` a
Python load generator in its own process stands in (slower; the report says so).
Run on an otherwise idle machine: every figure depends on the free cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.serve_cascade import bench_cascade, png, ratio_text, rel_path, saturation_line
from benchmarks.server import Server, check_report_path, code_revision, positive, snapshot_code, start_servers
from benchmarks.wrk import read_bundle, run_wrk

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_bench.json"
FULL_WIDTH = ROOT / "runs" / "bench" / "resnet18-cifar100"
SHIPPED = ROOT / "exported" / "fmnist-resnet18-eed"
TARGETS = {"saturation_main": 0.95, "saturation_exit1": 0.85, "overhead_p50_ms": 0.5, "cascade_efficiency": 0.8}
# The reference server (benchmarks/least_server.py): what a Python server of this shape gets on this host.
LEAST = "least_server"

# ------------------------------------------------------------------------------------------
# Load: wrk, or a Python closed-loop generator in its own process when wrk is missing
# ------------------------------------------------------------------------------------------


def wrk_load(url: str, path: str, connections: int, seconds: float, body: Path) -> dict:
    r = run_wrk(url + path, connections, seconds, body)
    return {
        # successes only, as the Python generator counts; wrk's latencies include the errors: a run
        # with any is reported as not valid (summary)
        "rps": r["requests_per_s"],
        "p50_ms": r["p50_ms"],
        "p99_ms": r["p99_ms"],
        "requests": r["requests"],
        "errors": r["non2xx"] + r["socket_errors"],
    }


async def _py_connection(host, port, requests, first, stop_at, latencies, errors) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    sent = first
    try:
        while (started := time.perf_counter()) < stop_at:
            writer.write(requests[sent % len(requests)])  # a bundle's bodies in turn
            sent += 1
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            (latencies if status.split()[1:2] == [b"200"] else errors).append(time.perf_counter() - started)
    finally:
        writer.close()


def loadgen_main(url: str, path: str, connections: int, seconds: float, bodies: list[bytes]) -> None:
    host, port = url.removeprefix("http://").split(":")
    requests = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]
    latencies: list[float] = []
    errors: list[float] = []
    t0 = time.perf_counter()

    async def main():
        await asyncio.gather(
            *(_py_connection(host, int(port), requests, c, t0 + seconds, latencies, errors) for c in range(connections))
        )

    asyncio.run(main())
    ms = np.asarray(latencies) * 1e3
    print(
        json.dumps(
            {
                "rps": len(ms) / (time.perf_counter() - t0),
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
                "requests": len(ms),
                "errors": len(errors),
            }
        )
    )


def run_load(url: str, path: str, connections: int, seconds: float, body: Path) -> dict:
    if shutil.which("wrk"):
        return wrk_load(url, path, connections, seconds, body)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--loadgen",
        url,
        path,
        str(connections),
        str(seconds),
        str(body),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# Raw ONNX Runtime
# ------------------------------------------------------------------------------------------


class RawORT:
    """One model's full-path sessions, with ORT's default options and with the server's."""

    def __init__(self, model_dir: Path, server_options) -> None:
        import onnxruntime as ort

        from serving.manifest import load_manifest
        from serving.runtime import ModelRuntime, provider_chain

        self.manifest = load_manifest(model_dir)
        chain = provider_chain(server_options.providers, ort.get_available_providers())
        self.server = ModelRuntime.load(model_dir, server_options)
        self.provider = self.server.provider
        self.default = {
            spec.exit: ort.InferenceSession(str(model_dir / spec.path), providers=chain)  # ORT's defaults
            for spec in self.manifest.exits
        }
        self.input_name = self.manifest.io.image_input

    def time(self, options: str, exit_number: int, batch: int, seconds: float) -> dict:
        x = self.server.example_input(batch)
        if options == "server":
            graph = self.server.exits[exit_number - 1]
            run = lambda: graph.run(x)  # noqa: E731
        else:
            session = self.default[exit_number]
            run = lambda: session.run(None, {self.input_name: x})  # noqa: E731
        for _ in range(2):
            run()
        times = []
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop or len(times) < 5:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        t = np.asarray(times)
        return {"p50_ms": float(np.median(t) * 1e3), "sps": float(batch / t.mean()), "runs": len(t)}


# ------------------------------------------------------------------------------------------
# Servers
# ------------------------------------------------------------------------------------------


def machine_jiffies() -> tuple[int, int] | None:
    """(idle, total) CPU time of the whole machine so far, from /proc/stat; None without it."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user .. steal


def measured_load(server: Server, path: str, connections: int, seconds: float, body: Path) -> dict:
    """One load run against ``server`` alone (the others stay paused), after a 1 s settling run,
    with the event loop's and the process's CPU per answer and the machine's idle share."""
    with server.running():
        run_load(server.url, path, connections, 1.0, body)  # settle after the raw run
        before, machine_before, client_before = server.cpu_seconds(), machine_jiffies(), children_cpu_seconds()
        served = run_load(server.url, path, connections, seconds, body)
        after, machine_after, client_after = server.cpu_seconds(), machine_jiffies(), children_cpu_seconds()
    if machine_before and machine_after:
        # How much of the machine nobody used: at saturation, what is left to gain
        # without taking CPU from someone (ORT, the event loop, wrk, the kernel).
        idle, total = (b - a for a, b in zip(machine_before, machine_after))
        served["machine_idle_share"] = idle / total if total else None
    if before and after and served["requests"]:
        # CPU per answer: the event loop (HTTP, decoding, JSON) and the process (plus ORT).
        # A lone request's short graph runs on the event loop (EED_INLINE_MAX_MS), so with
        # one connection the loop's figure includes ORT's calling thread.
        served["loop_cpu_ms_per_request"] = (after[0] - before[0]) * 1e3 / served["requests"]
        served["process_cpu_ms_per_request"] = (after[1] - before[1]) * 1e3 / served["requests"]
    if served["requests"]:
        # The load generator's own CPU (wrk, or the Python fallback: a child process either way),
        # which it takes from the two cores the server shares with it: how often the server's
        # answers wake it shows here (serving/transport.py's WriteHold).
        served["client_cpu_ms_per_request"] = (client_after - client_before) * 1e3 / served["requests"]
    return served


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


RAW_KEYS = {"default": "raw_default", "server": "raw_server_options"}


def overhead_in_slices(raw, servers, exit_number: int, path: str, body: Path, args, r: int) -> dict[str, dict]:
    """One round of the one-connection case in ``args.overhead_slices`` short slices: raw ORT at
    batch 1 both ways, then each server, in turn. The overhead of the round is the median over
    slices of each slice's server p50 minus the raw p50 timed next to it: a stall of the host that
    lasts seconds (seen here: raw batch 1 at half speed for a few seconds) skews one slice, not
    the round, which one long raw block and one long server block could not tell from a gap.
    Returns one sample per raw option and per server, medians over the slices, the server's with
    its per-slice overheads."""
    seconds = args.slice_seconds
    raws: dict[str, list[dict]] = {key: [] for key in RAW_KEYS.values()}
    served: dict[str, list[dict]] = {server.name: [] for server in servers}
    for j in range(args.overhead_slices):
        flip = (r + j) % 2 == 1
        for options in ("server", "default") if flip else ("default", "server"):
            raws[RAW_KEYS[options]].append(raw.time(options, exit_number, 1, seconds))
        for server in servers[::-1] if flip else servers:
            served[server.name].append(measured_load(server, path, 1, seconds, body))

    def medians(runs: list[dict]) -> dict:
        keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and all(k in run for run in runs)]
        return {k: float(np.median([run[k] for run in runs])) for k in keys}

    out = {key: medians(runs) for key, runs in raws.items()}
    for name, runs in served.items():
        sample = medians(runs)
        sample["requests"] = int(sum(run["requests"] for run in runs))
        sample["errors"] = int(sum(run["errors"] for run in runs))
        for key in RAW_KEYS.values():
            pairs = [run["p50_ms"] - timed["p50_ms"] for run, timed in zip(runs, raws[key])]
            sample[f"p50_overhead_ms_vs_{key}"] = float(np.median(pairs))
            sample[f"p50_overhead_ms_vs_{key}_per_slice"] = [round(p, 4) for p in pairs]
        out[name] = sample
    return out


def idle_cpu_share(server: Server, seconds: float = 4.0) -> float | None:
    """Share of one core ``server`` uses with no requests (latency probes, ORT's spinning after them)."""
    time.sleep(1.0)  # past the spinning after the last answer
    before = server.cpu_seconds()
    time.sleep(seconds)
    after = server.cpu_seconds()
    return (after[1] - before[1]) / seconds if before and after else None


# ------------------------------------------------------------------------------------------
# 1 + 2: saturation and single-request overhead
# ------------------------------------------------------------------------------------------


def bench_throughput(model_dir: Path, args, variants, workdir: Path, server_options, code: Path = ROOT) -> dict:
    raw = RawORT(model_dir, server_options)
    spec = raw.manifest.input
    k = raw.manifest.num_exits
    rng = np.random.default_rng(0)
    shape = (spec.height, spec.width) if spec.channels == 1 else (spec.height, spec.width, 3)
    body = workdir / "bench.png"
    body.write_bytes(png(rng.integers(0, 256, shape, dtype=np.uint8)))
    conns = args.connections
    cases = [("saturation_main", k, conns), ("saturation_exit1", 1, conns), ("overhead_main", k, 1)]
    names = [*variants, *([LEAST] if args.least_server else [])]
    samples: dict = {
        case: {"raw_default": [], "raw_server_options": [], **{v: [] for v in names}} for case, _, _ in cases
    }

    def start_all() -> list[Server]:
        servers = start_servers(model_dir, variants, workdir, args.providers)
        if args.least_server:  # measured like the others, in the same rounds
            least = Server(model_dir, [], workdir, name=LEAST, module="benchmarks.least_server", tree=code)
            servers.append(least)
            try:
                least.wait_ready()
            except Exception:
                for server in servers:
                    server.stop()
                raise
            least.pause()
        return servers

    servers = start_all()
    how_lone, idle_cpu = {}, {}
    lone_per_round: dict[str, list] = {}  # each round's processes: as read after warming up

    def how_lone_requests_run(server) -> dict:  # the server's choices when asked (they follow its lone runs)
        info = server.get_json("/v1/model")
        return {
            "sessions": info.get("lone_requests"),
            "on_event_loop": info.get("batching", {}).get("lone_on_event_loop"),
        }

    def warm(server) -> None:  # HTTP paths and batch sizes, before anything is measured
        run_load(server.url, f"/classify?exit={k}&top_k=1", conns, 1.0, body)

    try:
        for server in servers:
            # Only the server being measured runs; the others are frozen (Server.pause), as they
            # are during the raw runs: an idle server's probes and spinning threads take CPU.
            # (With fresh servers, lone_requests and the idle share describe the first round's.)
            with server.running():
                warm(server)
                # How a request alone on that server runs (its choices after warming up; they follow
                # its lone runs): the one-connection figure depends on them.
                how_lone[server.name] = how_lone_requests_run(server)
                lone_per_round[server.name] = [how_lone[server.name]["on_event_loop"]]
                idle_cpu[server.name] = idle_cpu_share(server)
            print(
                f"  {server.name}: lone requests on {how_lone[server.name]}; idle, "
                f"{100 * idle_cpu[server.name]:.1f} % of a core",
                flush=True,
            )
        for r in range(args.rounds):
            if r and args.fresh_servers:
                # Every round on new server processes: one process's one-connection p50 carries a
                # factor of its own (three servers of the same code: +0.62, +0.98 and +1.07 ms, each
                # consistent over its rounds; docs/request-path-profile.md, seventh session), which
                # medians over rounds of the same processes would keep instead of averaging out.
                for server in servers:
                    server.stop()
                servers = start_all()
                for server in servers:
                    with server.running():
                        warm(server)
                        lone_per_round[server.name].append(how_lone_requests_run(server)["on_event_loop"])
            for case, exit_number, c in cases:
                path = f"/classify?exit={exit_number}&top_k=1"
                if c == 1 and args.overhead_slices > 1:
                    for name, sample in overhead_in_slices(raw, servers, exit_number, path, body, args, r).items():
                        samples[case][name].append(sample)
                else:
                    # Both raw timings back to back, their order alternating by round, so that neither
                    # is always the one timed next to the servers' runs.
                    for options in ("default", "server") if r % 2 == 0 else ("server", "default"):
                        key = RAW_KEYS[options]
                        samples[case][key].append(raw.time(options, exit_number, c, args.raw_seconds))
                    for server in servers if r % 2 == 0 else servers[::-1]:
                        samples[case][server.name].append(measured_load(server, path, c, args.seconds, body))
                print(
                    f"  round {r + 1} {case}: "
                    + ", ".join(f"{name} {_fmt(v[-1])}" for name, v in samples[case].items()),
                    flush=True,
                )
    finally:
        for server in servers:
            server.stop()

    def med(values, key):
        return float(np.median([v[key] for v in values]))

    result = {
        "model_dir": rel_path(model_dir),
        "model": raw.manifest.name,
        "provider": raw.provider,
        "connections": conns,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "fresh_servers_each_round": args.fresh_servers,
        "least_server": args.least_server,
        "lone_requests": how_lone,
        "lone_on_event_loop_per_round": lone_per_round,
        "idle_cpu_share_of_a_core": idle_cpu,
        "cases": {},
    }
    for case, exit_number, c in cases:
        s = samples[case]
        entry = {
            "exit": exit_number,
            "connections": c,
            **{
                key: {"sps": med(s[key], "sps"), "p50_ms": med(s[key], "p50_ms"), "runs": s[key]}
                for key in RAW_KEYS.values()
            },
            "servers": {},
        }
        for name in names:
            served = {
                "rps": med(s[name], "rps"),
                "p50_ms": med(s[name], "p50_ms"),
                "p99_ms": med(s[name], "p99_ms"),
                "errors": int(sum(v["errors"] for v in s[name])),
                "runs": s[name],
            }
            if all(v.get("machine_idle_share") is not None for v in s[name]):
                served["machine_idle_share"] = med(s[name], "machine_idle_share")
            if all("loop_cpu_ms_per_request" in v for v in s[name]):
                served["loop_cpu_ms_per_request"] = med(s[name], "loop_cpu_ms_per_request")
                served["process_cpu_ms_per_request"] = med(s[name], "process_cpu_ms_per_request")
            if all("client_cpu_ms_per_request" in v for v in s[name]):
                served["client_cpu_ms_per_request"] = med(s[name], "client_cpu_ms_per_request")
            served.update(round_comparisons(case, name, s, args.least_server))
            entry["servers"][name] = served
        result["cases"][case] = entry
    return result


def round_comparisons(case: str, name: str, runs: Mapping[str, list[dict]], least_server: bool) -> dict[str, Any]:
    """Server ``name``'s figures against the baselines timed beside it in each round (``runs``: each
    server's and raw key's runs, round by round): saturation ratios, or one-connection p50 overheads,
    with their rounds and the rounds whose baseline stalled. The same for a run and for ``--summarize``."""
    mine, figures = runs[name], {}
    if case.startswith("saturation"):
        # Each round's server against the raw runs timed beside it, then the median over rounds:
        # a raw block that a host stall slowed (seen: 138 against 194-202 img/s) skews its round,
        # where a ratio of the two medians would carry it into the result.
        for key in [*RAW_KEYS.values(), *([LEAST] if least_server and name != LEAST else [])]:
            per_round = [v["rps"] / other[_rate(other)] for v, other in zip(mine, runs[key])]
            stalled = stalled_rounds([other[_rate(other)] for other in runs[key]])
            figures.update(round_figures(f"ratio_vs_{key}", per_round, stalled))
        return figures
    for key in RAW_KEYS.values():
        overhead = f"p50_overhead_ms_vs_{key}"
        if all(overhead in v for v in mine):  # each round's median of paired slices
            per_round = [v[overhead] for v in mine]
        else:  # one block each per round: that round's difference
            per_round = [v["p50_ms"] - raw_run["p50_ms"] for v, raw_run in zip(mine, runs[key])]
        # A baseline slowed by the host is slow here too (seen: a raw batch-1 p50 of 11.9 ms against
        # 7.3-8.2, which the paired slices did not absorb): its round reads as met.
        stalled = stalled_rounds([1.0 / raw_run["p50_ms"] for raw_run in runs[key]])
        figures.update(round_figures(overhead, per_round, stalled))
    if least_server and name != LEAST:
        # The same connection's p50 over the reference server's, round by round.
        per_round = [v["p50_ms"] - least["p50_ms"] for v, least in zip(mine, runs[LEAST])]
        figures["p50_ms_over_least_server"] = float(np.median(per_round))
        figures["p50_ms_over_least_server_per_round"] = per_round
    return figures


def resummarize(report: dict) -> dict:
    """``report`` (a results file) with its throughput figures derived again from its rounds' runs,
    by this code's rules (results written before a rule changed read as they would now)."""
    throughput = report.get("throughput")
    if throughput:
        for case, entry in throughput["cases"].items():
            baselines = [entry[key] for key in RAW_KEYS.values() if key in entry]
            if not all("runs" in part for part in [*baselines, *entry["servers"].values()]):
                # Files from before 2026-12-01 kept the baselines' medians only: nothing to re-read.
                print(
                    f"note: {case}: no rounds stored for its baselines; its figures are printed as stored",
                    file=sys.stderr,
                )
                continue
            runs = {key: entry[key]["runs"] for key in RAW_KEYS.values() if key in entry}
            runs.update({name: served["runs"] for name, served in entry["servers"].items()})
            for name, served in entry["servers"].items():
                served.update(round_comparisons(case, name, runs, bool(throughput.get("least_server"))))
    return report


# A baseline run below this share of its rounds' median was slowed by the host (seen: 138 against
# 194-202 img/s): the ratio against it says nothing about the server, so its round is left out of
# the figure and of the count of rounds that meet a target.
STALLED_BASELINE_SHARE = 0.85


def round_figures(key: str, per_round: list[float], stalled: list[int]) -> dict[str, Any]:
    """A figure measured round by round: ``key`` the median over the rounds whose baseline did not
    stall (a stalled one inflates its round's figure, and a median of five moves with it: 0.852x read
    as met where the other four rounds gave 0.825x), ``key_all_rounds`` the median over all of them,
    and the rounds themselves (unrounded: rounds are counted on them) with those that stalled."""
    kept = [x for i, x in enumerate(per_round) if i not in stalled] or per_round
    return {
        key: float(np.median(kept)),
        f"{key}_all_rounds": float(np.median(per_round)),
        f"{key}_per_round": per_round,
        f"{key}_stalled_rounds": stalled,
    }


def stalled_rounds(baseline_rates: list[float]) -> list[int]:
    """The rounds (0-based) whose baseline rate fell below :data:`STALLED_BASELINE_SHARE` of the median."""
    median = float(np.median(baseline_rates)) if baseline_rates else 0.0
    return [i for i, rate in enumerate(baseline_rates) if rate < STALLED_BASELINE_SHARE * median]


def _rate(sample: dict) -> str:
    """The rate key of a sample: a server's requests/s or raw ORT's samples/s."""
    return "rps" if "rps" in sample else "sps"


def _fmt(v: dict) -> str:
    if "rps" in v:
        cpu = f" loop CPU {v['loop_cpu_ms_per_request']:.3f} ms/req" if "loop_cpu_ms_per_request" in v else ""
        if "client_cpu_ms_per_request" in v:
            cpu += f", client CPU {v['client_cpu_ms_per_request']:.3f} ms/req"
        if v.get("machine_idle_share") is not None:
            cpu += f", machine idle {100 * v['machine_idle_share']:.0f} %"
        if "p50_overhead_ms_vs_raw_default" in v:
            cpu += f", overhead {v['p50_overhead_ms_vs_raw_default']:+.2f} ms (median of paired slices)"
        return f"{v['rps']:.1f} req/s p50 {v['p50_ms']:.2f} ms{cpu}"
    return f"{v['sps']:.1f} img/s p50 {v['p50_ms']:.2f} ms"


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def parse_variants(specs: list[str], trees: list[str]) -> dict[str, tuple[list[str], Path]]:
    tree_of = {}
    for spec in trees:
        name, _, path = spec.partition("=")
        tree_of[name] = Path(path).resolve()
    variants = {}
    for spec in specs or ["server="]:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"bad --variant {spec!r}: expected NAME=FLAGS (FLAGS may be empty)")
        variants[name] = (shlex.split(flags), tree_of.get(name, ROOT))
    unknown = set(tree_of) - set(variants)
    if unknown:
        raise SystemExit(f"--variant-tree for unknown variants {sorted(unknown)}")
    return variants


def verdict(
    value: float | None,
    target: float,
    at_most: bool = False,
    per_round: list[float] | None = None,
    stalled: list[int] | None = None,
) -> str:
    """Whether ``value`` meets ``target``, decided on the unrounded value (0.946 is not >= 0.95,
    though it prints as 0.95 with two decimals); with ``per_round``, in how many rounds it did: on
    this shared host one round's ratio ranges over +-0.1 (docs/request-path-profile.md), so the
    median of five alone does not say how close a target is. ``stalled``: rounds whose baseline the
    host slowed (:func:`stalled_rounds`), left out of the count as out of ``value``
    (:func:`round_figures`): a figure over a stalled baseline reads as met for nothing the server did."""
    sign = "<=" if at_most else ">="
    if value is None:
        return f"{sign} {target}: n/a"

    def meets(x: float) -> bool:
        return x <= target if at_most else x >= target

    text = f"{sign} {target}: {'met' if meets(value) else 'not met'}"
    if per_round:
        left_out = set(stalled or ())
        counted = [x for i, x in enumerate(per_round) if i not in left_out]
        text += f", in {sum(map(meets, counted))} of {len(counted)} rounds"
        if left_out:
            text += f" ({len(left_out)} with a stalled baseline left out)"
    return text


def _figure(throughput: dict, case: str, server: str, key: str) -> tuple[float, list[float] | None, list[int]]:
    """A server's figure in a throughput case, its rounds' figures where the report has them, and the
    rounds whose baseline stalled."""
    served = throughput["cases"][case]["servers"][server]
    return served[key], served.get(f"{key}_per_round"), served.get(f"{key}_stalled_rounds", [])


def summary(report: dict) -> list[str]:
    lines = []
    t = report.get("throughput")
    if t:
        for name in next(iter(t["cases"].values()))["servers"]:
            sat_main, main_rounds, main_stalled = _figure(t, "saturation_main", name, "ratio_vs_raw_default")
            sat_one, one_rounds, one_stalled = _figure(t, "saturation_exit1", name, "ratio_vs_raw_default")
            over, over_rounds, over_stalled = _figure(t, "overhead_main", name, "p50_overhead_ms_vs_raw_default")
            line = (
                f"[{name}] saturation main {sat_main:.3f}x "
                f"({verdict(sat_main, TARGETS['saturation_main'], per_round=main_rounds, stalled=main_stalled)}), "
                f"exit 1 {sat_one:.3f}x "
                f"({verdict(sat_one, TARGETS['saturation_exit1'], per_round=one_rounds, stalled=one_stalled)}), "
                f"p50 overhead {over:+.2f} ms "
                f"({verdict(over, TARGETS['overhead_p50_ms'], True, over_rounds, over_stalled)})"
            )
            errors = sum(case["servers"][name].get("errors", 0) for case in t["cases"].values())
            if errors:  # a refused request is not served throughput, and wrk's latencies include them
                line += f"; NOT VALID: {errors} error answers or socket errors under load"
            if name == LEAST:
                line += " -- the reference server, not the product: what the host allows a server of this shape"
            elif t.get("least_server"):
                cases = t["cases"]
                line += (
                    f"; against the reference server in the same rounds: main "
                    f"{cases['saturation_main']['servers'][name]['ratio_vs_least_server']:.3f}x, exit 1 "
                    f"{cases['saturation_exit1']['servers'][name]['ratio_vs_least_server']:.3f}x, p50 "
                    f"{cases['overhead_main']['servers'][name]['p50_ms_over_least_server']:+.2f} ms"
                )
            lines.append(line)
    for c in report.get("cascade", []):
        for name, v in c["variants"].items():
            # The target is time saved "with accuracy unchanged": the served answers must be the
            # offline rule's (agreement), whose accuracy the line states beside the main exit's.
            agreed = v["agreement_with_offline_rule"] == 1.0
            judged = verdict(v["efficiency"], TARGETS["cascade_efficiency"]) if agreed else "not met: answers differ"
            accuracy = (
                f"main {100 * v['accuracy_main']:.2f} % / cascade {100 * v['accuracy_cascade']:.2f} %"
                if c.get("accuracy_meaningful", True)
                else "n/a (the images are not the model's data set)"
            )
            lines.append(
                f"[{name}] {c['model']}: cascade efficiency {ratio_text(v['efficiency'])} "
                f"({judged}; its ORT runs alone "
                f"{ratio_text(v.get('efficiency_of_ort_runs'))}, the same graphs without HTTP "
                f"{ratio_text(c.get('in_process', {}).get('efficiency'))}), "
                f"agreement with the offline rule {100 * v['agreement_with_offline_rule']:.1f} %, top-1 accuracy "
                f"{accuracy}"
            )
            if v.get("at_saturation"):  # not the target's figure (sequential requests): what load makes of it
                lines.append(saturation_line(c["model"], name, v["at_saturation"]))
    return lines


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--loadgen":
        url, path, conns, seconds, body = sys.argv[2:7]
        loadgen_main(url, path, int(conns), float(seconds), read_bundle(Path(body)) or [Path(body).read_bytes()])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=FULL_WIDTH, help="model for saturation and overhead")
    parser.add_argument(
        "--cascade-model",
        type=Path,
        action="append",
        help="model(s) for cascade efficiency (default: the shipped model and the full-width export)",
    )
    parser.add_argument("--only", choices=["throughput", "cascade"], help="run one part only")
    parser.add_argument("--connections", type=positive(int), default=32)
    parser.add_argument(
        "--rounds", type=positive(int), default=2, help="alternating server/raw rounds (medians reported)"
    )
    parser.add_argument("--seconds", type=positive(float), default=5.0, help="seconds per wrk run")
    parser.add_argument(
        "--fresh-servers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start every variant's server anew for each saturation/overhead round (a process's p50 has a "
        "factor of its own; ~25 s per server and round on the full-width export)",
    )
    parser.add_argument("--raw-seconds", type=positive(float), default=2.0, help="seconds per raw ORT timing")
    parser.add_argument(
        "--least-server",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure the reference server (benchmarks/least_server.py: HTTP, decoding, batching, ORT, "
        "JSON and nothing else) in the same rounds, and each server against it (default: on with --providers cpu)",
    )
    parser.add_argument(
        "--overhead-slices",
        type=positive(int),
        default=5,
        help="the one-connection case in this many alternating raw/server slices per round, the overhead "
        "the median of the slices' differences (1: one raw block and one server block, as before)",
    )
    parser.add_argument(
        "--slice-seconds", type=positive(float), default=1.0, help="seconds per slice (wrk takes whole seconds)"
    )
    parser.add_argument("--images", type=positive(int), default=2000, help="test images for cascade efficiency")
    parser.add_argument(
        "--full-width-images",
        type=positive(int),
        default=600,
        help="of which the full-width export gets this many (it is ~20x slower per image)",
    )
    parser.add_argument(
        "--cascade-at-saturation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time main exit and cascade under --connections connections, the test images sent in turn, "
        "for --rounds alternating rounds of --seconds (~1 min per model and server with --rounds 5)",
    )
    parser.add_argument(
        "--policy", default="budget_0.75x_main", help="calibrated policy for the cascade where the manifest has it"
    )
    parser.add_argument("--fmnist-dir", type=Path, help="folder with the Fashion-MNIST t10k idx.gz files")
    parser.add_argument("--providers", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="a server variant: extra flags for python -m serving (repeatable; default one plain "
        "server). Variants alternate within each round",
    )
    parser.add_argument(
        "--variant-tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="run variant NAME from another source tree (e.g. a `git archive` of the old code)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--summarize",
        type=Path,
        metavar="RESULTS",
        help="measure nothing: print a results file's summary, its figures derived again from its rounds by "
        "this code's rules (the file is not changed)",
    )
    args = parser.parse_args(argv)
    if args.summarize is not None:
        try:
            report = json.loads(args.summarize.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--summarize {args.summarize}: not a readable results file ({exc})")
        try:
            lines = summary(resummarize(report))
        except (KeyError, TypeError, ValueError) as exc:
            parser.error(f"--summarize {args.summarize}: not a serve_bench results file this code reads ({exc!r})")
        if not lines:  # the first benchmark's own format (per model, no throughput cases)
            parser.error(
                f"--summarize {args.summarize}: no throughput or cascade figures in the format this code reads"
            )
        print("\n".join(lines))
        return 0
    check_report_path(parser, args.out)
    variants = parse_variants(args.variant, args.variant_tree)
    if args.least_server is None:
        args.least_server = args.providers == "cpu"  # the reference server runs ORT on the CPU only
    elif args.least_server and args.providers != "cpu":
        parser.error("--least-server runs ORT on the CPU only; use it with --providers cpu")
    if LEAST in variants:
        parser.error(f"the variant name {LEAST!r} is the reference server's")

    from serving.runtime import SessionOptions

    # CPU fallback for `auto` only: `--providers cuda` that silently measured the CPU would be a lie.
    server_options = SessionOptions(providers=args.providers, allow_provider_fallback=args.providers == "auto")
    if args.only != "cascade" and not (args.model / "manifest.json").is_file():
        parser.error(f"no model in {args.model}: `python benchmarks/untrained_export.py --out {args.model}`")
    cascade_models = args.cascade_model or [SHIPPED, FULL_WIDTH]
    if args.only != "throughput" and args.policy:  # a typo found now, not after the throughput rounds
        from serving.manifest import load_manifest

        for model_dir in cascade_models:
            if (model_dir / "manifest.json").is_file():
                manifest = load_manifest(model_dir, verify=False)
                policies = manifest.thresholds.policies if manifest.thresholds is not None else {}
                if policies and args.policy not in policies:
                    parser.error(
                        f"--policy {args.policy!r} is not one of {manifest.name}'s calibrated policies: "
                        + ", ".join(sorted(policies))
                    )
    started = time.time()
    report: dict = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
        },
        "command": " ".join(
            shlex.quote(a) for a in [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]
        ),
        "load_generator": "wrk" if shutil.which("wrk") else "python (wrk not installed)",
        "method": "server and raw ONNX Runtime alternate in each round (medians over rounds); saturation = server "
        "req/s with N keep-alive connections / raw ORT samples/s at batch N (ORT default session options); "
        "overhead = server p50 with 1 connection - raw ORT p50 at batch 1; cascade efficiency = share of "
        "mean inference_ms saved / share of mean GFLOPs saved, sequential requests over real test images "
        "(efficiency_of_ort_runs: the same from the server's ORT time per request, its metrics; in_process: "
        "the server's lone-request graphs timed in the benchmark's process, no HTTP; at_saturation: time per "
        "answer saved = 1 - main answers/s / cascade answers/s under N connections sending the test images in "
        "turn, over GFLOPs per answer saved, from the server's metrics)",
        "targets": TARGETS,
        "variants": {name: {"flags": flags, "tree": rel_path(tree)} for name, (flags, tree) in variants.items()},
        "code": code_revision(),  # the servers run a copy of the checkout's packages as they were at the start
    }
    import onnxruntime

    report["machine"]["onnxruntime"] = onnxruntime.__version__
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        workdir = Path(tmp)
        code = snapshot_code(ROOT, workdir / "code")
        variants = {name: (flags, code if tree == ROOT else tree) for name, (flags, tree) in variants.items()}
        if args.only != "cascade":
            print(f"== saturation and overhead: {args.model} ==", flush=True)
            report["throughput"] = bench_throughput(args.model, args, variants, workdir, server_options, code)
        if args.only != "throughput":
            report["cascade"] = []
            for model_dir in cascade_models:
                if not (model_dir / "manifest.json").is_file():
                    print(f"skipping cascade efficiency on {model_dir}: no model there", flush=True)
                    continue
                print(f"== cascade efficiency: {model_dir} ==", flush=True)
                saved_images = args.images
                # The full-width export where it is by default, or wherever --model put it (gpu_check.sh
                # moves it with GPU_CHECK_EXPORT_DIR): ~20x slower per image than the shipped model.
                full_width = {FULL_WIDTH.resolve(), args.model.resolve()} - {SHIPPED.resolve()}
                if model_dir.resolve() in full_width:
                    args.images = min(args.images, args.full_width_images)
                load = run_load if args.cascade_at_saturation else None
                report["cascade"].append(bench_cascade(model_dir, args, variants, workdir, server_options, load))
                args.images = saved_images
    report["seconds"] = round(time.time() - started, 1)
    report["summary"] = summary(report)
    print("\n".join(report["summary"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['seconds']} s)")
    if "throughput" in report:
        from benchmarks.plots import serving_rounds

        print(f"wrote {serving_rounds(report['throughput'], TARGETS, args.out.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
