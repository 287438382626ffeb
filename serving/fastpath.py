"""POST /classify answered by the HTTP protocol itself, past ASGI.

For every request uvicorn builds an ASGI scope, a request/response cycle with its event and
messages, and runs the app's layers (proxy headers, Starlette, request ids, routing) before
the handler; for the one route that answers images under load that was a quarter of the event
loop's CPU per answer at saturation and 0.11–0.26 ms of a lone request's latency
(docs/request-path-profile.md, ninth session). So the server's HTTP protocol class (uvicorn's
httptools protocol, subclassed here) answers the common form of ``POST /classify`` itself: a
query string the route has already parsed and accepted (``AppState.parsed_queries``), an image
or octet-stream body with a ``Content-Length`` within the limits, on a keep-alive connection
with nothing else in flight. It runs the route's own body (:func:`serving.routes.answer_classify`)
and gives the answer what the ASGI way gives it: the ``X-Request-ID`` in and out, the access-log
line and the request id in log records, the body deadline (408), client errors as
``{"error", "detail"}`` with their headers, a logged JSON 500 for anything unexpected, and
graceful shutdown (uvicorn waits for the task; a draining connection closes after the answer).
Every other request — another route, a first or invalid query string, multipart, a chunked or
large body, ``Expect: 100-continue``, ``Connection: close``, HTTP/1.0, a pipelined request
behind one in flight — goes the ASGI way, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from typing import Any

import httptools

from .body import RAW_TYPES, media_type, within
from .errors import INTERNAL_ERROR_BODY, JSON_ENCODER, ClientDisconnected, ServingError, shut_down
from .keepalive import head_limit
from .requestlog import access_level, access_log, correlation_id, current_request_id, log_request
from .routes import answer_classify
from .service import InferenceService
from .state import ARRIVED, CLIENT_GONE, AppState
from .transport import http_protocol

log = logging.getLogger("serving")

# Larger bodies go the ASGI way, whose cycle pauses reading while the app catches up.
FAST_MAX_BODY_BYTES = 1 << 20
_INTERNAL_ERROR = JSON_ENCODER.encode(INTERNAL_ERROR_BODY).encode()
_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_STATUS_LINES[499] = b"HTTP/1.1 499 Client Closed Request\r\n"  # nginx's: a ClientDisconnected, for the log


class _InFlight:
    """The protocol's ``cycle`` while a request is answered here: uvicorn's own code reads it to
    queue a pipelined request behind it (``response_complete``), to tell it that the client left
    and to ask it to close after the answer (``keep_alive``, on shutdown)."""

    __slots__ = (
        "body",
        "parts",
        "response_complete",
        "keep_alive",
        "disconnected",
        "message_event",
        "counted",
        "ended",
    )

    def __init__(self, body: asyncio.Future) -> None:
        self.body = body  # the image, once the parser has it all
        self.parts: list[bytes] = []
        self.response_complete = False
        self.keep_alive = True
        self.disconnected = False
        self.message_event = self  # uvicorn calls message_event.set() when the connection is lost
        self.counted: InferenceService | None = None  # the service counting it in ``arrived``
        self.ended = False  # its handler's task is done (cancelled at shutdown before it began, too)
        # Nobody reads the body when the answer failed before it (a 422, a 503): no "exception never
        # retrieved" when the client then leaves mid-body.
        body.add_done_callback(lambda future: future.cancelled() or future.exception())

    def set(self) -> None:
        if not self.body.done():
            self.body.set_exception(ClientDisconnected("client disconnected before the body was complete"))

    def arrive(self, service: InferenceService | None) -> None:
        """Counted among the service's requests read but not yet admitted, so that a request
        deciding whether it is alone on the server sees this one (InferenceService.arrived)."""
        if service is not None and not self.ended:
            service.arrived += 1
            self.counted = service

    def admitted(self) -> None:
        """No longer counted: its handler is being admitted."""
        if self.counted is not None:
            self.counted.arrived -= 1
            self.counted = None

    def end(self, _task: Any = None) -> None:
        """Its handler's task is done: never counted again, however it ended."""
        self.ended = True
        self.admitted()


