"""One socket write per response (serving/transport.py): a response's head and body reach the
client in one TCP segment, and nothing that does not follow at once is held back."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
import time

import pytest
from serving_model import (
    ServerProcess,
    build_model_folder,
    encode,
    gray_for_bin,
    uniform_image,
    uvicorn_in_thread,
)

from serving.settings import ServerSettings
from serving.transport import CoalescingTransport, http_protocol

# struct tcp_info (linux/tcp.h): tcpi_data_segs_in, segments that carried data, at byte 152.
TCP_INFO_DATA_SEGS_IN = 152


def data_segments_received(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < TCP_INFO_DATA_SEGS_IN + 4:
        pytest.skip("this kernel's tcp_info has no tcpi_data_segs_in (Linux 4.6+)")
    return struct.unpack_from("I", info, TCP_INFO_DATA_SEGS_IN)[0]


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bytes]:
    """(head, body) of one Content-Length response."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return head, body


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("transport-model"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO segment counts are Linux's")
def test_each_answer_reaches_the_client_in_one_segment(model_dir, tmp_path):
    image = encode(uniform_image(gray_for_bin(3)))
    request = (
        f"POST /classify?exit=2 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(image)}\r\n\r\n"
    ).encode() + image
    with (
        ServerProcess(model_dir, tmp_dir=tmp_path) as server,
        socket.create_connection(("127.0.0.1", server.port)) as sock,
    ):
        for n in range(1, 4):  # keep-alive: every answer on the connection
            sock.sendall(request)
            head, body = read_response(sock)
            time.sleep(0.05)  # a second segment, if there were one, would have arrived by now
            assert head.startswith(b"HTTP/1.1 200")
            assert json.loads(body)["exit"] == 2
            assert data_segments_received(sock) == n
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = read_response(sock)
        time.sleep(0.05)
        assert json.loads(body)["status"] == "ok"
        assert data_segments_received(sock) == 4


# -- what must not be held back: a small ASGI app on a real uvicorn with the same protocol ------


class App:
    """Streams two chunks with a wait between them; answers HEAD; closes when asked to."""

    def __init__(self) -> None:
        self.go_on: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    self.go_on, self.loop = asyncio.Event(), asyncio.get_running_loop()
                    await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:  # the whole request body (also after a 100 Continue)
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            assert self.go_on is not None
            await asyncio.wait_for(self.go_on.wait(), 10)  # the client sets it once it has the head
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            await send({"type": "http.response.body", "body": b"second"})
            return
        payload = b"echo:" + body
        headers = [(b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def asgi_server():
    app = App()
    timeouts = (ServerSettings.model_fields[f"{kind}_timeout_s"].default for kind in ("header", "body"))
    with uvicorn_in_thread(app, http=http_protocol(*timeouts)) as server:
        yield app, server.config.port, server


def test_a_head_that_nothing_follows_goes_out_by_itself(asgi_server):
    app, port, server = asgi_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:  # the app waits for us before its first chunk
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in received.lower()
        app.loop.call_soon_threadsafe(app.go_on.set)
        while not received.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
        assert b"5\r\nfirst\r\n" in received and b"6\r\nsecond\r\n" in received


def test_head_requests_expect_continue_and_connection_close_still_answer(asgi_server):
    _, port, _ = asgi_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n")  # a head and no body write at all
        sock.settimeout(5)
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        # 100 Continue: the interim head must leave before the client sends its body.
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        head, body = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200") and body == b"echo:hello"
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        head, body = read_response(sock)
        assert body == b"echo:hi" and b"connection: close" in head.lower()
        assert sock.recv(65536) == b""  # and the server closed the connection after it


class Recorder:
    """A transport's write side, as the protocol sees it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 7


def test_only_heads_wait_and_never_past_a_close_or_the_next_turn():
    async def main():
        loop = asyncio.get_running_loop()
        rec = Recorder()
        t = CoalescingTransport(rec, loop)  # type: ignore[arg-type]
        head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
        t.write(b"raw bytes")  # not a head: straight through
        t.write(memoryview(b"HTTP/1.1 204 No Content\r\n\r\n"))  # only bytes are held
        assert len(rec.writes) == 2
        rec.writes.pop()
        t.write(head)
        t.write(b"ok")
        assert rec.writes == [b"raw bytes", head + b"ok"]
        t.write(head)
        assert len(rec.writes) == 2  # held ...
        await asyncio.sleep(0)
        assert rec.writes[2:] == [head]  # ... until the next turn of the loop
        t.write(head)
        t.close()  # a close sends what is held first
        assert rec.writes[-1] == head and rec.closed
        assert t.get_write_buffer_size() == 7  # the rest is the transport's own
        rec2 = Recorder()
        t2 = CoalescingTransport(rec2, loop)  # type: ignore[arg-type]
        t2.write(head)
        t2.abort()  # an abort drops it, as it drops the transport's own buffer
        await asyncio.sleep(0)
        assert rec2.writes == [] and rec2.aborted

    asyncio.run(main())
