"""Serving benchmark: the real server under closed-loop load vs raw in-process ONNX Runtime.

For each model folder given:

1. raw ONNX Runtime, in this process, with the server's session options: every
   exit's full-path graph at batch sizes equal to the concurrency levels
   (latency per batch and samples per second);
2. the real server (``python -m serving``) in a subprocess, driven by a separate
   load-generator process (this script with ``--loadgen``) that keeps
   ``concurrency`` keep-alive HTTP/1.1 connections busy for ``--duration`` seconds
   per exit and level, posting the same PNG with ``?exit=N``.

It prints, per exit and concurrency: server throughput and p50/p99 latency, raw
ORT throughput and latency at the same batch size, and the ratio; and writes all
of it to ``benchmarks/results/serve_bench.json``.

    python benchmarks/serve_bench.py exported/NAME [MORE_DIRS...] [--duration 5]

The load generator shares the machine's cores with the server; on a 2-core box
that costs the server some throughput, which the ratio includes.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_bench.json"


# ------------------------------------------------------------------------------------------
# Load generator (runs in its own process)
# ------------------------------------------------------------------------------------------

async def _connection(host: str, port: int, request: bytes, warm_until: float, stop_at: float,
                      latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            started = time.perf_counter()
            if started >= stop_at:
                break
            writer.write(request)
            status = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            finished = time.perf_counter()
            if started >= warm_until:
                if status.split()[1:2] == [b"200"]:
                    latencies.append(finished - started)
                else:
                    errors.append(int(status.split()[1]))
    finally:
        writer.close()


async def _loadgen(url: str, path: str, body: bytes, concurrency: int, duration: float, warmup: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/png\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    errors: list[int] = []
    start = time.perf_counter()
    warm_until, stop_at = start + warmup, start + warmup + duration
    await asyncio.gather(*(_connection(host, int(port), request, warm_until, stop_at, latencies, errors)
                           for _ in range(concurrency)))
    measured = time.perf_counter() - warm_until
    ms = np.asarray(latencies) * 1e3
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "throughput_rps": len(latencies) / measured,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "mean_ms": float(ms.mean()) if len(ms) else None,
    }


def loadgen_main(args: argparse.Namespace) -> None:
    try:
        import uvloop  # lower client overhead where available

        uvloop.install()
    except ImportError:
        pass
    body = Path(args.image).read_bytes()
    result = asyncio.run(_loadgen(args.loadgen, args.path, body, args.concurrency, args.duration, args.warmup))
    print(json.dumps(result))


# ------------------------------------------------------------------------------------------
# Raw ONNX Runtime
# ------------------------------------------------------------------------------------------

def raw_ort(model_dir: Path, batch_sizes: list[int], seconds: float, options,
            exits: list[int] | None = None) -> tuple[dict, str]:
    """Per exit and batch size: p50 latency per batch and samples/s of the bare session."""
    from serving.runtime import ModelRuntime

    runtime = ModelRuntime.load(model_dir, options)
    results: dict[int, dict[int, dict]] = {}
    for graph in runtime.exits:
        if exits and graph.exit not in exits:
            continue
        results[graph.exit] = {}
        for batch in batch_sizes:
            x = runtime.example_input(batch)
            for _ in range(3):
                graph.run(x)
            times = []
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline or len(times) < 5:
                t0 = time.perf_counter()
                graph.run(x)
                times.append(time.perf_counter() - t0)
            t = np.asarray(times)
            results[graph.exit][batch] = {
                "batch": batch,
                "runs": len(times),
                "p50_ms": float(np.percentile(t, 50) * 1e3),
                "p99_ms": float(np.percentile(t, 99) * 1e3),
                "throughput_sps": float(batch / t.mean()),
            }
    provider = runtime.provider
    del runtime
    return results, provider


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def _test_image(manifest, path: Path) -> Path:
    from PIL import Image

    spec = manifest.input
    rng = np.random.default_rng(0)
    shape = (spec.height, spec.width) if spec.channels == 1 else (spec.height, spec.width, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def bench_model(model_dir: Path, args: argparse.Namespace, workdir: Path) -> dict:
    from serving.manifest import load_manifest
    from serving.runtime import SessionOptions

    manifest = load_manifest(model_dir)
    # Raw ORT gets exactly the server's session options.
    options = SessionOptions(providers=args.providers, intra_op_threads=args.intra_op_threads,
                             allow_spinning=args.ort_allow_spinning, allow_provider_fallback=True)
    print(f"\n== {manifest.name} ({model_dir}) ==", flush=True)
    raw, provider = raw_ort(model_dir, args.concurrency, args.raw_seconds, options, args.exits)
    image = _test_image(manifest, workdir / f"{manifest.name}.png")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server_cmd = [sys.executable, "-m", "serving", "--model-dir", str(model_dir), "--host", "127.0.0.1",
                  "--port", str(port), "--providers", args.providers, "--allow-provider-fallback",
                  "--intra-op-threads", str(args.intra_op_threads),
                  "--ort-allow-spinning" if args.ort_allow_spinning else "--no-ort-allow-spinning",
                  "--log-level", "warning", *args.server_arg]
    log = open(workdir / f"server-{port}.log", "wb")
    server = subprocess.Popen(server_cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    exits = []
    try:
        _wait_ready(url, server)
        for spec in manifest.exits:
            if args.exits and spec.exit not in args.exits:
                continue
            points = {}
            for concurrency in args.concurrency:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--loadgen", url, "--path",
                       f"/classify?exit={spec.exit}&top_k=1", "--image", str(image), "--concurrency",
                       str(concurrency), "--duration", str(args.duration), "--warmup", str(args.warmup)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
                served = json.loads(out.stdout)
                base = raw[spec.exit][concurrency]
                served["raw_ort"] = base
                served["throughput_ratio"] = (served["throughput_rps"] / base["throughput_sps"]
                                              if base["throughput_sps"] else None)
                served["p50_overhead_ms"] = (
                    served["p50_ms"] - base["p50_ms"] if served["p50_ms"] is not None else None
                )
                points[str(concurrency)] = served
                print(f"exit {spec.exit} ({spec.gflops:.4g} GFLOPs) c={concurrency:>3}: "
                      f"server {served['throughput_rps']:9.1f} req/s  p50 {served['p50_ms']:8.3f} ms  "
                      f"p99 {served['p99_ms']:8.3f} ms | raw ORT batch {concurrency:>3}: "
                      f"{base['throughput_sps']:9.1f} samples/s  p50 {base['p50_ms']:8.3f} ms | "
                      f"ratio {served['throughput_ratio']:.2f}  errors {served['errors']}", flush=True)
            exits.append({"exit": spec.exit, "gflops": spec.gflops, "points": points})
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    return {"model_dir": str(model_dir), "name": manifest.name, "arch": manifest.arch, "provider": provider,
            "server_command": " ".join(server_cmd[1:]), "exits": exits}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dirs", nargs="*", type=Path, help="exported model folders")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--exits", type=int, nargs="+", help="only these exits (default: all)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per exit and concurrency")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--raw-seconds", type=float, default=2.0, help="seconds of raw ORT timing per batch size")
    parser.add_argument("--providers", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--intra-op-threads", type=int, default=0, help="for the server and raw ORT alike")
    parser.add_argument("--ort-allow-spinning", action=argparse.BooleanOptionalAction, default=False,
                        help="for the server and raw ORT alike")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for python -m serving (repeatable), e.g. --server-arg=--max-wait-ms=1")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    # Load-generator mode (internal).
    parser.add_argument("--loadgen", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loadgen:
        args.concurrency = args.concurrency[0]
        loadgen_main(args)
        return 0
    if not args.model_dirs:
        parser.error("give at least one model folder")

    import tempfile

    import onnxruntime

    results = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        for model_dir in args.model_dirs:
            results.append(bench_model(model_dir, args, Path(tmp)))
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "onnxruntime": onnxruntime.__version__},
        "method": "closed loop: each of `concurrency` keep-alive connections posts the same PNG and waits for the "
                  "answer; raw ORT = the exit's full-path session in-process at batch = concurrency; "
                  "throughput_ratio = server req/s / raw samples/s; p50_overhead_ms = server p50 - raw p50",
        "settings": {"concurrency": args.concurrency, "exits": args.exits, "duration_s": args.duration,
                     "warmup_s": args.warmup,
                     "providers": args.providers, "intra_op_threads": args.intra_op_threads,
                     "ort_allow_spinning": args.ort_allow_spinning,
                     "server_args": args.server_arg},
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
