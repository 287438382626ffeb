"""The HTTP routes of DESIGN §4: ``/classify``, ``/feedback``, ``/v1/model``, health and metrics.

Module-level routes that receive the shared :class:`~serving.state.AppState` as a dependency
(``state: State``); the Open Inference Protocol routes live in :mod:`serving.oip`. Client errors
are :mod:`serving.errors` types, rendered as ``{"error", "detail"}`` by the app's handlers.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, field_validator

from .body import media_type, read_body_within, read_limited, within
from .errors import (
    JSON_ENCODER,
    ClientDisconnected,
    InvalidParameters,
    NotReady,
    ServingError,
    UnknownRequestId,
    UnsupportedMediaType,
    shown,
    shut_down,
)
from .imageheader import declared_pixels
from .images import decode_off_loop
from .outputs import ranked as ranked_classes
from .policy import PolicyParams, effective_params, name_cheapest, params_from_request
from .query import CLASSIFY_QUERY_OPENAPI, classify_query, refuse_crowded, refuse_unknown
from .service import Outcome
from .state import CLIENT_GONE, AppState, State, arrived_at, state_of

router = APIRouter()

# POST /feedback's JSON: an id (serving.feedback: at most ~1 KiB) and a label. FastAPI reads a
# route's body whole and without a deadline (a 300 MB body was read into memory; a stalled one
# held the connection with no answer); read first under these bounds, FastAPI parses what is cached.
FEEDBACK_MAX_BYTES = 64 * 1024


class BoundedBodyRoute(APIRoute):
    """A route whose body is read within :data:`FEEDBACK_MAX_BYTES` (413) and the server's
    ``body_timeout_s`` (408) before FastAPI parses it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def read_then_handle(request: Request) -> Response:
            declared = media_type(request.headers.get("content-type"))
            if not _is_json(declared):
                # FastAPI parses only application/json and application/*+json; anything else (curl -d
                # sends application/x-www-form-urlencoded, httpx content= sends no type) got its 422
                # quoting the body as "not a valid dictionary".
                said = f"Content-Type {declared} is not accepted" if declared else "the request has no Content-Type"
                raise UnsupportedMediaType(
                    f"{said}; send the body as JSON (-H 'Content-Type: application/json')",
                    accepted=["application/json"],
                )
            timeout_s = state_of(request).settings.body_timeout_s
            advice = "a feedback body is an id and a label"
            request._body = await within(read_limited(request, FEEDBACK_MAX_BYTES, advice), timeout_s)
            return await handler(request)

        return read_then_handle


def _is_json(media: str) -> bool:
    """Whether FastAPI reads a body of this media type as JSON (application/json, application/*+json)."""
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


class TopKEntry(BaseModel):
    label: int
    class_name: str
    probability: float


class ClassifyResponse(BaseModel):
    id: str = Field(description="request id; POST it to /feedback with the true label")
    exit: int = Field(description="the exit that answered (1..k; k is the main output)")
    label: int
    class_name: str
    probability: float
    top_k: list[TopKEntry]
    gflops: float = Field(description="GFLOPs actually spent (cascade: every stage run)")
    exits_evaluated: list[int]
    policy: str
    latency_ms: float = Field(description="server-side time for the whole request")
    inference_ms: float = Field(description="time in the model: queueing, batching and inference")
    deadline_met: bool | None = Field(
        None,
        description="present whenever a deadline applied (budget_ms or the server's default_budget_ms): "
        "whether the answer was ready in time",
    )


class FeedbackRequest(BaseModel):
    id: str = Field(description="the id returned by POST /classify")
    label: int | str = Field(description="true class, as index or class name")

    @field_validator("label", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        # JSON true/false are not integers (JSON Schema says so too), but pydantic would take them as
        # class 1/0 and use up the id. 1.0 is an integer to JSON Schema, and stays one.
        if isinstance(value, bool):
            raise ValueError("a boolean is not a class; give a class index or a class name")
        return value


class ErrorBody(BaseModel):
    error: str
    detail: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in codes}


