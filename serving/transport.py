"""One socket write per HTTP response where uvicorn makes two.

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
out on the next turn by itself. Nothing else is delayed or reordered.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .keepalive import connection_timeouts

# Every response head uvicorn writes (httptools and h11 alike) starts with the status line
# and ends with the empty line after the headers.
_HEAD_START = b"HTTP/1."
_HEAD_END = b"\r\n\r\n"


class CoalescingTransport:
    """A transport that sends a response head together with the write after it."""

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif type(data) is bytes and data.startswith(_HEAD_START) and data.endswith(_HEAD_END):
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Send a held head now (a no-op when the body already took it along)."""
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


def coalescing(protocol: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """``protocol`` (a uvicorn HTTP protocol class) writing through :class:`CoalescingTransport`."""

    class Coalescing(protocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:
            # connection_made runs on the event loop: no need for the protocol's own loop attribute.
            super().connection_made(CoalescingTransport(transport, asyncio.get_running_loop()))

    Coalescing.__name__ = Coalescing.__qualname__ = f"Coalescing{protocol.__name__}"
    return Coalescing


def http_protocol(header_timeout_s: float, body_timeout_s: float) -> type[asyncio.Protocol]:
    """The HTTP protocol uvicorn's ``http="auto"`` picks (httptools when installed, else h11),
    coalescing each response's head and body into one write, with one timer per connection for its
    keep-alive timeout and its requests' header deadline (serving/keepalive.py)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as protocol
    except ImportError:  # no httptools wheel for this platform
        from uvicorn.protocols.http.h11_impl import H11Protocol as protocol  # type: ignore[assignment]
    return coalescing(connection_timeouts(protocol, header_timeout_s, body_timeout_s))
