"""Request correlation ids and per-request log lines.

Every request gets a correlation id: the client's (or a proxy's) ``X-Request-ID``
when it is acceptable — 1 to 200 visible ASCII characters (``!`` to ``~``: every
UUID, Heroku's 20–200-character ids, trace ids with ``;`` or ``=`` in them) — and a
fresh one otherwise (an id with spaces, control or non-ASCII bytes, or longer than that
is replaced, not refused, as load balancers do, so a proxy with another id format never
breaks requests; what is echoed is always a valid header value, and JSON logs escape it). The id is echoed in
the response's ``X-Request-ID`` header, is available to routes as
``request.state.request_id`` and to log records as ``request_id``.

With ``EED_LOG_FORMAT=json`` every log record is one JSON object per line, and each
request adds one line (logger ``serving.access``) with its id, method, route,
policy, exit, status and latency; routes fill in ``request.state.policy`` and
``request.state.exit``. With the default text format these lines are logged at
DEBUG only: at INFO they would cost more than a small model's inference.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import Any

from .randomhex import RandomHex

HEADER = "x-request-id"
MAX_ID_CHARS = 200
ID_PATTERN = rf"[!-~]{{1,{MAX_ID_CHARS}}}"  # visible ASCII, no space
_VALID_ID = re.compile(ID_PATTERN)
_FRESH_IDS = RandomHex(32)

# The id of the request being handled, for log records made anywhere below the middleware.
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

access_log = logging.getLogger("serving.access")


def correlation_id(incoming: str | None) -> str:
    """The client's id when acceptable, else a fresh one."""
    if incoming is not None and _VALID_ID.fullmatch(incoming):
        return incoming
    return _FRESH_IDS.take()  # 128 random bits as uuid4().hex spells them, without building a UUID


def loggable(path: str) -> str:
    """A request path as a log line may hold it: paths arrive percent-decoded, and /x%0AFAKE would
    write a forged line into a text log."""
    return path if path.isprintable() else path.encode("unicode_escape").decode("ascii")


def access_level(log_format: str) -> int:
    """The level of the per-request lines: INFO in JSON logs; DEBUG in text logs, where at INFO they
    would cost more than a small model's inference."""
    return logging.INFO if log_format == "json" else logging.DEBUG


class RequestIdMiddleware:
    """Pure ASGI middleware (no body buffering): correlation id in, header out, one log line per request."""

    def __init__(self, app, log_format: str = "text") -> None:
        self.app = app
        self.level = access_level(log_format)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = correlation_id(incoming)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        token = current_request_id.set(request_id)
        started = time.perf_counter()
        status = 500  # unless a response starts

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if access_log.isEnabledFor(self.level):
                route = getattr(scope.get("route"), "path", None) or scope.get("path")
                log_request(
                    self.level, request_id, scope.get("method"), scope.get("path"), route, state, status, started
                )
            current_request_id.reset(token)


def log_request(
    level: int,
    request_id: str,
    method: str | None,
    path: str | None,
    route: str | None,
    state: dict,
    status: int,
    started: float,
) -> None:
    """The request's access-log line (``serving.access``): every way a request arrives logs the same fields."""
    access_log.log(
        level,
        "%s %s %s",
        method,
        None if path is None else loggable(path),
        status,
        extra={
            "request_id": request_id,
            "method": method,
            "route": route,
            "policy": state.get("policy"),
            "exit": state.get("exit"),
            "status": status,
            "latency_ms": round((time.perf_counter() - started) * 1e3, 3),
        },
    )


def install(app, log_format: str = "text", inner=None) -> None:
    """Put :class:`RequestIdMiddleware` outside every other layer of a Starlette/FastAPI app.

    ``app.add_middleware`` would place it inside Starlette's ServerErrorMiddleware, which
    sends the 500 of an unhandled exception itself: that response would lack the id.
    ``inner(stack)``, if given, wraps the app's own stack inside the id layer.
    """
    build = app.build_middleware_stack

    def build_with_ids():
        stack = build()
        return RequestIdMiddleware(stack if inner is None else inner(stack), log_format=log_format)

    app.build_middleware_stack = build_with_ids


# Attributes every LogRecord has; anything else was passed with ``extra=`` and goes into the JSON.
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}  # uvicorn's ANSI copy


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Plain lines; a record with ``extra`` fields (an access line: request id, policy, exit, latency)
    gets them appended as ``key=value`` — they were in JSON logs only."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = [
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _RECORD_FIELDS and key not in ("method", "status") and value is not None
        ]
        return f"{line} {' '.join(extra)}" if extra else line


def configure_logging(level: str, log_format: str) -> None:
    """Root logging for the server process: plain lines, or JSON lines with ``log_format='json'``."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings become log records too (one JSON line each)
