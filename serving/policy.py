"""Exit selection: which exit (or which cascade) answers a request.

Pure functions over the manifest's costs, its calibrated policies and the idle
service-time estimates; no I/O, no model. The HTTP layer turns query parameters
into :class:`PolicyParams`, calls :func:`plan_request`, and the inference service
executes the resulting :class:`Plan` (deadlines are enforced there, stage by stage,
because they depend on the load at that moment).

Semantics (DESIGN §4):

* ``exit=N`` — exactly exit N (full-path graph). Cannot be combined with anything
  else (contradictory → 422).
* ``budget_gflops=B`` — the deepest exit whose full-path cost ≤ B.
* ``confidence=p`` or ``confidence=p1,...,p(k-1)`` — a cascade over the stage graphs
  with the rule of :mod:`serving.cascade` (one threshold for every early exit, or one
  per early exit). ``policy=NAME`` — the same with the per-exit thresholds the
  manifest calibrated under that name. In a cascade a budget bounds what is actually
  *spent*: the cumulative cost of the stages run, so ``gflops`` in the response never
  exceeds ``budget_gflops``.
* ``budget_ms=T`` — a deadline T ms after the request arrived: the request runs as a
  cascade over the stage graphs (any thresholds given still apply) up to the deepest
  exit an idle server could finish in time; the service stops earlier when the next
  stage cannot finish before the deadline under the present load. 422 only when T is
  below exit 1's idle service time — never because of load.
* A GFLOPs budget below the cheapest exit → 422 naming the cheapest cost.

Default policies use the same vocabulary as the query string, written as
comma-separated ``key:value`` pairs, e.g. ``exit:last``, ``exit:2``,
``confidence:0.9``, ``budget_gflops:0.5``, ``policy:budget_0.5x_main``,
``confidence:0.8,budget_ms:20``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from decimal import ROUND_CEILING, Decimal
from typing import Literal

import numpy as np

from . import cascade
from .errors import ImpossibleBudget, InvalidParameters, shown
from .manifest import Thresholds

POLICY_KEYS = ("exit", "budget_gflops", "budget_ms", "confidence", "policy")
# A confidence list has one threshold per early exit; longer lists are refused before any is read
# (10 million of them, a 20 MiB OIP parameter, took 4 s of CPU on the event loop to count).
MAX_THRESHOLDS = 64


@dataclass(frozen=True)
class PolicyParams:
    """What a client (or the default policy) asked for; all optional."""

    budget_gflops: float | None = None
    budget_ms: float | None = None
    confidence: tuple[float, ...] | None = None
    exit: int | Literal["last"] | None = None
    policy: str | None = None

    def is_empty(self) -> bool:
        """True when no selector is given (the default policy then applies)."""
        return all(getattr(self, f.name) is None for f in fields(self))

    @property
    def name(self) -> str:
        """Policy label for responses and metrics (a small, fixed set of values: :func:`policy_labels`)."""
        if self.exit is not None:
            return "exit"
        if self.policy is not None:
            return f"policy:{self.policy}"
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
    ``mode == "cascade"``: run stage graphs 1..``exit`` in order, stopping at the first
    early exit whose top probability ≥ its entry of ``thresholds`` (one per early exit;
    all :data:`serving.cascade.NEVER` for a pure deadline) or, with ``budget_ms``, when
    the next stage cannot finish before the deadline.
    """

    mode: Literal["single", "cascade"]
    exit: int
    thresholds: tuple[float, ...] | None = None
    budget_ms: float | None = None
    # A pure deadline (no thresholds) answers from ``exit`` in one full-path call when that is in
    # time, but stage by stage only up to ``stage_exit``: the stages spend the trunk once plus
    # every head on the way, and take longer idle, so a budget may allow exit 3 as one call and
    # only exit 2 as a cascade. None: the same as ``exit``.
    stage_exit: int | None = None

    @property
    def stages_to(self) -> int:
        """The deepest exit a stage-by-stage run of this plan may reach."""
        return self.exit if self.stage_exit is None else self.stage_exit


