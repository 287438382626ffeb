"""Anytime serving under a step load: deadlines met by degrading to earlier exits.

Starts the real server (``python -m serving``, default settings) on a model folder and
drives it with Debian's ``wrk`` (a C load generator: it costs the server little CPU,
unlike a Python client on the same cores) through phases of closed-loop load, by
default 1 → 64 → 1 connections, every request carrying the same deadline
(``/classify?budget_ms=D``). Meanwhile it scrapes ``/metrics`` every
``--scrape-interval`` seconds, so it sees which exits answered, how many deadlines were
met and how many requests were refused, over time and per phase.

Before the step load, a *regime check* measures the p50 latency of the main exit and
of exit 1 (``?exit=N``) at the peak connection count: the default deadline lies
between them (their geometric mean), i.e. a deadline the main exit cannot meet under
that load but exit 1 can — the situation anytime serving is for.

Per phase it prints and writes: requests/s, p50/p99 latency against the deadline,
answered-exit shares, share of deadlines met, 422s and 503s; plus the time after the
load drops until the main exit answers deadline requests again. A PNG plots exit shares,
deadlines met and connections over time.

    python benchmarks/untrained_export.py --out runs/bench/resnet18-cifar100   # the full-width model
    python benchmarks/anytime_load.py runs/bench/resnet18-cifar100

``--onset N`` adds, after the phases, the start of a burst: N requests sent at the same moment to
the idle server (``--onset-rounds`` times), with the answers' exits and how many were in time by the
client's clock and by the server's ``deadline_met``.

Run it on an otherwise idle machine: training runs or tests on the same cores change
every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.server import Server, check_report_path, positive
from benchmarks.wrk import run_wrk
from serving.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "runs" / "bench" / "resnet18-cifar100"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "anytime_load.json"

SERIES = re.compile(r"^(eed_requests_total|eed_deadline_total)\{([^}]*)\} (\S+)$")


def parse_phases(text: str) -> list[tuple[int, float]]:
    """``"1:10,64:20,1:15"`` → [(connections, seconds), ...]."""
    phases = []
    for part in text.split(","):
        conns, _, seconds = part.partition(":")
        try:
            phases.append((int(conns), float(seconds)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad phase {part!r}: expected CONNECTIONS:SECONDS, e.g. 64:20") from None
        if phases[-1][0] < 1 or phases[-1][1] <= 0:
            raise argparse.ArgumentTypeError(f"bad phase {part!r}: connections >= 1 and seconds > 0")
    return phases


def scrape(url: str) -> dict:
    """Cumulative counters: answers by exit and status, deadline outcomes by exit."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=5).text
    counts: dict = {"status": {}, "exit": {}, "met": 0.0, "missed": 0.0}
    for line in text.splitlines():
        m = SERIES.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        value = float(m.group(3))
        if m.group(1) == "eed_requests_total":
            counts["status"][labels["status"]] = counts["status"].get(labels["status"], 0.0) + value
            if labels["status"] == "200":
                counts["exit"][labels["exit"]] = counts["exit"].get(labels["exit"], 0.0) + value
        else:
            counts[labels["outcome"]] += value
    return counts


def delta(later: dict, earlier: dict, num_exits: int) -> dict:
    """What happened between two scrapes."""
    answered = {
        str(e): later["exit"].get(str(e), 0.0) - earlier["exit"].get(str(e), 0.0) for e in range(1, num_exits + 1)
    }
    total = sum(answered.values())
    status = {k: v - earlier["status"].get(k, 0.0) for k, v in later["status"].items()}
    met, missed = later["met"] - earlier["met"], later["missed"] - earlier["missed"]
    return {
        "answered": int(total),
        "exit_shares": {e: (n / total if total else 0.0) for e, n in answered.items()},
        "deadline_met_share": met / (met + missed) if met + missed else None,
        "status_422": int(status.get("422", 0.0)),
        "status_503": int(status.get("503", 0.0)),
        "status_other_errors": int(sum(v for k, v in status.items() if k not in ("200", "422", "503"))),
    }


class Scraper(threading.Thread):
    """Scrapes /metrics at a fixed interval into (seconds since start, counters)."""

    def __init__(self, url: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.samples: list[tuple[float, dict]] = []
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.monotonic() - self.t0, scrape(self.url)))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.samples.append((time.monotonic() - self.t0, scrape(self.url)))


def load(url: str, query: str, connections: int, seconds: float, body: Path) -> dict:
    """One wrk run on /classify?QUERY (up to two wrk threads)."""
    return run_wrk(f"{url}/classify?{query}", connections, seconds, body, threads=max(1, min(connections, 2)))


def test_image(manifest, path: Path) -> Path:
    from PIL import Image

    spec = manifest.input
    rng = np.random.default_rng(0)
    shape = (spec.height, spec.width) if spec.channels == 1 else (spec.height, spec.width, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, format="PNG")
    return path