IMAGE_BODY = {
    "required": True,
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=_errors(400, 408, 413, 415, 422, 503),
    openapi_extra={"parameters": CLASSIFY_QUERY_OPENAPI, "requestBody": IMAGE_BODY},
)
async def classify(request: Request) -> Response:
    """Classify the image in the body (raw image bytes, or multipart field ``file``)."""
    arrived = arrived_at(request)
    state = state_of(request)  # not a dependency: the hot path skips FastAPI's solving (serving/state.py)
    remembered = state.parsed_queries.get(request.scope["query_string"])
    settings = state.settings

    def note(policy: str, exit_label: str) -> None:  # for the request log
        request.state.policy, request.state.exit = policy, exit_label

    payload = await answer_classify(
        state,
        lambda: remembered or _params_and_top_k(state, request),
        # The whole body arrives before the request takes an admission slot, so slow
        # uploads wait outside capacity; the read deadline bounds how long they may take.
        lambda: read_body_within(request, settings.max_body_bytes, settings.body_timeout_s),
        arrived,
        note,
        gone=request.scope.get(CLIENT_GONE),
    )
    # X-Request-ID, the correlation id: serving/requestlog.py.
    return Response(payload, media_type="application/json")


async def answer_classify(
    state: AppState,
    parse: Callable[[], tuple[PolicyParams, int]],
    read_body: Callable[[], Awaitable[tuple[bytes, str | None]]],
    arrived: float,
    note: Callable[[str, str], None],
    arrival_counted: bool = False,
    gone: Callable[[], bool] | None = None,
) -> bytes:
    """A /classify answer's JSON bytes; client errors raise :class:`ServingError`. One body for
    both ways a request arrives: the ASGI route above and the HTTP protocol's own path
    (serving/fastpath.py). ``parse``: the policy parameters and ``top_k`` (remembered, or parsed
    and checked: a 422 raised there is counted); ``read_body``: the image and its declared type; ``note(policy, exit)``:
    the labels for the request log, called once the request ends; ``arrival_counted``: the caller
    counted the request in the service's ``arrived`` until ``read_body`` returned; ``gone()``: whether
    the client has left (its answer is then counted as nginx's 499, not as a 200 nobody read), read from
    the connection without yielding: asking ASGI's way, by awaiting ``receive``, would let a batch's held
    answers go out before the last of them is ready (serving/transport.py)."""
    loop = asyncio.get_running_loop()
    metrics = state.metrics
    exit_label, policy_label, status = "none", "none", 500
    try:
        try:
            params, k = parse()
        except InvalidParameters as exc:  # a value not of its type, unknown or repeated, top_k < 1, ...
            if state.service is not None:
                name_cheapest(exc, state.service.costs)
            raise
        service, preprocess = state.require_model()
        plan = service.plan(params)
        # Labelled only once the plan is valid: a refused policy name is the client's text, and a
        # label per typo would grow the metric without bound.
        policy_label = params.name
        data, content_type = await read_body()
        with service.admit(arrival_counted) as ticket:
            x = await decode_off_loop(len(data), lambda: preprocess(data, content_type), declared_pixels(data))
            deadline = None if plan.budget_ms is None else arrived + plan.budget_ms / 1e3
            outcome = await service.run(x, plan, ticket, deadline)
        ranked = ranked_classes(outcome.logits, k)
        manifest = service.runtime.manifest
        request_id = state.signer.issue(manifest.name, outcome.exit, ranked[0][0])
        exit_label, status = str(outcome.exit), 200
        elapsed = time.perf_counter() - arrived
        outcome.answered_at(arrived + elapsed, deadline)  # latency_ms and eed_deadline_total agree
        # The metrics after the answer is written: nothing between here and the socket write
        # yields to the event loop, so the loop runs them right after it, before any later
        # request (a scrape included). A lone request's p50 no longer carries them.
        left = gone is not None and gone()  # clients that time out and leave show as 499s, not 200s
        if left:  # the work was done, but nobody received an answer to be in time or late
            outcome.deadline_met = None
        loop.call_soon(metrics.record_answer, outcome, policy_label, elapsed)
        if left:
            raise ClientDisconnected("client disconnected before the answer was sent")
        return answer_json(request_id, outcome, ranked, manifest.classes, policy_label, elapsed)
    except ServingError as exc:
        status = exc.status_code
        raise
    except asyncio.CancelledError:
        # The graceful shutdown gave up on it (a body still arriving): answered as 503 on both paths
        # (the app's handler, the protocol's own), not with uvicorn's bare 500.
        error = shut_down()
        status = error.status_code
        raise error from None
    finally:
        loop.call_soon(metrics.count_request, exit_label, policy_label, str(status))
        note(policy_label, exit_label)


