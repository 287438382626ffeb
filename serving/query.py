"""/classify's query parameters: their types, their OpenAPI entries, and the parser.

They are parsed by :func:`classify_query` rather than declared as FastAPI ``Query`` arguments:
FastAPI's per-request parameter solving was a quarter of the event loop's CPU per request
(docs/request-path-profile.md). The same pydantic types accept and refuse the same values, and a
refusal reads as a declared parameter's would (``describe_validation_errors``), but is raised as
:class:`InvalidParameters` inside the request's handling: counted in ``eed_requests_total`` and
naming the cheapest cost like every other 422 of /classify.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .errors import InvalidParameters, describe_validation_errors, listed

# (name, type, description)
CLASSIFY_QUERY: tuple[tuple[str, type, str], ...] = (
    ("budget_gflops", float, "deepest exit whose cost ≤ this many GFLOPs"),
    (
        "budget_ms",
        float,
        "deadline in ms from arrival: the deepest exit that can be ready in time; under load an "
        "earlier exit, with deadline_met in the answer",
    ),
    (
        "confidence",
        str,
        "cascade: stop at the first exit whose top probability ≥ threshold (0..1); one number, "
        "or one per early exit (e.g. 0.65,0.43,0.33)",
    ),
    ("policy", str, "a calibrated policy's name (GET /v1/model lists them)"),
    ("exit", str, "this exit: 1..k, or 'last'"),
    ("top_k", int, "classes to return (capped at the number of classes)"),
)
CLASSIFY_PARAMS = frozenset(name for name, _, _ in CLASSIFY_QUERY)
_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    name: TypeAdapter(kind) for name, kind, _ in CLASSIFY_QUERY if kind is not str
}
_JSON_TYPES = {float: "number", int: "integer", str: "string"}

# The OpenAPI entries a FastAPI ``Query(None)`` declaration of each would produce.
CLASSIFY_QUERY_OPENAPI = [
    {
        "name": name,
        "in": "query",
        "required": False,
        "description": text,
        "schema": {
            "anyOf": [{"type": _JSON_TYPES[kind]}, {"type": "null"}],
            "description": text,
            "title": name.replace("_", " ").title(),
        },
    }
    for name, kind, text in CLASSIFY_QUERY
]


def classify_query(query: Mapping[str, str]) -> dict[str, Any]:
    """/classify's query parameters as typed values (None when absent).

    Raises InvalidParameters listing every value that is not of its type, in the words a FastAPI
    ``Query`` declaration's 422 would use.
    """
    values: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for name, _, _ in CLASSIFY_QUERY:
        raw = query.get(name)
        adapter = _ADAPTERS.get(name)
        if raw is None or adapter is None:
            values[name] = raw
            continue
        try:
            if "_" in raw:  # pydantic reads digit separators: '0_5' would be 5, a typo's other exit
                adapter.validate_python(f"{raw}?")  # the refusal its own words give a non-number
            values[name] = adapter.validate_python(raw)
        except ValidationError as exc:
            errors += [{**err, "loc": ("query", name), "input": raw} for err in exc.errors(include_url=False)]
    if errors:
        raise InvalidParameters(describe_validation_errors(errors))
    return values


# /classify takes six parameters; a query of thousands of pairs (64 kB of them took 20 ms of the
# event loop's CPU to parse) is refused by a count in C before it is parsed.
MAX_QUERY_PAIRS = 32


def refuse_crowded(query_string: bytes) -> None:
    """422 for a query of more than MAX_QUERY_PAIRS pairs, before it is parsed."""
    pairs = query_string.count(b"&") + 1
    if pairs > MAX_QUERY_PAIRS:
        raise InvalidParameters(
            f"the query has {pairs} parameters; /classify takes {len(CLASSIFY_PARAMS)}, each at most once: "
            f"{', '.join(sorted(CLASSIFY_PARAMS))}"
        )


def refuse_unknown(query: Mapping[str, str]) -> None:
    """422 naming any query parameter /classify does not take (a typo must not be ignored), and any
    given more than once (``?exit=abc&exit=2`` would run exit 2 without a word about the first)."""
    unknown = [name for name in query if name not in CLASSIFY_PARAMS]
    if unknown:
        names = listed(unknown)
        raise InvalidParameters(f"unknown query parameter(s) {names}; accepted: {', '.join(sorted(CLASSIFY_PARAMS))}")
    multi_items = getattr(query, "multi_items", None)  # Starlette's QueryParams keeps every repeat
    if multi_items is not None:
        counts = Counter(name for name, _ in multi_items())
        repeated = sorted(name for name, n in counts.items() if n > 1)
        if repeated:
            raise InvalidParameters(
                "query parameter(s) given more than once: "
                + ", ".join(f"{name} ({counts[name]} times)" for name in repeated)
                + "; give each once"
            )
