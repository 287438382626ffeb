"""The HTTP API (DESIGN §4): ``create_app(settings)`` builds the FastAPI application.

The model loads in the background once the app starts, so ``/healthz`` answers at
once and ``/readyz`` turns 200 only when every graph is loaded, checked and warm.
Client errors are :mod:`serving.errors` types rendered as ``{"error", "detail"}``
JSON; FastAPI's own validation and routing errors are rendered the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import BadRequest, InvalidParameters, NotReady, ServingError, UnknownRequestId
from .feedback import AnswerSigner, FeedbackStore
from .fused import attach_fused_cascade
from .images import Preprocessor
from .metrics import ServingMetrics
from .oip import router as oip_router
from .openapi import install as install_openapi
from .policy import PolicyParams, effective_params, params_from_request, top_k as top_k_classes
from .body import read_body_within
from .runtime import ModelRuntime, SessionOptions
from .requestlog import install as install_request_ids
from .service import InferenceService
from .settings import ServerSettings

log = logging.getLogger("serving")

CLASSIFY_PARAMS = {"budget_gflops", "budget_ms", "confidence", "exit", "policy", "top_k"}
# /classify's query parameters: (name, type, description). They are parsed by
# :func:`classify_query` rather than declared as FastAPI ``Query`` arguments: FastAPI's
# per-request parameter solving was a quarter of the event loop's CPU per request
# (docs/request-path-profile.md); the same pydantic types accept and refuse the same values.
CLASSIFY_QUERY = (
    ("budget_gflops", float, "deepest exit whose cost ≤ this many GFLOPs"),
    ("budget_ms", float, "deadline in ms from arrival: the deepest exit that can be ready in time; under load an "
     "earlier exit, with deadline_met in the answer"),
    ("confidence", str, "cascade: stop at the first exit whose top probability ≥ threshold (0..1); one number, "
     "or one per early exit (e.g. 0.65,0.43,0.33)"),
    ("policy", str, "a calibrated policy's name (GET /v1/model lists them)"),
    ("exit", str, "this exit: 1..k, or 'last'"),
    ("top_k", int, "classes to return (capped at the number of classes)"),
)
_QUERY_ADAPTERS = {name: TypeAdapter(kind) for name, kind, _ in CLASSIFY_QUERY if kind is not str}
_JSON_TYPES = {float: "number", int: "integer", str: "string"}
CLASSIFY_QUERY_OPENAPI = [
    {"name": name, "in": "query", "required": False, "description": text,
     "schema": {"anyOf": [{"type": _JSON_TYPES[kind]}, {"type": "null"}], "description": text,
                "title": name.replace("_", " ").title()}}
    for name, kind, text in CLASSIFY_QUERY
]


def classify_query(query) -> dict[str, Any]:
    """/classify's query parameters as typed values (None when absent).

    Raises RequestValidationError — rendered like every 422 — listing every value that is
    not of its type, exactly as a FastAPI ``Query`` declaration would.
    """
    values: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for name, _, _ in CLASSIFY_QUERY:
        raw = query.get(name)
        adapter = _QUERY_ADAPTERS.get(name)
        if raw is None or adapter is None:
            values[name] = raw
            continue
        try:
            values[name] = adapter.validate_python(raw)
        except ValidationError as exc:
            errors += [{**err, "loc": ("query", name)} for err in exc.errors(include_url=False)]
    if errors:
        raise RequestValidationError(errors)
    return values
# Bodies above this are decoded in a worker thread: a camera-sized JPEG takes tens of
# ms to decode, which would stall every other request on the event loop; tiny images
# decode faster than a thread hop.
INLINE_DECODE_BYTES = 64 * 1024


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
        None, description="present whenever a deadline applied (budget_ms or the server's default_budget_ms): "
        "whether the answer was ready in time")


class FeedbackRequest(BaseModel):
    id: str = Field(description="the id returned by POST /classify")
    label: int | str = Field(description="true class, as index or class name")


class ErrorBody(BaseModel):
    error: str
    detail: str


class AppState:
    """Everything the routes share; ``service`` is None until the model is ready."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = ServingMetrics()
        self.feedback = FeedbackStore(settings.feedback_capacity)
        secret = settings.feedback_secret
        self.signer = AnswerSigner(secret.get_secret_value().encode() if secret else None,
                                   settings.feedback_max_age_s)
        self.default_params: PolicyParams = settings.default_policy_params
        self.runtime: ModelRuntime | None = None
        self.service: InferenceService | None = None
        self.preprocess: Preprocessor | None = None
        self.load_error: str | None = None
        self.phase = "starting"
        self.started_at = time.time()
        self.ready_at: float | None = None
        # Set on SIGTERM (serving/drain.py): /readyz answers 503 while requests are still served.
        self.draining = False
        # Called with the error message when loading fails; the CLI uses it to exit.
        self.on_load_failure: Callable[[str], None] | None = None

    def require_service(self) -> InferenceService:
        if self.service is None:
            if self.load_error:
                raise NotReady(f"model failed to load: {self.load_error}")
            raise NotReady(f"model is not ready yet ({self.phase}); poll GET /readyz")
        return self.service


