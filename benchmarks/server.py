"""The real server for benchmarks: ``python -m serving`` in a subprocess on a free local port.

Shared by ``serve_bench.py`` (several at once, optionally each from another source tree, for
an A/B in one run) and ``anytime_load.py``, so both start, wait for and stop it the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_report_path(parser: Any, out: Path) -> None:
    """Refuse an ``--out`` the report could not be written to, before minutes of measuring: the report
    is written once, at the end, from memory (a folder given as ``--out`` lost a whole run)."""
    if out.is_dir():
        parser.error(f"--out {out} is a folder; give the report's file name, e.g. {out / 'report.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {out}: its folder cannot be created ({exc.strerror or exc})")
    if not os.access(out.parent, os.W_OK):
        parser.error(f"--out {out}: its folder {out.parent} is not writable")


def positive(kind: type = float):
    """An argparse type: a number above 0 (a 0 or negative count, interval or deadline measures nothing
    the report would say: NaN medians, a busy loop of scrapes, every request a 422)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return parse


class Server:
    """``python -m serving --model-dir MODEL ARGS`` from ``tree`` (default: this checkout), its
    output in ``workdir/server-NAME-MODEL.log``; ``providers`` adds ``--providers`` (with the CPU
    fallback only for ``auto``: a benchmark that asked for CUDA must not quietly measure the CPU).
    ``module``: another module that takes the same flags (``benchmarks.least_server``)."""

    def __init__(
        self,
        model_dir: Path,
        args: list[str],
        workdir: Path,
        *,
        name: str = "server",
        tree: Path = ROOT,
        providers: str | None = None,
        module: str = "serving",
    ) -> None:
        self.name, self.tree = name, tree
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        provider_args = ["--providers", providers] if providers else []
        if providers == "auto":
            provider_args.append("--allow-provider-fallback")
        self.cmd = [
            sys.executable,
            "-m",
            module,
            "--model-dir",
            str(model_dir.resolve()),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *provider_args,
            "--log-level",
            "warning",
            *args,
        ]
        self.log = workdir / f"server-{name}-{model_dir.name}.log"
        # The tree first, then whatever the caller's PYTHONPATH already holds (packages installed
        # with --target beside the interpreter's own, as on a machine that is not ours to set up).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(self.cmd, cwd=tree, env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        """Return once ``/readyz`` answers 200; raise with the log's tail if the server exits first."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server {self.name} exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server {self.name} not ready after {timeout} s; log: {self.log}")

    def get_json(self, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())

    def cpu_seconds(self) -> tuple[float, float] | None:
        """(event-loop thread, whole process) CPU seconds so far; None where /proc is missing."""
        try:
            ticks = os.sysconf("SC_CLK_TCK")
            fields = lambda path: Path(path).read_text().rsplit(")", 1)[1].split()  # noqa: E731
            main = fields(f"/proc/{self.proc.pid}/task/{self.proc.pid}/stat")
            whole = fields(f"/proc/{self.proc.pid}/stat")
            return ((int(main[11]) + int(main[12])) / ticks, (int(whole[11]) + int(whole[12])) / ticks)
        except (OSError, ValueError, IndexError):
            return None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP) so that it takes no CPU while something else is measured.

        An idle server is not idle on the CPU: it probes one stale graph every quarter second
        (``EED_PROBE_INTERVAL_S``), and where ORT's threads keep spinning after a run they spin
        after each probe: 3.7 % of a core with the default settings, 29 % with threads spinning
        30 ms after a run, 12 % with ORT's own spinning (full-width export, 2-core machine;
        ``idle_cpu_share_of_a_core`` in serve_bench's results), which a benchmark would charge to
        the server or the raw run it measures.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    @contextlib.contextmanager
    def running(self) -> Iterator[Server]:
        """Resumed for the ``with`` block, paused again after it."""
        self.resume()
        try:
            yield self
        finally:
            self.pause()

    def stop(self) -> None:
        self.resume()  # a stopped process would hold SIGTERM until continued
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# The packages a server started from a checkout imports (``python -m serving``, ``-m benchmarks.least_server``).
CODE_PACKAGES = ("serving", "benchmarks")


def snapshot_code(tree: Path, into: Path) -> Path:
    """A copy of the packages that servers started from ``tree`` import, taken when a run starts.

    Benchmarks start their servers anew every round, each from its source tree: a checkout edited
    while a run goes on would put later rounds on other code than earlier ones (a whole run on
    2026-12-01 did, docs/request-path-profile.md, eleventh session). Servers started from the
    copy run the code as it was at the start. Returns ``into``."""
    for package in CODE_PACKAGES:
        shutil.copytree(tree / package, into / package, ignore=shutil.ignore_patterns("__pycache__", "results"))
    return into


def code_revision(tree: Path = ROOT) -> dict[str, object]:
    """The checkout's git revision and whether the packages servers import differ from it."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", *CODE_PACKAGES)
    return {"revision": git("rev-parse", "HEAD"), "modified": None if status is None else bool(status)}


def start_servers(
    model_dir: Path, variants: dict[str, tuple[list[str], Path]], workdir: Path, providers: str
) -> list[Server]:
    """One server per variant, each started once the one before is ready: a server times its
    graphs while it loads (lone-request sessions, calibration), and servers loading side by
    side on a small machine would each measure the other's load."""
    servers: list[Server] = []
    try:
        for name, (args, tree) in variants.items():
            servers.append(Server(model_dir, args, workdir, name=name, tree=tree, providers=providers))
            servers[-1].wait_ready()
            servers[-1].pause()  # resumed only while measured (Server.running)
    except Exception:
        for server in servers:
            server.stop()
        raise
    return servers
