"""A memo for the request path: results worth keeping per distinct request text, bounded.

Clients send the same few query strings and policies over and over; parsing, validating and
planning them again on every request was event-loop CPU per answer (docs/request-path-profile.md).
The keys come from clients, and some clients send a new one every time (a deadline computed per
request, ``budget_ms=37.2``): a memo that simply stopped growing when full was full of such
one-offs for good after the first ``capacity`` of them, and the common queries that came later
were never remembered. So when the memo is full, every ``capacity`` entries it could not store
it forgets those not used since the last such sweep. A common query is used between sweeps and
stays; a client sending a different text each time only misses, and to push a common entry out
it must outpace that entry's own traffic ``capacity`` times over.
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    """``get`` → the stored value or None; ``put`` stores while there is room (see the module)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._values: dict[K, list] = {}  # key -> [value, used since the last sweep]
        self._refused = 0  # puts refused for want of room since the last sweep

    def get(self, key: K) -> V | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        entry[1] = True
        return entry[0]

    def put(self, key: K, value: V) -> None:
        if key in self._values:  # the same text gives the same result: keep the entry (and its use)
            return
        if len(self._values) >= self.capacity:
            self._refused += 1
            if self._refused < self.capacity:
                return
            self._sweep()
            if len(self._values) >= self.capacity:
                return
        self._values[key] = [value, False]

    def _sweep(self) -> None:
        self._refused = 0
        self._values = {k: [v, False] for k, (v, used) in self._values.items() if used}

    def __len__(self) -> int:
        return len(self._values)
