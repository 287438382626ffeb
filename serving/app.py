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
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .errors import INTERNAL_ERROR_BODY, BadRequest, InvalidParameters, ServingError, describe_validation_errors
from .oip import router as oip_router
from .openapi import install as install_openapi
from .requestlog import install as install_request_ids
from .requestlog import loggable
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
        # FastAPI's native OpenTelemetry asks the global providers on every request whether it is
        # configured: ~6 % of the event loop's CPU at saturation for nothing when it is not.
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.eed = state  # what serving.state.app_state hands to every route
    _install_error_handlers(app)
    app.include_router(router)  # DESIGN §4: /classify, /feedback, /v1/model, health, metrics
    app.include_router(oip_router)  # Open Inference Protocol v2: /v2/...
    # X-Request-ID in and out and request logs around everything; inside them POST /classify
    # goes straight to its handler (DirectRoutes).
    direct = DirectRoutes(router, {("POST", "/classify")}, app.exception_handlers)
    install_request_ids(app, settings.log_format, inner=direct.around)
    install_openapi(app)  # the exact, model-aware schema at /openapi.json
    return app


class DirectRoutes:
    """ASGI layer that runs the named hot routes' handlers directly, past Starlette's error and
    exception middleware, FastAPI's routing, its per-request dependency solving and its
    request/response wrappers (a third of the event loop's CPU per /classify answer).

    The handlers take the ``Request`` and return a ``Response`` as they do under FastAPI (the
    route stays registered for the OpenAPI document and for other methods); their exceptions
    go to the app's own exception handlers, looked up by class as Starlette does, so errors
    look the same either way. Every other request goes down the normal stack, a HEAD as a GET.
    """

    def __init__(self, router: APIRouter, routes: set[tuple[str, str]], handlers: dict) -> None:
        self.app: Any = None  # the app's own stack: around()
        self.handlers = handlers  # the app's exception handlers (the dict itself: filled before requests)
        self.routes = {
            (method, route.path): route
            for route in router.routes
            if isinstance(route, APIRoute)
            for method in route.methods or ()
            if (method, route.path) in routes
        }
        missing = routes - set(self.routes)
        if missing:
            raise ValueError(f"no such routes to serve directly: {sorted(missing)}")

    def around(self, app) -> DirectRoutes:
        """This layer in front of ``app`` (the stack everything else goes down)."""
        self.app = app
        return self

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            # HEAD is GET without the body (RFC 9110 §9.3.2; uptime monitors send it to /healthz):
            # the routes see a GET in a copy of the scope, and uvicorn, which parsed a HEAD, leaves
            # the body out and keeps the GET's Content-Length.
            scope = {**scope, "method": "GET"}
        route = None
        if scope["type"] == "http" and not scope.get("root_path"):
            route = self.routes.get((scope["method"], scope["path"]))
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # for the request log, as Starlette's router sets it
        request = Request(scope, receive, send)
        response: Response
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            handler = next(self.handlers[c] for c in type(exc).__mro__ if c in self.handlers)
            response = await handler(request, exc)
        await response(scope, receive, send)


class _LoggedOnce(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" for an error the app's 500 handler logged.

    Starlette re-raises an error after its handler has answered, and uvicorn logs it again: one bug
    gave two tracebacks, the second without the request id (its context has ended by then).
    An error that never reached the handler keeps uvicorn's record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not getattr(error, "__eed_logged__", False)


_LOGGED_ONCE = _LoggedOnce()


def _install_error_handlers(app: FastAPI) -> None:
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if _LOGGED_ONCE not in uvicorn_errors.filters:
        uvicorn_errors.addFilter(_LOGGED_ONCE)

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = describe_validation_errors(exc.errors())
        return JSONResponse({"error": InvalidParameters.code, "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: BadRequest.code}
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}; see /docs for the API"
        if request.url.path.startswith("/v2/") or request.url.path == "/v2":
            # The Open Inference Protocol's error body: the message itself under "error".
            return JSONResponse({"error": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))
        return JSONResponse(
            {"error": codes.get(exc.status_code, "http_error"), "detail": detail},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, loggable(request.url.path))
        exc.__eed_logged__ = True  # type: ignore[attr-defined]  # see _LoggedOnce
        # Starlette re-raises the error after this answer and uvicorn then closes the connection:
        # say so, or a client reusing it meets a reset on its next request.
        return JSONResponse(INTERNAL_ERROR_BODY, status_code=500, headers={"Connection": "close"})
