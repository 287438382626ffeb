"""One socket write per HTTP response where uvicorn makes two, and a batch's answers sent together.

uvicorn writes a response's status line and headers (ASGI ``http.response.start``) and its
body (``http.response.body``) with a ``transport.write`` each: two ``send`` system calls,
two TCP segments and two wake-ups of the client for every answer. On loopback a ``send``
runs the whole TCP path and the reader's wake-up in the sender's context: uvicorn's ``send``
was the largest single item of the event loop's CPU at saturation (``cProfile`` on a
thread-CPU clock). One write instead: loop CPU per answer 0.30–0.34 → 0.28–0.29 ms and
main-exit saturation 0.88x → 0.91x in one A/B (docs/request-path-profile.md, eighth session).

:class:`CoalescingTransport` holds a response head back until the next write (the body,
which Starlette's responses send right after it, without yielding to the event loop) and
sends both in one call; a head that nothing follows in the same event-loop turn (a
streaming response waiting for its first chunk, ``HEAD``, an interim ``100 Continue``) goes
out on the next turn by itself.

A batch's answers leave together (:class:`WriteHold`). When a batch's results are handed out,
its requests' handlers resume one after another in the event loop's next turn, and each wrote
its answer as it finished, ~15–25 µs apart: long enough for a client reading them all (a load
balancer, ``wrk``) to fall asleep between two answers, and on loopback every ``send`` runs the
reader's wake-up in the sender's context. Now every connection's writes are held while a batch's
handlers run, and after the last of them each connection's held bytes go out in one write,
connection after connection. At 32 connections on the full-width export, in one
``serve_bench.py`` rotation against the code before (docs/request-path-profile.md, thirteenth
session): at exit 1 the load generator's CPU per request 0.029–0.043 → 0.020–0.026 ms and the event
loop's per answer 0.241–0.304 → 0.196–0.266 ms (lower in 4 rounds of 4), throughput 0.770x →
0.836x of raw ORT; at the main exit no difference; other pairs of processes gained less.
A lone request or a batch of one starts no hold; any write made while one is on (whatever its
request) waits for that batch's handlers, a few tens of microseconds per handler, or less: a lone
run about to block the event loop sends what is held first, and so does a connection whose client
stops sending. Answers whose handler resumes later than the batch's (an Open Inference Protocol
request with several inputs gathers them in tasks of their own) leave on their own. Within a
connection nothing is reordered: all its writes go through its one :class:`CoalescingTransport`,
in order.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .keepalive import connection_timeouts

# Every response head uvicorn writes (httptools and h11 alike) starts with the status line
# and ends with the empty line after the headers.
_HEAD_START = b"HTTP/1."
_HEAD_END = b"\r\n\r\n"

log = logging.getLogger("serving.transport")


class WriteHold:
    """Holds every connection's writes while one batch's handlers run (see the module docstring).

    The batcher's ``answers`` (``serving.batching.HeldAnswers``): :meth:`hold` is called on the
    event loop right after a batch's results were handed to its requests, whose handlers the loop
    runs next, in order; the release it queues runs after them and sends what they wrote. Holds
    that overlap (a batch's results handed out before the last one's release) keep writes held
    until the last release; each release sends what is held by then.
    """

    __slots__ = ("_pending_releases", "_held", "writes_held")

    def __init__(self) -> None:
        self._pending_releases = 0
        self._held: list[CoalescingTransport] = []
        self.writes_held = 0  # writes that waited for a release, since start

    @property
    def holding(self) -> bool:
        return self._pending_releases > 0

    def hold(self, requests: int) -> None:
        """Hold writes until the handlers of a batch of ``requests`` resumed now have run; a
        batch of one is not held (nothing to send it with)."""
        if requests > 1:
            self._pending_releases += 1
            asyncio.get_running_loop().call_soon(self._release)

    def send_held(self) -> None:
        """Send what is held now, the hold staying on: the event loop is about to block (a lone
        request's run on it), and what the batch's handlers wrote must not wait for that."""
        held, self._held = self._held, []
        for transport in held:
            try:
                transport.flush()
            except Exception:  # one connection's failure must not strand the others' answers
                log.exception("sending a held answer failed")

    def keep(self, transport: CoalescingTransport) -> None:
        """``transport`` holds bytes to send at the release."""
        self._held.append(transport)

    def _release(self) -> None:
        self._pending_releases -= 1
        self.send_held()


class CoalescingTransport:
    """A transport that sends a response head together with the write after it, and holds its
    writes while ``hold`` (shared by every connection of a server) is holding."""

    __slots__ = ("_transport", "_loop", "_held", "_hold")

    def __init__(
        self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, hold: WriteHold | None = None
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._hold = hold

    def write(self, data: bytes) -> None:
        held = self._held
        hold = self._hold
        if hold is not None and hold.holding:
            hold.writes_held += 1
            if held is None:
                hold.keep(self)
                self._held = bytes(data)
            else:
                self._held = held + data
        elif self._transport.is_closing():
            # The client left (with a request pipelined behind this one, uvicorn marks only the later
            # one as disconnected, so this answer is still written): uvloop raises on a closed transport.
            self._held = None
        elif held is not None:
            self._held = None
            self._transport.write(held + data)
        elif type(data) is bytes and data.startswith(_HEAD_START) and data.endswith(_HEAD_END):
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Send what is held now (a no-op when a later write already took it along; dropped
        when the transport is already closing, as its own buffer would be)."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # everything else: the socket transport's own
        return getattr(self._transport, name)


def coalescing(protocol: type[asyncio.Protocol], hold: WriteHold | None = None) -> type[asyncio.Protocol]:
    """``protocol`` (a uvicorn HTTP protocol class) writing through :class:`CoalescingTransport`,
    its writes held while ``hold`` holds."""

    class Coalescing(protocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:
            # connection_made runs on the event loop: no need for the protocol's own loop attribute.
            super().connection_made(CoalescingTransport(transport, asyncio.get_running_loop(), hold))

        def eof_received(self) -> bool | None:
            # The client stopped sending: the event loop closes the socket when this returns a
            # false value (uvicorn's do), so what is held for it goes out first.
            self.transport.flush()
            return super().eof_received()

    Coalescing.__name__ = Coalescing.__qualname__ = f"Coalescing{protocol.__name__}"
    return Coalescing


def http_protocol(
    header_timeout_s: float, body_timeout_s: float, hold: WriteHold | None = None
) -> type[asyncio.Protocol]:
    """The HTTP protocol uvicorn's ``http="auto"`` picks (httptools when installed, else h11),
    coalescing each response's head and body into one write and holding writes while ``hold``
    holds (a batch's answers), with one timer per connection for its keep-alive timeout and its
    requests' header deadline (serving/keepalive.py)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as protocol
    except ImportError:  # no httptools wheel for this platform
        from uvicorn.protocols.http.h11_impl import H11Protocol as protocol  # type: ignore[assignment]
    return coalescing(connection_timeouts(protocol, header_timeout_s, body_timeout_s), hold)
