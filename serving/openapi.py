"""The OpenAPI document, made exact: what the schema allows, the server accepts, and back.

FastAPI derives a schema from the route signatures; that schema is close but not the
contract: it cannot know the model (cheapest cost, number of exits, classes,
calibrated policies), it documents FastAPI's own 422 body instead of ours, and it says
nothing about the Open Inference Protocol routes, which parse their bodies themselves.
:func:`install` replaces ``app.openapi`` with a builder that starts from FastAPI's
schema and states, once the model is loaded:

* ``/classify``: the policy parameters as one exploded query object, so that JSON
  Schema can say which combinations are contradictory (``exit`` with anything else,
  ``policy`` with ``confidence``), budgets with the model's lower bounds, ``exit`` in
  1..k or ``last``, ``confidence`` as one threshold or one per early exit in [0, 1],
  ``policy`` among the manifest's calibrated names; image bodies by media type.
* ``/feedback``: the label domain (0..classes-1 or a class name), every status.
* ``/metrics`` as ``text/plain``; error bodies as ``{"error", "detail"}``.
* ``/v2/...``: the protocol's requests, responses and ``{"error": "..."}`` bodies
  (:mod:`serving.openapi_oip`).
* ``X-Request-ID`` on every operation and response.

Until the model is ready the model-dependent parts are left generic and nothing is
cached, so a client that fetches the schema early and again later gets the exact one.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .openapi_oip import describe_oip
from .requestlog import ID_PATTERN, MAX_ID_CHARS

ERROR = {"$ref": "#/components/schemas/ErrorBody"}
OIP_ERROR = {"$ref": "#/components/schemas/OipError"}
REQUEST_ID_HEADER = {"$ref": "#/components/headers/X-Request-ID"}
# Image types with a body a generic client can produce; the server also takes BMP, TIFF,
# application/octet-stream and untyped bodies (the format is read from the bytes).
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")

# What each operation can answer besides 200 (every one of these codes is reachable).
STATUSES = {
    ("post", "/classify"): (400, 408, 413, 415, 422, 503),
    ("post", "/feedback"): (400, 403, 404, 408, 409, 410, 413, 415, 422, 503),
    ("get", "/v1/model"): (503,),
    ("get", "/healthz"): (),
    ("get", "/readyz"): (503,),
    ("get", "/metrics"): (),
    ("get", "/v2"): (),
    ("get", "/v2/health/live"): (),
    ("get", "/v2/health/ready"): (400,),  # the protocol's "false" is a 4xx
    ("get", "/v2/models/{name}"): (404, 503),
    ("get", "/v2/models/{name}/ready"): (400, 404),
    ("get", "/v2/models/{name}/config"): (404, 503),
    ("post", "/v2/models/{name}/infer"): (400, 404, 408, 413, 503),
    ("get", "/v2/models/{name}/versions/{version}"): (404, 503),
    ("get", "/v2/models/{name}/versions/{version}/ready"): (400, 404),
    ("get", "/v2/models/{name}/versions/{version}/config"): (404, 503),
    ("post", "/v2/models/{name}/versions/{version}/infer"): (400, 404, 408, 413, 503),
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def install(app: FastAPI) -> None:
    """Serve the exact schema at /openapi.json (and /docs)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        service = app.state.eed.service
        exact = build(schema, app.state.eed.settings, service)
        if service is not None:  # model-aware: final
            app.openapi_schema = exact
        return exact

    app.openapi = openapi  # type: ignore[method-assign]


