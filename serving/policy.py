"""Exit selection: which exit (or which cascade) answers a request.

Pure functions over the manifest's costs and the current latency estimates; no I/O,
no model. The HTTP layer turns query parameters into :class:`PolicyParams`, calls
:func:`plan_request`, and the inference service executes the resulting :class:`Plan`.

Semantics (DESIGN §4):

* ``exit=N`` — exactly exit N (full-path graph). Cannot be combined with a budget or
  ``confidence`` (contradictory → 422).
* ``budget_gflops=B`` — the deepest exit whose full-path cost ≤ B.
* ``budget_ms=T`` — the deepest exit whose current latency estimate ≤ T.
  Both budgets together: the deepest exit satisfying both.
* ``confidence=p`` — a cascade over the stage graphs: evaluate exits 1, 2, … and stop
  at the first whose top softmax probability ≥ p; the deepest exit evaluated is the
  main output, or the deepest exit a budget given with it allows. In a cascade the
  budget bounds what is actually *spent*: the cumulative cost of the stages run
  (trunk once, every head on the way), so ``gflops`` in the response never exceeds
  ``budget_gflops``; likewise ``budget_ms`` is compared with the cascade's cumulative
  latency estimate.
* A budget below the cheapest exit → 422 naming the cheapest cost.

Default policies use the same vocabulary as the query string, written as
comma-separated ``key:value`` pairs, e.g. ``exit:last``, ``exit:2``,
``confidence:0.9``, ``budget_gflops:0.5``, ``confidence:0.8,budget_ms:20``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, Sequence

import numpy as np

from .errors import ImpossibleBudget, InvalidParameters

# Relative slack when comparing a budget with a cost, so a client who copies a cost
# from /v1/model (float → JSON → float) is never refused by rounding.
_EPS = 1e-9

POLICY_KEYS = ("exit", "budget_gflops", "budget_ms", "confidence")


@dataclass(frozen=True)
class PolicyParams:
    """What a client (or the default policy) asked for; all optional."""

    budget_gflops: float | None = None
    budget_ms: float | None = None
    confidence: float | None = None
    exit: int | Literal["last"] | None = None

    def is_empty(self) -> bool:
        """True when no selector is given (the default policy then applies)."""
        return all(getattr(self, f.name) is None for f in fields(self))

    @property
    def name(self) -> str:
        """Policy label for responses and metrics (a small, fixed set of values)."""
        if self.exit is not None:
            return "exit"
        if self.confidence is not None:
            return "confidence"
        if self.budget_gflops is not None and self.budget_ms is not None:
            return "budget"
        if self.budget_gflops is not None:
            return "budget_gflops"
        if self.budget_ms is not None:
            return "budget_ms"
        return "none"


@dataclass(frozen=True)
class Plan:
    """How to run one request.

    ``mode == "single"``: run the full-path graph of ``exit``.
    ``mode == "cascade"``: run stage graphs 1..``exit`` in order, stopping early at the
    first exit whose top probability ≥ ``threshold``.
    """

    policy: str
    mode: Literal["single", "cascade"]
    exit: int
    threshold: float | None = None
    budget_gflops: float | None = None
    budget_ms: float | None = None


@dataclass(frozen=True)
class CostTable:
    """Per-exit costs from the manifest (index 0 = exit 1)."""

    gflops: tuple[float, ...]
    stage_gflops: tuple[float, ...]

    @property
    def num_exits(self) -> int:
        return len(self.gflops)

    @property
    def cascade_gflops(self) -> tuple[float, ...]:
        """Cumulative cost of a cascade that stops at exit i (trunk once + heads 1..i)."""
        return tuple(float(x) for x in np.cumsum(self.stage_gflops))

    @classmethod
    def from_manifest(cls, manifest) -> "CostTable":
        return cls(
            gflops=tuple(e.gflops for e in manifest.exits),
            stage_gflops=tuple(e.stage_gflops for e in manifest.exits),
        )


def parse_policy_spec(spec: str) -> PolicyParams:
    """Parse a default-policy string such as ``confidence:0.9,budget_gflops:1.2``.

    Keys are the query-parameter names; ``exit`` also takes ``last``. Raises
    ValueError with the accepted format on anything else. Range checks against a
    model happen later, in :func:`plan_request`.
    """
    values: dict[str, object] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, raw = part.replace("=", ":", 1).partition(":")
        key, raw = key.strip(), raw.strip()
        if not sep or key not in POLICY_KEYS:
            raise ValueError(
                f"bad policy element {part!r}: expected comma-separated key:value pairs with keys "
                f"{', '.join(POLICY_KEYS)}; e.g. 'exit:last', 'confidence:0.9,budget_gflops:0.5'"
            )
        if key in values:
            raise ValueError(f"policy {spec!r} gives {key!r} twice")
        try:
            if key == "exit":
                values[key] = "last" if raw == "last" else int(raw)
            else:
                value = float(raw)
                if not math.isfinite(value):
                    raise ValueError
                values[key] = value
        except ValueError:
            kind = "an integer or 'last'" if key == "exit" else "a finite number"
            raise ValueError(f"policy element {part!r}: {key} must be {kind}") from None
    params = PolicyParams(**values)  # type: ignore[arg-type]
    if params.is_empty():
        raise ValueError("empty policy; e.g. 'exit:last' or 'confidence:0.9'")
    return params


def plan_request(
    params: PolicyParams,
    costs: CostTable,
    latency_ms: Sequence[float] | None = None,
    cascade_latency_ms: Sequence[float] | None = None,
) -> Plan:
    """Turn request parameters into a :class:`Plan`, or raise a 422 error.

    ``latency_ms[i]`` / ``cascade_latency_ms[i]`` are the current latency estimates of
    exit i+1 by its full path / by a cascade ending there; they are needed only when
    ``params.budget_ms`` is given.
    """
    try:
        return _plan(params, costs, latency_ms, cascade_latency_ms)
    except InvalidParameters as exc:  # DESIGN §4: every 422 names the cheapest cost
        cheapest = int(np.argmin(costs.gflops))
        exc.extra.setdefault("cheapest_gflops", float(costs.gflops[cheapest]))
        exc.extra.setdefault("cheapest_exit", cheapest + 1)
        raise


def _plan(params, costs: CostTable, latency_ms, cascade_latency_ms) -> Plan:
    k = costs.num_exits
    if params.exit is not None:
        others = [n for n in ("budget_gflops", "budget_ms", "confidence") if getattr(params, n) is not None]
        if others:
            raise InvalidParameters(
                f"'exit' selects one exit and cannot be combined with {', '.join(others)}; "
                "give either exit, or budgets and/or confidence",
                accepted="exit alone, or any of budget_gflops, budget_ms, confidence",
            )
        number = k if params.exit == "last" else params.exit
        if not isinstance(number, int) or not 1 <= number <= k:
            raise InvalidParameters(f"exit={params.exit} is out of range; this model has exits 1..{k}")
        return Plan(policy="exit", mode="single", exit=number)

    if params.confidence is not None and not 0.0 <= params.confidence <= 1.0:
        raise InvalidParameters(
            f"confidence={params.confidence} is out of range; a softmax probability threshold in [0, 1] is accepted"
        )
    for name in ("budget_gflops", "budget_ms"):
        value = getattr(params, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise InvalidParameters(f"{name}={value} must be a positive finite number")

    cascade = params.confidence is not None
    # The cost/latency that limits how deep we may go: full path for a single exit,
    # cumulative stage cost for a cascade (see module docstring).
    gflops = costs.cascade_gflops if cascade else costs.gflops
    deepest = k
    if params.budget_gflops is not None:
        by_gflops = _deepest_within(gflops, params.budget_gflops)
        if by_gflops == 0:
            cheapest = int(np.argmin(gflops)) + 1
            cost = float(gflops[cheapest - 1])
            what = "the first stage of a cascade" if cascade else "the cheapest exit"
            raise ImpossibleBudget(
                f"budget_gflops={params.budget_gflops:g} is below {what} "
                f"(exit {cheapest} costs {cost:g} GFLOPs); accepted: budget_gflops >= {cost:g}",
                cheapest_gflops=cost,
                cheapest_exit=cheapest,
            )
        deepest = min(deepest, by_gflops)
    if params.budget_ms is not None:
        estimates = cascade_latency_ms if cascade else latency_ms
        if estimates is None or len(estimates) != k:
            raise ValueError("budget_ms planning needs a latency estimate for every exit")
        by_ms = _deepest_within(estimates, params.budget_ms)
        if by_ms == 0:
            fastest = int(np.argmin(estimates)) + 1
            fastest_ms = float(estimates[fastest - 1])
            cheapest = int(np.argmin(gflops)) + 1
            raise ImpossibleBudget(
                f"budget_ms={params.budget_ms:g} is below the current latency estimate of the fastest "
                f"exit (exit {fastest}: {fastest_ms:.4g} ms; the cheapest exit, exit {cheapest}, costs "
                f"{gflops[cheapest - 1]:g} GFLOPs); accepted: budget_ms >= {fastest_ms:.4g} "
                "(estimates move with load; see GET /v1/model)",
                fastest_ms=round(fastest_ms, 4),
                fastest_exit=fastest,
                cheapest_gflops=float(gflops[cheapest - 1]),
                cheapest_exit=cheapest,
            )
        deepest = min(deepest, by_ms)

    return Plan(
        policy=params.name,
        mode="cascade" if cascade else "single",
        exit=deepest,
        threshold=params.confidence if cascade else None,
        budget_gflops=params.budget_gflops,
        budget_ms=params.budget_ms,
    )


def _deepest_within(values: Sequence[float], budget: float) -> int:
    """1-based index of the deepest entry ≤ budget, 0 if none.

    Neither costs nor latency estimates need grow with depth (an exit's head can cost
    more than the rest of the trunk), so every exit is checked rather than bisecting.
    """
    deepest = 0
    for i, value in enumerate(values, start=1):
        if value <= budget * (1 + _EPS):
            deepest = i
    return deepest


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def is_confident(probs: np.ndarray, threshold: float) -> bool:
    """The cascade's stopping rule: top probability ≥ threshold."""
    return bool(probs.max() >= threshold)


def top_k(probs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most probable classes as (index, probability), most probable first.

    Ties keep the lower class index first, so answers are deterministic.
    """
    k = max(1, min(int(k), probs.shape[-1]))
    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in order]


def gflops_spent(costs: CostTable, plan_mode: str, exits_evaluated: Sequence[int]) -> float:
    """GFLOPs actually spent: the full path for a single exit, the stages run for a cascade."""
    if not exits_evaluated:
        return 0.0
    if plan_mode == "single":
        return costs.gflops[exits_evaluated[-1] - 1]
    return float(sum(costs.stage_gflops[i - 1] for i in exits_evaluated))
