"""A memo for the request path: results worth keeping per distinct request text, bounded.

Clients send the same few query strings and policies over and over; parsing, validating and
planning them again on every request was event-loop CPU per answer (docs/request-path-profile.md).
The keys come from clients, so the memo stops growing at ``capacity`` entries rather than
evicting: a client sending a different query string each time only misses, it cannot make the
server forget the common ones or hold more memory.
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    """``get`` → the stored value or None; ``put`` stores while there is room."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._values: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self._values.get(key)

    def put(self, key: K, value: V) -> None:
        if len(self._values) < self.capacity:
            self._values[key] = value

    def __len__(self) -> int:
        return len(self._values)
