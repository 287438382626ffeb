"""One socket write per response (serving/transport.py): a response's head and body reach the
client in one TCP segment, and nothing that does not follow at once is held back."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_model import (
    ServerProcess,
    build_model_folder,
    encode,
    uniform_image,
    uvicorn_in_thread,
)

from serving.batching import GraphWorker, LoneRun
from serving.settings import ServerSettings
from serving.transport import CoalescingTransport, WriteHold, coalescing, http_protocol

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
    image = encode(uniform_image(3))
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


class ClosedRecorder(Recorder):
    """A transport whose connection is gone: uvloop raises on a write to it."""

    def write(self, data: bytes) -> None:
        if self.is_closing():
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")
        super().write(data)


def test_an_answer_to_a_client_that_left_is_dropped_not_an_error():
    # A client that pipelined a second request and then left: uvicorn marks only the later request
    # as disconnected, so the first one's answer is still written, and uvloop raised (an "internal
    # error" traceback per such answer, with the connection already gone).
    async def main():
        loop = asyncio.get_running_loop()
        rec = ClosedRecorder()
        t = CoalescingTransport(rec, loop)  # type: ignore[arg-type]
        head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
        t.write(head)  # held for the body
        rec.closed = True  # the connection is lost meanwhile
        t.write(b"ok")
        t.write(b"more")
        t.write(head)
        await asyncio.sleep(0)
        assert rec.writes == []

    asyncio.run(main())


# -- a batch's answers leave together: held while its handlers run, then one write per connection --


def test_writes_held_for_a_batch_leave_at_its_release_one_write_per_connection_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        hold = WriteHold()
        rec1, rec2 = Recorder(), Recorder()
        t1, t2 = CoalescingTransport(rec1, loop, hold), CoalescingTransport(rec2, loop, hold)  # type: ignore[arg-type]
        head = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n"
        t1.write(b"now")  # no hold: straight through
        hold.hold(1)  # a batch of one is not held
        t1.write(b"still now")
        assert rec1.writes == [b"now", b"still now"] and not hold.holding
        rec1.writes.clear()
        await asyncio.sleep(0)

        # Two batches' results handed out in one turn: each release sends what its handlers wrote.
        seen = []
        loop.call_soon(t1.write, head)  # batch A's handlers ...
        loop.call_soon(t1.write, b"a")
        hold.hold(2)
        loop.call_soon(lambda: seen.append((list(rec1.writes), hold.holding)))  # after A's release
        loop.call_soon(t2.write, memoryview(b"b"))  # batch B's handler
        loop.call_soon(t1.write, head + b"c")  # a pipelined answer on the first connection
        hold.hold(2)
        assert hold.holding and rec1.writes == rec2.writes == []
        await asyncio.sleep(0)
        assert seen == [([head + b"a"], True)]  # A's answer, in one write; B's still coming
        assert rec1.writes == [head + b"a", head + b"c"]  # in order
        assert rec2.writes == [b"b"] and not hold.holding
        t2.write(b"after")
        assert rec2.writes[-1] == b"after"  # released: straight through again

        # A close sends what is held first; an abort drops it.
        hold.hold(2)
        t1.write(b"last")
        t1.close()
        assert rec1.writes[-1] == b"last" and rec1.closed
        t2.write(b"dropped")
        t2.abort()
        await asyncio.sleep(0)
        assert rec2.writes[-1] == b"after" and rec2.aborted

    asyncio.run(main())


def test_a_batchs_answers_are_sent_after_its_last_handler_has_written():
    """The batcher's hook and the hold together: every handler of a batch writes before anything is
    sent, then each connection gets its answer; a batch of one is sent as it is written."""

    async def main():
        loop = asyncio.get_running_loop()
        hold = WriteHold()
        recorders = [Recorder() for _ in range(6)]
        transports = [CoalescingTransport(r, loop, hold) for r in recorders]  # type: ignore[arg-type]
        sent_when_written: list[int] = []
        batches: list[int] = []
        with ThreadPoolExecutor(1) as pool:
            worker = GraphWorker(
                "plus-one",
                lambda batch: [batch + 1],
                pool,
                max_batch_size=8,
                max_wait_s=0.05,
                on_batch=lambda size, wait, run_s, rows: batches.append(size),
                answers=hold,
            )
            worker.start()

            async def handler(i: int, count: int) -> None:
                (out,) = await worker.submit(np.full(2, i, dtype=np.float32))
                transports[i].write(b"answer %d" % int(out[0]))
                sent_when_written.append(sum(len(r.writes) for r in recorders[:count]))

            await asyncio.gather(*(handler(i, 5) for i in range(5)))
            assert batches == [5]
            assert sent_when_written == [0] * 5  # nothing left before the last handler had written
            assert [r.writes for r in recorders[:5]] == [[b"answer %d" % (i + 1)] for i in range(5)]
            sent_when_written.clear()
            await handler(5, 6)  # alone in its batch
            assert batches == [5, 1] and sent_when_written == [6]
            await worker.stop()

    asyncio.run(main())


def test_concurrent_and_pipelined_answers_each_reach_their_own_request(model_dir, tmp_path):
    """Twelve connections at once, each pipelining three requests with their own ids: with answers
    batched (and so written under the server's hold: that they were held is checked in
    test_serving_fastpath.py), every answer comes back on its connection, in its request's order."""
    images = [encode(uniform_image(b)) for b in range(3)]

    def request(conn: int, n: int) -> bytes:
        image = images[n]
        return (
            f"POST /classify?exit=2 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nX-Request-ID: c{conn}-r{n}\r\n"
            f"Content-Length: {len(image)}\r\n\r\n"
        ).encode() + image

    with ServerProcess(model_dir, tmp_dir=tmp_path) as server:
        socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(12)]
        try:
            for c, sock in enumerate(socks):
                sock.sendall(b"".join(request(c, n) for n in range(3)))
            for c, sock in enumerate(socks):
                sock.settimeout(10)
                data = b""  # pipelined answers may share a read
                for n in range(3):
                    while b"\r\n\r\n" not in data:
                        data += sock.recv(65536) or pytest.fail(f"connection {c} closed")
                    head, _, data = data.partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    while len(data) < length:
                        data += sock.recv(65536) or pytest.fail(f"connection {c} closed")
                    body, data = data[:length], data[length:]
                    assert head.startswith(b"HTTP/1.1 200"), head
                    assert f"x-request-id: c{c}-r{n}".encode() in head.lower()
                    assert json.loads(body)["exit"] == 2
        finally:
            for sock in socks:
                sock.close()
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
    sizes = {
        sample.name: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name.startswith("eed_batch_size_")
        and sample.labels.get("exit") == "2"
        and sample.labels.get("graph") == "exit"
    }
    # 36 requests in fewer batches: some batch held several answers (the path under test).
    assert sizes["eed_batch_size_sum"] == 36 and sizes["eed_batch_size_count"] < 36


