"""Drain on SIGTERM (serving/drain.py), against a real ``python -m serving`` on 127.0.0.1.

Under steady, bounded load the server gets SIGTERM. What a replica behind a load balancer
needs: /readyz turns 503, requests that keep coming in the drain window are still answered,
a request in flight when the listener finally closes completes, no request fails, and the
process exits with status 0. Assertions are on outcomes, not on timings.
"""

from __future__ import annotations

import io
import signal
import socket
import threading
import time

import httpx
import pytest
from PIL import Image
from serving_model import ServerProcess, build_model_folder, gray_for_bin

DRAIN_SECONDS = 6  # long enough for the load phase below even on a busy 2-core machine
CLIENTS = 3


def png(gray: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), gray).save(buf, format="PNG")
    return buf.getvalue()


def listener_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def http_response(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("drain-model"))


def test_sigterm_drains_without_failing_a_request(model_dir, tmp_path):
    body = png(gray_for_bin(5))
    results: list[tuple[float, object]] = []  # (start time, status code or exception)
    lock = threading.Lock()
    stop_load = threading.Event()

    # The slow upload below spans the whole drain window: allow its body plenty of time.
    with ServerProcess(
        model_dir,
        "--drain-seconds",
        str(DRAIN_SECONDS),
        "--body-timeout-s",
        "120",
        "--log-level",
        "info",
        tmp_dir=tmp_path,
    ) as server:

        def client_loop():
            with httpx.Client(base_url=server.url, timeout=30) as client:  # keep-alive, like a proxy
                for _ in range(2000):  # bounded
                    if stop_load.is_set():
                        return
                    started = time.monotonic()
                    try:
                        outcome = client.post(
                            "/classify", content=body, headers={"Content-Type": "image/png"}
                        ).status_code
                    except httpx.HTTPError as exc:
                        outcome = exc
                    with lock:
                        results.append((started, outcome))

        workers = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
        for w in workers:
            w.start()
        try:
            # Load is flowing before the signal.
            deadline = time.monotonic() + 60
            while len(results) < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(results) >= 10, server.log()

            # A slow upload: headers and half the body now, the rest once the listener is closed.
            slow = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            head = (
                f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            slow.sendall(head + body[: len(body) // 2])

            sigterm_at = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)

            # /readyz turns 503 (new connections are still accepted), while /classify keeps answering.
            readiness = []
            deadline = time.monotonic() + DRAIN_SECONDS / 2
            while time.monotonic() < deadline:
                readiness.append(httpx.get(server.url + "/readyz", timeout=5).status_code)
                if readiness[-1] == 503:
                    break
                time.sleep(0.05)
            assert readiness and readiness[-1] == 503, readiness
            while time.monotonic() < deadline:
                with lock:
                    after = [r for t, r in results if t > sigterm_at]
                if len(after) >= 2 * CLIENTS:
                    break
                time.sleep(0.05)
            r = httpx.get(server.url + "/healthz", timeout=5)
            assert r.status_code == 200, "the process is still up while draining"
            # The Open Inference Protocol's readiness says false with a 4xx (Triton's 400), not a 503.
            model = httpx.get(server.url + "/v1/model", timeout=5).json()["manifest"]["name"]
            for path in ("/v2/health/ready", f"/v2/models/{model}/ready", f"/v2/models/{model}/versions/1/ready"):
                r = httpx.get(server.url + path, timeout=5)
                assert r.status_code == 400 and "draining" in r.json()["error"], (path, r.status_code, r.text)
            assert httpx.get(server.url + "/v2/health/live", timeout=5).status_code == 200
            # An unknown model is still unknown (404), not "draining".
            assert httpx.get(server.url + "/v2/models/nope/ready", timeout=5).status_code == 404
        finally:
            stop_load.set()
            for w in workers:
                w.join(timeout=60)

        # The window ends: the listener closes, but the slow upload is still in flight.
        deadline = time.monotonic() + DRAIN_SECONDS + 60
        while not listener_closed(server.port):
            assert server.proc.poll() is None, server.log()
            assert time.monotonic() < deadline, "the listener never closed"
            time.sleep(0.1)
        slow.sendall(body[len(body) // 2 :])
        answer = http_response(slow)
        slow.close()

        rc = server.proc.wait(timeout=60)
        log = server.log()

    failures = [r for _, r in results if r != 200]
    after = [r for t, r in results if t > sigterm_at]
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:5]}\n{log}"
    assert len(after) >= CLIENTS, f"requests sent during the drain window: {after}"
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"exit"' in answer
    assert rc == 0, log
    assert "draining" in log and "Cancel" not in log, log


def test_without_a_drain_window_sigterm_still_exits_cleanly(model_dir, tmp_path):
    with ServerProcess(model_dir, tmp_dir=tmp_path) as server:
        r = httpx.post(
            server.url + "/classify", content=png(gray_for_bin(2)), headers={"Content-Type": "image/png"}, timeout=30
        )
        assert r.status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.log()


@pytest.mark.parametrize(
    "signals", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT,)], ids=["SIGTERM twice", "Ctrl-C"]
)
def test_a_second_sigterm_or_ctrl_c_cuts_the_window_short_and_still_exits_0(model_dir, tmp_path, signals):
    # uvicorn re-raised the signals it caught after the shutdown: the process ended by SIGTERM (143) or
    # with a KeyboardInterrupt traceback, which a supervisor reads as a failure.
    with ServerProcess(model_dir, "--drain-seconds", "30", tmp_dir=tmp_path) as server:
        started = time.monotonic()
        for sig in signals:
            server.proc.send_signal(sig)
            time.sleep(0.3)
        rc = server.proc.wait(timeout=60)
        log = server.log()
    assert rc == 0, log
    assert time.monotonic() - started < 20  # not the 30 s window
    assert "Traceback" not in log, log


def test_an_upload_a_shutdown_gives_up_on_is_told_503_on_both_paths(model_dir, tmp_path):
    # A body still arriving when uvicorn's graceful shutdown stops waiting (SHUTDOWN_TIMEOUT_S): the
    # client is told to go elsewhere (503, Retry-After, close) — on the app's path uvicorn answered a
    # bare 500, and the protocol's own path counted a 499 while sending a 500.
    body = png(gray_for_bin(5))
    with ServerProcess(model_dir, "--drain-seconds", "0", "--body-timeout-s", "120", tmp_dir=tmp_path) as server:
        remembered = "/classify?exit=2"  # answered once: the protocol's own path from now on
        r = httpx.post(server.url + remembered, content=body, headers={"Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 200
        uploads = []
        for path in (remembered, "/classify?exit=2&top_k=2"):  # the second: a query not seen, the app's path
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
            sock.sendall(head.encode() + body[: len(body) // 2])
            uploads.append(sock)
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        answers = [http_response(sock) for sock in uploads]
        for sock in uploads:
            sock.close()
        rc = server.proc.wait(timeout=60)
        log = server.log()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 503 "), (answer[:300], log)
        assert b"retry-after: 1" in answer.lower() and b"connection: close" in answer.lower()
        assert b"shut down before this request was complete" in answer
    assert rc == 0, log
