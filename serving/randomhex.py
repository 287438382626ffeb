"""Random hex strings for the request path, drawn from the operating system in bulk.

Every answer carries two: its correlation id (``serving.requestlog``, when the client sent none)
and its signed id's nonce (``serving.feedback``). One ``getrandom(2)`` system call per string was
~4 % of the event loop's samples at saturation for the nonces alone (py-spy, docs/request-path-profile.md,
tenth session): the call is a place where the scheduler may hand the loop's core to ORT's threads.
The same CSPRNG bytes (``secrets.token_hex``, i.e. ``os.urandom``) come in one call per
``per_draw`` strings instead (hot, a correlation id 0.49 → 0.26 µs; what counts is the system
call no longer made per request). A forked child starts with empty pools, so parent and child never
hand out the same strings.
"""

from __future__ import annotations

import os
import secrets
import weakref


class RandomHex:
    """``take()`` → ``chars`` random lowercase hex digits (``chars`` even), never the same string
    twice in practice (``4 * chars`` random bits); the OS is asked once per ``per_draw`` strings."""

    __slots__ = ("chars", "per_draw", "_pool", "__weakref__")

    def __init__(self, chars: int, per_draw: int = 512) -> None:
        if chars <= 0 or chars % 2:
            raise ValueError(f"chars={chars}: a positive even number of hex digits (whole random bytes)")
        if per_draw < 1:
            raise ValueError(f"per_draw={per_draw}: at least one string per draw")
        self.chars, self.per_draw = chars, per_draw
        self._pool: list[str] = []
        _POOLS.add(self)

    def take(self) -> str:
        if not self._pool:
            raw, n = secrets.token_hex(self.chars // 2 * self.per_draw), self.chars
            self._pool = [raw[i : i + n] for i in range(0, len(raw), n)]
        return self._pool.pop()

    def _forget(self) -> None:
        self._pool = []


_POOLS: weakref.WeakSet[RandomHex] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._forget()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