@dataclass(frozen=True)
class CostTable:
    """Per-exit costs (index 0 = exit 1) and the calibrated policies of one model."""

    gflops: tuple[float, ...]
    stage_gflops: tuple[float, ...]
    policies: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def num_exits(self) -> int:
        return len(self.gflops)

    @property
    def cascade_gflops(self) -> tuple[float, ...]:
        """Cumulative cost of a cascade that stops at exit i (trunk once + heads 1..i)."""
        return tuple(float(x) for x in cascade.cumulative_gflops(self.stage_gflops))

    def spent(self, mode: str, exits_evaluated: Sequence[int]) -> float:
        """GFLOPs actually spent by a plan of ``mode`` that evaluated these exits."""
        return cascade.gflops_spent(self.gflops, self.stage_gflops, mode, exits_evaluated)

    @classmethod
    def from_manifest(cls, manifest) -> CostTable:
        return cls(
            gflops=tuple(e.gflops for e in manifest.exits),
            stage_gflops=tuple(e.stage_gflops for e in manifest.exits),
            policies=calibrated_policies(manifest.thresholds, manifest.num_exits),
        )


def calibrated_policies(thresholds: Thresholds | None, num_exits: int) -> dict[str, tuple[float, ...]]:
    """Name → per-early-exit thresholds of every policy the manifest calibrated."""
    if thresholds is None:
        return {}
    return {
        name: tuple(float(v) for v in cascade.as_thresholds(p.thresholds, num_exits))
        for name, p in thresholds.policies.items()
    }


def rounded_up(value: float, digits: int) -> float:
    """``value`` rounded *up* to ``digits`` significant digits: a floor a 422 can quote that the
    client may send back and be accepted (``f"{0.020651008:g}"`` is 0.020651, which is refused)."""
    if not (value > 0 and math.isfinite(value)):
        return value
    exact = Decimal(repr(value))
    return float(exact.quantize(Decimal(1).scaleb(exact.adjusted() - digits + 1), rounding=ROUND_CEILING))


def plain_number(raw: object) -> float:
    """``float(raw)`` for a number, or for a string written as JSON or a query writes one; ValueError
    for anything else. ``float`` alone would also read digit separators ('0_5' as 5: a typo for 0.5
    would run another exit), digits of other scripts ('０.５') and a bool (True as 1)."""
    if isinstance(raw, bool) or (isinstance(raw, str) and ("_" in raw or not raw.isascii())):
        raise ValueError(raw)
    try:
        return float(raw)  # type: ignore[arg-type]
    except OverflowError:  # a JSON integer beyond a float's range (10**400): as '1e400' reads, infinite
        return math.inf if raw > 0 else -math.inf  # type: ignore[operator]


def plain_integer(text: str) -> int:
    """``int(text)`` under :func:`plain_number`'s rules: '1_0' and '２' are not integers."""
    if "_" in text or not text.isascii():
        raise ValueError(text)
    return int(text)


# A threshold written in a query string or an OIP string parameter: a plain decimal, as the
# published schema's pattern has it (serving/openapi.py); float() alone also read '1e-1', 'inf'.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def parse_confidence(raw: str | float | Sequence[float]) -> tuple[float, ...]:
    """``0.9`` or ``"0.65,0.43,0.33"`` → a tuple of finite floats (ranges checked later)."""
    given = raw.count(",") + 1 if isinstance(raw, str) else len(raw) if isinstance(raw, (list, tuple)) else 1
    if given > MAX_THRESHOLDS:
        raise InvalidParameters(
            f"confidence has {given} values, more than any model has exits (at most {MAX_THRESHOLDS} are read); "
            "accepted: one threshold for every early exit (confidence=0.9) or one per early exit "
            "(confidence=0.65,0.43,0.33)"
        )
    if isinstance(raw, (int, float)):
        parts: Sequence = [raw]
    elif isinstance(raw, str):
        parts = [p.strip() for p in raw.split(",")]
    else:
        parts = list(raw)
    values = []
    for part in parts:
        try:
            if isinstance(part, str) and not _DECIMAL.fullmatch(part := part.strip()):
                raise ValueError(part)
            value = plain_number(part)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise InvalidParameters(
                f"confidence={shown(raw)} is not a number or a comma-separated list of numbers; "
                "accepted: one threshold for every early exit (confidence=0.9) or one per early exit "
                "(confidence=0.65,0.43,0.33)"
            )
        values.append(value)
    return tuple(values)


