"""The HTTP application (DESIGN §4): ``create_app(settings)`` builds it.

The model loads in the background once the app starts (:func:`serving.state.load_model`), so
``/healthz`` answers at once and ``/readyz`` turns 200 only when every graph is loaded,
checked and warm. Routes: :mod:`serving.routes` (DESIGN §4) and :mod:`serving.oip` (Open
Inference Protocol v2). Client errors are :mod:`serving.errors` types rendered as
``{"error", "detail"}`` JSON; FastAPI's own validation and routing errors are rendered the
same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import BadRequest, InvalidParameters, ServingError
from .oip import router as oip_router
from .openapi import install as install_openapi
from .requestlog import install as install_request_ids
from .routes import router
from .settings import ServerSettings
from .state import AppState, load_model

log = logging.getLogger("serving")

__all__ = ["AppState", "create_app", "load_model"]


def create_app(settings: ServerSettings) -> FastAPI:
    """Build the application for ``settings``; the model loads when the app starts."""
    state = AppState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
    app.state.eed = state  # what serving.state.app_state hands to every route
    _install_error_handlers(app)
    install_request_ids(app, settings.log_format)  # X-Request-ID in and out, request logs
    app.include_router(router)  # DESIGN §4: /classify, /feedback, /v1/model, health, metrics
    app.include_router(oip_router)  # Open Inference Protocol v2: /v2/...
    install_openapi(app)  # the exact, model-aware schema at /openapi.json
    return app


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
        return JSONResponse({"error": InvalidParameters.code, "detail": "; ".join(problems)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: BadRequest.code}
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}; see /docs for the API"
        return JSONResponse(
            {"error": codes.get(exc.status_code, "http_error"), "detail": detail},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"error": "internal_error", "detail": "the server failed on this request; see the server log"},
            status_code=500,
        )
