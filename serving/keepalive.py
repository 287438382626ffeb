"""A connection's timeouts with one timer per connection, not one per response: keep-alive, and
a deadline on a request's line and headers.

uvicorn's httptools protocol arms a new ``call_later`` timer after every response and cancels
it when the next request's first bytes arrive. On this 2-core host that cost a lone request
~10–15 µs to arm, and the cancelled timer's handle, closed in the event loop's next iteration,
is one cause of a slow step between a request's last byte and its handler's first step (58–88
µs instead of ~5 in many 1,000-request medians; stamped servers, docs/request-path-profile.md,
eleventh session) — every request, at saturation too. And that timer only ever runs after a
response: a connection that sends nothing after opening, or the start of a request and then
nothing (the "slowloris" pattern), was held open for good — each one a socket and a file
descriptor, until the process runs out of them.

Here a connection keeps at most one timer, armed when it opens or after a response if none is
armed, never per request. When it fires it reads the connection's state:

* a response is owed (a request whose headers arrived is being answered, or waits behind one):
  nothing — the request's own deadlines apply (the body's, ``EED_BODY_TIMEOUT_S``, on every route
  that reads one: /classify, /feedback, /v2/.../infer), and its response arms the timer again. A
  backstop behind them, for any route that reads its body without a deadline: a request whose body is still arriving
  ``header_timeout_s + body_timeout_s`` after its first byte loses its connection — counted
  instead from the last time the server itself held the body back (``Expect: 100-continue``
  before the app asks for it, reading paused until the app catches up, a pipelined request
  waiting its turn);
* a request has begun but its line and headers have not all arrived: it gets ``header_timeout_s``
  from its first byte, then a 408 and the connection is closed;
* bytes arrived since the last response without beginning a request — the rest of a body
  answered early (a 413 on its Content-Length): the connection stays while they keep coming,
  within the backstop, and closes ``timeout_keep_alive`` after they stop (the client reads its
  answer once it has sent everything; closing on unread bytes would reset the connection under it);
* otherwise the connection is idle (a new one included): it closes ``timeout_keep_alive``
  seconds after its last response, or after opening — uvicorn's rule for idle connections,
  extended to those that never sent a request.

A deadline not yet due re-arms the timer for the rest of it. With h11 (no httptools wheel) and
other uvicorn versions uvicorn's own timers stay: keep-alive after responses only, no header
deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
import textwrap
from collections.abc import Sequence
from typing import Any

from .errors import HeadersTooLarge, HeaderTimeout, ServingError, is_oip_target
from .requestlog import correlation_id

log = logging.getLogger("serving")

# The sha256 of uvicorn 0.54's HttpToolsProtocol.on_response_complete (its source, dedented), which
# ConnectionTimeouts reproduces but for the timer. Any other version of that method keeps uvicorn's
# own timers (and no header deadline): a copy of code that has since changed would quietly drop
# whatever the change added.
REPRODUCED_ON_RESPONSE_COMPLETE = "5684fd801d0683ac20b9144e8eed8327e445236d5c1d16a02253dfb3a35b9a75"


def _reproduces(base: type[Any]) -> bool:
    try:
        source = textwrap.dedent(inspect.getsource(base.on_response_complete))
    except (OSError, TypeError):  # no source installed
        return False
    return hashlib.sha256(source.encode()).hexdigest() == REPRODUCED_ON_RESPONSE_COMPLETE


def header_timeout_response(
    header_timeout_s: float,
    default_headers: list[tuple[bytes, bytes]],
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """The 408 sent when a request's line and headers are late: the server's usual error body
    (``target``, ``headers``: the request's, as far as they came), and close."""
    error = HeaderTimeout(
        f"the request line and headers did not arrive within {header_timeout_s:g} s of the request's first "
        "byte; send them at once (the limit is the server's header_timeout_s)"
    )
    return protocol_error_response(error, b"Request Timeout", default_headers, target, headers)


def protocol_error_response(
    error: ServingError,
    reason: bytes,
    default_headers: list[tuple[bytes, bytes]],
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """A response the HTTP protocol sends itself, before any route saw the request: the error body
    the route at ``target`` (the request's, as far as it came) would send, its request id (the
    client's from ``headers``, those parsed so far, when acceptable; else a fresh one), and
    ``connection: close``."""
    body = error.encoded_body(oip=is_oip_target(target))
    incoming = next((value.decode("latin-1") for name, value in headers if name == b"x-request-id"), None)
    head = [b"HTTP/1.1 %d %s\r\n" % (error.status_code, reason)]
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
    head.append(b"x-request-id: %s\r\nconnection: close\r\n\r\n" % correlation_id(incoming).encode("latin-1"))
    return b"".join(head) + body


def connection_timeouts(
    protocol: type[Any],
    header_timeout_s: float,
    body_timeout_s: float,
) -> type[Any]:
    """``protocol`` (uvicorn's httptools protocol, or a subclass) with one timer per connection for its
    keep-alive timeout, its requests' header deadline (``header_timeout_s``) and the backstop for
    bodies read without a deadline (``header_timeout_s + body_timeout_s``). Any other protocol
    class (h11), and uvicorn versions whose response completion this does not reproduce
    (:data:`REPRODUCED_ON_RESPONSE_COMPLETE`), are returned as they are."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return protocol
    if not issubclass(protocol, HttpToolsProtocol) or not _reproduces(HttpToolsProtocol):
        return protocol
    if not (header_timeout_s > 0 and body_timeout_s > 0):
        raise ValueError(
            f"timeouts must be positive: header_timeout_s={header_timeout_s!r}, body_timeout_s={body_timeout_s!r}"
        )
    whole_request_s = header_timeout_s + body_timeout_s

    class ConnectionTimeouts(protocol):
        _last_response = 0.0  # loop time of the last response, or of the opening
        _last_data = 0.0  # loop time bytes last arrived
        _head_since = 0.0  # loop time of the latest request's first byte
        _backstop_from = 0.0  # where the body backstop counts from (see _timer_due)
        _begun = 0  # requests begun on this connection
        _answered = 0  # responses completed on it
        _keep_alive_timer: asyncio.TimerHandle | None = None
        _due_at = math.inf  # when the timer fires; inf: none armed

        def _arm(self, due: float) -> None:
            if self._keep_alive_timer is not None:
                self._keep_alive_timer.cancel()
            self._keep_alive_timer = self.loop.call_at(due, self._timer_due)
            self._due_at = due

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._last_response = now = self.loop.time()
            self._arm(now + self.timeout_keep_alive)

        def data_received(self, data: bytes) -> None:
            self._last_data = self.loop.time()
            super().data_received(data)

        def _unset_keepalive_if_required(self) -> None:
            # uvicorn calls this when data arrives (and from its own on_response_complete and
            # connection_lost): cancelling the timer was its way of marking the connection busy.
            # Here the timer reads the connection's state when it fires instead.
            pass

        def on_message_begin(self) -> None:
            self._begun += 1
            self._head_since = self._backstop_from = now = self.loop.time()
            if self._due_at > now + header_timeout_s:  # only behind a response owed (a pipelined request)
                self._arm(now + header_timeout_s)
            super().on_message_begin()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            # A body above uvicorn's high-water mark pauses reading until the app's next receive(),
            # which a route that has read its whole body never makes: a client that left then went
            # unseen, and its answer counted as a 200 (a 499 after a small body). The body is all
            # here: read on, as after a small one. A request behind it pauses reading at its headers.
            if not self.pipeline and self.flow.read_paused:
                self.flow.resume_reading()

        def on_response_complete(self) -> None:
            # uvicorn's own (0.54), but for the keep-alive timer.
            self._answered += 1
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            self.flow.resume_reading()
            self._last_response = now = self.loop.time()
            # Armed unless armed sooner (usually: since the opening or an earlier response). Also
            # before a pipelined request, which may read a body.
            if self._due_at > now + self.timeout_keep_alive:
                self._arm(now + self.timeout_keep_alive)
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._backstop_from = now  # its body was held back while it waited
                self._start_asgi_task(cycle, app)

        def _timer_due(self) -> None:
            self._keep_alive_timer, self._due_at = None, math.inf
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # closing, or upgraded to another protocol (a WebSocket's is no longer HTTP)
            now = self.loop.time()
            cycle = self.cycle  # uvicorn's request/response cycle, or the fast path's (serving/fastpath.py)
            if self.pipeline or (cycle is not None and not cycle.response_complete):
                # A response is owed: the request's own deadlines run, and its response re-arms. The
                # fast path's requests have their body deadline (no ``more_body``); uvicorn's cycle,
                # still reading a body, has the backstop, counted from the request's first byte —
                # or from the last time the server itself held the body back: before the app asks
                # for it (``Expect: 100-continue``), or with reading paused until the app catches up.
                if self.pipeline or not getattr(cycle, "more_body", False):
                    return
                if getattr(cycle, "waiting_for_100_continue", False) or self.flow.read_paused:
                    self._backstop_from = now
                    self._arm(now + self.timeout_keep_alive)
                elif now < self._backstop_from + whole_request_s:
                    self._arm(self._backstop_from + whole_request_s)
                else:
                    log.debug("closing a connection whose request body took longer than %g s", whole_request_s)
                    self.transport.close()  # the app's read sees the client leave
                return
            if self._begun > self._answered:
                # Nothing owed, yet a request begun: its headers have not all arrived (a request
                # whose headers are in starts a cycle, owed until answered).
                due = self._head_since + header_timeout_s
                if now < due:
                    self._arm(due)
                    return
                log.debug("closing a connection whose request headers took longer than %g s", header_timeout_s)
                self.transport.write(
                    header_timeout_response(header_timeout_s, self.server_state.default_headers, self.url, self.headers)
                )
                self.transport.close()
                return
            if self._last_data > self._last_response:
                # Bytes since the last response that began no request: the rest of the body of a
                # request answered early (a 413 on its Content-Length, a 422 before its body). The
                # client reads its answer once it has sent everything: let it, while the bytes keep
                # coming and within the backstop — closing on unread bytes would reset the
                # connection under the answer.
                due = min(self._last_data + self.timeout_keep_alive, self._backstop_from + whole_request_s)
            else:
                due = self._last_response + self.timeout_keep_alive
            if now < due:  # not yet: the rest of it
                self._arm(due)
            else:
                self.timeout_keep_alive_handler()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._keep_alive_timer is not None:
                self._keep_alive_timer.cancel()
                self._keep_alive_timer, self._due_at = None, math.inf
            super().connection_lost(exc)

    ConnectionTimeouts.__name__ = ConnectionTimeouts.__qualname__ = f"ConnectionTimeouts{protocol.__name__}"
    return ConnectionTimeouts


# The most bytes a request's line and headers may take (URL, names and values as parsed). httptools
# has no limit of its own, and uvicorn appends each fragment of a URL to what came before: a client
# streaming one header for the header deadline had 88 MiB accepted (a review's script), at seconds of CPU that every
# other client waited through. nginx's default is 32 KiB (4 buffers of 8 KiB); h11 refuses 16 KiB.
MAX_HEAD_BYTES = 64 * 1024


def head_limit(protocol: type[Any], max_bytes: int = MAX_HEAD_BYTES) -> type[Any]:
    """``protocol`` (uvicorn's httptools protocol, or a subclass: the outermost one, so that a
    request over the limit reaches none of its routes, the fast path included) answering 431 and
    closing once a request's line and headers pass ``max_bytes``. Any other protocol class (h11,
    which has a limit of its own) is returned as it is."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return protocol
    if not issubclass(protocol, HttpToolsProtocol):
        return protocol

    class HeadLimit(protocol):
        # Two measures, the larger one counts, each at most the head's true size: at its end, the
        # URL and headers the parser handed over; while it arrives, the raw bytes of reads that
        # began and ended inside it — httptools hands a header over only once it ends and keeps
        # its fragments until then, so a header that never ends shows only there. The read in
        # which a head begins is not counted raw: it may also hold earlier pipelined requests and
        # their bodies (at most one read of the head is missed). Three calls per request (begin,
        # headers complete, a read): on the hot path, so no per-header or per-fragment hooks.
        _in_head = False
        _heads = 0  # requests begun on the connection
        _raw = 0
        # The 431 once a request is refused: sent at once, or after the answers still owed to the
        # requests before it (HTTP/1.1 answers in order: sent first, it took an earlier pipelined
        # request's place and that answer was lost). What the connection reads after the refusal
        # is dropped unparsed.
        _refusal: bytes | None = None

        def on_message_begin(self) -> None:
            self._in_head, self._raw = True, 0
            self._heads += 1
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head = False
            # Each header line also holds ': ' and CRLF: 65,535 headers 'a:' counted 65 kB for 256 kB.
            parsed = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if max(parsed, self._raw) > max_bytes or self._refusal is not None:
                self._refuse()  # no route sees it, nor a request pipelined behind one refused
            else:
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if self._refusal is None:  # a refused request's body must not reach the cycle before it
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._refusal is None:
                super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a request pipelined before the refused one
            if self._refusal is not None and not self._owed():
                self._send_refusal()

        def _owed(self) -> bool:
            """Whether a request before the refused one still waits for its answer."""
            return bool(self.pipeline) or not (self.cycle is None or self.cycle.response_complete)

        def data_received(self, data: bytes) -> None:
            if self._refusal is not None:
                # Refused: nothing more is parsed (httptools keeps an unfinished header's fragments,
                # and the answers still owed resume reading) — a header streamed on after a deferred
                # 431 grew by 65 MB in 5 s.
                return
            inside, heads = self._in_head, self._heads
            super().data_received(data)
            if inside and self._in_head and self._heads == heads:  # a read wholly inside one head
                self._raw += len(data)
                if self._raw > max_bytes:
                    self._refuse()

        def _refuse(self) -> None:
            if self._refusal is not None or self.transport.is_closing():
                return
            error = HeadersTooLarge(
                f"the request line and headers are larger than the server's limit of {max_bytes} bytes; "
                "send a shorter URL and fewer or smaller headers"
            )
            self._refusal = protocol_error_response(
                error, b"Request Header Fields Too Large", self.server_state.default_headers, self.url, self.headers
            )
            if not self._owed():  # else it follows the answers owed; meanwhile what arrives is dropped
                self._send_refusal()

        def _send_refusal(self) -> None:
            if not self.transport.is_closing():
                self.transport.write(self._refusal)
                self.transport.close()

    HeadLimit.__name__ = HeadLimit.__qualname__ = f"HeadLimit{protocol.__name__}"
    return HeadLimit
