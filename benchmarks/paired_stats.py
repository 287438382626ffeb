"""Small statistics for comparing training methods over seeds, in plain Python.

Student's t quantiles (for confidence intervals over a handful of seeds) come from the
regularized incomplete beta function evaluated by its continued fraction, so no SciPy is
needed. ``paired_interval`` is the t-interval of the mean of per-seed differences: the
methods share each seed's training subset, batch order and (but for heads that only one
has) initial weights, so pairing
removes the seed-to-seed spread that both methods share.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass


def _betacf(a: float, b: float, x: float, max_iter: int = 300, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); use symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t value with P(T <= t) = p (bisection on ``t_cdf``; accurate to ~1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie strictly between 0 and 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its sample std and a two-sided t-interval."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.2f} (1 seed: no interval)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def mean_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """Mean ± t_{(1+c)/2, n-1} · s/√n; with one value the interval is the point itself."""
    values = list(values)
    if not values:
        raise ValueError("no values to summarize")
    if not 0.0 < confidence < 1.0:  # -0.5 gave an inverted interval that "excluded zero"
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"values must be finite numbers, got {values}")
    n, mean = len(values), statistics.fmean(values)
    if n == 1:
        return Interval(1, mean, 0.0, mean, mean, confidence)
    std = statistics.stdev(values)
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half, confidence)


def paired_interval(a: dict, b: dict, confidence: float = 0.95) -> Interval:
    """t-interval of a − b over the keys (seeds) both have."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two methods share no seed; nothing to pair")
    return mean_interval([a[k] - b[k] for k in common], confidence)


__all__ = ["Interval", "betainc", "mean_interval", "paired_interval", "t_cdf", "t_quantile"]
