"""Load from Debian's ``wrk`` (a C load generator that takes far less CPU than a Python client):
one image POSTed over and over on N keep-alive connections, summarised as JSON by a Lua hook.

Shared by ``serve_bench.py`` and ``anytime_load.py``, so both measure load the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

# Reads the body from the file named by EED_BENCH_BODY; prints one "EED_JSON {...}" line.
POST_SCRIPT = """
local f = assert(io.open(os.getenv("EED_BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "image/png"

done = function(summary, latency, requests)
  io.write(string.format(
    "EED_JSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"non2xx\\": %d, \\"socket_errors\\": %d, "
    .. "\\"p50_ms\\": %.4f, \\"p90_ms\\": %.4f, \\"p99_ms\\": %.4f, \\"max_ms\\": %.4f}\\n",
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000))
end
"""


def run_wrk(url: str, connections: int, seconds: float, body: Path, threads: int = 1) -> dict:
    """POST the PNG file ``body`` to ``url`` (path and query included) for ``seconds``.

    Returns wrk's summary: ``requests`` (non-2xx answers included), ``duration_us``, ``non2xx``,
    ``socket_errors``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ``max_ms`` (latencies of every answer),
    and ``requests_per_s``: successful (2xx) answers per second.
    """
    script = body.parent / "wrk-post.lua"
    if not script.exists():
        script.write_text(POST_SCRIPT)
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",  # wrk takes whole seconds
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    env = {**os.environ, "EED_BENCH_BODY": str(body)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("EED_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    result = json.loads(line[len("EED_JSON ") :])
    # Successful answers only: wrk's ``requests`` include non-2xx ones (its latencies do too).
    result["requests_per_s"] = (result["requests"] - result["non2xx"]) / (result["duration_us"] / 1e6)
    return result