def build(schema: dict[str, Any], settings, service) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["ErrorBody"] = {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {"type": "string", "description": "stable machine-readable code"},
            "detail": {"type": "string", "description": "what was wrong and what is accepted"},
        },
        "description": "A client error; some carry more keys (e.g. cheapest_gflops with a 422 on a budget).",
    }
    schemas["OipError"] = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    components["headers"] = {
        "X-Request-ID": {
            "description": "the request's correlation id: the client's X-Request-ID when acceptable, else a new one",
            "schema": {"type": "string", "pattern": f"^{ID_PATTERN}$"},
        }
    }

    paths = schema["paths"]
    _classify(paths["/classify"]["post"], schemas, settings, service)
    _feedback(paths["/feedback"]["post"], schemas, service)
    paths["/metrics"]["get"]["responses"]["200"]["content"] = {
        "text/plain": {"schema": {"type": "string", "description": "Prometheus text exposition format"}}
    }
    describe_oip(paths, schemas, service, settings.model_name)

    for (method, path), codes in STATUSES.items():
        operation = paths[path][method]
        responses = operation["responses"]
        for code in list(responses):
            if code != "200" and int(code) not in codes:
                del responses[code]  # FastAPI's generic 422 where nothing can be invalid
        oip = path.startswith("/v2")
        for code in codes:
            readiness_false = code == 400 and path.endswith("/ready")  # the protocol's "false", not a bad request
            described = "not ready: loading, warming up or draining" if readiness_false else _describe(code)
            entry = responses.setdefault(str(code), {"description": described})
            entry["content"] = {"application/json": {"schema": OIP_ERROR if oip else ERROR}}
            if code == 503:
                entry["headers"] = dict(RETRY_AFTER)
        for entry in responses.values():
            entry.setdefault("headers", {})["X-Request-ID"] = REQUEST_ID_HEADER
        operation.setdefault("parameters", []).append(
            {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": f"correlation id, echoed: 1-{MAX_ID_CHARS} visible ASCII characters (! to ~, no space); "
                "anything else is replaced by a new id (not refused)",
                "schema": {"type": "string"},
            }
        )
    _heads(paths)
    return schema


def _heads(paths: dict[str, Any]) -> None:
    """HEAD beside every GET (serving/app.py answers it as GET without the body: uptime monitors and
    proxies send HEAD), declared with the GET's parameters, statuses and headers, and no content."""
    for item in paths.values():
        get = item.get("get")
        if get is None or "head" in item:
            continue
        head = copy.deepcopy(get)
        head["operationId"] = f"{get.get('operationId', 'get')}_head"
        head["summary"] = f"{get.get('summary', '')} (headers only)".strip()
        for response in head.get("responses", {}).values():
            response.pop("content", None)
        item["head"] = head


def _describe(code: int) -> str:
    return {
        400: "malformed request or body",
        403: "id not issued by this deployment (forged or altered)",
        404: "unknown id or model",
        408: "the body did not arrive within body_timeout_s",
        409: "conflict",
        410: "the id has expired",
        413: "body or image too large",
        415: "not an accepted media type",
        422: "invalid or contradictory parameters",
        503: "not ready, draining or at capacity; retry after Retry-After seconds",
    }[code]


# -- /classify ---------------------------------------------------------------------------


# A threshold in [0, 1] as the server reads it (float() after strip): decimals, with
# leading zeros, an optional plus sign, and signed zeros.
_THRESHOLD = r"\s*(?:\+?(?:0+(?:\.[0-9]*)?|\.[0-9]+|0*1(?:\.0*)?)|-(?:0+(?:\.0*)?|\.0+))\s*"


def _threshold_pattern(k: int) -> str:
    one = f"(?:{_THRESHOLD})"
    if k <= 2:
        return f"^{one}$"
    return f"^{one}(?:{(',' + one) * (k - 2)})?$"


