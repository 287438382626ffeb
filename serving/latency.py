"""Rolling latency estimates per graph, used by the ``budget_ms`` policy.

Each graph (full path ``exitN`` or stage ``stageN``) keeps a window of recent
per-request times from enqueue to result — queueing, batching delay and inference
together — and its estimate is a high percentile of that window. The window is
seeded by start-up calibration so estimates exist before the first request.
"""

from __future__ import annotations

import collections
import threading
from typing import Iterable

import numpy as np


class LatencyTracker:
    """A bounded window of recent latencies (seconds) and a percentile estimate."""

    def __init__(self, window: int = 512, percentile: float = 95.0) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=window)
        self._percentile = percentile
        self._cached: float | None = None
        # Updated from the event loop, read by /v1/model and metrics; a lock keeps
        # the cached estimate and the window consistent if a thread ever reads it.
        self._lock = threading.Lock()

    def seed(self, samples: Iterable[float]) -> None:
        """Replace the window with calibration samples."""
        with self._lock:
            self._samples.clear()
            self._samples.extend(float(s) for s in samples)
            self._cached = None

    def observe(self, seconds: float) -> None:
        """Add one live measurement."""
        with self._lock:
            self._samples.append(float(seconds))
            self._cached = None

    def estimate(self) -> float:
        """The configured percentile of the window, in seconds (0.0 when empty)."""
        with self._lock:
            if self._cached is None:
                self._cached = (
                    float(np.percentile(np.fromiter(self._samples, dtype=np.float64), self._percentile))
                    if self._samples
                    else 0.0
                )
            return self._cached

    def __len__(self) -> int:
        return len(self._samples)
