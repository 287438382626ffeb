"""Keep-alive timeouts with one timer per idle spell (serving/keepalive.py), on a real uvicorn with
the server's HTTP protocol: an idle connection closes ``timeout_keep_alive`` after its last
response, a busy one never does, and requests do not arm timers one by one."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from serving_model import uvicorn_in_thread

from serving.transport import http_protocol

KEEP_ALIVE_S = 1.0


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/slow":  # in flight longer than the keep-alive timeout
        await asyncio.sleep(KEEP_ALIVE_S * 1.5)
    payload = scope["path"].encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(payload))]})
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def server():
    with uvicorn_in_thread(app, http=http_protocol(), timeout_keep_alive=1) as server:
        yield server


def get(sock: socket.socket, path: str = "/") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while not data.endswith(path.encode()):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def seconds_until_closed(sock: socket.socket, limit: float = 10.0) -> float:
    started = time.monotonic()
    sock.settimeout(limit)
    assert sock.recv(1) == b"", "data where a close was expected"
    return time.monotonic() - started


def connection(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.config.port))


def test_an_idle_connection_closes_after_the_keep_alive_timeout(server):
    with connection(server) as sock:
        get(sock)
        assert 0.8 * KEEP_ALIVE_S <= seconds_until_closed(sock) <= 2 * KEEP_ALIVE_S + 0.5


def test_a_busy_connection_stays_open_and_closes_a_timeout_after_its_last_response(server):
    with connection(server) as sock:
        started = time.monotonic()
        while time.monotonic() - started < 2.5 * KEEP_ALIVE_S:  # longer than the timeout, never idle for it
            get(sock, "/busy")
            time.sleep(0.3 * KEEP_ALIVE_S)
        assert 0.5 * KEEP_ALIVE_S <= seconds_until_closed(sock) <= 2 * KEEP_ALIVE_S + 0.5


def test_a_request_in_flight_past_the_timeout_is_answered_and_the_connection_kept(server):
    with connection(server) as sock:
        get(sock)
        time.sleep(0.5 * KEEP_ALIVE_S)
        get(sock, "/slow")  # the timer armed after the first answer fires while this one runs
        get(sock, "/after")
        assert 0.8 * KEEP_ALIVE_S <= seconds_until_closed(sock) <= 2 * KEEP_ALIVE_S + 0.5


def test_a_connection_idle_again_before_its_timer_fires_closes_a_timeout_after_its_last_response(server):
    # The timer armed after the first answer finds the connection idle again, but for less than
    # the timeout: it waits for the rest of that spell instead of closing now or never.
    with connection(server) as sock:
        get(sock)
        time.sleep(0.5 * KEEP_ALIVE_S)
        get(sock, "/second")
        assert 0.8 * KEEP_ALIVE_S <= seconds_until_closed(sock) <= 1.5 * KEEP_ALIVE_S


def test_every_response_is_counted(server):
    before = server.server_state.total_requests
    with connection(server) as sock:
        for n in range(5):
            get(sock, f"/count{n}")
    assert server.server_state.total_requests - before == 5


def test_this_uvicorn_gets_the_one_timer_per_spell():
    # serving/keepalive.py reproduces uvicorn 0.54's response completion; another version keeps its
    # own timers (correct, only slower): this says which one is installed.
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from serving.keepalive import lazy_keep_alive

    assert lazy_keep_alive(HttpToolsProtocol) is not HttpToolsProtocol, (
        "uvicorn's HttpToolsProtocol.on_response_complete changed: check serving/keepalive.py against it "
        "and update REPRODUCED_ON_RESPONSE_COMPLETE"
    )


def test_requests_do_not_arm_a_timer_each(server):
    with connection(server) as sock:
        get(sock)
        (protocol,) = [c for c in server.server_state.connections if c.transport.get_extra_info("peername")]
        timer = protocol._keep_alive_timer
        assert timer is not None
        for n in range(20):
            get(sock, f"/{n}")
        assert protocol._keep_alive_timer is timer  # the same timer for the whole idle-and-busy spell
        # Pipelined requests are still answered in order.
        sock.sendall(b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p2 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b"/p2"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        assert data.index(b"/p1") < data.index(b"/p2")
