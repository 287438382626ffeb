"""Load from Debian's ``wrk`` (a C load generator that takes far less CPU than a Python client):
one image POSTed over and over on N keep-alive connections, summarised as JSON by a Lua hook —
or a *bundle* of images (:func:`write_bundle`) POSTed in turn, for loads whose answers depend on
the image (a confidence cascade stops at an exit that depends on each image).

Shared by ``serve_bench.py`` and ``anytime_load.py``, so both measure load the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

# A bundle: one line "EEDBUNDLE <length> <length> ...\n", then the bodies back to back.
BUNDLE_MAGIC = b"EEDBUNDLE"

# Prints one "EED_JSON {...}" line when wrk ends.
DONE_HOOK = """
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

# Reads the body from the file named by EED_BENCH_BODY: wrk sends it from C, no Lua per request.
POST_SCRIPT = (
    """
local f = assert(io.open(os.getenv("EED_BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "image/png"
"""
    + DONE_HOOK
)

# Reads the bundle named by EED_BENCH_BODY and sends its bodies in turn; the requests are formatted
# once, at start, so a request costs wrk one Lua call.
BUNDLE_SCRIPT = (
    """
local requests, count, position = {}, 0, 0
init = function(args)
  local f = assert(io.open(os.getenv("EED_BENCH_BODY"), "rb"))
  local data = f:read("*all")
  f:close()
  local newline = assert(data:find("\\n", 1, true), "not a bundle")
  local offset = newline + 1
  local headers = {["Content-Type"] = "image/png"}
  for length in data:sub(1, newline - 1):gmatch("%d+") do
    length = tonumber(length)
    count = count + 1
    requests[count] = wrk.format("POST", nil, headers, data:sub(offset, offset + length - 1))
    offset = offset + length
  end
end
request = function()
  position = position % count + 1
  return requests[position]
end
"""
    + DONE_HOOK
)


def write_bundle(path: Path, bodies: Sequence[bytes]) -> Path:
    """Write ``bodies`` as one bundle file at ``path`` (read by :func:`read_bundle` and by wrk's
    script), so that one load run sends them all in turn; returns ``path``."""
    if not bodies:
        raise ValueError("a bundle needs at least one body")
    header = BUNDLE_MAGIC + b"".join(b" %d" % len(b) for b in bodies) + b"\n"
    path.write_bytes(header + b"".join(bodies))
    return path


def is_bundle(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(BUNDLE_MAGIC) + 1) == BUNDLE_MAGIC + b" "


def read_bundle(path: Path) -> list[bytes] | None:
    """The bodies of the bundle at ``path``, or None when the file is a plain body."""
    if not is_bundle(path):
        return None
    data = path.read_bytes()
    header, _, rest = data.partition(b"\n")
    bodies, offset = [], 0
    for length in map(int, header.split()[1:]):
        bodies.append(rest[offset : offset + length])
        offset += length
    if offset != len(rest):
        raise ValueError(f"{path}: the bundle's lengths do not add up to its size")
    return bodies


def run_wrk(url: str, connections: int, seconds: float, body: Path, threads: int = 1) -> dict:
    """POST the PNG file ``body`` to ``url`` (path and query included) for ``seconds``; a bundle
    (:func:`write_bundle`) has its bodies sent in turn.

    Returns wrk's summary: ``requests`` (non-2xx answers included), ``duration_us``, ``non2xx``,
    ``socket_errors``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ``max_ms`` (latencies of every answer),
    and ``requests_per_s``: successful (2xx) answers per second.
    """
    bundle = is_bundle(body)
    script = body.parent / ("wrk-bundle.lua" if bundle else "wrk-post.lua")
    if not script.exists():
        script.write_text(BUNDLE_SCRIPT if bundle else POST_SCRIPT)
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
