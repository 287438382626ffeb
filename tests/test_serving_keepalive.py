"""A connection's timeouts with one timer per connection (serving/keepalive.py), on a real uvicorn
with the server's HTTP protocol: an idle connection closes ``timeout_keep_alive`` after its last
response (or after opening, when it never sent a request), a busy one never does, a request whose
headers stop coming gets a 408, a body that stops coming on a route without a deadline of its own
loses its connection, and requests do not arm timers one by one."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time

import pytest
from serving_model import uvicorn_in_thread

from serving.keepalive import head_limit
from serving.transport import http_protocol

KEEP_ALIVE_S = 1.0
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 1.0


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    status = 200
    if scope["path"] == "/early":  # refused on its headers, its body never read (as a 413 on Content-Length)
        status = 413
    else:
        if scope["path"] == "/think":  # works longer than every timeout together before it reads the body
            await asyncio.sleep(KEEP_ALIVE_S + HEADER_TIMEOUT_S + BODY_TIMEOUT_S)
        while (await receive()).get("more_body"):
            pass
    if scope["path"] == "/slow":  # in flight longer than the keep-alive timeout
        await asyncio.sleep(KEEP_ALIVE_S * 1.5)
    if scope["path"] == "/slower":  # in flight longer than every timeout together
        await asyncio.sleep(KEEP_ALIVE_S + HEADER_TIMEOUT_S + BODY_TIMEOUT_S)
    payload = scope["path"].encode()
    headers = [(b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def server():
    protocol = http_protocol(HEADER_TIMEOUT_S, BODY_TIMEOUT_S)
    with uvicorn_in_thread(app, http=protocol, timeout_keep_alive=KEEP_ALIVE_S) as server:
        yield server


def answer(sock: socket.socket, path: str) -> bytes:
    """The response to a request for ``path`` (the test app's body is the path), read whole."""
    data = b""
    while not data.endswith(path.encode()):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def get(sock: socket.socket, path: str = "/") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return answer(sock, path)


def seconds_until_closed(sock: socket.socket, limit: float = 10.0) -> float:
    started = time.monotonic()
    sock.settimeout(limit)
    assert sock.recv(1) == b"", "data where a close was expected"
    return time.monotonic() - started


def connection(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.config.port))


