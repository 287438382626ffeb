"""Keep-alive timeouts with one timer per idle spell of a connection, not one per response.

uvicorn's httptools protocol arms a new ``call_later`` timer after every response and cancels
it when the next request's first bytes arrive. On this 2-core host that cost a lone request
~10–15 µs to arm, and the cancelled timer's handle, closed in the event loop's next iteration,
is one cause of a slow step between a request's last byte and its handler's first step (58–88
µs instead of ~5 in many 1,000-request medians; stamped servers, docs/request-path-profile.md,
eleventh session) — every request, at saturation too.

Here a connection keeps at most one timer. A response marks the connection idle since now and
arms the timer only when none is armed; new data marks it busy without touching the timer.
When the timer fires it closes a connection idle for ``timeout_keep_alive`` seconds, re-arms
for the rest of the spell if it went idle again since, and leaves a busy connection alone (its
next response arms it again). The same rule as uvicorn's: an idle keep-alive connection closes
``timeout_keep_alive`` seconds after its last response.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import textwrap
from typing import Any

# The sha256 of uvicorn 0.54's HttpToolsProtocol.on_response_complete (its source, dedented), which
# LazyKeepAlive reproduces but for the timer. Any other version of that method keeps uvicorn's own
# timers: a copy of code that has since changed would quietly drop whatever the change added.
REPRODUCED_ON_RESPONSE_COMPLETE = "5684fd801d0683ac20b9144e8eed8327e445236d5c1d16a02253dfb3a35b9a75"


def _reproduces(base: type[Any]) -> bool:
    try:
        source = textwrap.dedent(inspect.getsource(base.on_response_complete))
    except (OSError, TypeError):  # no source installed
        return False
    return hashlib.sha256(source.encode()).hexdigest() == REPRODUCED_ON_RESPONSE_COMPLETE


def lazy_keep_alive(protocol: type[Any]) -> type[Any]:
    """``protocol`` (uvicorn's httptools protocol, or a subclass) with one keep-alive timer per
    idle spell. Any other protocol class (h11), and uvicorn versions whose response completion
    this does not reproduce (:data:`REPRODUCED_ON_RESPONSE_COMPLETE`), are returned as they are."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return protocol
    if not issubclass(protocol, HttpToolsProtocol) or not _reproduces(HttpToolsProtocol):
        return protocol

    class LazyKeepAlive(protocol):
        _idle_since: float | None = None  # loop time of the last response while idle; None: busy
        _keep_alive_timer: asyncio.TimerHandle | None = None

        def _unset_keepalive_if_required(self) -> None:
            # uvicorn calls this when data arrives (and from its own on_response_complete and
            # connection_lost): cancelling the timer was its way of marking the connection busy.
            self._idle_since = None

        def on_response_complete(self) -> None:
            # uvicorn's own (0.54), but for the keep-alive timer.
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            self._idle_since = None
            self.flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
                return
            self._idle_since = now = self.loop.time()
            if self._keep_alive_timer is None:
                self._keep_alive_timer = self.loop.call_at(now + self.timeout_keep_alive, self._keep_alive_due)

        def _keep_alive_due(self) -> None:
            self._keep_alive_timer = None
            if self._idle_since is None or self.transport.is_closing():
                return  # busy: its next response arms the timer again
            due = self._idle_since + self.timeout_keep_alive
            if due > self.loop.time():  # idle again since the timer was armed: the rest of the spell
                self._keep_alive_timer = self.loop.call_at(due, self._keep_alive_due)
                return
            self.timeout_keep_alive_handler()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._keep_alive_timer is not None:
                self._keep_alive_timer.cancel()
                self._keep_alive_timer = None
            super().connection_lost(exc)

    LazyKeepAlive.__name__ = LazyKeepAlive.__qualname__ = f"LazyKeepAlive{protocol.__name__}"
    return LazyKeepAlive