def parse_policy_spec(spec: str) -> PolicyParams:
    """Parse a default-policy string such as ``confidence:0.9,budget_gflops:1.2``.

    Keys are the query-parameter names, values read as the query string's are
    (:func:`params_from_request`: ``exit:LAST`` as ``?exit=LAST``); ``confidence`` may list one
    threshold per early exit (``confidence:0.65,0.43,0.33``). Raises ValueError with the accepted
    format on anything else. Range checks against a model happen later, in :func:`plan_request`.
    """
    values: dict[str, str] = {}
    last_key = None
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, raw = part.replace("=", ":", 1).partition(":")
        key, raw = key.strip(), raw.strip()
        if not sep and last_key == "confidence":  # the next threshold of a per-exit list
            values["confidence"] += "," + part
            continue
        if not sep or key not in POLICY_KEYS:
            raise ValueError(
                f"bad policy element {shown(part)}: expected comma-separated key:value pairs with keys "
                f"{', '.join(POLICY_KEYS)}; e.g. 'exit:last', 'confidence:0.9,budget_gflops:0.5', "
                "'policy:budget_0.5x_main'"
            )
        if key in values:
            raise ValueError(f"policy {shown(spec)} gives {key!r} twice")
        if not raw:
            raise ValueError(f"policy element {shown(part)} has no value")
        values[key], last_key = raw, key
    try:
        params = params_from_request(values)
    except InvalidParameters as exc:
        raise ValueError(f"policy {shown(spec)}: {exc.detail}") from None
    if params.is_empty():
        raise ValueError("empty policy; e.g. 'exit:last' or 'confidence:0.9'")
    return params


def params_from_request(values: Mapping[str, object]) -> PolicyParams:
    """Policy parameters from a request: query strings (/classify) or OIP v2 ``parameters``.

    Values may be strings or numbers; ``confidence`` may be a comma-separated list.
    Unknown keys are the caller's business (each route knows its other parameters).
    """

    def number(key: str) -> float | None:
        raw = values.get(key)
        if raw is None:
            return None
        try:
            value = plain_number(raw)
        except (TypeError, ValueError):
            raise InvalidParameters(f"{key}={shown(raw)} is not a number") from None
        if not math.isfinite(value):
            raise InvalidParameters(f"{key}={shown(raw)} must be a finite number")
        return value

    for key in ("exit", "policy"):  # one value each; str() of a 5-million-item list took 0.7 s
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
            raise InvalidParameters(f"{key}={shown(value)} must be a string or an integer")
    raw_exit = values.get("exit")
    exit_value: int | Literal["last"] | None = None
    if raw_exit is not None:
        text = str(raw_exit).strip().lower()
        if text == "last":
            exit_value = "last"
        else:
            try:
                exit_value = plain_integer(text)
            except ValueError:
                raise InvalidParameters(
                    f"exit={shown(raw_exit)} is not an exit number; accepted: an integer 1..k or 'last'"
                ) from None
    raw_confidence = values.get("confidence")
    policy = values.get("policy")
    return PolicyParams(
        budget_gflops=number("budget_gflops"),
        budget_ms=number("budget_ms"),
        confidence=None if raw_confidence is None else parse_confidence(raw_confidence),  # type: ignore[arg-type]
        exit=exit_value,
        policy=None if policy is None else str(policy),
    )