def read_until_closed(sock: socket.socket, limit: float = 15.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    started = time.monotonic()
    sock.settimeout(limit)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def test_an_idle_connection_closes_after_the_keep_alive_timeout(server):
    with connection(server) as sock:
        get(sock)
        assert 0.8 * KEEP_ALIVE_S <= seconds_until_closed(sock) <= 2 * KEEP_ALIVE_S + 0.5


def test_a_new_connection_that_sends_nothing_closes_after_the_keep_alive_timeout(server):
    # uvicorn's own timer starts only after a response: such a connection was held open for good.
    with connection(server) as sock:
        assert 0.8 * KEEP_ALIVE_S <= seconds_until_closed(sock) <= 2 * KEEP_ALIVE_S + 0.5


@pytest.mark.parametrize("answered_before", [False, True], ids=["new connection", "after an answer"])
def test_a_request_whose_headers_stop_coming_gets_408_and_its_connection_closed(server, answered_before):
    with connection(server) as sock:
        if answered_before:
            get(sock)
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Le")
        reply, seconds = read_until_closed(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), reply
    assert b"\r\nconnection: close" in head and b"\r\ncontent-type: application/json" in head
    error = json.loads(body)
    assert error["error"] == "header_timeout" and f"within {HEADER_TIMEOUT_S:g} s" in error["detail"], error
    assert 0.9 * HEADER_TIMEOUT_S <= seconds <= HEADER_TIMEOUT_S + 1.0


def test_an_open_inference_protocol_request_whose_headers_stop_coming_gets_the_protocols_error_body(server):
    # KServe/Triton clients read {"error": message}: the code-and-detail body of the other routes
    # left them without the message.
    with connection(server) as sock:
        sock.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
        reply, _ = read_until_closed(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), reply
    error = json.loads(body)
    assert list(error) == ["error"] and f"within {HEADER_TIMEOUT_S:g} s" in error["error"], error


@pytest.mark.parametrize("sent, echoed", [("X-Request-ID: keep-me\r\n", True), ("", False)], ids=["echoed", "fresh"])
def test_a_refusal_by_the_http_layer_carries_a_request_id(server, limited, sent, echoed):
    # The 408 and 431 the protocol sends itself had no X-Request-ID, which every other response has.
    with connection(server) as sock:
        sock.sendall(f"GET /x HTTP/1.1\r\nHost: x\r\n{sent}Content-Le".encode())
        timed_out, _ = read_until_closed(sock)
    with connection(limited) as sock:
        sock.sendall(f"GET /x HTTP/1.1\r\nHost: x\r\n{sent}X-Big: {'a' * (HEAD_LIMIT + 1)}\r\n\r\n".encode())
        refused, _ = read_until_closed(sock)
    for reply in (timed_out, refused):
        ids = re.findall(rb"\r\nx-request-id: ([^\r]*)\r\n", reply.partition(b"\r\n\r\n")[0] + b"\r\n")
        assert len(ids) == 1, reply[:300]
        assert ids[0] == b"keep-me" if echoed else re.fullmatch(rb"[0-9a-f]{32}", ids[0]), ids


def test_headers_that_trickle_in_within_the_deadline_are_answered(server):
    # Past the keep-alive timeout but within the header deadline: the timer that finds the headers
    # still coming waits for the rest of the deadline.
    request = b"GET /trickled HTTP/1.1\r\nHost: x\r\n\r\n"
    pieces = [request[i : i + 4] for i in range(0, len(request), 4)]
    with connection(server) as sock:
        for piece in pieces[:-1]:
            sock.sendall(piece)
            time.sleep(0.65 * HEADER_TIMEOUT_S / len(pieces))
        sock.sendall(pieces[-1])
        assert answer(sock, "/trickled").startswith(b"HTTP/1.1 200 ")
        assert get(sock, "/next").startswith(b"HTTP/1.1 200 ")


def test_a_body_that_stops_coming_loses_its_connection_where_the_route_has_no_deadline(server):
    # The app here reads its whole body with no deadline of its own (as FastAPI's JSON routes do):
    # the backstop closes the connection header_timeout_s + body_timeout_s after the first byte.
    with connection(server) as sock:
        sock.sendall(b'POST /json HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"id": ')
        reply, seconds = read_until_closed(sock)
    assert reply == b""  # the app's read saw the client leave; nothing is sent on a closed connection
    whole = HEADER_TIMEOUT_S + BODY_TIMEOUT_S
    assert 0.9 * whole <= seconds <= whole + 1.0


def test_an_upload_answered_before_its_body_may_finish_and_read_its_answer(server):
    # A 413 on the Content-Length while the client is still sending: closing with its bytes unread
    # would reset the connection under the answer (http.client, and so requests, then raise
    # BrokenPipeError instead of returning the 413). The bytes keep coming for longer than the
    # keep-alive timeout; the connection closes a keep-alive timeout after they stop.
    chunk, chunks = b"x" * 10_000, 12
    with connection(server) as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (len(chunk) * chunks))
        for _ in range(chunks):  # 2.4 s: past the keep-alive timeout, within header + body timeouts
            sock.sendall(chunk)
            time.sleep(0.2)
        reply, seconds = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 413 ") and reply.endswith(b"/early"), reply
    assert seconds <= 1.5 * KEEP_ALIVE_S


