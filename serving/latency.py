"""Service-time estimates per graph, for deadlines (``budget_ms``).

A request's time to an answer is *queueing* (waiting for the inference thread and
for its batch) plus *service* (the ONNX Runtime run of the batch it rides in). The
two are estimated separately because they behave differently:

* Service time depends on the batch size (and somewhat on load, through CPU
  contention), so each graph keeps a linear model ``seconds(b) = fixed + per_item * b``
  fitted by weighted least squares over its recent batch runs. Old runs lose weight
  with time (half-life ``half_life_s``), the live data never weighs more than
  ``max_live_weight`` runs (so a long burst leaves no more inertia than a short one),
  and the start-up calibration stays in the fit as a prior of fixed weight: when live
  runs stop (a graph nobody is sent to) the estimate returns to its idle calibration
  within a few half-lives instead of freezing at whatever a burst left behind.
* Queueing depends on what is waiting *now*; :mod:`serving.service` computes it
  from the current queues and these service models (no history to go stale).

Deadlines are planned with these numbers; ``GET /v1/model`` shows them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable


class ServiceTimeModel:
    """``seconds(batch) = fixed + per_item * batch``, fitted on time-decayed batch runs."""

    def __init__(
        self,
        half_life_s: float = 0.5,
        prior_weight: float = 4.0,
        max_live_weight: float = 16.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if half_life_s <= 0 or prior_weight <= 0 or max_live_weight <= 0:
            raise ValueError("half_life_s, prior_weight and max_live_weight must be positive")
        self._decay_rate = math.log(2.0) / half_life_s
        self._prior_weight = prior_weight
        self._max_live_weight = max_live_weight
        self._clock = clock
        # Weighted sums for least squares: weight, Σw·b, Σw·b², Σw·t, Σw·b·t.
        self._prior = [0.0] * 5
        self._live = [0.0] * 5
        self._live_at = clock()
        self.last_observed: float | None = None
        # Observed from the event loop, read by /v1/model and metrics from the same
        # loop; the lock keeps the sums consistent should a thread ever read them.
        self._lock = threading.Lock()

    @staticmethod
    def _sums(samples: Iterable[tuple[int, float]], weight: float = 1.0) -> list[float]:
        s = [0.0] * 5
        for b, t in samples:
            s[0] += weight
            s[1] += weight * b
            s[2] += weight * b * b
            s[3] += weight * t
            s[4] += weight * b * t
        return s

    def seed(self, samples: Iterable[tuple[int, float]]) -> None:
        """Set the prior from calibration runs: (batch size, seconds) pairs.

        The prior is normalised to ``prior_weight`` observations in all, whatever
        the number of calibration runs, and never decays.
        """
        samples = [(int(b), float(t)) for b, t in samples]
        if not samples:
            raise ValueError("seed needs at least one (batch, seconds) sample")
        with self._lock:
            self._prior = self._sums(samples, self._prior_weight / len(samples))

    def _decay_live(self, now: float) -> None:
        factor = math.exp(-self._decay_rate * max(0.0, now - self._live_at))
        self._live = [v * factor for v in self._live]
        self._live_at = now

    def observe(self, batch: int, seconds: float) -> None:
        """Add one live batch run."""
        now = self._clock()
        with self._lock:
            self._decay_live(now)
            for i, v in enumerate(self._sums([(batch, seconds)])):
                self._live[i] += v
            if self._live[0] > self._max_live_weight:
                scale = self._max_live_weight / self._live[0]
                self._live = [v * scale for v in self._live]
            self.last_observed = now

    def coefficients(self) -> tuple[float, float]:
        """(fixed seconds, seconds per item) of the current fit, both ≥ 0."""
        with self._lock:
            self._decay_live(self._clock())
            w, sb, sbb, st, sbt = (p + q for p, q in zip(self._prior, self._live))
        if w <= 0:
            return 0.0, 0.0
        mean_b, mean_t = sb / w, st / w
        var_b = sbb / w - mean_b * mean_b
        # With (nearly) one batch size in the data the slope is not identifiable:
        # treat the time as per-batch overhead plus nothing per item at that size.
        if var_b <= 1e-9 * max(1.0, mean_b * mean_b):
            return max(0.0, mean_t), 0.0
        slope = (sbt / w - mean_b * mean_t) / var_b
        fixed = mean_t - slope * mean_b
        # Guard against a fit that extrapolates to negative times at either end.
        if slope < 0:
            return max(0.0, mean_t), 0.0
        if fixed < 0:
            return 0.0, mean_t / mean_b if mean_b > 0 else 0.0
        return fixed, slope

    def estimate(self, batch: int = 1) -> float:
        """Predicted seconds for one run at ``batch`` items."""
        fixed, per_item = self.coefficients()
        return fixed + per_item * max(1, int(batch))


class DecayingMean:
    """A time-weighted mean that fades to ``rest`` when nothing new is observed.

    Used for the gap between predicted and observed stage times (event-loop delay,
    result hand-off): under load it grows, and seconds after the load ends it is back
    near ``rest`` without needing new observations to wash it out.
    """

    def __init__(
        self,
        half_life_s: float = 0.5,
        rest: float = 0.0,
        max_weight: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._decay_rate = math.log(2.0) / half_life_s
        self._rest = rest
        self._max_weight = max_weight
        self._clock = clock
        self._weight = 0.0
        self._sum = 0.0
        self._at = clock()

    def _decay(self, now: float) -> None:
        factor = math.exp(-self._decay_rate * max(0.0, now - self._at))
        self._weight *= factor
        self._sum *= factor
        self._at = now

    def observe(self, value: float) -> None:
        self._decay(self._clock())
        self._weight += 1.0
        self._sum += value
        if self._weight > self._max_weight:  # bounded inertia, as for service times
            self._sum *= self._max_weight / self._weight
            self._weight = self._max_weight

    def value(self) -> float:
        """The mean, pulled towards ``rest`` by one pseudo-observation that never decays."""
        self._decay(self._clock())
        return (self._sum + self._rest) / (self._weight + 1.0)
