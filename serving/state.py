"""What every route shares (:class:`AppState`), how the model gets into it (:func:`load_model`),
and the dependency that hands it to a route (:data:`State`).

The model loads in the background once the app starts, so ``/healthz`` answers at once and
``/readyz`` turns 200 only when every graph is loaded, checked, warm and calibrated.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from . import cascade
from .errors import NotReady, ServingError
from .feedback import AnswerSigner, FeedbackStore
from .fused import attach_fused_cascade
from .images import Preprocessor
from .memo import Memo
from .metrics import ServingMetrics
from .policy import PolicyParams, effective_params
from .runtime import ModelRuntime, SessionOptions
from .service import InferenceService
from .settings import ServerSettings
from .transport import WriteHold

log = logging.getLogger("serving")


class AppState:
    """Everything the routes share; ``service`` and ``preprocess`` are None until the model is ready."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = ServingMetrics()
        self.feedback = FeedbackStore(settings.feedback_capacity, settings.feedback_max_age_s)
        secret = settings.feedback_secret
        self.signer = AnswerSigner(secret.get_secret_value().encode() if secret else None, settings.feedback_max_age_s)
        self.default_params: PolicyParams = settings.default_policy_params
        # /classify query string → (policy parameters, top_k), once parsed and valid.
        self.parsed_queries: Memo[bytes, tuple[PolicyParams, int]] = Memo()
        self.runtime: ModelRuntime | None = None
        self.service: InferenceService | None = None
        self.preprocess: Preprocessor | None = None
        self.load_error: str | None = None
        # How confidence cascades run, and why (serving/fused.py chooses at load).
        self.cascade_graph: str | None = None
        self.phase = "starting"
        self.started_at = time.time()
        self.ready_at: float | None = None
        # Set on SIGTERM (serving/drain.py): /readyz answers 503 while requests are still served.
        self.draining = False
        # Every connection's writes held while a batch's handlers run: the HTTP protocol writes
        # through it (serving/transport.py), the service says when a batch's results are out.
        self.write_hold = WriteHold()
        # Called with the error message when loading fails; the CLI uses it to exit.
        self.on_load_failure: Callable[[str], None] | None = None

    def require_service(self) -> InferenceService:
        """The inference service, or :class:`NotReady` (503) saying why there is none yet."""
        if self.service is None:
            if self.load_error:
                raise NotReady(f"model failed to load: {self.load_error}")
            raise NotReady(f"model is not ready yet ({self.phase}); poll GET /readyz")
        return self.service

    def require_model(self) -> tuple[InferenceService, Preprocessor]:
        """The service and the image preprocessor, both set together once the model is ready."""
        service = self.require_service()
        assert self.preprocess is not None  # set before service in load_model
        return service, self.preprocess


def state_of(request: Request) -> AppState:
    """The application's :class:`AppState` (set by ``create_app``)."""
    return request.app.state.eed


# Scope keys the server's HTTP protocol (serving/fastpath.py) sets for the routes that need them.
# When the request's first bytes were parsed: a deadline counts from the request's arrival (DESIGN
# §4), and under load the task that runs the route starts milliseconds later (64 connections: p50
# 3 ms, up to 26), which answers reported as in time did not count.
ARRIVED = "eed.arrived"
# POST /classify taking the ASGI way: a callable saying whether its client has left — uvicorn's
# cycle knows without the route awaiting ``receive`` (which would yield: see routes.answer_classify).
CLIENT_GONE = "eed.client_gone"


def arrived_at(request: Request) -> float:
    """The ``time.perf_counter()`` at which ``request`` arrived (now, under another server)."""
    return request.scope.get(ARRIVED) or time.perf_counter()


async def app_state(request: Request) -> AppState:
    """FastAPI dependency: the application's :class:`AppState`.

    ``async`` on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, a thread
    hop on every request (py-spy put it at a tenth of the event loop's samples). The two
    inference routes (``/classify``, OIP ``infer``) call :func:`state_of` instead: they skip
    FastAPI's per-request dependency solving, as they skip it for their parameters."""
    return state_of(request)


State = Annotated[AppState, Depends(app_state)]


async def load_model(state: AppState) -> None:
    """Load, check, warm and calibrate the model, then start serving it."""
    settings = state.settings
    loop = asyncio.get_running_loop()
    options = SessionOptions.from_settings(settings)
    try:
        state.phase = "loading graphs"
        runtime = await loop.run_in_executor(None, ModelRuntime.load, settings.model_dir, options)
        calibrated = runtime.manifest.thresholds
        if calibrated is not None and calibrated.policies and calibrated.rule != cascade.RULE:
            # The server applies its own rule; the manifest's figures describe the one it was calibrated under.
            log.warning(
                "%s was calibrated under another cascade rule (%r); this server applies %r, so the policies' "
                "recorded figures may differ slightly from its answers: python -m training.calibrate %s",
                settings.model_dir,
                calibrated.rule,
                cascade.RULE,
                settings.model_dir,
            )
        state.phase = "warming up"
        await loop.run_in_executor(None, runtime.warm_up, settings.max_batch_size, settings.warmup_runs)
        await loop.run_in_executor(None, runtime.check_consistency)
        await loop.run_in_executor(None, runtime.choose_lone_sessions, options)
        state.cascade_graph = await loop.run_in_executor(
            None, attach_fused_cascade, runtime, settings.cascade_graph, options, settings.max_batch_size
        )
        state.phase = "calibrating latency"
        timings = await loop.run_in_executor(
            None, runtime.calibrate, settings.calibration_runs, (1, settings.max_batch_size)
        )
        service = InferenceService.from_settings(runtime, state.metrics, settings, state.write_hold)
        service.seed_latency(timings)
        # A default policy the model cannot satisfy (exit:7 on 3 exits, a budget below
        # exit 1) is a configuration error: fail now, not on the first request.
        try:
            service.plan(effective_params(PolicyParams(), state.default_params, settings.default_budget_ms))
        except ServingError as exc:
            what = f"default_policy {settings.default_policy!r}"
            if settings.default_budget_ms is not None:  # a plain request runs under both
                what += f" with default_budget_ms={settings.default_budget_ms:g}"
            raise ValueError(f"{what} does not fit this model: {exc.detail}") from None
        await service.start()
        state.metrics.describe_model(runtime.manifest, runtime.provider)
        state.metrics.describe_build(runtime.manifest, admitted=lambda: service.inflight, limit=settings.queue_size)
        state.runtime = runtime
        state.preprocess = Preprocessor.from_spec(runtime.manifest.input, settings.max_pixels)
        state.service = service
        # Everything loaded so far (modules, sessions, the app) lives as long as the server:
        # out of the collector's sight, a full collection under load no longer walks it
        # (36 ms once every few seconds at saturation on the full-width export, with every
        # request in flight waiting; ~1 ms frozen).
        gc.collect()
        gc.freeze()
        state.phase = "ready"
        state.ready_at = time.time()
        state.metrics.ready.set(0 if state.draining else 1)  # a SIGTERM during the load came first
        log.info(
            "model %s ready: %d exits on %s, %.1f s after start",
            runtime.manifest.name,
            runtime.manifest.num_exits,
            runtime.provider,
            state.ready_at - state.started_at,
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        state.phase = "failed"
        log.error("cannot serve %s: %s", settings.model_dir, state.load_error)
        if state.on_load_failure is not None:
            state.on_load_failure(state.load_error)