def _classify(operation: dict, schemas: dict, settings, service) -> None:
    described = {p["name"]: p.get("description", "") for p in operation.get("parameters", [])}
    properties: dict[str, Any] = {
        "budget_gflops": {"type": "number", "exclusiveMinimum": 0},
        "budget_ms": {"type": "number", "exclusiveMinimum": 0},
        "confidence": {"type": "string"},
        "policy": {"type": "string"},
        "exit": {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "enum": ["last"]}]},
        "top_k": {"type": "integer", "minimum": 1},
    }
    rules: list[dict] = []
    if service is not None:
        costs = service.costs
        k = costs.num_exits
        properties["exit"]["oneOf"][0]["maximum"] = k
        properties["confidence"]["pattern"] = _threshold_pattern(k)
        names = sorted(costs.policies)
        properties["policy"] = {"type": "string", "enum": names} if names else {"not": {}}
        # The planner compares budgets with costs exactly (serving/policy.py): the cheapest cost is the minimum.
        single_min = min(costs.gflops)
        cascade_min = min(costs.cascade_gflops)
        # A cascade (confidence, policy or a deadline) is bounded by what it spends, from stage 1 on.
        cascade_when: list[dict[str, Any]] = [
            {"required": ["confidence"]},
            {"required": ["policy"]},
            {"required": ["budget_ms"]},
        ]
        if settings.default_budget_ms is not None:
            cascade_when.append({"not": {"required": ["exit"]}})
        properties["budget_gflops"] = {"type": "number", "minimum": min(single_min, cascade_min)}
        if service.deadline_floor_ms is not None:  # fixed at start-up (serving/service.py)
            properties["budget_ms"] = {"type": "number", "minimum": service.deadline_floor_ms}
        if cascade_min != single_min:
            rules.append(
                {
                    "if": {"anyOf": cascade_when},
                    "then": {"properties": {"budget_gflops": {"minimum": cascade_min}}},
                    "else": {"properties": {"budget_gflops": {"minimum": single_min}}},
                }
            )
    for name, prop in properties.items():
        if described.get(name):
            prop["description"] = described[name]
    contradictions = [["exit", other] for other in ("budget_gflops", "budget_ms", "confidence", "policy")]
    contradictions.append(["policy", "confidence"])
    schemas["ClassifyParameters"] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "not": {"anyOf": [{"required": pair} for pair in contradictions]},
        **({"allOf": rules} if rules else {}),
        "description": "How to pick the exit; all optional (none: the server's default policy). 'exit' stands "
        "alone; 'policy' and 'confidence' exclude each other.",
    }
    operation["parameters"] = [
        {
            "name": "selection",
            "in": "query",
            "required": False,
            "style": "form",
            "explode": True,
            "schema": {"$ref": "#/components/schemas/ClassifyParameters"},
            "description": "query parameters budget_gflops, budget_ms, confidence, policy, exit, top_k",
        }
    ]
    binary = {"schema": {"type": "string", "format": "binary"}}
    operation["requestBody"] = {
        "required": True,
        # Only bodies whose every schema-valid instance is an image are documented: a generic
        # binary (octet-stream, a multipart file part) admits bytes that are no image at all.
        "description": "the image file as the body, typed with its media type. Also accepted, not described "
        "here: BMP and TIFF, application/octet-stream or untyped bodies (the format is read from "
        "the bytes), and multipart/form-data with the image in field 'file'",
        "content": {t: binary for t in IMAGE_TYPES},
    }


# -- /feedback ------------------------------------------------------------------------------


def _feedback(operation: dict, schemas: dict, service) -> None:
    label: dict[str, Any] = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "minLength": 1}]}
    if service is not None:
        classes = list(service.runtime.manifest.classes)
        label = {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": len(classes) - 1},
                {"type": "string", "enum": classes},
                {"type": "string", "pattern": r"^\s*0*(?:" + "|".join(map(str, range(len(classes)))) + r")\s*$"},
            ]
        }
    label["description"] = "the true class: index or class name"
    request = schemas["FeedbackRequest"]
    request["properties"]["id"] = {
        "type": "string",
        "minLength": 1,
        "description": "the id of a /classify answer (or an OIP feedback_id)",
    }
    request["properties"]["label"] = label
    schemas["FeedbackAnswer"] = {
        "type": "object",
        "required": ["id", "exit", "predicted", "label", "correct", "live_accuracy"],
        "properties": {
            "id": {"type": "string"},
            "exit": {"type": "integer"},
            "predicted": {"type": "integer"},
            "label": {"type": "integer"},
            "correct": {"type": "boolean"},
            "live_accuracy": {"type": "number", "description": "this replica's count since start"},
        },
    }
    operation["responses"]["200"]["content"] = {
        "application/json": {"schema": {"$ref": "#/components/schemas/FeedbackAnswer"}}
    }