def effective_params(
    requested: PolicyParams, default: PolicyParams, default_budget_ms: float | None = None
) -> PolicyParams:
    """What a request runs under: its own parameters, else the default policy; plus the
    server-wide deadline when the request itself names neither a deadline nor an exit.

    The server deadline replaces a default ``exit:last`` (a deadline alone already goes
    as deep as the time allows); settings refuse it beside a default ``exit:N``.
    """
    params = default if requested.is_empty() else requested
    if default_budget_ms is None or requested.budget_ms is not None or requested.exit is not None:
        return params
    if params.exit is not None:  # the default policy is exit:last (settings refuse exit:N with a deadline)
        return PolicyParams(budget_ms=default_budget_ms)
    if params.budget_ms is not None:  # the default policy has its own deadline
        return params
    return replace(params, budget_ms=default_budget_ms)


def plan_request(
    params: PolicyParams,
    costs: CostTable,
    idle_cascade_ms: Sequence[float] | None = None,
    idle_single_ms: Sequence[float] | None = None,
) -> Plan:
    """Turn request parameters into a :class:`Plan`, or raise a 422 error.

    ``idle_cascade_ms[i]`` is the idle service time of a cascade ending at exit i+1
    (stages 1..i+1 at batch size 1, no queueing), ``idle_single_ms[i]`` that of exit i+1's
    full-path graph (default: the cascade's); needed only with ``budget_ms``.
    """
    try:
        return _plan(params, costs, idle_cascade_ms, idle_single_ms)
    except InvalidParameters as exc:
        name_cheapest(exc, costs)
        raise


def policy_labels(policy_names) -> list[str]:
    """Every value :attr:`PolicyParams.name` can take for a model with these calibrated policies."""
    return ["none", "exit", "confidence", "budget", "budget_gflops", "budget_ms"] + [
        f"policy:{name}" for name in policy_names
    ]


def name_cheapest(exc: InvalidParameters, costs: CostTable) -> None:
    """Make ``exc`` name the cheapest exit and its cost (DESIGN §4: every 422 of /classify names
    them), unless it already does."""
    cheapest = int(np.argmin(costs.gflops))
    exc.extra.setdefault("cheapest_gflops", float(costs.gflops[cheapest]))
    exc.extra.setdefault("cheapest_exit", cheapest + 1)


def _thresholds(params: PolicyParams, costs: CostTable) -> tuple[float, ...] | None:
    """Per-early-exit thresholds from ``confidence`` or ``policy``; None if neither."""
    k = costs.num_exits
    if params.policy is not None:
        if params.confidence is not None:
            raise InvalidParameters(
                "'policy' brings its own calibrated thresholds and cannot be combined with 'confidence'"
            )
        if params.policy not in costs.policies:
            names = ", ".join(sorted(costs.policies)) or "none (this model's manifest has no calibrated policies)"
            raise InvalidParameters(
                f"unknown policy {shown(params.policy)}; this model's policies: {names}",
                accepted=sorted(costs.policies),
            )
        return costs.policies[params.policy]
    if params.confidence is None:
        return None
    values = params.confidence
    if len(values) not in (1, k - 1):
        raise InvalidParameters(
            f"confidence has {len(values)} values; this model has {k - 1} early exits: give one threshold "
            f"for all of them or {k - 1} comma-separated (the main output always answers)"
        )
    for value in values:
        if not 0.0 <= value <= 1.0:
            raise InvalidParameters(
                f"confidence={value} is out of range; a softmax probability threshold in [0, 1] is accepted"
            )
    return tuple(float(v) for v in cascade.as_thresholds(values if len(values) > 1 else values[0], k))