async def feedback(item: FeedbackRequest, state: State) -> dict[str, Any]:
    """Record the true label of an earlier answer (any replica sharing EED_FEEDBACK_SECRET accepts its id);
    counts it in eed_feedback_total{exit, correct}."""
    manifest = state.require_service().runtime.manifest
    claim = state.signer.verify(item.id)
    if claim.model != manifest.name:
        raise UnknownRequestId(f"this id was issued for model {claim.model!r}; this server serves {manifest.name!r}")
    if not (1 <= claim.exit <= manifest.num_exits and 0 <= claim.label < len(manifest.classes)):
        # Signed with the shared secret, so issued by a replica, but for a model of another shape under
        # the same name: counting it would add an exit="9" series or a label no class has.
        raise UnknownRequestId(
            f"this id names exit {claim.exit} and class {claim.label}; model {manifest.name!r} here has exits "
            f"1..{manifest.num_exits} and classes 0..{len(manifest.classes) - 1} (an id from another version of it?)"
        )
    true_label = class_index(item.label, manifest.classes)
    correct, accuracy = state.feedback.record(claim, true_label)
    state.metrics.record_feedback(claim.exit, correct)
    return {
        "id": item.id,
        "exit": claim.exit,
        "predicted": claim.label,
        "label": true_label,
        "correct": correct,
        "live_accuracy": accuracy,
    }


router.add_api_route(
    "/feedback",
    feedback,
    methods=["POST"],
    responses=_errors(403, 404, 408, 409, 410, 413, 415, 422, 503),
    route_class_override=BoundedBodyRoute,
)


@router.get("/v1/model")
async def model_info(state: State) -> dict[str, Any]:
    """The manifest as served, with the provider, the calibrated policies and live latency estimates."""
    service = state.require_service()
    runtime, settings = service.runtime, state.settings
    single, cascade = service.latency_estimates_ms()
    idle_single, idle_cascade = service.idle_service_ms()
    live = state.feedback.live_accuracy()
    manifest = runtime.manifest.model_dump(mode="json")
    for entry, s, c, idle_s, idle_c in zip(manifest["exits"], single, cascade, idle_single, idle_cascade):
        entry["latency_estimate_ms"] = round(s, 4)
        entry["cascade_latency_estimate_ms"] = round(c, 4)
        entry["idle_service_ms"] = round(idle_s, 4)
        entry["idle_cascade_service_ms"] = round(idle_c, 4)
        entry["live_accuracy"] = live.get(entry["exit"])
    return {
        "manifest": manifest,
        "model_dir": str(runtime.model_dir),
        "provider": runtime.provider,
        "default_policy": settings.default_policy,
        "default_budget_ms": settings.default_budget_ms,
        # The manifest's calibrated policies, as dumped above; listed again by name for clients.
        "policies": (manifest.get("thresholds") or {}).get("policies", {}),
        "latency": {
            "queue_delay_ms": round(service.queue_delay_s() * 1e3, 4),
            "prediction_gap_ms": round(service.prediction_gap.value() * 1e3, 4),
            "half_life_s": settings.estimate_half_life_s,
            "probe_interval_s": settings.probe_interval_s,
        },
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            # How long clients just answered are expected back (batching.Settle; 0 on a GPU).
            "settle_ms": service.settle.window_s * 1e3,
            "queue_size": settings.queue_size,
            "inline_max_ms": settings.inline_max_ms,
            "lone_on_event_loop": service.lone_on_event_loop(),
            # GPU providers: every batch padded to max_batch_size (one input shape per session).
            "padded_to": service.exit_workers[0].pad_to,
        },
        "stage_chain_max_abs_diff": runtime.consistency,
        "cascade_graph": {"setting": settings.cascade_graph, "runs": state.cascade_graph},
        "lone_requests": runtime.lone_sessions,  # what a request alone on the server runs on
    }


@router.get("/healthz")
async def healthz(state: State) -> dict[str, Any]:
    """The process is up (says nothing about the model)."""
    return {"status": "ok", "phase": state.phase}


@router.get("/readyz", responses=_errors(503))
async def readyz(state: State) -> dict[str, Any]:
    """200 once the model is loaded and every graph is warm; 503 before, if loading failed, and
    from the moment a drain (SIGTERM) begins."""
    if state.draining:
        raise NotReady("the server is draining before it shuts down; send requests to another replica")
    runtime = state.require_service().runtime
    return {"status": "ready", "model": runtime.manifest.name, "provider": runtime.provider}