async def _onset_round(host: str, port: int, request: bytes, n: int) -> list[dict]:
    """``n`` connections opened beforehand each send ``request`` at the same moment; their answers."""
    import asyncio

    conns = [await asyncio.open_connection(host, port) for _ in range(n)]
    await asyncio.sleep(1.5)  # the server idle again: its probes and estimates at rest
    go = asyncio.Event()

    async def one(reader, writer) -> dict:
        await go.wait()
        sent = time.perf_counter()
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        answer = json.loads(await reader.readexactly(length))
        client_ms = (time.perf_counter() - sent) * 1e3
        writer.close()
        return {
            "status": int(head.split(b" ")[1]),
            "exit": answer.get("exit"),
            "deadline_met": answer.get("deadline_met"),
            "latency_ms": answer.get("latency_ms"),
            "client_ms": round(client_ms, 2),
        }

    tasks = [asyncio.create_task(one(r, w)) for r, w in conns]
    await asyncio.sleep(0.05)
    go.set()
    return list(await asyncio.gather(*tasks))


def onset(url: str, query: str, body: Path, n: int, rounds: int, deadline_ms: float) -> dict:
    """A burst's first moments: ``n`` requests at once on an idle server, ``rounds`` times. The step
    load's phases start with a ramp of connections; this is the load that arrives all at once."""
    import asyncio
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    data = body.read_bytes()
    request = (
        f"POST /classify?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data
    answers = []
    for r in range(rounds):
        got = asyncio.run(_onset_round(parts.hostname or "127.0.0.1", parts.port or 80, request, n))
        answers.extend(got)
        late = sum(1 for a in got if a["client_ms"] > deadline_ms)
        exits = {e: sum(1 for a in got if a["exit"] == e) for e in sorted({a["exit"] for a in got}, key=str)}
        print(
            f"onset round {r + 1}: {n} at once, exits {exits}, late by the client's clock {late}, "
            f"slowest {max(a['client_ms'] for a in got):.1f} ms (deadline {deadline_ms:g})",
            flush=True,
        )
    in_time = sum(1 for a in answers if a["client_ms"] <= deadline_ms)
    return {
        "requests_at_once": n,
        "rounds": rounds,
        "in_time_share_client": round(in_time / max(1, len(answers)), 4),
        "deadline_met_share_server": round(sum(1 for a in answers if a["deadline_met"]) / max(1, len(answers)), 4),
        "answers": answers,
    }


def recovery_seconds(samples: list[tuple[float, dict]], since: float, num_exits: int) -> float | None:
    """Seconds after ``since`` until an interval whose answers came ≥ 90 % from the main exit."""
    for (t0, c0), (_, c1) in zip(samples, samples[1:]):
        if t0 < since:
            continue
        d = delta(c1, c0, num_exits)
        if d["answered"] and d["exit_shares"][str(num_exits)] >= 0.9:
            return round(t0 - since, 2)
    return None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result["over_time"]
    t = [s["t"] for s in series]
    k = result["num_exits"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    shares = np.array([[s["exit_shares"][str(e)] for e in range(1, k + 1)] for s in series]).T
    ax1.stackplot(t, shares, labels=[f"exit {e}" for e in range(1, k + 1)], step="post", alpha=0.85)
    ax1.set_ylabel("share of answers")
    ax1.set_ylim(0, 1)
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title(
        f"{result['model']}: deadline {result['deadline_ms']:g} ms, step load "
        f"{' → '.join(str(p['connections']) for p in result['phases'])} connections"
    )
    met = [s["deadline_met_share"] if s["deadline_met_share"] is not None else np.nan for s in series]
    ax2.step(t, met, where="post", label="deadlines met (share)", color="tab:green")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("share met")
    ax2.set_xlabel("seconds")
    ax3 = ax2.twinx()
    ax3.step(t, [s["requests_per_s"] for s in series], where="post", color="tab:blue", alpha=0.6, label="answers/s")
    ax3.set_ylabel("answers/s")
    for p in result["phases"]:
        for ax in (ax1, ax2):
            ax.axvline(p["start_s"], color="grey", lw=0.8, ls="--")
        ax1.text(p["start_s"], 1.01, f"{p['connections']} conn", fontsize=8)
    ax2.legend(loc="lower left", fontsize=8)
    ax3.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument(
        "--phases",
        type=parse_phases,
        default=parse_phases("1:10,64:20,1:15"),
        help="CONNECTIONS:SECONDS,... (default 1:10,64:20,1:15)",
    )
    parser.add_argument(
        "--deadline-ms",
        type=positive(float),
        default=None,
        help="the deadline of every request (default: between the main exit's and exit 1's p50 "
        "at the peak load, from the regime check)",
    )
    parser.add_argument("--check-seconds", type=positive(float), default=6.0, help="duration of each regime-check run")
    parser.add_argument("--scrape-interval", type=positive(float), default=0.5)
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for the server (repeatable)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--onset",
        type=int,
        default=0,
        metavar="N",
        help="after the phases, N requests at once on the idle server (--onset-rounds times): the start of a burst",
    )
    parser.add_argument("--onset-rounds", type=int, default=4)
    args = parser.parse_args(argv)
    if args.onset < 0 or args.onset_rounds < 1:
        parser.error("--onset must be >= 0 and --onset-rounds >= 1")
    check_report_path(parser, args.out)

    if shutil.which("wrk") is None:
        parser.error("wrk is not installed: apt-get install -y wrk")
    if not (args.model_dir / "manifest.json").is_file():
        parser.error(
            f"no model in {args.model_dir}: build the full-width export with "
            f"`python benchmarks/untrained_export.py --out {args.model_dir}`"
        )
    manifest = load_manifest(args.model_dir, verify=False)
    k = manifest.num_exits
    peak = max(c for c, _ in args.phases)
    workdir = Path(tempfile.mkdtemp(prefix="anytime-"))
    body = test_image(manifest, workdir / "image.png")
    server = Server(args.model_dir, args.server_arg, workdir, name="anytime")
    server.wait_ready()
    url = server.url
    try:
        regime = {}
        for e in (k, 1):
            r = load(url, f"exit={e}", peak, args.check_seconds, body)
            regime[f"exit{e}"] = r
            print(
                f"regime check, {peak} connections, exit={e}: {r['requests_per_s']:.1f} req/s, "
                f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms",
                flush=True,
            )
        deadline = args.deadline_ms or round(math.sqrt(regime[f"exit{k}"]["p50_ms"] * regime["exit1"]["p50_ms"]), 1)
        print(f"deadline: {deadline:g} ms", flush=True)
        time.sleep(3)  # let the estimates settle back to idle before the step load

        scraper = Scraper(url, args.scrape_interval)
        scraper.start()
        phases = []
        for connections, seconds in args.phases:
            start_s = time.monotonic() - scraper.t0
            before = scrape(url)
            w = load(url, f"budget_ms={deadline:g}", connections, seconds, body)
            d = delta(scrape(url), before, k)
            phase = {
                "connections": connections,
                "seconds": seconds,
                "start_s": round(start_s, 2),
                "requests_per_s": round(w["requests_per_s"], 1),
                "p50_ms": w["p50_ms"],
                "p99_ms": w["p99_ms"],
                "wrk_non2xx": w["non2xx"],
                "socket_errors": w["socket_errors"],
                **d,
            }
            phases.append(phase)
            shares = " ".join(f"e{e}:{100 * s:.0f}%" for e, s in d["exit_shares"].items())
            met = "n/a" if d["deadline_met_share"] is None else f"{100 * d['deadline_met_share']:.1f}%"
            print(
                f"{connections:>4} conn {seconds:g}s: {phase['requests_per_s']:.1f} req/s, p50 {w['p50_ms']:.1f} ms, "
                f"p99 {w['p99_ms']:.1f} ms (deadline {deadline:g}), met {met}, {shares}, "
                f"422: {d['status_422']}, 503: {d['status_503']}",
                flush=True,
            )
        scraper.stop()
        burst = None
        if args.onset:
            time.sleep(3)
            burst = onset(url, f"budget_ms={deadline:g}", body, args.onset, args.onset_rounds, deadline)
    finally:
        server.stop()

    over_time = []
    for (t0, c0), (t1, c1) in zip(scraper.samples, scraper.samples[1:]):
        d = delta(c1, c0, k)
        d.update(t=round(t0, 2), requests_per_s=round(d["answered"] / max(1e-9, t1 - t0), 1))
        over_time.append(d)
    drop = next((p["start_s"] for p, q in zip(phases[1:], phases) if p["connections"] < q["connections"]), None)
    recovery = None if drop is None else recovery_seconds(scraper.samples, drop, k)
    peak_phase = max(phases, key=lambda p: p["connections"])
    answered_share = peak_phase["answered"] / max(
        1,
        peak_phase["answered"]
        + peak_phase["status_503"]
        + peak_phase["status_422"]
        + peak_phase["status_other_errors"],
    )
    targets = {
        "peak_answered_share": round(answered_share, 4),
        "peak_deadline_met_share": peak_phase["deadline_met_share"],
        "total_422": sum(p["status_422"] for p in phases),
        "main_exit_again_after_s": recovery,
        "met": bool(
            answered_share >= 0.95
            and (peak_phase["deadline_met_share"] or 0) >= 0.90
            and sum(p["status_422"] for p in phases) == 0
            and recovery is not None
            and recovery <= 5
        ),
    }
    result = {
        "model": manifest.name,
        "model_dir": os.path.relpath(args.model_dir, ROOT),
        "num_exits": k,
        "deadline_ms": deadline,
        "regime_check": regime,
        "phases": phases,
        "targets": targets,
        "over_time": over_time,
        "onset": burst,
        "server_args": args.server_arg,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(
        f"targets: answered at peak {100 * answered_share:.1f}% (>= 95), deadlines met at peak "
        f"{100 * (peak_phase['deadline_met_share'] or 0):.1f}% (>= 90), 422s {targets['total_422']} (0), "
        f"main exit again {recovery} s after the load dropped (<= 5): {'MET' if targets['met'] else 'NOT MET'}"
    )
    if burst is not None:
        print(
            f"onset: {burst['requests_at_once']} at once x {burst['rounds']}: in time by the client's clock "
            f"{100 * burst['in_time_share_client']:.1f}%, deadline_met (server) "
            f"{100 * burst['deadline_met_share_server']:.1f}%"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    plot(result, png)
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