def _plan(params: PolicyParams, costs: CostTable, idle_cascade_ms, idle_single_ms) -> Plan:
    k = costs.num_exits
    if params.exit is not None:
        others = [n for n in ("budget_gflops", "budget_ms", "confidence", "policy") if getattr(params, n) is not None]
        if others:
            raise InvalidParameters(
                f"'exit' selects one exit and cannot be combined with {', '.join(others)}; "
                "give either exit, or budgets and/or confidence or policy",
                accepted="exit alone, or any of budget_gflops, budget_ms, confidence, policy",
            )
        number = k if params.exit == "last" else params.exit
        if not isinstance(number, int) or not 1 <= number <= k:
            raise InvalidParameters(f"exit={params.exit} is out of range; this model has exits 1..{k}")
        return Plan(mode="single", exit=number)

    thresholds = _thresholds(params, costs)
    for name in ("budget_gflops", "budget_ms"):
        value = getattr(params, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise InvalidParameters(f"{name}={value} must be a positive finite number")

    # A deadline runs as a cascade too: stage by stage, so the service can stop as
    # soon as the next stage would finish too late and still answer from the last exit.
    cascade_mode = thresholds is not None or params.budget_ms is not None
    if params.budget_ms is not None and (idle_cascade_ms is None or len(idle_cascade_ms) != k):
        raise ValueError("budget_ms planning needs an idle service time for every exit")
    # The cost that limits how deep we may go: full path for a single exit, cumulative stage
    # cost for a cascade (see module docstring) — and both for a pure deadline, which answers
    # in one full-path call when that is in time and stage by stage when it is not.
    gflops = costs.cascade_gflops if cascade_mode else costs.gflops
    capped = _deepest_allowed(params, gflops, idle_cascade_ms, cascade_mode)
    if not cascade_mode:
        return Plan(mode="single", exit=capped)
    if thresholds is not None:
        return Plan(mode="cascade", exit=capped, thresholds=thresholds, budget_ms=params.budget_ms)
    single_ms = idle_cascade_ms if idle_single_ms is None else idle_single_ms
    one_call = _deepest_allowed(params, costs.gflops, single_ms, False)
    deepest = max(one_call, capped)
    return Plan(
        mode="cascade",
        exit=deepest,
        thresholds=(cascade.NEVER,) * (k - 1),
        budget_ms=params.budget_ms,
        stage_exit=None if capped == deepest else capped,
    )


def _deepest_allowed(params: PolicyParams, gflops: Sequence[float], idle_ms, stages: bool) -> int:
    """The deepest exit both budgets allow, by these costs and idle times (``stages``: the
    cascade's, which word the 422s); an ImpossibleBudget when not even exit 1 fits."""
    deepest = len(gflops)
    if params.budget_gflops is not None:
        by_gflops = _deepest_within(gflops, params.budget_gflops)
        if by_gflops == 0:
            cheapest = int(np.argmin(gflops)) + 1
            cost = float(gflops[cheapest - 1])
            what = "the first stage of a cascade" if stages else "the cheapest exit"
            raise ImpossibleBudget(
                f"budget_gflops={params.budget_gflops:g} is below {what} "
                f"(exit {cheapest} costs {cost!r} GFLOPs); accepted: budget_gflops >= {rounded_up(cost, 6):g}",
                cheapest_gflops=cost,
                cheapest_exit=cheapest,
            )
        deepest = min(deepest, by_gflops)
    if params.budget_ms is not None:
        by_ms = _deepest_within(idle_ms, params.budget_ms)
        if by_ms == 0:
            idle = float(idle_ms[0])
            raise ImpossibleBudget(
                f"budget_ms={params.budget_ms:g} is below exit 1's service time on an idle server "
                f"({idle:.4g} ms), so no answer can be ready in time; accepted: budget_ms >= "
                f"{rounded_up(idle, 4):.4g} (exit 1 costs {float(gflops[0])!r} GFLOPs; "
                "current estimates: GET /v1/model)",
                idle_exit1_ms=rounded_up(idle, 4),
                cheapest_gflops=float(gflops[0]),
                cheapest_exit=1,
            )
        deepest = min(deepest, by_ms)
    return deepest


def _deepest_within(values: Sequence[float], budget: float) -> int:
    """1-based index of the deepest entry ≤ budget, 0 if none.

    Neither costs nor latency estimates need grow with depth (an exit's head can cost
    more than the rest of the trunk), so every exit is checked rather than bisecting.
    """
    deepest = 0
    for i, value in enumerate(values, start=1):
        # Exact: a cost copied from /v1/model (float → JSON → float) round-trips to the same
        # float, and any slack would let a budget just below a cost spend more than it.
        if value <= budget:
            deepest = i
    return deepest
