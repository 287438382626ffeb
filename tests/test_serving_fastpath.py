"""POST /classify answered by the HTTP protocol itself (serving/fastpath.py): which requests take it,
and that they get what the ASGI way gives — request ids, errors, the body deadline, metrics, logs,
answers in order on a keep-alive connection. A real uvicorn with the server's protocol, in-process."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import socket
import threading
import time

import pytest
import uvicorn
from serving_model import NUM_EXITS, build_model_folder, encode, expected_label, free_port, uniform_image

from serving.app import create_app
from serving.fastpath import server_protocol
from serving.settings import ServerSettings

IMAGE = encode(uniform_image(3))


def post(path: str = "/classify?exit=2", body: bytes = IMAGE, headers: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
    ).encode() + body


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length response; bytes after it (a pipelined answer) stay for the next call."""
    sock.settimeout(timeout)
    data = _leftover.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    if len(body) > length:
        _leftover[sock] = body[length:]
    return int(status_line.split()[1]), headers, body[:length]


_leftover: dict[socket.socket, bytes] = {}


def exchange(port: int, *requests: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send the requests one after another on one keep-alive connection; their responses."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        out = []
        for request in requests:
            sock.sendall(request)
            out.append(read_response(sock))
        return out


_SERVERS: dict[int, uvicorn.Server] = {}  # by port: a test may hold the server's event loop


@contextlib.contextmanager
def loop_held(port: int):
    """The server's event loop blocked while the body runs: what the client does meanwhile (send, leave)
    is in the kernel before the server reads any of it, whatever the threads' scheduling."""
    loop = _SERVERS[port].servers[0].get_loop()
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(10)

    loop.call_soon_threadsafe(hold)
    assert holding.wait(10), "the server's event loop did not run"
    try:
        yield
    finally:
        release.set()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = build_model_folder(tmp_path_factory.mktemp("fastpath-model"))
    settings = ServerSettings(model_dir=model_dir, log_format="json", body_timeout_s=0.5, intra_op_threads=1)
    app = create_app(settings)
    port = free_port()
    protocol = server_protocol(app.state.eed)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=protocol, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _SERVERS[port] = server
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not become ready"
        try:
            if exchange(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")[0][0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    yield app, port
    server.should_exit = True
    thread.join(10)


def test_a_query_seen_before_is_answered_past_the_asgi_stack(served):
    app, port = served
    first, again = exchange(port, post(), post())  # the first goes the ASGI way and is remembered
    assert first[0] == again[0] == 200
    assert json.loads(again[2])["label"] == json.loads(first[2])["label"] == expected_label(3, 2)
    stack = app.middleware_stack

    async def refuse(scope, receive, send):  # the app's own stack, as far as requests reach it
        await send({"type": "http.response.start", "status": 599, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    app.middleware_stack = refuse
    try:
        answers = exchange(
            port,
            post(),  # remembered: answered by the protocol
            post("/classify?exit=1"),  # a query string not seen before: the ASGI way
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",  # another route
            post(headers="Connection: close\r\n"),  # a connection that closes: the ASGI way
        )
    finally:
        app.middleware_stack = stack
    assert [status for status, _, _ in answers] == [200, 599, 599, 599]
    assert json.loads(answers[0][2])["exit"] == 2
    # The same head as the ASGI way's answer: uvicorn's date and server headers among them.
    assert set(again[1]) == set(first[1]) >= {"date", "server", "content-type", "content-length", "x-request-id"}
    assert again[1]["content-type"] == first[1]["content-type"] == "application/json"


def test_request_ids_in_and_out(served):
    _, port = served
    exchange(port, post())  # remembered
    (s1, h1, _), (s2, h2, _), (s3, h3, _) = exchange(
        port, post(headers="X-Request-ID: trace-42\r\n"), post(), post(headers="X-Request-ID: not valid!\r\n")
    )
    assert s1 == s2 == s3 == 200
    assert h1["x-request-id"] == "trace-42"
    assert len(h2["x-request-id"]) == 32 and len(h3["x-request-id"]) == 32 and h2["x-request-id"] != h3["x-request-id"]


@contextlib.contextmanager
def broken_preprocessing(app):
    """A bug in the request's handling: preprocessing raises RuntimeError while the block runs."""
    state = app.state.eed
    real = state.preprocess

    def broken(data, content_type):
        raise RuntimeError("a bug in preprocessing")

    state.preprocess = broken
    try:
        yield
    finally:
        state.preprocess = real


def test_errors_are_json_with_the_request_id_and_counted(served):
    app, port = served
    exchange(port, post())  # remembered
    series = 'eed_requests_total{exit="none",policy="exit",status="%s"}'
    before = {code: _count(port, series % code) for code in ("400", "500")}
    status, headers, body = exchange(port, post(body=b"\x89PNG not really", headers="X-Request-ID: bad-1\r\n"))[0]
    assert status == 400 and headers["x-request-id"] == "bad-1"
    assert json.loads(body)["error"] == "invalid_image"
    with broken_preprocessing(app):
        status, headers, body = exchange(port, post(headers="X-Request-ID: bug-1\r\n"))[0]
    assert status == 500 and headers["x-request-id"] == "bug-1"
    assert json.loads(body) == {
        "error": "internal_error",
        "detail": "the server failed on this request; see the server log",
    }
    time.sleep(0.1)  # counted right after the answer is written
    assert {code: _count(port, series % code) for code in ("400", "500")} == {c: n + 1 for c, n in before.items()}


def test_a_500_is_logged_once_with_its_traceback(served, caplog):
    """Starlette re-raises an error after the app's 500 handler answered, and uvicorn logged it a
    second time ("Exception in ASGI application"): one bug, two tracebacks in the log."""
    import logging

    app, port = served
    with broken_preprocessing(app):
        with caplog.at_level(logging.ERROR):
            # the protocol's own path, the direct route's (a query the fast path has not seen), and
            # a route down Starlette's whole stack (OIP v2)
            for path in ("/classify?exit=2", "/classify?exit=1&top_k=3"):
                assert exchange(port, post(path))[0][0] == 500
            name = app.state.eed.service.runtime.manifest.name
            oip = json.dumps(
                {
                    "inputs": [
                        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(IMAGE).decode()]}
                    ]
                }
            ).encode()
            head = f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            assert exchange(port, head.encode() + b"Content-Length: %d\r\n\r\n" % len(oip) + oip)[0][0] == 500
            time.sleep(0.2)  # uvicorn logs after the response is sent
    tracebacks = [r for r in caplog.records if r.exc_info and "a bug in preprocessing" in str(r.exc_info[1])]
    assert len(tracebacks) == 3, [(r.name, r.getMessage()) for r in tracebacks]


def test_a_body_that_does_not_arrive_in_time_is_a_408_and_the_connection_closes(served):
    _, port = served
    exchange(port, post())  # remembered
    request = post()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request[: len(request) - 10])  # headers and most of the body; the rest never comes
        status, headers, body = read_response(sock)
        assert status == 408 and headers["connection"] == "close"
        assert json.loads(body)["error"] == "body_timeout"
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed by the server


def test_pipelined_requests_are_answered_in_order(served):
    _, port = served
    exchange(port, post())  # remembered
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(post() + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + post("/classify?exit=3"))
        answers = [read_response(sock) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert json.loads(answers[0][2])["exit"] == 2 and json.loads(answers[1][2])["status"] == "ok"
    assert json.loads(answers[2][2])["exit"] == 3


def test_a_head_over_the_limit_behind_an_answer_owed_waits_for_that_answer(served):
    # The 431 took the place of the fast path's answer in flight: the client saw only the 431,
    # and the server counted the lost answer as a 200.
    from serving.keepalive import MAX_HEAD_BYTES

    _, port = served
    exchange(port, post())  # remembered: the next one takes the fast path
    with socket.create_connection(("127.0.0.1", port)) as sock:
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
        sock.sendall(post(headers="X-Request-ID: first\r\n") + big)
        status, headers, body = read_response(sock)
        assert status == 200 and headers["x-request-id"] == "first" and json.loads(body)["exit"] == 2
        status, headers, body = read_response(sock)
        assert status == 431 and headers["connection"] == "close" and json.loads(body)["error"] == "headers_too_large"


def test_each_answer_logs_one_access_line(served, caplog):
    _, port = served
    exchange(port, post())  # remembered
    with caplog.at_level(logging.INFO, logger="serving.access"):
        exchange(port, post(headers="X-Request-ID: logged-1\r\n"))
        deadline = time.monotonic() + 5  # the line is logged right after the answer is written
        while not (records := [r for r in caplog.records if getattr(r, "request_id", None) == "logged-1"]):
            assert time.monotonic() < deadline, "no access-log line"
            time.sleep(0.01)
    (record,) = records
    assert (record.method, record.route, record.status, record.policy, record.exit) == (
        "POST",
        "/classify",
        200,
        "exit",
        "2",
    )
    assert record.latency_ms > 0


def test_http_1_0_closes_after_the_answer_and_the_first_request_id_wins(served):
    _, port = served
    exchange(port, post())  # remembered
    request = (
        f"POST /classify?exit=2 HTTP/1.0\r\nConnection: keep-alive\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(IMAGE)}\r\n\r\n"
    ).encode() + IMAGE
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["exit"] == 2
        sock.settimeout(3)
        assert sock.recv(1) == b""  # uvicorn's rule for HTTP/1.0: closed after the response
    ((status, headers, _),) = exchange(port, post(headers="X-Request-ID: first\r\nX-Request-ID: second\r\n"))
    assert status == 200 and headers["x-request-id"] == "first"  # as the request-id middleware reads it


def _batches(port: int) -> tuple[float, float]:
    """(requests, batches) run so far on exit 2's full-path graph, from /metrics."""
    metrics = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")[0][2].decode()
    values = {}
    for line in metrics.splitlines():
        for name in ("eed_batch_size_sum", "eed_batch_size_count"):
            if line.startswith(name + '{exit="2",graph="exit"}'):
                values[name] = float(line.split()[-1])
    return values.get("eed_batch_size_sum", 0.0), values.get("eed_batch_size_count", 0.0)


@pytest.mark.parametrize("way", ["fast path", "ASGI way", "both"])
def test_requests_read_in_one_loop_turn_are_batched_and_a_lone_one_runs_alone(served, way):
    # A request is answered at once when it finds the server idle — but not one of several read
    # in the same loop turn: those must be batched, not run alone one after another, whichever
    # way they are answered (a closing connection goes the ASGI way).
    app, port = served
    exchange(port, post())  # remembered
    service = app.state.eed.service
    loop = service.exit_workers[1]._task.get_loop()
    closing = {"fast path": [False] * 6, "ASGI way": [True] * 6, "both": [True, False] * 3}[way]
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
    hold = app.state.eed.write_hold
    try:
        before, writes_held = _batches(port), hold.writes_held
        held = threading.Event()

        def hold_the_loop():  # the six requests arrive while the loop is busy
            held.set()
            time.sleep(0.5)

        loop.call_soon_threadsafe(hold_the_loop)
        assert held.wait(5)
        for sock, close in zip(socks, closing):
            sock.sendall(post(headers="Connection: close\r\n" if close else ""))
        answers = [read_response(sock) for sock in socks]
        after = _batches(port)
    finally:
        for sock in socks:
            sock.close()
    assert [status for status, _, _ in answers] == [200] * 6
    assert [headers.get("connection") == "close" for _, headers, _ in answers] == closing
    assert {json.loads(body)["label"] for _, _, body in answers} == {expected_label(3, 2)}
    assert after[0] - before[0] == 6 and after[1] - before[1] == 1  # one batch of six
    # Its six answers were held until the sixth was written (serving/transport.py's WriteHold).
    assert hold.writes_held - writes_held >= 6 and not hold.holding
    # Alone, one request is one batch of one, its answer not held; none is left counted as arriving.
    writes_held = hold.writes_held
    exchange(port, post())
    assert _batches(port)[1] - after[1] == 1 and service.arrived == 0
    assert hold.writes_held == writes_held


def test_a_large_image_and_a_body_in_a_later_packet_are_answered(served):
    app, port = served
    exchange(port, post())  # remembered
    large = encode(uniform_image(3, size=(160, 160), mode="RGB"), compress_level=0)
    assert len(large) > 64 * 1024  # decoded in a worker thread (serving.images.INLINE_DECODE_BYTES)
    request = post(body=large)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["label"] == expected_label(3, 2)
        late = post()
        sock.sendall(late[:-20])  # the headers and most of the body; the rest a little later
        time.sleep(0.05)
        sock.sendall(late[-20:])
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["label"] == expected_label(3, 2)
    assert app.state.eed.service.arrived == 0


def _count(port: int, series: str) -> float:
    metrics = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")[0][2].decode()
    found = re.search(rf"^{re.escape(series)} (\S+)$", metrics, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_leaves_mid_body_is_counted_as_499_not_as_a_bad_request(served):
    # nginx's 499: the client went away, nobody reads an answer; not the client's malformed request.
    _, port = served
    exchange(port, post())  # remembered: answered on the protocol's own path from now on
    series = 'eed_requests_total{exit="none",policy="exit",status="499"}'
    before = _count(port, series)
    # the protocol's own path, then the ASGI one (a query not seen before)
    for request in (post(), post("/classify?exit=2&top_k=2")):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request[: len(request) - 10])
            time.sleep(0.1)
    deadline = time.monotonic() + 5
    while _count(port, series) < before + 2:
        assert time.monotonic() < deadline, "the departures were not counted as 499"
        time.sleep(0.05)


def test_feedback_bodies_are_bounded_in_size_and_time(served):
    _, port = served
    big = b'{"id": "' + b"a" * 70_000 + b'", "label": 1}'
    request = b"POST /feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    status, _, body = exchange(port, request % len(big) + big)[0]
    assert status == 413 and json.loads(body)["error"] == "payload_too_large", body
    # A body that stops coming: a 408 at the body deadline (0.5 s here), not a connection dropped later.
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request % 100 + b'{"id": "abc')
        started = time.monotonic()
        status, headers, body = read_response(sock)
        assert status == 408 and json.loads(body)["error"] == "body_timeout" and time.monotonic() - started < 3
    # and the schema says both can happen
    schema = json.loads(exchange(port, b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")[0][2])
    assert {"408", "413", "415"} <= set(schema["paths"]["/feedback"]["post"]["responses"])
    # curl -d without a JSON type sends a form type: say what to send, not a 422 quoting the body
    form = b'{"id": "x", "label": 1}'
    head = b"POST /feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    status, _, body = exchange(port, head + b"Content-Length: %d\r\n\r\n" % len(form) + form)[0]
    assert status == 415 and "application/json" in json.loads(body)["detail"], body
    # no Content-Type at all (httpx content=, requests data=bytes), or a text type FastAPI does not read
    untyped = b"POST /feedback HTTP/1.1\r\nHost: x\r\n"
    for head, said in ((untyped, "the request has no Content-Type"), (_typed(b"text/x+json"), "text/x+json")):
        status, _, body = exchange(port, head + b"Content-Length: %d\r\n\r\n" % len(form) + form)[0]
        assert status == 415 and said in json.loads(body)["detail"], body
    # application/*+json is JSON: it reaches the handler (which refuses the id), not the 415
    head = _typed(b"application/merge-patch+json")
    status, _, body = exchange(port, head + b"Content-Length: %d\r\n\r\n" % len(form) + form)[0]
    assert status not in (415, 422), body


def _typed(media: bytes) -> bytes:
    return b"POST /feedback HTTP/1.1\r\nHost: x\r\nContent-Type: " + media + b"\r\n"


def test_head_is_answered_as_get_without_the_body(served):
    """Uptime monitors send HEAD; FastAPI's GET routes alone would answer it 405."""
    _, port = served
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(10)
        for path in ("/healthz", "/readyz", "/v2/health/ready", "/metrics"):
            sock.sendall(
                f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            _leftover[sock] = rest  # the GET's answer follows at once: nothing of a body came between
            assert head.startswith(b"HTTP/1.1 200"), (path, head)
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            assert rest[:12] == b"HTTP/1.1 200" or not rest, (path, rest[:40])
            status, headers, body = read_response(sock)
            assert status == 200 and len(body) > 0
            if path != "/metrics":  # the metrics change between the two requests
                assert int(headers["content-length"]) == length
        sock.sendall(b"HEAD /classify HTTP/1.1\r\nHost: x\r\n\r\n")  # a POST route stays a 405
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 405"), data[:60]


def test_a_client_that_leaves_before_its_answer_is_counted_as_499_not_as_200_either_way(served):
    """Clients that time out and leave (under load, with deadlines of their own) must not read as
    successes: the answer is computed — its work is recorded — but counted as nginx's 499."""
    import numpy as np
    from PIL import Image

    _, port = served
    rng = np.random.default_rng(0)
    large = encode(Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8)))
    assert len(large) > 64 * 1024  # decoded in a worker thread: the handler waits while the client leaves
    with_deadline = "/classify?budget_ms=60000&budget_gflops=1e9"
    exchange(port, post("/classify?exit=2", large), post(with_deadline, large))  # remembered: the protocol's own path
    answered = 'eed_requests_total{exit="2",policy="exit",status="200"}'
    # The ASGI way may see the client gone before it read the body: a 499 too, with no exit.
    left = [
        'eed_requests_total{exit="2",policy="exit",status="499"}',
        'eed_requests_total{exit="none",policy="exit",status="499"}',
    ]
    exits = range(1, NUM_EXITS + 1)
    left_with_deadline = [f'eed_requests_total{{exit="{e}",policy="budget",status="499"}}' for e in exits]
    deadlines = [f'eed_deadline_total{{exit="{e}",outcome="{o}"}}' for e in exits for o in ("met", "missed")]

    def total(series: list[str]) -> float:
        return sum(_count(port, s) for s in series)

    before_answered, before_left, before_gone = _count(port, answered), total(left), total(left_with_deadline)
    before_deadlines = [_count(port, series) for series in deadlines]
    # on the protocol's own path, then twice the ASGI way (Connection: close, a query not seen before);
    # with a deadline, an answer nobody received was neither in time nor late
    # The clients leave before the server reads a byte: the server runs in this process, and a client
    # left to close its socket after sendall may get the GIL back only after its answer was written.
    with loop_held(port):
        for request in (
            post("/classify?exit=2", large),
            post("/classify?exit=2", large, "Connection: close\r\n"),
            post("/classify?exit=2&top_k=1", large),
            post(with_deadline, large),
        ):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(request)
    deadline = time.monotonic() + 5
    while total(left) < before_left + 3 or total(left_with_deadline) < before_gone + 1:
        assert time.monotonic() < deadline, "the departures were not counted as 499"
        time.sleep(0.05)
    assert _count(port, answered) == before_answered
    assert [_count(port, series) for series in deadlines] == before_deadlines
    assert exchange(port, post("/classify?exit=2", large))[0][0] == 200  # and the server goes on


def test_a_client_that_leaves_after_sending_a_large_body_is_counted_as_499(served):
    """A body above uvicorn's high-water mark (64 KiB) left reading paused once the route had read it:
    the client's leaving went unseen, and its answer was counted as a 200 with its deadline met."""
    import numpy as np
    from PIL import Image

    _, port = served
    rng = np.random.default_rng(1)
    huge = encode(Image.fromarray(rng.integers(0, 256, (3000, 3000), dtype=np.uint8)))  # ~9 MB, ~0.1 s to decode
    path = "/classify?budget_ms=60000&budget_gflops=1e9&top_k=2"  # a query not seen before: the ASGI way
    exits = [*map(str, range(1, NUM_EXITS + 1))]
    answered = [f'eed_requests_total{{exit="{e}",policy="budget",status="200"}}' for e in exits]
    left = [f'eed_requests_total{{exit="{e}",policy="budget",status="499"}}' for e in [*exits, "none"]]
    deadlines = [f'eed_deadline_total{{exit="{e}",outcome="{o}"}}' for e in exits for o in ("met", "missed")]
    before = (
        [_count(port, s) for s in answered],
        sum(_count(port, s) for s in left),
        [_count(port, s) for s in deadlines],
    )
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(post(path, huge))
        time.sleep(0.05)  # the body read, its image decoding
    deadline = time.monotonic() + 10
    while sum(_count(port, s) for s in left) < before[1] + 1:
        assert time.monotonic() < deadline, "the departure was not counted as a 499"
        time.sleep(0.05)
    assert [_count(port, s) for s in answered] == before[0] and [_count(port, s) for s in deadlines] == before[2]


def test_a_deadline_and_latency_count_from_the_requests_arrival_not_from_its_handler(served):
    """DESIGN §4: a deadline is counted from the request's arrival. A request pipelined behind a slow
    one arrives with it and waits for it before its handler starts (as requests wait for the event
    loop under load): its latency_ms, and so its deadline, include that wait."""
    import numpy as np
    from PIL import Image

    _, port = served
    slow = encode(Image.fromarray(np.full((3000, 3000), 128, dtype=np.uint8)))  # few bytes, a long decode
    assert len(slow) < 64 * 1024  # both requests arrive at once
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(post("/classify?exit=1", slow) + post("/classify?budget_ms=1000"))
        first, second = read_response(sock), read_response(sock)
    assert first[0] == second[0] == 200, (first, second)
    waited = json.loads(first[2])["latency_ms"]
    assert waited > 5, waited  # the slow one was slow
    assert json.loads(second[2])["latency_ms"] >= 0.9 * waited, (waited, second[2])