def with_fast_classify(protocol: type[Any], state: AppState, log_format: str) -> type[Any]:
    """``protocol`` (uvicorn's httptools protocol, or a subclass) answering POST /classify itself;
    any other protocol class (h11, where httptools has no wheel) is returned as it is."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return protocol
    if not issubclass(protocol, HttpToolsProtocol):
        return protocol
    level = access_level(log_format)
    settings = state.settings
    max_body = min(settings.max_body_bytes, FAST_MAX_BODY_BYTES)

    class FastClassify(protocol):
        cycle: Any  # uvicorn's RequestResponseCycle, or an _InFlight here
        _parsing: _InFlight | None = None  # the message being parsed, when it is answered here

        def on_message_begin(self) -> None:
            self._parsing = None
            super().on_message_begin()
            self.scope[ARRIVED] = time.perf_counter()  # the request's arrival, for its deadline

        def on_headers_complete(self) -> None:
            if self.url.startswith(b"/classify") and self.parser.get_method() == b"POST":
                answer = self._answer_here()
                if answer is not None:
                    self._parsing = answer
                    return
                before = self.cycle
                super().on_headers_complete()
                cycle = self.cycle  # the ASGI way: the route asks the cycle uvicorn marks when the client leaves
                if cycle is not before:  # the same one: an upgrade, handed on to another protocol
                    self.scope[CLIENT_GONE] = lambda: cycle.disconnected
                return
            super().on_headers_complete()

        def _answer_here(self) -> _InFlight | None:
            """Start answering the request whose headers were just parsed, or None: the ASGI way."""
            url = httptools.parse_url(self.url)
            query_string = url.query or b""
            remembered = state.parsed_queries.get(query_string)
            if (
                url.path != b"/classify"
                or remembered is None
                or self.root_path
                or self.expect_100_continue
                or self.parser.get_http_version() != "1.1"  # uvicorn closes HTTP/1.0 connections after a response
                or not self.parser.should_keep_alive()
                or self.parser.should_upgrade()  # uvicorn's upgrade path reads the ASGI scope
                or not (self.cycle is None or self.cycle.response_complete)
            ):
                return None
            length = content_type = incoming_id = None
            for name, value in self.headers:  # the first of repeated headers, as the ASGI way reads them
                if name == b"content-length" and length is None:
                    length = value
                elif name == b"content-type" and content_type is None:
                    content_type = value.decode("latin-1")
                elif name == b"x-request-id" and incoming_id is None:
                    incoming_id = value.decode("latin-1")
            declared = media_type(content_type)
            if not (length is not None and length.isdigit() and int(length) <= max_body):
                return None
            if declared and not declared.startswith("image/") and declared not in RAW_TYPES:
                return None
            answer = _InFlight(self.loop.create_future())
            self.cycle = answer  # a request behind it waits, as behind a cycle
            task = self.loop.create_task(self._serve(answer, remembered, declared, incoming_id, self.scope[ARRIVED]))
            task.add_done_callback(self.tasks.discard)
            task.add_done_callback(answer.end)  # however it ended, even before it began
            self.tasks.add(task)
            return answer

        def on_body(self, body: bytes) -> None:
            if self._parsing is not None:
                self._parsing.parts.append(body)
            else:
                super().on_body(body)

        def on_message_complete(self) -> None:
            answer = self._parsing
            if answer is None:
                super().on_message_complete()
                return
            self._parsing = None
            if not answer.body.done():  # not timed out meanwhile
                parts = answer.parts
                answer.body.set_result(parts[0] if len(parts) == 1 else b"".join(parts))
                if not answer.response_complete:  # not answered already (a 422 before its body came)
                    answer.arrive(state.service)

        async def _serve(
            self, answer: _InFlight, remembered: Any, declared: str, incoming_id: str | None, started: float
        ) -> None:
            request_id = correlation_id(incoming_id)
            token = current_request_id.set(request_id)
            labels: dict[str, str] = {}
            headers: dict[str, str] = {}

            async def read_body() -> tuple[bytes, str | None]:
                # The handler admits the request right after this returns, without yielding.
                if answer.body.done():  # the usual case: the image came with the headers
                    answer.admitted()
                    return answer.body.result(), declared or None
                body = await within(answer.body, settings.body_timeout_s)
                answer.admitted()
                return body, declared or None

            def note(policy: str, exit_label: str) -> None:
                labels["policy"], labels["exit"] = policy, exit_label

            def gone() -> bool:  # uvicorn sets it when the connection is lost
                return answer.disconnected

            # Whatever happens, an answer and its log line: a 500 unless the handler says otherwise.
            status, payload = 500, _INTERNAL_ERROR
            try:
                payload = await answer_classify(state, lambda: remembered, read_body, started, note, True, gone)
                status = 200
            except ServingError as exc:
                status, payload, headers = exc.status_code, exc.encoded_body(), exc.headers
            except Exception:
                log.exception("internal error on POST /classify")
            except asyncio.CancelledError:  # shutdown gave up waiting (a body still arriving): retry elsewhere
                error = shut_down()  # (answer_classify turns its own cancellation into this error)
                status, payload, headers = error.status_code, error.encoded_body(), error.headers
                raise
            finally:
                try:
                    self._respond(answer, status, payload, headers, request_id)
                finally:
                    if access_log.isEnabledFor(level):
                        log_request(level, request_id, "POST", "/classify", "/classify", labels, status, started)
                    current_request_id.reset(token)

        def _respond(self, answer: _InFlight, status: int, payload: bytes, headers: dict[str, str], rid: str) -> None:
            close = not answer.keep_alive or headers.get("Connection", "").lower() == "close"
            head = [_STATUS_LINES[status]]
            for name, value in self.server_state.default_headers:  # date, server: as uvicorn sends them
                head += [name, b": ", value, b"\r\n"]
            head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(payload))
            for name, text in headers.items():
                if name.lower() != "connection":
                    head.append(f"{name}: {text}\r\n".encode("latin-1"))
            head.append(
                b"x-request-id: %s\r\n%s\r\n" % (rid.encode("latin-1"), b"connection: close\r\n" if close else b"")
            )
            answer.response_complete = True
            if not self.transport.is_closing():
                self.transport.write(b"".join(head) + payload)
                if close:
                    self.transport.close()
            self.on_response_complete()  # keep-alive timer, or the pipelined request behind it

    FastClassify.__name__ = FastClassify.__qualname__ = f"FastClassify{protocol.__name__}"
    return FastClassify


def server_protocol(state: AppState) -> type[Any]:
    """The HTTP protocol the server runs for ``state``'s app: uvicorn's (httptools when installed)
    with one timer per connection (serving/keepalive.py), one write per response and a batch's
    answers held until its last handler has run (serving/transport.py), ``POST /classify``
    answered past ASGI (:func:`with_fast_classify`), and a request's line and headers limited in
    size (serving/keepalive.py's :func:`head_limit`)."""
    settings = state.settings
    protocol = http_protocol(settings.header_timeout_s, settings.body_timeout_s, state.write_hold)
    return head_limit(with_fast_classify(protocol, state, settings.log_format))