def test_a_body_the_app_asks_for_late_is_not_cut_off(server):
    # Expect: 100-continue: the client sends its body only once the app reads it, here after longer
    # than every timeout together. The server held the body back, not the client.
    with connection(server) as sock:
        sock.sendall(b"POST /think HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        sock.settimeout(15)
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        sock.sendall(b"hello")
        assert answer(sock, "/think").startswith(b"HTTP/1.1 200 ")


def test_an_answer_that_takes_longer_than_every_timeout_is_still_answered(server):
    with connection(server) as sock:
        sock.sendall(b"POST /slower HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        assert answer(sock, "/slower").startswith(b"HTTP/1.1 200 ")
        assert get(sock, "/after").startswith(b"HTTP/1.1 200 ")


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


def test_this_uvicorn_gets_the_one_timer_per_connection():
    # serving/keepalive.py reproduces uvicorn 0.54's response completion; another version keeps its
    # own timers (slower, and without the header deadline): this says which one is installed.
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from serving.keepalive import connection_timeouts

    assert connection_timeouts(HttpToolsProtocol, HEADER_TIMEOUT_S, BODY_TIMEOUT_S) is not HttpToolsProtocol, (
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
        assert protocol._keep_alive_timer is timer  # the one armed when it opened, for all of them
        # Pipelined requests are still answered in order.
        sock.sendall(b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p2 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = answer(sock, "/p2")
        assert data.index(b"/p1") < data.index(b"/p2")


# --- the size of a request's line and headers (keepalive.head_limit) -------------------------------

HEAD_LIMIT = 16 * 1024


@pytest.fixture(scope="module")
def limited():
    protocol = head_limit(http_protocol(HEADER_TIMEOUT_S, BODY_TIMEOUT_S), HEAD_LIMIT)
    with uvicorn_in_thread(app, http=protocol, timeout_keep_alive=KEEP_ALIVE_S) as server:
        yield server


def assert_431(reply: bytes, seconds: float) -> None:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), reply[:200]
    assert b"\r\nconnection: close" in head
    error = json.loads(body)
    assert error["error"] == "headers_too_large" and f"limit of {HEAD_LIMIT} bytes" in error["detail"], error
    assert seconds < HEADER_TIMEOUT_S  # at once: not at the header deadline


@pytest.mark.parametrize("where", ["header", "url"])
def test_a_request_head_over_the_limit_gets_431_at_once(limited, where, caplog, capfd):
    big = "a" * (HEAD_LIMIT + 1)
    request = f"GET /{big} HTTP/1.1\r\nHost: x\r\n\r\n" if where == "url" else f"GET / HTTP/1.1\r\nX-Big: {big}\r\n\r\n"
    with caplog.at_level(logging.ERROR), connection(limited) as sock:
        sock.sendall(request.encode() + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")  # nothing more is served
        assert_431(*read_until_closed(sock))
    time.sleep(0.2)  # the connection's loss, handled on the server's loop
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors and "Traceback" not in capfd.readouterr().err, caplog.text


@pytest.mark.parametrize("path", ["/v2", "/v2/health/live", "/v2/models/m/infer?x=1"])
def test_an_open_inference_protocol_request_over_the_head_limit_gets_the_protocols_error_body(limited, path):
    big = "a" * (HEAD_LIMIT + 1)
    with connection(limited) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nX-Big: {big}\r\n\r\n".encode())
        reply, _ = read_until_closed(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), reply[:200]
    error = json.loads(body)
    assert list(error) == ["error"] and f"limit of {HEAD_LIMIT} bytes" in error["error"], error


@pytest.mark.parametrize("before", [["/slow"], ["/slow", "/p"]], ids=["one in flight", "one in flight, one queued"])
def test_a_head_over_the_limit_behind_pipelined_requests_is_refused_after_their_answers(limited, before):
    # HTTP/1.1 answers in order: a 431 written at once took the place of the answers still owed,
    # which were lost (the server counted them as answered). The refused request's body, which
    # here holds what looks like another request, reaches no one.
    big = "a" * (HEAD_LIMIT + 1)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    requests = b"".join(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for path in before)
    refused = f"POST /refused HTTP/1.1\r\nX-Big: {big}\r\nContent-Length: {len(smuggled)}\r\n\r\n".encode()
    with connection(limited) as sock:
        sock.sendall(requests + refused + smuggled)
        reply, seconds = read_until_closed(sock)
    for path in before:
        head, _, rest = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), reply[:300]
        assert rest.startswith(path.encode()), reply[:300]
        reply = rest[len(path) :]
    assert_431(reply, seconds - KEEP_ALIVE_S * 1.5)  # after /slow's answer, at once
    assert b"/smuggled" not in reply


def test_after_a_deferred_refusal_nothing_more_is_parsed(limited):
    # While an earlier answer was owed, the answers' completion resumed reading and every byte went
    # on to the parser: a header streamed after the refusal grew without limit (65 MB in 5 s).
    fed: list[int] = []

    class CountingParser:  # what the connection's protocol feeds its httptools parser
        def __init__(self, parser) -> None:
            self.parser = parser

        def feed_data(self, data: bytes) -> None:
            fed.append(len(data))
            self.parser.feed_data(data)

        def __getattr__(self, name: str):
            return getattr(self.parser, name)

    with connection(limited) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)  # /slow in flight (1.5 s): the server's loop is idle
        (protocol,) = [c for c in limited.server_state.connections if c.client[1] == sock.getsockname()[1]]
        protocol.parser = CountingParser(protocol.parser)
        sock.sendall(b"GET /big HTTP/1.1\r\nX-Big: ")
        time.sleep(0.1)
        sock.sendall(b"a" * (HEAD_LIMIT + 1))  # a read wholly inside the head, past the limit: refused
        time.sleep(0.2)
        refused_after = sum(fed)
        for _ in range(64):  # the header streams on while /slow is still owed
            sock.sendall(b"a" * 65536)
        time.sleep(0.2)
        parsed = sum(fed) - refused_after
        reply, _ = read_until_closed(sock)
    assert parsed == 0, f"{parsed} bytes parsed after the refusal"
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and rest.startswith(b"/slow"), reply[:200]
    assert b"HTTP/1.1 431 " in rest


def test_many_short_headers_count_their_whole_lines(limited):
    # Names and values alone undercounted each line by 4 bytes (': ' and CRLF): 65,535 headers 'a:'
    # in 256 kB counted 65 kB, and every route's header lookups scan them all.
    lines = HEAD_LIMIT // 4 + 16  # under the limit by names and values, over it by the bytes sent
    assert lines * 2 < HEAD_LIMIT < lines * 4
    with connection(limited) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n" + b"a:\r\n" * lines + b"\r\n")
        assert_431(*read_until_closed(sock))


def test_a_header_streamed_past_the_limit_is_cut_off_before_it_ends(limited):
    # One header that never ends, sent in small pieces (each piece re-copied the whole URL or header
    # so far: a client had 85 MiB accepted in the header deadline, at seconds of CPU).
    with connection(limited) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nX-Big: ")
        started, sent = time.monotonic(), 0
        try:
            while sent <= 2 * HEAD_LIMIT:
                sock.sendall(b"a" * 1024)
                sent += 1024
                time.sleep(0.002)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply, _ = read_until_closed(sock)
        assert_431(reply, time.monotonic() - started)


def test_heads_within_the_limit_and_large_bodies_are_served(limited):
    with connection(limited) as sock:
        header = "b" * (HEAD_LIMIT - 200)
        sock.sendall(f"GET /big-header HTTP/1.1\r\nHost: x\r\nX-Big: {header}\r\n\r\n".encode())
        assert answer(sock, "/big-header").startswith(b"HTTP/1.1 200 ")
        body = b"c" * (4 * HEAD_LIMIT)  # a body does not count
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert answer(sock, "/upload").startswith(b"HTTP/1.1 200 ")
        assert get(sock, "/next").startswith(b"HTTP/1.1 200 ")


def test_pipelined_requests_and_bodies_before_a_head_do_not_count_toward_it(limited):
    # One write may hold many pipelined requests, or a large body and the start of the next head:
    # only the head itself is measured (the whole write was, and 431 lost the answers owed).
    with connection(limited) as sock:
        n = 3 * HEAD_LIMIT // len(b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.sendall(b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n" * n)
        replies = b""
        while replies.count(b"\r\n\r\n/p") < n:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {replies.count(b'HTTP/1.1 200 ')} answers of {n}: {replies[-300:]!r}"
            replies += chunk
        assert replies.count(b"HTTP/1.1 200 ") == n
        body = b"c" * (4 * HEAD_LIMIT)
        upload = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        sock.sendall(upload + b"GET /after HTTP/1.1\r\nHo")
        time.sleep(0.2)
        sock.sendall(b"st: x\r\n\r\n")
        assert answer(sock, "/upload").startswith(b"HTTP/1.1 200 ")
        assert answer(sock, "/after").startswith(b"HTTP/1.1 200 ")


def test_a_protocol_error_body_is_encoded_as_the_apps_error_handler_encodes_it():
    """A 408/431 the protocol sends itself carries the same bytes as the app's JSONResponse for the
    same error: non-ASCII text as UTF-8, not escaped (clients comparing bodies see one encoding)."""
    from fastapi.responses import JSONResponse

    from serving.errors import HeadersTooLarge
    from serving.keepalive import protocol_error_response

    error = HeadersTooLarge("the headers ran past 8 KiB — send fewer cookies (≤ 8 KiB)", limit="8 KiB")
    response = protocol_error_response(error, b"Request Header Fields Too Large", [], b"/classify")
    head, body = response.split(b"\r\n\r\n", 1)
    assert body == JSONResponse(error.body()).body
    assert "—".encode() in body and b"\\u" not in body
    assert b"content-length: %d" % len(body) in head
