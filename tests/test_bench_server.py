"""benchmarks/server.py: the real server as benchmarks start it, and pausing it so that it takes no
CPU while another server or raw ONNX Runtime is measured (its idle probes and ORT's spinning would)."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

import pytest

from benchmarks.server import Server

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "exported" / "fmnist-resnet18-eed"


def _status(port: int, timeout: float) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", "/readyz")
    return conn.getresponse().status


def test_a_paused_server_takes_no_cpu_and_answers_again_once_resumed(tmp_path):
    # Probe every 50 ms on two-thread sessions whose pool thread spins 30 ms after each run: unpaused,
    # this idle server keeps a core busy.
    flags = ["--probe-interval-s", "0.05", "--intra-op-threads", "2", "--ort-spin-us", "30000"]
    server = Server(SHIPPED, [*flags, "--ort-keep-spinning-after-run"], tmp_path, name="paused")
    try:
        server.wait_ready()
        before = server.cpu_seconds()
        time.sleep(1.0)
        busy = server.cpu_seconds()[1] - before[1]
        assert busy > 0.02, f"the idle server used only {busy:.3f} s of CPU in 1 s: nothing for a pause to stop"

        server.pause()
        time.sleep(0.2)
        before = server.cpu_seconds()
        time.sleep(1.0)
        assert server.cpu_seconds()[1] - before[1] < 0.02  # frozen: no probes, no spinning
        with pytest.raises(TimeoutError):
            _status(server.port, timeout=0.5)

        with server.running():
            assert _status(server.port, timeout=10) == 200
        with pytest.raises(TimeoutError):  # paused again after the block
            _status(server.port, timeout=0.5)
    finally:
        started = time.monotonic()
        server.stop()  # resumes first: a frozen process would hold SIGTERM
    assert server.proc.returncode is not None and time.monotonic() - started < 15


def _post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "image/png"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_the_reference_server_answers_as_the_server_does(tmp_path):
    # serve_bench reads the server against benchmarks/least_server.py; that only means something if
    # the reference does the same work: the same decoding, graphs and answer for the same image.
    images = [_png(seed) for seed in range(3)]
    answers, errors = {}, {}
    for name, module in (("server", "serving"), ("least", "benchmarks.least_server")):
        server = Server(SHIPPED, [], tmp_path, name=name, module=module)
        try:
            server.wait_ready()
            answers[name] = [
                _post(server.port, f"/classify?exit={e}&top_k=1", image) for image in images for e in (1, 4)
            ]
            errors[name] = [
                _post(server.port, path, body)[0]
                for path, body in (
                    ("/classify?exit=9", images[0]),
                    ("/classify?exit=x", images[0]),
                    ("/classify", b"?"),
                )
            ]
        finally:
            server.stop()
    served, least = answers["server"], answers["least"]
    assert all(status == 200 for status, _ in served + least)
    assert [(a["exit"], a["label"]) for _, a in least] == [(a["exit"], a["label"]) for _, a in served]
    for (_, a), (_, b) in zip(least, served):
        assert abs(a["probability"] - b["probability"]) < 1e-5
    assert errors["least"] == errors["server"] == [422, 422, 400]


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_the_benchmark_decides_each_target_on_the_unrounded_figure_and_counts_the_rounds_that_met_it():
    # A main-exit median of 0.9456 once printed as "0.95x (>= 0.95)": the verdict must say not met.
    from benchmarks.serve_bench import summary

    def servers(**figures):
        return {"servers": {"server": figures}}

    report = {
        "throughput": {
            "cases": {
                "saturation_main": servers(ratio_vs_raw_default=0.9456),
                "saturation_exit1": servers(
                    ratio_vs_raw_default=0.85, ratio_vs_raw_default_per_round=[0.80, 0.85, 0.91, 0.84, 0.86]
                ),
                "overhead_main": servers(
                    p50_overhead_ms_vs_raw_default=0.5004, p50_overhead_ms_vs_raw_default_per_round=[0.49, 0.5004, 0.7]
                ),
            }
        },
        "cascade": [
            {
                "model": "m",
                "in_process": {"efficiency": 0.5},
                "variants": {
                    "server": {
                        "efficiency": None,
                        "efficiency_of_ort_runs": 0.4,
                        "agreement_with_offline_rule": 1.0,
                        "accuracy_main": 0.9415,
                        "accuracy_cascade": 0.941,
                    }
                },
            }
        ],
    }
    throughput, cascade = summary(report)
    assert "0.946x (>= 0.95: not met)" in throughput
    assert "0.850x (>= 0.85: met, in 3 of 5 rounds)" in throughput  # how often, where rounds are known
    assert "+0.50 ms (<= 0.5: not met, in 1 of 3 rounds)" in throughput
    assert "NOT VALID" not in throughput
    assert "cascade efficiency n/a (>= 0.8: n/a" in cascade
    assert "main 94.15 % / cascade 94.10 %" in cascade

    # A round just below the target is not met (the report now stores rounds unrounded: 0.94996 was
    # stored as 0.95 and counted as met — that storing is not exercised here), a run with error
    # answers is not a measurement, and a cascade whose answers are not the offline rule's does not
    # meet the target however fast.
    report["throughput"]["cases"]["saturation_main"] = servers(
        ratio_vs_raw_default=0.94996, ratio_vs_raw_default_per_round=[0.94996, 0.94996, 0.96], errors=3
    )
    variant = report["cascade"][0]["variants"]["server"]
    variant.update(efficiency=0.85, agreement_with_offline_rule=0.5)
    throughput, cascade = summary(report)
    assert "0.950x (>= 0.95: not met, in 1 of 3 rounds)" in throughput
    # A round whose raw baseline the host slowed (138 against ~200 img/s) reads as met for nothing the
    # server did: found by its baseline, and left out of the count.
    from benchmarks.serve_bench import stalled_rounds

    assert stalled_rounds([200.0, 198.0, 138.0, 202.0, 195.0]) == [2]
    assert stalled_rounds([200.0, 180.0, 202.0]) == []
    report["throughput"]["cases"]["saturation_exit1"]["servers"]["server"]["ratio_vs_raw_default_stalled_rounds"] = [2]
    throughput, _ = summary(report)
    assert "0.850x (>= 0.85: met, in 2 of 4 rounds (1 with a stalled baseline left out))" in throughput
    assert "NOT VALID: 3 error answers" in throughput
    assert "cascade efficiency 0.85 (not met: answers differ" in cascade
    # the untrained full-width export is timed on Fashion-MNIST images, not scored on them
    report["cascade"][0]["accuracy_meaningful"] = False
    assert "top-1 accuracy n/a" in summary(report)[-1]


def test_a_round_whose_baseline_stalled_is_left_out_of_the_figure_not_only_of_the_count(tmp_path):
    # The median over all rounds carried a stalled baseline's inflated ratio: exit 1 read 0.852x,
    # met, where the four other rounds gave 0.825x; a raw batch-1 p50 of 11.9 ms (7.3-8.2 in the
    # others) made its round's overhead -2.24 ms, the only round counted as met.
    from benchmarks.plots import serving_rounds
    from benchmarks.serve_bench import TARGETS, round_figures, stalled_rounds, summary

    per_round = [0.80, 1.231, 0.83, 0.82, 0.84]
    stalled = stalled_rounds([500.0, 320.0, 490.0, 505.0, 498.0])
    assert stalled == [1]
    figures = round_figures("ratio_vs_raw_default", per_round, stalled)
    assert figures["ratio_vs_raw_default"] == pytest.approx(0.825)
    assert figures["ratio_vs_raw_default_all_rounds"] == pytest.approx(0.83)
    raw_p50 = [7.3, 8.2, 7.6, 7.9, 11.88]
    overhead = round_figures(
        "p50_overhead_ms_vs_raw_default", [1.4, 1.2, 1.5, 1.3, -2.24], stalled_rounds([1 / p for p in raw_p50])
    )
    assert overhead["p50_overhead_ms_vs_raw_default_stalled_rounds"] == [4]
    assert overhead["p50_overhead_ms_vs_raw_default"] == pytest.approx(1.35)

    def case(**figures):
        return {"servers": {"server": {**figures, "runs": []}}}

    throughput = {
        "model": "m",
        "rounds": 5,
        "cases": {
            "saturation_main": case(**round_figures("ratio_vs_raw_default", [0.9] * 5, [])),
            "saturation_exit1": case(**figures),
            "overhead_main": case(**overhead),
        },
    }
    lines = summary({"throughput": throughput})
    assert "exit 1 0.825x (>= 0.85: not met, in 0 of 4 rounds (1 with a stalled baseline left out))" in lines[0]
    assert "p50 overhead +1.35 ms (<= 0.5: not met, in 0 of 4 rounds (1 with a stalled baseline left out))" in lines[0]
    assert serving_rounds(throughput, TARGETS, tmp_path / "rounds.png").stat().st_size > 1000


def test_summarize_reads_every_committed_results_file(capsys):
    # Files from before the baselines kept their rounds (33 of them) raised KeyError: 'runs'.
    from benchmarks.serve_bench import main

    files = sorted((ROOT / "benchmarks" / "results").glob("serve_bench*.json"))
    assert len(files) > 40
    read = 0
    for path in files:
        try:
            status = main(["--summarize", str(path)])
        except SystemExit as exc:  # the first benchmark's own format: said, not a traceback
            status = exc.code
            assert "no throughput or cascade figures" in capsys.readouterr().err, path
            continue
        assert status == 0 and "[" in capsys.readouterr().out, path
        read += 1
    assert read >= len(files) - 3


def test_servers_run_the_code_as_it_was_when_the_run_started(tmp_path):
    # Servers start anew every round: edits to the checkout during a run must not reach them.
    from benchmarks.server import code_revision, snapshot_code

    code = snapshot_code(ROOT, tmp_path / "code")
    assert (code / "serving" / "__main__.py").is_file() and (code / "benchmarks" / "least_server.py").is_file()
    assert not list(code.rglob("__pycache__")) and not (code / "benchmarks" / "results").exists()
    marker = tmp_path / "ran-from-the-copy"
    with open(code / "serving" / "__init__.py", "a") as f:  # an edit only the copy has
        f.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    server = Server(SHIPPED, ["--intra-op-threads", "1"], tmp_path, name="copy", tree=code)
    try:
        server.wait_ready()
    finally:
        server.stop()
    assert marker.exists()
    if (ROOT / ".git").exists():  # what the run's report records of the code
        revision = code_revision(ROOT)
        assert len(str(revision["revision"])) == 40 and isinstance(revision["modified"], bool)


@pytest.mark.skipif(__import__("shutil").which("wrk") is None, reason="wrk not installed (Debian package wrk)")
def test_refused_answers_are_not_counted_as_throughput(tmp_path):
    # wrk's request count includes non-2xx answers: a server refusing half its load read as twice its
    # real rate. The load's rate counts successes only (as the Python generator does).
    import asyncio
    import socket
    import threading

    from benchmarks.serve_bench import run_load

    answered = [0]

    class HalfRefused(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, b""

        def data_received(self, data):
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                head = self.buffer[:end].decode("latin-1").lower().split("\r\n")
                length = next((int(h.split(":")[1]) for h in head if h.startswith("content-length:")), 0)
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length :]
                answered[0] += 1
                status = b"200 OK" if answered[0] % 2 else b"503 Service Unavailable"
                self.transport.write(b"HTTP/1.1 %s\r\ncontent-length: 2\r\n\r\n{}" % status)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = loop.create_future()

    async def serve():
        server = await loop.create_server(HalfRefused, "127.0.0.1", port)
        ready.set()
        async with server:
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    body = tmp_path / "body.png"
    body.write_bytes(b"x" * 100)
    r = run_load(f"http://127.0.0.1:{port}", "/classify", 1, 1.0, body)
    successes_per_s = (r["requests"] - r["errors"]) / 1.0
    loop.call_soon_threadsafe(stop.set_result, None)
    thread.join(10)
    loop.close()
    assert r["errors"] > 0 and r["requests"] > 20
    assert r["rps"] == pytest.approx(successes_per_s, rel=0.2), r


@pytest.mark.parametrize(
    "program, flags, message",
    [
        ("serve_bench", ["--out", "{dir}"], "is a folder; give the report's file name"),  # lost after the run
        ("serve_bench", ["--out", "{file}/report.json"], "its folder cannot be created"),
        ("serve_bench", ["--rounds", "0"], "must be above 0"),  # NaN medians in the report
        ("serve_bench", ["--connections", "x"], "not an integer"),
        ("serve_bench", ["--images", "0"], "must be above 0"),  # a traceback after the saturation rounds
        ("serve_bench", ["--full-width-images", "-1"], "must be above 0"),  # silently all but one image
        ("ort_spinning", ["--rounds", "0"], "must be above 0"),  # an IndexError after opening sessions
        ("serve_bench", ["--policy", "budget_0.5x_mian"], "is not one of fmnist-resnet18-eed's calibrated policies"),
        ("anytime_load", ["--deadline-ms", "0"], "must be above 0"),  # silently the computed deadline
        ("anytime_load", ["--deadline-ms", "-5"], "must be above 0"),  # every request a 422, "NOT MET"
        ("anytime_load", ["--scrape-interval", "0"], "must be above 0"),  # a busy loop of scrapes
        ("anytime_load", ["--out", "{dir}"], "is a folder"),
    ],
)
def test_benchmarks_refuse_flags_that_would_measure_nothing_before_they_start(
    tmp_path, capsys, program, flags, message
):
    import importlib

    (tmp_path / "a-file").write_text("x")
    flags = [f.replace("{file}", str(tmp_path / "a-file")).replace("{dir}", str(tmp_path)) for f in flags]
    main = importlib.import_module(f"benchmarks.{program}").main
    # A report path of the test's own first (a case's --out comes later and wins): should a check go
    # missing, the benchmark that then runs must not overwrite the committed results.
    flags = ["--out", str(tmp_path / "report.json"), *flags]
    with pytest.raises(SystemExit) as refused:
        main(["--only", "cascade", "--images", "8", *flags] if program == "serve_bench" else flags)
    assert refused.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("generator", ["wrk", "python"])
def test_a_bundle_of_images_is_sent_image_by_image(tmp_path, monkeypatch, generator):
    # A cascade's exit depends on the image: under load, the benchmark sends its test images in turn
    # (a bundle), not one image over and over, or its GFLOPs and time would be one image's.
    import asyncio
    import shutil
    import socket
    import threading

    from benchmarks import serve_bench
    from benchmarks.wrk import read_bundle, write_bundle

    if generator == "wrk" and shutil.which("wrk") is None:
        pytest.skip("wrk not installed (Debian package wrk)")
    if generator == "python":  # the fallback where wrk is missing
        monkeypatch.setattr(serve_bench.shutil, "which", lambda name: None)
    received: list[bytes] = []

    class Recorder(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, b""

        def data_received(self, data):
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                head = self.buffer[:end].decode("latin-1").lower().split("\r\n")
                length = next((int(h.split(":")[1]) for h in head if h.startswith("content-length:")), 0)
                if len(self.buffer) < end + 4 + length:
                    return
                received.append(self.buffer[end + 4 : end + 4 + length])
                self.buffer = self.buffer[end + 4 + length :]
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = loop.create_future()

    async def serve():
        server = await loop.create_server(Recorder, "127.0.0.1", port)
        ready.set()
        async with server:
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    bodies = [b"first", b"\x89PNG second\r\n\r\n with a blank line", b"third" * 1000]
    bundle = write_bundle(tmp_path / "images.bundle", bodies)
    (tmp_path / "plain.png").write_bytes(bodies[1])
    assert read_bundle(bundle) == bodies and read_bundle(tmp_path / "plain.png") is None  # a plain body
    try:
        r = serve_bench.run_load(f"http://127.0.0.1:{port}", "/classify", 2, 1.0, bundle)
    finally:
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(10)
        loop.close()
    assert r["errors"] == 0 and len(received) > 30
    assert set(received) == set(bodies)  # every image sent, byte for byte, and nothing else
    counts = [received.count(b) for b in bodies]
    assert max(counts) - min(counts) <= 2 * 2, counts  # in turn: about as often each


def test_under_load_a_cascade_is_timed_per_answer_from_the_servers_metrics(tmp_path):
    # The cascade at saturation: answers/s from the load generator, GFLOPs and exits per answer from
    # the server's own counters, for the main exit and the cascade in alternating runs.
    import argparse

    from benchmarks.serve_bench import run_load
    from benchmarks.serve_cascade import cascade_at_saturation, fashion_mnist_test, png
    from benchmarks.wrk import write_bundle
    from serving.manifest import load_manifest

    manifest = load_manifest(SHIPPED)
    images, _, _ = fashion_mnist_test(64, None)
    bundle = write_bundle(tmp_path / "images.bundle", [png(im) for im in images])
    policy = "budget_0.75x_main"
    assert policy in manifest.thresholds.policies  # a calibrated policy of this model
    server = Server(SHIPPED, ["--intra-op-threads", "1"], tmp_path, name="loaded")
    try:
        server.wait_ready()
        args = argparse.Namespace(rounds=2, seconds=1.0, connections=4)
        result = cascade_at_saturation([server], bundle, 4, f"policy={policy}", args, run_load)["loaded"]
    finally:
        server.stop()
    assert len(result["runs"]["main"]) == len(result["runs"]["cascade"]) == 2 and result["rounds_counted"] == 2
    assert result["errors"] == 0
    for main, casc in zip(result["runs"]["main"], result["runs"]["cascade"]):
        assert main["answers_per_s"] > 0 and casc["answers_per_s"] > 0
        # Every answer of the main exit costs its GFLOPs, whatever was in flight at either end of the run.
        assert main["gflops_per_answer"] == pytest.approx(manifest.exits[-1].gflops, rel=1e-6)
        assert main["exit_shares"] == pytest.approx([0, 0, 0, 1])
        # The cascade's answers come from several exits, and cost less than the main exit's.
        assert sum(share > 0 for share in casc["exit_shares"]) >= 2 and sum(casc["exit_shares"]) == pytest.approx(1)
        assert casc["gflops_per_answer"] < main["gflops_per_answer"]
        assert main["ort_ms_per_answer"] > 0 and casc["ort_ms_per_answer"] > 0
    rounds = result["rounds"]
    for r, (main, casc) in zip(rounds, zip(result["runs"]["main"], result["runs"]["cascade"])):
        assert r["gflops_saved"] == pytest.approx(1 - casc["gflops_per_answer"] / main["gflops_per_answer"])
        assert r["time_per_answer_saved"] == pytest.approx(1 - main["answers_per_s"] / casc["answers_per_s"])
        assert r["efficiency"] == pytest.approx(r["time_per_answer_saved"] / r["gflops_saved"])
    for key in ("gflops_saved", "time_per_answer_saved", "efficiency", "main_answers_per_s"):
        assert result[key] == pytest.approx(sum(r[key] for r in rounds) / 2)  # the median of two rounds


def test_a_load_round_without_answers_is_reported_not_counted(tmp_path, monkeypatch):
    # Every request refused (a 503 storm, a wrong query): no answers to divide by. The round is kept
    # with its runs, left out of the figures, and the benchmark goes on to write its report.
    import argparse
    import contextlib

    from benchmarks import serve_cascade
    from benchmarks.serve_bench import summary

    class Refusing:
        name, url, port = "refusing", "http://127.0.0.1:1", 1

        @contextlib.contextmanager
        def running(self):
            yield self

    served = iter([0, 0] * 8)  # the server's answer count never moves
    monkeypatch.setattr(
        serve_cascade,
        "served_so_far",
        lambda port: {"answers": next(served), "per_exit": {}, "gflops": 0.0, "ort_s": 0.0},
    )

    def refused(url, path, connections, seconds, body):
        return {"rps": 0.0, "errors": 100, "p50_ms": 1.0, "requests": 100}

    monkeypatch.setattr(serve_cascade.time, "sleep", lambda s: None)
    args = argparse.Namespace(rounds=2, seconds=1.0, connections=4)
    result = serve_cascade.cascade_at_saturation([Refusing()], tmp_path / "b", 4, "confidence=0.5", args, refused)
    loaded = result["refusing"]
    assert loaded["rounds"] == [None, None] and loaded["rounds_counted"] == 0 and loaded["efficiency"] is None
    assert loaded["errors"] == 400 and len(loaded["runs"]["main"]) == 2
    variant = {"efficiency": 0.5, "agreement_with_offline_rule": 1.0, "accuracy_main": 0.9, "accuracy_cascade": 0.9}
    report = {"cascade": [{"model": "m", "variants": {"refusing": {**variant, "at_saturation": loaded}}}]}
    assert summary(report)[-1] == "[refusing] m, 4 connections: no round with answers"
