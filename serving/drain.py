"""Graceful drain: what the server does between SIGTERM and exit.

A load balancer (a Kubernetes Service, an ingress) keeps sending requests to a replica
for a few seconds after the replica is told to stop: endpoints are removed
asynchronously. Closing the listener at once, as uvicorn does on SIGTERM, turns those
requests into connection errors. So on the first SIGTERM:

1. ``/readyz`` answers 503 at once (the app's ``draining`` flag), so readiness probes
   take the replica out of rotation;
2. the server keeps accepting and answering requests for ``drain_seconds``;
3. then uvicorn's own graceful shutdown runs: the listener closes, requests in flight
   finish (up to ``SHUTDOWN_TIMEOUT_S``), the model is unloaded, and the process exits
   with status 0.

A second SIGTERM, or SIGINT (Ctrl-C), skips what is left of the window; the process still
exits with status 0.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

log = logging.getLogger("serving")

# How long requests still in flight when the listener closes may take to finish.
SHUTDOWN_TIMEOUT_S = 10


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains for ``drain_seconds`` after SIGTERM before shutting down.

    ``mark_draining`` is called from the signal handler, so it must only set a flag
    (no locks, no logging); ``on_drain`` runs once on the event loop right after, where
    it may do anything (metrics, logs).
    """

    def __init__(
        self,
        config: uvicorn.Config,
        drain_seconds: float,
        mark_draining: Callable[[], None],
        on_drain: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self._mark_draining = mark_draining
        self._on_drain = on_drain
        self._drain_deadline: float | None = None
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # No signal is recorded as captured, as uvicorn's own handler does: it re-raises them after
        # the shutdown, and a second SIGTERM or a Ctrl-C then ended the process by that signal
        # (status 143 / 130, a traceback for SIGINT) — a graceful shutdown, however asked for,
        # exits with status 0.
        self._mark_draining()
        if sig == signal.SIGTERM and self._drain_deadline is None and not self.should_exit:
            self._drain_deadline = time.monotonic() + self.drain_seconds  # on_tick ends the window
        elif self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # uvicorn's rule: Ctrl-C again stops waiting for requests in flight
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        # uvicorn calls this every 0.1 s on the event loop.
        if not self._announced and (self._drain_deadline is not None or self.should_exit):
            self._announced = True
            if self._drain_deadline is not None and self.drain_seconds > 0:
                log.info(
                    "SIGTERM: draining for %.1f s (/readyz answers 503, requests still served)", self.drain_seconds
                )
            if self._on_drain is not None:
                self._on_drain()
        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
            self.should_exit = True
        return await super().on_tick(counter)