@router.get("/metrics")
async def metrics_endpoint(state: State) -> Response:
    """Prometheus text exposition of the ``eed_`` metrics."""
    if state.service is not None:
        state.service.publish_estimates()
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _params_and_top_k(state: AppState, request: Request) -> tuple[PolicyParams, int]:
    """The policy parameters and ``top_k`` of a /classify query, refused with 422 when invalid;
    valid ones are remembered by query string (``AppState.parsed_queries``)."""
    settings = state.settings
    refuse_crowded(request.scope["query_string"])
    query = classify_query(request.query_params)
    refuse_unknown(request.query_params)
    params = effective_params(params_from_request(query), state.default_params, settings.default_budget_ms)
    k = settings.default_top_k if query["top_k"] is None else query["top_k"]
    if k < 1:
        raise InvalidParameters(f"top_k={k} must be at least 1")
    state.parsed_queries.put(request.scope["query_string"], (params, k))
    return params, k


def _number(value: float) -> str:
    """A number as JSONEncoder writes it: ``float.__repr__`` for floats (numpy float64s too, which
    ``repr`` would spell ``np.float64(...)``), ``int.__repr__`` for integers."""
    return float.__repr__(value) if isinstance(value, float) else int.__repr__(int(value))


def answer_json(
    request_id: str,
    outcome: Outcome,
    ranked: list[tuple[int, float]],
    classes: list[str],
    policy: str,
    elapsed_s: float,
) -> bytes:
    """The /classify response body (DESIGN §4 keys, plus inference_ms; :class:`ClassifyResponse`):
    the bytes ``JSON_ENCODER`` gives for the body as a dict, key order included, written from a
    template. The generic encoder walks a dict of nested dicts and lists after every ORT run, where
    its code starts cold (docs/request-path-profile.md, tenth session). ``request_id`` is one of
    :class:`~serving.feedback.AnswerSigner`'s tokens (URL-safe characters and dots: nothing to escape)."""
    latency_ms, inference_ms = round(elapsed_s * 1e3, 3), round(outcome.seconds * 1e3, 3)
    numbers = [probability for _, probability in ranked]
    numbers += (outcome.gflops, latency_ms, inference_ms)
    if not all(map(math.isfinite, numbers)):  # as JSON_ENCODER (allow_nan=False) refuses them
        raise ValueError(f"Out of range float values are not JSON compliant: {numbers}")
    name = JSON_ENCODER.encode  # a str: one C call
    top_k = ",".join(
        f'{{"label":{int(i)},"class_name":{name(classes[i])},"probability":{_number(p)}}}' for i, p in ranked
    )
    label, probability = ranked[0]
    deadline = "" if outcome.deadline_met is None else f',"deadline_met":{"true" if outcome.deadline_met else "false"}'
    return (
        f'{{"id":"{request_id}","exit":{int(outcome.exit)},"label":{int(label)},"class_name":{name(classes[label])},'
        f'"probability":{_number(probability)},"top_k":[{top_k}],"gflops":{_number(outcome.gflops)},'
        f'"exits_evaluated":[{",".join(str(int(e)) for e in outcome.exits_evaluated)}],'
        f'"policy":{name(policy)},"latency_ms":{_number(latency_ms)},'
        f'"inference_ms":{_number(inference_ms)}{deadline}}}'
    ).encode()


def class_index(label: int | str, classes: list[str]) -> int:
    """A feedback label (index, class name, or an index as text) as a class index; 422 otherwise."""
    if isinstance(label, int):
        if 0 <= label < len(classes):
            return label
        raise InvalidParameters(f"label={label} is out of range; accepted: 0..{len(classes) - 1} or a class name")
    if label in classes:
        return classes.index(label)
    digits = label.strip()
    # ASCII digits only, as the OpenAPI pattern says: str.isdigit() is also true of '³', which int() refuses.
    if digits.isascii() and digits.isdigit():
        if len(digits.lstrip("0")) > len(str(len(classes))):  # out of range; int() refuses > 4,300 digits
            raise InvalidParameters(
                f"label {shown(label)} is out of range; accepted: 0..{len(classes) - 1} or a class name"
            )
        return class_index(int(digits), classes)
    raise InvalidParameters(
        f"label {shown(label)} is not a class of this model; accepted: 0..{len(classes) - 1} or one of {classes}"
    )