async def load_model(state: AppState) -> None:
    """Load, check, warm and calibrate the model, then start serving it."""
    settings = state.settings
    loop = asyncio.get_running_loop()
    try:
        state.phase = "loading graphs"
        runtime = await loop.run_in_executor(
            None, ModelRuntime.load, settings.model_dir, SessionOptions.from_settings(settings)
        )
        state.phase = "warming up"
        await loop.run_in_executor(None, runtime.warm_up, settings.max_batch_size, settings.warmup_runs)
        await loop.run_in_executor(None, runtime.check_consistency)
        await loop.run_in_executor(None, attach_fused_cascade, runtime, settings.cascade_graph,
                                   SessionOptions.from_settings(settings), settings.max_batch_size)
        state.phase = "calibrating latency"
        timings = await loop.run_in_executor(
            None, runtime.calibrate, settings.calibration_runs, (1, settings.max_batch_size)
        )
        service = InferenceService.from_settings(runtime, state.metrics, settings)
        service.seed_latency(timings)
        # A default policy the model cannot satisfy (exit:7 on 3 exits, a budget below
        # exit 1) is a configuration error: fail now, not on the first request.
        try:
            service.plan(state.default_params)
        except ServingError as exc:
            raise ValueError(f"default_policy {settings.default_policy!r} does not fit this model: {exc.detail}")
        await service.start()
        state.metrics.describe_model(runtime.manifest, runtime.provider)
        state.metrics.describe_build(runtime.manifest, admitted=lambda: service.inflight, limit=settings.queue_size)
        state.runtime = runtime
        state.preprocess = Preprocessor.from_spec(runtime.manifest.input, settings.max_pixels)
        state.service = service
        state.phase = "ready"
        state.ready_at = time.time()
        state.metrics.ready.set(1)
        log.info(
            "model %s ready: %d exits on %s, %.1f s after start",
            runtime.manifest.name, runtime.manifest.num_exits, runtime.provider, state.ready_at - state.started_at,
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        state.phase = "failed"
        log.error("cannot serve %s: %s", settings.model_dir, state.load_error)
        if state.on_load_failure is not None:
            state.on_load_failure(state.load_error)


def create_app(settings: ServerSettings) -> FastAPI:
    """Build the application for ``settings``; the model loads when the app starts."""
    state = AppState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(load_model(state), name="load-model")
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if state.service is not None:
                await state.service.stop()

    app = FastAPI(
        title="EED anytime classifier",
        description="Multi-exit image classification: pick an exit by compute budget, latency budget or "
        "confidence. Errors are JSON {error, detail}.",
        version="1",
        lifespan=lifespan,
    )
    app.state.eed = state
    _install_error_handlers(app)
    install_request_ids(app, settings.log_format)  # X-Request-ID in and out, request logs
    app.include_router(oip_router)  # Open Inference Protocol v2: /v2/...
    install_openapi(app)  # the exact, model-aware schema at /openapi.json

    error_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody} for code in (400, 408, 413, 415, 422, 503)
    }

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=error_responses,
        openapi_extra={
            "parameters": CLASSIFY_QUERY_OPENAPI,
            "requestBody": {
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
        },
    )
    async def classify(request: Request) -> Response:
        """Classify the image in the body (raw image bytes, or multipart field ``file``)."""
        arrived = time.perf_counter()
        query = classify_query(request.query_params)  # a 422 here is not counted, as FastAPI's own were not
        top_k = query["top_k"]
        metrics = state.metrics
        exit_label, policy_label, status = "none", "none", 500
        try:
            unknown = sorted(set(request.query_params) - CLASSIFY_PARAMS)
            if unknown:
                raise InvalidParameters(
                    f"unknown query parameter(s) {', '.join(unknown)}; accepted: {', '.join(sorted(CLASSIFY_PARAMS))}"
                )
            requested = params_from_request(query)
            params = effective_params(requested, state.default_params, settings.default_budget_ms)
            policy_label = params.name
            service = state.require_service()
            plan = service.plan(params)
            k = settings.default_top_k if top_k is None else top_k
            if k < 1:
                raise InvalidParameters(f"top_k={k} must be at least 1")
            # The whole body arrives before the request takes an admission slot, so slow
            # uploads wait outside capacity; the read deadline bounds how long they may take.
            data, content_type = await read_body_within(request, settings.max_body_bytes, settings.body_timeout_s)
            with service.admit() as ticket:
                if len(data) > INLINE_DECODE_BYTES:
                    x = await anyio.to_thread.run_sync(state.preprocess, data, content_type)
                else:
                    x = state.preprocess(data, content_type)
                deadline = None if plan.budget_ms is None else arrived + plan.budget_ms / 1e3
                outcome = await service.run(x, plan, ticket, deadline)
            ranked = top_k_classes(outcome.probs, k)
            request_id = state.signer.issue(service.runtime.manifest.name, outcome.exit, ranked[0][0])
            exit_label, status = str(outcome.exit), 200
            elapsed = time.perf_counter() - arrived
            metrics.record_answer(outcome, policy_label, elapsed)
            body = _answer(request_id, outcome, ranked, service.runtime.manifest.classes, policy_label, elapsed)
            return JSONResponse(body)  # X-Request-ID: the correlation id (serving/requestlog.py)
        except ServingError as exc:
            status = exc.status_code
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's convention); not a server error
            raise
        finally:
            metrics.requests.labels(exit_label, policy_label, str(status)).inc()
            request.state.policy, request.state.exit = policy_label, exit_label  # for the request log

    @app.post("/feedback", responses={code: {"model": ErrorBody} for code in (403, 404, 409, 410, 422, 503)})
    async def feedback(item: FeedbackRequest) -> dict[str, Any]:
        """Record the true label of an earlier answer (any replica sharing EED_FEEDBACK_SECRET accepts its id);
        counts it in eed_feedback_total{exit, correct}."""
        service = state.require_service()
        manifest = service.runtime.manifest
        claim = state.signer.verify(item.id)
        if claim.model != manifest.name:
            raise UnknownRequestId(
                f"this id was issued for model {claim.model!r}; this server serves {manifest.name!r}"
            )
        true_label = _class_index(item.label, manifest.classes)
        correct, accuracy = state.feedback.record(claim, true_label)
        state.metrics.record_feedback(claim.exit, correct)
        return {"id": item.id, "exit": claim.exit, "predicted": claim.label, "label": true_label,
                "correct": correct, "live_accuracy": accuracy}

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        """The manifest as served, with the provider, the calibrated policies and live latency estimates."""
        service = state.require_service()
        runtime = service.runtime
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
        # The manifest's calibrated policies, as dumped above; listed again by name for clients.
        policies = (manifest.get("thresholds") or {}).get("policies", {})
        return {
            "manifest": manifest,
            "model_dir": str(runtime.model_dir),
            "provider": runtime.provider,
            "default_policy": settings.default_policy,
            "default_budget_ms": settings.default_budget_ms,
            "policies": policies,
            "latency": {
                "queue_delay_ms": round(service.queue_delay_s() * 1e3, 4),
                "prediction_gap_ms": round(service.prediction_gap.value() * 1e3, 4),
                "half_life_s": settings.estimate_half_life_s,
                "probe_interval_s": settings.probe_interval_s,
            },
            "batching": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
                         "queue_size": settings.queue_size},
            "stage_chain_max_abs_diff": runtime.consistency,
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """The process is up (says nothing about the model)."""
        return {"status": "ok", "phase": state.phase}

    @app.get("/readyz", responses={503: {"model": ErrorBody}})
    async def readyz() -> dict[str, Any]:
        """200 once the model is loaded and every graph is warm; 503 before, if loading failed, and
        from the moment a drain (SIGTERM) begins."""
        if state.draining:
            raise NotReady("the server is draining before it shuts down; send requests to another replica")
        service = state.require_service()
        return {"status": "ready", "model": service.runtime.manifest.name, "provider": service.runtime.provider}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        """Prometheus text exposition of the ``eed_`` metrics."""
        if state.service is not None:
            state.service.publish_estimates()
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _answer(request_id: str, outcome, ranked: list[tuple[int, float]], classes: list[str], policy: str,
            elapsed_s: float) -> dict[str, Any]:
    """The /classify response body (DESIGN §4 keys, plus inference_ms)."""
    label, probability = ranked[0]
    return {
        "id": request_id,
        "exit": outcome.exit,
        "label": label,
        "class_name": classes[label],
        "probability": probability,
        "top_k": [{"label": i, "class_name": classes[i], "probability": p} for i, p in ranked],
        "gflops": outcome.gflops,
        "exits_evaluated": outcome.exits_evaluated,
        "policy": policy,
        "latency_ms": round(elapsed_s * 1e3, 3),
        "inference_ms": round(outcome.seconds * 1e3, 3),
        **({} if outcome.deadline_met is None else {"deadline_met": outcome.deadline_met}),
    }


def _class_index(label: int | str, classes: list[str]) -> int:
    if isinstance(label, int):
        if 0 <= label < len(classes):
            return label
        raise InvalidParameters(f"label={label} is out of range; accepted: 0..{len(classes) - 1} or a class name")
    if label in classes:
        return classes.index(label)
    if label.strip().isdigit():
        return _class_index(int(label.strip()), classes)
    raise InvalidParameters(
        f"label {label!r} is not a class of this model; accepted: 0..{len(classes) - 1} or one of {classes}"
    )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
            problems.append(f"{where or 'request'}: {err.get('msg', 'invalid')}{got}")
        return JSONResponse(
            {"error": InvalidParameters.code, "detail": "; ".join(problems)}, status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: BadRequest.code}
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}; see /docs for the API"
        return JSONResponse({"error": codes.get(exc.status_code, "http_error"), "detail": detail},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"error": "internal_error", "detail": "the server failed on this request; see the server log"},
            status_code=500,
        )
