"""Correlation ids (X-Request-ID) and JSON request logs, on real server processes."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import time

import httpx
import pytest
from serving_model import ServerProcess, build_model_folder, encode, expected_label, uniform_image

from serving.requestlog import MAX_ID_CHARS, correlation_id

GENERATED = re.compile(r"[0-9a-f]{32}")


def png(c: int) -> bytes:
    return encode(uniform_image(c), "PNG")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def json_server(model_dir, tmp_path_factory):
    env = {**os.environ, "EED_LOG_FORMAT": "json"}
    with ServerProcess(model_dir, "--intra-op-threads", "1", tmp_dir=tmp_path_factory.mktemp("json"), env=env) as srv:
        yield srv


def log_entries(server: ServerProcess, request_id: str, timeout: float = 10) -> list[dict]:
    """The JSON log lines carrying ``request_id`` (waits for the server to write them)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = [json.loads(line) for line in server.log().splitlines() if line.strip()]
        found = [e for e in entries if e.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# A load balancer's id, a trace header's shape (";" and "="), Heroku's longest (200 characters) and
# punctuation a header value may carry: each is the request's id, echoed as it came.
@pytest.mark.parametrize(
    "incoming", ["lb-7f3a:trace.42", "Self=1-5f2b;Root=1-5f2b-9a0c", "h" * MAX_ID_CHARS, 'q"u\\o<t>e{s}']
)
def test_an_incoming_request_id_is_used_and_echoed(json_server, incoming):
    r = httpx.post(
        json_server.url + "/classify",
        content=png(4),
        params={"exit": 2},
        headers={"Content-Type": "image/png", "X-Request-ID": incoming},
        timeout=30,
    )
    assert r.status_code == 200
    assert r.headers["X-Request-ID"] == incoming
    assert r.json()["label"] == expected_label(4, 2)


@pytest.mark.parametrize("incoming", ["a" * (MAX_ID_CHARS + 1), "has space", "tab\there", "", "ünïcode"])
def test_an_unacceptable_request_id_is_replaced_not_refused(json_server, incoming):
    r = httpx.post(
        json_server.url + "/classify",
        content=png(4),
        params={"exit": 1},
        headers={"Content-Type": "image/png", "X-Request-ID": incoming.encode("utf-8")},
        timeout=30,
    )
    assert r.status_code == 200
    assert GENERATED.fullmatch(r.headers["X-Request-ID"])


def test_every_response_has_its_own_id_errors_included(json_server):
    ids = set()
    for method, path in [("GET", "/healthz"), ("GET", "/nope"), ("POST", "/feedback"), ("GET", "/metrics")]:
        r = httpx.request(method, json_server.url + path, timeout=30)
        assert GENERATED.fullmatch(r.headers["X-Request-ID"]), (path, r.headers)
        ids.add(r.headers["X-Request-ID"])
    assert len(ids) == 4
    r = httpx.get(json_server.url + "/nope", headers={"X-Request-ID": "mine-1"}, timeout=30)
    assert r.status_code == 404 and r.headers["X-Request-ID"] == "mine-1"


def test_json_logs_one_line_per_request_with_id_route_policy_exit_status_latency(json_server):
    r = httpx.post(
        json_server.url + "/classify",
        content=png(5),
        params={"confidence": 0.9},
        headers={"Content-Type": "image/png", "X-Request-ID": "req-json-1"},
        timeout=30,
    )
    assert r.status_code == 200
    (entry,) = [e for e in log_entries(json_server, "req-json-1") if e["logger"] == "serving.access"]
    assert entry["route"] == "/classify" and entry["method"] == "POST"
    assert entry["policy"] == "confidence" and entry["exit"] == str(r.json()["exit"])
    assert entry["status"] == 200 and entry["latency_ms"] > 0 and entry["level"] == "info"

    r = httpx.post(
        json_server.url + "/classify",
        content=b"not an image",
        headers={"Content-Type": "image/png", "X-Request-ID": "req-json-2"},
        timeout=30,
    )
    assert r.status_code == 400
    (entry,) = [e for e in log_entries(json_server, "req-json-2") if e["logger"] == "serving.access"]
    assert entry["status"] == 400 and entry["exit"] == "none"

    # Every line the process wrote is JSON, uvicorn's own start-up lines included.
    lines = [line for line in json_server.log().splitlines() if line.strip()]
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert any(json.loads(line)["logger"].startswith("uvicorn") for line in lines)


def test_json_logs_oip_calls_with_the_exit_of_every_sample(json_server):
    images = [base64.b64encode(png(c)).decode() for c in (2, 8)]
    body = {
        "parameters": {"confidence": 0.9},
        "outputs": [{"name": "exit"}],
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": images}],
    }
    r = httpx.post(
        json_server.url + "/v2/models/tiny-test/infer", json=body, headers={"X-Request-ID": "oip-1"}, timeout=30
    )
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "oip-1"
    exits = r.json()["outputs"][0]["data"]
    (entry,) = [e for e in log_entries(json_server, "oip-1") if e["logger"] == "serving.access"]
    assert entry["route"] == "/v2/models/{name}/infer" and entry["status"] == 200
    assert entry["policy"] == "confidence" and entry["exit"] == ",".join(map(str, exits))


def test_plain_text_logs_stay_the_default_without_request_lines(model_dir, tmp_path):
    with ServerProcess(model_dir, "--intra-op-threads", "1", tmp_dir=tmp_path) as srv:
        r = httpx.post(
            srv.url + "/classify",
            content=png(1),
            headers={"Content-Type": "image/png", "X-Request-ID": "req-text-1"},
            timeout=30,
        )
        assert r.status_code == 200 and r.headers["X-Request-ID"] == "req-text-1"
        time.sleep(0.5)
        log = srv.log()
    assert "req-text-1" not in log
    assert not log.lstrip().startswith("{")


def test_even_an_unhandled_error_answers_with_the_request_id():
    import asyncio

    from fastapi import FastAPI

    from serving.requestlog import install

    app = FastAPI()

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    install(app)

    async def call():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/boom", headers={"X-Request-ID": "bug-1"})

    r = asyncio.run(call())
    assert r.status_code == 500 and r.headers["X-Request-ID"] == "bug-1"


@contextlib.contextmanager
def access_lines(formatter=None):
    """The access log's lines while the block runs, formatted by ``formatter`` (default: the message)."""
    from serving.requestlog import access_log

    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Capture()
    if formatter is not None:
        handler.setFormatter(formatter)
    access_log.addHandler(handler)
    level = access_log.level
    access_log.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        access_log.removeHandler(handler)
        access_log.setLevel(level)


def test_a_path_with_a_newline_cannot_forge_a_text_log_line():
    from serving.requestlog import log_request

    with access_lines() as lines:  # the path arrives percent-decoded: /healthz%0AFAKE is "/healthz\nFAKE"
        log_request(logging.INFO, "id", "GET", "/healthz\nINFO forged line", None, {}, 404, time.perf_counter())
    assert lines == ["GET /healthz\\nINFO forged line 404"]
    # the same escape for the 500 handler's line (serving/app.py), which names the path too
    from serving.requestlog import loggable

    assert loggable("/v2/models/x\nERROR forged") == "/v2/models/x\\nERROR forged" and loggable("/ok/ü") == "/ok/ü"


def test_text_access_lines_carry_the_request_id_and_the_answers_fields():
    # Passed as ``extra``, they reached JSON logs only: a text line said "POST /classify 408".
    from serving.requestlog import TextFormatter, log_request

    with access_lines(TextFormatter()) as lines:
        log_request(logging.DEBUG, "req-7", "POST", "/classify", "/classify", {"policy": "exit", "exit": "2"}, 200, 0.0)
        logging.getLogger("serving").warning("a plain line")  # not an access line: not captured
    (line,) = lines
    assert "serving.access: POST /classify 200 request_id=req-7 route=/classify policy=exit exit=2 latency_ms=" in line
    plain = TextFormatter().format(logging.LogRecord("serving", logging.WARNING, "", 0, "a plain line", (), None))
    assert plain.endswith("WARNING serving: a plain line")


def test_correlation_id_rules():
    assert correlation_id("abc-DEF_1.2:3+4=5/6") == "abc-DEF_1.2:3+4=5/6"
    assert correlation_id("Root=1-5f;Parent=53;Sampled=1") == "Root=1-5f;Parent=53;Sampled=1"
    assert GENERATED.fullmatch(correlation_id("two words"))
    assert correlation_id("x" * MAX_ID_CHARS) == "x" * MAX_ID_CHARS
    assert GENERATED.fullmatch(correlation_id(None))
    assert GENERATED.fullmatch(correlation_id("x" * (MAX_ID_CHARS + 1)))
    assert GENERATED.fullmatch(correlation_id("a\nb"))