def test_a_lone_run_on_the_event_loop_sends_held_answers_first():
    """A request that leaves a batch at an earlier stage has its answer held with the batch's; one
    that goes on alone runs its next stage on the event loop, and that run must not delay the rest."""

    async def main():
        loop = asyncio.get_running_loop()
        hold = WriteHold()
        rec = Recorder()
        transport = CoalescingTransport(rec, loop, hold)  # type: ignore[arg-type]
        sent_when_run: list[int] = []

        def run_alone(batch):
            sent_when_run.append(len(rec.writes))
            return [batch]

        with ThreadPoolExecutor(1) as pool:
            lone = LoneRun(run_alone, alone=lambda: True, inline=True)
            worker = GraphWorker("stage2", run_alone, pool, 8, 0.0, answers=hold, lone=lone)
            worker.start()
            hold.hold(2)  # a batch's handlers are running: one answered ...
            transport.write(b"answer of the request that stopped")
            assert rec.writes == []
            await worker.submit(np.zeros(2, dtype=np.float32), arrivals_counted=True)  # ... one goes on
            assert sent_when_run == [1]
            await worker.stop()

    asyncio.run(main())


def test_what_is_held_for_a_connection_leaves_before_the_loop_closes_it_on_eof():
    """An answer held for a batch waits through the loop's next read of the sockets; a client that
    stopped sending meanwhile gets its socket closed when the protocol's eof_received returns
    (uvicorn's return None): what is held for it must go out first."""
    uvloop = pytest.importorskip("uvloop")
    hold = WriteHold()

    class Answering(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            def a_batchs_handlers():
                hold.hold(2)  # a batch's results are out: its handlers write ...
                self.transport.write(b"answer")  # ... this answer among them
                time.sleep(0.05)  # the rest of them; the client's end of sending arrives meanwhile

            asyncio.get_running_loop().call_soon(a_batchs_handlers)

        def eof_received(self):
            return None  # as uvicorn's protocols: the loop closes the socket

    async def main():
        server = await asyncio.get_running_loop().create_server(coalescing(Answering, hold), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        received: list[bytes] = []

        def client():
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"request")
                time.sleep(0.02)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(5)
                data = b""
                while chunk := sock.recv(1000):
                    data += chunk
                received.append(data)

        thread = threading.Thread(target=client)
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.01)
        server.close()
        return received

    assert uvloop.run(main()) == [b"answer"]
